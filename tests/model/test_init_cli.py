"""`rwkv-disha init`: refuses to replace a file, refuses nonsense shapes, writes atomically."""

import math
import os
import time

import pytest

from rwkv_disha.cli import main
from rwkv_disha.model.init import make_config, parameter_count
from rwkv_disha.model.load import load_model


def run_init(capsys, *args: str) -> tuple[int, str]:
    rc = main(["init", *args])
    return rc, capsys.readouterr().err


def assert_one_error_line(rc: int, err: str, text: str) -> None:
    assert rc == 2
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    assert text in err, err


def test_refuses_an_existing_file_without_overwrite(tmp_path, capsys):
    out = tmp_path / "m.pth"
    out.write_bytes(b"an earlier model")
    rc, err = run_init(capsys, "--output", str(out), "--n_embd", "64", "--vocab_size", "50")
    assert_one_error_line(
        rc, err, f"--output {out} already exists: choose another name or pass --overwrite 1"
    )
    assert out.read_bytes() == b"an earlier model"
    assert [p.name for p in tmp_path.iterdir()] == ["m.pth"]

    rc, _ = run_init(capsys, "--output", str(out), "--n_embd", "64", "--vocab_size", "50", "--overwrite", "1")
    assert rc == 0
    assert load_model(out).config.vocab_size == 50
    assert [p.name for p in tmp_path.iterdir()] == ["m.pth"]  # no temporary file left


@pytest.mark.parametrize(
    "args,text",
    [
        (["--head_size", "0"], "--head_size must be a positive integer (64 in every release), got 0"),
        (["--head_size", "-64"], "--head_size must be a positive integer (64 in every release), got -64"),
        (["--n_layer", "0"], "--n_layer must be a positive integer, got 0"),
        (["--n_embd", "-128"], "--n_embd must be a positive integer, got -128"),
        (["--vocab_size", "0"], "--vocab_size must be a positive integer, got 0"),
        (["--n_embd", "96", "--head_size", "64"], "n_embd 96 must be a multiple of head_size 64"),
        (["--seed", "-1"], "--seed must be in [0, 2**64), got -1"),
        (["--n_layer", "4000", "--n_embd", "65536"], "GiB of memory to write"),
        (["--version", "x099"], "--version: invalid choice: 'x099' (choose from 'x070', 'x060', 'x052')"),
        (["--version", "x060", "--n_embd", "96"], "n_embd 96 must be a multiple of head_size 64"),
    ],
)
def test_nonsense_shapes_are_one_line_and_write_nothing(tmp_path, capsys, args, text):
    rc, err = run_init(capsys, "--output", str(tmp_path / "m.pth"), *args)
    assert_one_error_line(rc, err, text)
    assert list(tmp_path.iterdir()) == []


def test_output_that_is_a_directory(tmp_path, capsys):
    rc, err = run_init(capsys, "--output", str(tmp_path))
    assert_one_error_line(rc, err, f"--output {tmp_path} is a directory")


def read_only_folder(tmp_path, small_fs):
    if os.geteuid() == 0:  # root writes through permission bits: use a read-only file system
        return small_fs("1m", read_only=True)
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    return ro


def test_read_only_folder(tmp_path, capsys, small_fs):
    ro = read_only_folder(tmp_path, small_fs)
    rc, err = run_init(capsys, "--output", str(ro / "m.pth"), "--n_embd", "64", "--vocab_size", "50")
    assert_one_error_line(rc, err, "is not writable")
    assert list(ro.iterdir()) == []


def test_full_disk(capsys, small_fs):
    full = small_fs("1m")
    args = ["--output", str(full / "m.pth"), "--n_embd", "256", "--vocab_size", "2000"]  # ~6 MB
    rc, err = run_init(capsys, *args)
    assert_one_error_line(rc, err, f"cannot write model {full / 'm.pth'}: no space left on the device")
    assert list(full.iterdir()) == []


def test_stale_temp_of_a_killed_init_is_cleaned(tmp_path, capsys):
    stale = tmp_path / ".m.pth.999999999.abcd.tmp"  # no process has this pid
    stale.write_bytes(b"half a model")
    rc, _ = run_init(capsys, "--output", str(tmp_path / "m.pth"), "--n_embd", "64", "--vocab_size", "50")
    assert rc == 0
    assert [p.name for p in tmp_path.iterdir()] == ["m.pth"]


def test_parameter_count_matches_the_written_model(tmp_path, capsys):
    out = tmp_path / "m.pth"
    rc, _ = run_init(capsys, "--output", str(out), "--n_layer", "3", "--n_embd", "64", "--vocab_size", "70")
    assert rc == 0
    n = sum(p.numel() for p in load_model(out).parameters())
    assert n == parameter_count(make_config(3, 64, 70))


@pytest.mark.parametrize("version,name", [("x060", "RWKV-6"), ("x052", "RWKV-5.2")])
def test_version_flag_writes_that_version(tmp_path, capsys, version, name):
    out = tmp_path / "m.pth"
    assert main(["init", "--version", version, "--output", str(out), "--n_layer", "2", "--n_embd", "64"]) == 0
    assert f"{name} L2 C64" in capsys.readouterr().out
    model = load_model(out)
    assert model.config.version == version
    n = sum(p.numel() for p in model.parameters())
    assert n == parameter_count(make_config(2, 64, 65536, 64, version))


@pytest.mark.parametrize("version", ["x070", "x060", "x052"])
@pytest.mark.parametrize("n_layer", [1, 2, 3, 7])
def test_parameter_count_is_the_layout_total(version, n_layer):
    from rwkv_disha.model.registry import get_version

    cfg = make_config(n_layer, 128, 300, 64, version)
    shapes = get_version(version).tensor_shapes(cfg)
    assert len(shapes) > 0 and parameter_count(cfg) == sum(math.prod(s) for s in shapes.values())


@pytest.mark.parametrize("n_layer", ["99999999999999999999999", "1000000"])
def test_an_absurd_n_layer_is_refused_at_once(tmp_path, capsys, n_layer):
    t0 = time.perf_counter()
    rc, err = run_init(
        capsys, "--output", str(tmp_path / "bi.pth"), "--n_layer", n_layer, "--n_embd", "64",
        "--vocab_size", "256", "--head_size", "32",
    )  # fmt: skip
    assert_one_error_line(rc, err, "choose a smaller --n_layer / --n_embd")
    assert time.perf_counter() - t0 < 5
    assert list(tmp_path.iterdir()) == []


def test_a_too_big_vocab_names_vocab_size(tmp_path, capsys):
    rc, err = run_init(
        capsys, "--output", str(tmp_path / "m.pth"), "--n_embd", "64", "--vocab_size", "99999999999"
    )
    assert_one_error_line(rc, err, "choose a smaller --vocab_size / --n_embd")
