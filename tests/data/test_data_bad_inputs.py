"""Bad data for `prepare`, `train` and `eval`: one `error:` line, exit status 2, nothing written."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from rwkv_disha.cli import main
from rwkv_disha.data.binidx import BinIdx, write_binidx
from rwkv_disha.data.dataset import make_dataset

DEEP = "[" * 200_000 + "]" * 200_000
BAD_LINES = [
    (DEEP, "not readable JSON (nested too deeply)"),
    ('{"text": "a\\ud800b"}', "the text holds \\ud800, a lone surrogate (not valid Unicode)"),
    ('{"text": ' + "7" * 5000 + "}", "not readable JSON (a number with more than 4300 digits)"),
]


def listing(folder) -> dict[str, bytes]:
    return {
        os.path.relpath(os.path.join(d, f), folder): open(os.path.join(d, f), "rb").read()
        for d, _, files in os.walk(folder)
        for f in files
    }


def one_error_line(capsys, rc: int) -> str:
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err.strip()


def bad_jsonl(tmp_path, line: str):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"text": "fine"}) + "\n" + line + "\n" + json.dumps({"text": "after"}) + "\n")
    return path


def prepare_argv(inputs, output, *extra) -> list[str]:
    return ["prepare", "--input", *map(str, inputs), "--output", str(output), "--workers", "1", *extra]


@pytest.mark.parametrize("line,why", BAD_LINES, ids=["deep", "surrogate", "digits"])
def test_prepare_names_file_and_line(tmp_path, capsys, line, why):
    src = bad_jsonl(tmp_path, line)
    before = listing(tmp_path)
    err = one_error_line(capsys, main(prepare_argv([src], tmp_path / "out")))
    assert err.startswith(f"error: {src}:2: {why}; fix the line")
    assert listing(tmp_path) == before


@pytest.mark.parametrize("line,why", BAD_LINES, ids=["deep", "surrogate", "digits"])
def test_training_jsonl_reader_names_file_and_line(tmp_path, line, why, one_line_error):
    src = bad_jsonl(tmp_path, line)
    msg = one_line_error(
        make_dataset, str(src), "jsonl", "pad", 16, 1, 0, "pad", 0, 65536, match=f"{src}:2: "
    )
    assert msg.startswith(f"{src}:2: {why}")


def test_train_and_eval_cli_jsonl_errors(tmp_path, capsys, tiny_model_path):
    src = bad_jsonl(tmp_path, BAD_LINES[1][0])
    proj = tmp_path / "proj"
    train = ["train", "--load_model", str(tiny_model_path), "--proj_dir", str(proj),
             "--data_file", str(src), "--data_type", "jsonl", "--ctx_len", "16", "--micro_bsz", "1",
             "--accelerator", "cpu"]  # fmt: skip
    before = listing(tmp_path)
    assert f"{src}:2: the text holds" in one_error_line(capsys, main(train))
    evaluate = ["eval", "--load_model", str(tiny_model_path), "--data_file", str(src), "--data_type", "jsonl"]
    assert f"{src}:2: the text holds" in one_error_line(capsys, main(evaluate))
    assert listing(tmp_path) == before


def test_json_array_file_too_deep(tmp_path, capsys):
    src = tmp_path / "d.json"
    src.write_text(DEEP)
    err = one_error_line(capsys, main(prepare_argv([src], tmp_path / "out")))
    assert f"{src}: not readable JSON (nested too deeply); expected a JSON array of records" in err
    assert sorted(os.listdir(tmp_path)) == ["d.json"]


# --- no token counts toward the loss --------------------------------------------------------------------
def test_user_only_chats_with_loss_mask_qa(tmp_path, one_line_error):
    src = tmp_path / "c.jsonl"
    src.write_text(
        "".join(json.dumps({"messages": [{"role": "user", "content": f"q{i}"}]}) + "\n" for i in range(3))
    )
    one_line_error(
        make_dataset, str(src), "jsonl", "pad", 16, 1, 0, "qa", 0, 65536,
        match=r"^--loss_mask qa: no token of .*c\.jsonl counts toward the loss \(no answer tokens",
    )  # fmt: skip
    assert len(make_dataset(str(src), "jsonl", "pad", 16, 1, 0, "pad", 0, 65536)) == 3  # pad: all count


def test_answers_beyond_ctx_len(tmp_path, one_line_error):
    src = tmp_path / "qa.jsonl"
    src.write_text(json.dumps({"question": "a long question " * 20, "answer": "yes"}) + "\n")
    one_line_error(make_dataset, str(src), "jsonl", "pad", 8, 1, 0, "qa", 0, 65536, match="first ctx_len = 8")
    assert len(make_dataset(str(src), "jsonl", "pad", 200, 1, 0, "qa", 0, 65536)) == 1


def zero_mask_data(tmp_path, answer_at: int | None = None) -> str:
    """binidx data (ids < 100) with an answer-mask sidecar that is all zero, or 1 at one position."""
    docs = [np.arange(1, 11, dtype=np.int32) for _ in range(4)]
    masks = [np.zeros(10, np.uint8) for _ in range(4)]
    if answer_at is not None:
        masks[3][answer_at] = 1
    prefix = str(tmp_path / "z")
    write_binidx(prefix, docs)
    write_binidx(prefix + ".mask", masks, np.uint8)
    return prefix


@pytest.mark.parametrize("dataload", ["pad", "get"])
def test_all_masked_binidx(tmp_path, one_line_error, dataload):
    prefix = zero_mask_data(tmp_path)
    one_line_error(
        make_dataset, prefix, "binidx", dataload, 4, 1, 0, "qa", 0, 100, match="counts toward the loss"
    )


def test_one_answer_token_is_enough_and_position_zero_is_not(tmp_path, one_line_error):
    ok = make_dataset(zero_mask_data(tmp_path / "a", answer_at=4), "binidx", "pad", 8, 1, 0, "qa", 0, 100)
    assert sum(float(ok.sample(s)["mask"].sum()) for s in range(4)) == 1.0
    # the first token of a document is never a label; position 9 is cut off by ctx_len 8 (labels 1..8)
    for at in (0, 9):
        prefix = zero_mask_data(tmp_path / f"b{at}", answer_at=at)
        one_line_error(make_dataset, prefix, "binidx", "pad", 8, 1, 0, "qa", 0, 100, match="counts toward")


def test_documents_of_one_token(tmp_path, one_line_error):
    prefix = str(tmp_path / "one")
    write_binidx(prefix, [np.array([5], np.int32)] * 3)
    one_line_error(make_dataset, prefix, "binidx", "pad", 4, 1, 0, "pad", 0, 100, match="fewer than 2 tokens")


def test_train_and_eval_cli_refuse_all_masked(tmp_path, capsys, tiny_model_path):
    (tmp_path / "d").mkdir()
    prefix = zero_mask_data(tmp_path / "d")
    proj = tmp_path / "proj"
    common = ["--data_file", prefix, "--loss_mask", "qa", "--ctx_len", "8"]
    before = listing(tmp_path)
    train = ["train", "--load_model", str(tiny_model_path), "--proj_dir", str(proj), *common,
             "--micro_bsz", "1", "--accelerator", "cpu"]  # fmt: skip
    assert "--loss_mask qa: no token of" in one_error_line(capsys, main(train))
    evaluate = ["eval", "--load_model", str(tiny_model_path), *common]
    assert "--loss_mask qa: no token of" in one_error_line(capsys, main(evaluate))
    assert listing(tmp_path) == before


# --- where prepare writes -------------------------------------------------------------------------------
def small_input(tmp_path, n: int = 3):
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"text": f"document number {i}"}) + "\n" for i in range(n)))
    return src


def test_output_or_input_a_directory(tmp_path, capsys):
    src = small_input(tmp_path)
    (tmp_path / "outdir").mkdir()
    before = listing(tmp_path)
    err = one_error_line(capsys, main(prepare_argv([src], tmp_path / "outdir")))
    assert f"--output {tmp_path / 'outdir'} is a directory; give a prefix inside it" in err
    err = one_error_line(capsys, main(prepare_argv([tmp_path / "outdir"], tmp_path / "o")))
    assert f"--input {tmp_path / 'outdir'} is a directory" in err
    assert listing(tmp_path) == before


def test_read_only_location(tmp_path, capsys, small_fs):
    src = small_input(tmp_path)
    if os.geteuid() == 0:
        ro = small_fs("1m", read_only=True)
    else:
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o555)
    err = one_error_line(capsys, main(prepare_argv([src], ro / "out")))
    assert f"--output {ro / 'out.bin'}: {ro} is not writable" in err
    assert os.listdir(ro) == []


def test_full_disk_leaves_nothing(tmp_path, capsys, small_fs):
    full = small_fs("1m")
    src = tmp_path / "big.jsonl"
    rng = np.random.default_rng(0)
    words = ["".join(chr(c) for c in rng.integers(0x4E00, 0x9FFF, 30)) for _ in range(400)]
    src.write_text(
        "".join(json.dumps({"text": " ".join(words[i : i + 50])}) + "\n" for i in range(0, 400, 2)) * 4
    )
    err = one_error_line(capsys, main(prepare_argv([src], full / "out")))
    assert err == f"error: cannot write {full / 'out'}.bin: no space left on the device"
    assert os.listdir(full) == []


def test_stale_temps_of_killed_runs_are_cleaned(tmp_path, capsys):
    src = small_input(tmp_path)
    dead = 999_999_999  # no process has this pid
    stale = [
        f".out.bin.{dead}.x1y2.tmp",
        f".out.idx.{dead}.x1y2.tmp",
        f"out.bin.tmp-{dead}",
        f"out.idx.tmp-{dead}",
    ]
    for name in stale:
        (tmp_path / name).write_bytes(b"half written")
    (tmp_path / f"notes.tmp-{dead}").write_bytes(b"not ours")  # not a binidx temporary: kept
    assert main(prepare_argv([src], tmp_path / "out")) == 0
    assert sorted(os.listdir(tmp_path)) == ["in.jsonl", f"notes.tmp-{dead}", "out.bin", "out.idx"]
    assert len(BinIdx(tmp_path / "out")) == 3


def test_second_run_while_the_output_is_locked(tmp_path, capsys):
    from rwkv_disha.data.prepare import output_lock

    src = small_input(tmp_path)
    with output_lock(str(tmp_path / "out")):
        before = listing(tmp_path)
        err = one_error_line(capsys, main(prepare_argv([src], tmp_path / "out")))
        assert (
            f"{tmp_path / 'out'}.bin/.idx is being written by rwkv-disha prepare (pid {os.getpid()})" in err
        )
        assert listing(tmp_path) == before
    assert os.listdir(tmp_path) == ["in.jsonl"]  # the lock file goes with its holder
    assert main(prepare_argv([src], tmp_path / "out")) == 0


SLOW_PREPARE = textwrap.dedent(
    """
    import sys, time
    import rwkv_disha.data.prepare as prep
    from rwkv_disha.cli import main

    encode = prep.encode_items
    def slow(*args, **kw):  # hold the output long enough for the other run to meet it
        time.sleep(1.5)
        return encode(*args, **kw)
    prep.encode_items = slow
    sys.exit(main(sys.argv[1:]))
    """
)


def test_two_runs_at_once_one_succeeds(tmp_path):
    src = small_input(tmp_path)
    argv = prepare_argv([src], tmp_path / "out", "--progress", "0")
    procs = [
        subprocess.Popen([sys.executable, "-c", SLOW_PREPARE, *argv], stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    results = [(p.wait(timeout=120), p.stderr.read()) for p in procs]
    assert sorted(rc for rc, _ in results) == [0, 2], results
    err = next(e for rc, e in results if rc == 2)
    assert err.count("\n") == 1 and (
        "is being written by rwkv-disha prepare (pid" in err or "already exists" in err
    )
    assert sorted(os.listdir(tmp_path)) == ["in.jsonl", "out.bin", "out.idx"]
    assert len(BinIdx(tmp_path / "out")) == 3


def test_failing_mask_sidecar_publishes_nothing(tmp_path, capsys, monkeypatch):
    """Token files and answer masks are both complete on disk before either is renamed into place."""
    import errno

    from rwkv_disha.data.binidx import BinIdxWriter

    write_index = BinIdxWriter._write_index

    def full_for_masks(self):
        if self.prefix.endswith(".mask"):
            raise OSError(errno.ENOSPC, "No space left on device")
        write_index(self)

    monkeypatch.setattr(BinIdxWriter, "_write_index", full_for_masks)
    src = tmp_path / "qa.jsonl"
    src.write_text(json.dumps({"question": "q", "answer": "a"}) + "\n")
    err = one_error_line(capsys, main(prepare_argv([src], tmp_path / "out")))
    assert err == f"error: cannot write {tmp_path / 'out.mask'}.idx: no space left on the device"
    assert os.listdir(tmp_path) == ["qa.jsonl"]


@pytest.mark.parametrize("workers", ["100000", "99999999999999999999999"])
def test_workers_far_above_the_cores_are_refused_before_any_work(tmp_path, capsys, workers):
    src = small_input(tmp_path)
    argv = ["prepare", "--input", str(src), "--output", str(tmp_path / "o" / "wh"), "--workers", workers]
    err = one_error_line(capsys, main(argv))
    assert f"--workers {workers} is more than" in err and "per core" in err
    assert sorted(os.listdir(tmp_path)) == ["in.jsonl"]


def test_workers_never_outnumber_the_chunks(tmp_path, monkeypatch):
    """A small input is one chunk: it is tokenized in-process however many workers were asked for."""
    from rwkv_disha.data import prepare as prep

    monkeypatch.setattr(prep, "_cpu_count", lambda: 8)
    src = small_input(tmp_path)
    stats = prep.prepare(
        prep.Config(input=[str(src)], output=str(tmp_path / "out"), workers=32, progress=False)
    )
    assert stats.workers == 1 and stats.documents == 3
    # several small files are a small input too (each file used to count as a chunk: two tiny files
    # started a pool of two processes)
    more = [tmp_path / f"more{i}.jsonl" for i in range(3)]
    for i, p in enumerate(more):
        p.write_text(json.dumps({"text": f"t{i}"}) + "\n")
    srcs = [str(src)] + [str(p) for p in more]
    stats = prep.prepare(prep.Config(input=srcs, output=str(tmp_path / "out2"), workers=32, progress=False))
    assert stats.workers == 1 and stats.documents == 6


@pytest.mark.parametrize("content", [b'{"text": "fine"}\n\xff\xfe\n', b""])
def test_a_failed_run_leaves_no_folders_it_created(tmp_path, capsys, content):
    src = tmp_path / "in.jsonl"
    src.write_bytes(content)
    (tmp_path / "nd1").mkdir()  # existed before the run: kept
    one_error_line(capsys, main(prepare_argv([src], tmp_path / "nd1" / "sub" / "deeper" / "x")))
    assert sorted(os.listdir(tmp_path)) == ["in.jsonl", "nd1"]
    assert os.listdir(tmp_path / "nd1") == []
    one_error_line(capsys, main(prepare_argv([src], tmp_path / "nd2" / "x")))
    assert sorted(os.listdir(tmp_path)) == ["in.jsonl", "nd1"]


def test_a_successful_run_creates_the_missing_folders(tmp_path, capsys):
    src = small_input(tmp_path)
    assert main(prepare_argv([src], tmp_path / "a" / "b" / "out")) == 0
    assert sorted(os.listdir(tmp_path / "a" / "b")) == ["out.bin", "out.idx"]  # the lock file is gone


def test_the_lock_file_is_removed_after_an_error(tmp_path, capsys):
    src = bad_jsonl(tmp_path, "{not json")
    one_error_line(capsys, main(prepare_argv([src], tmp_path / "out")))
    assert sorted(os.listdir(tmp_path)) == ["d.jsonl"]


def test_an_empty_text_key_is_refused_before_reading(tmp_path, capsys):
    src = small_input(tmp_path)
    err = one_error_line(capsys, main(prepare_argv([src], tmp_path / "out", "--text_key", "")))
    assert err.startswith("error: --text_key must not be empty")
    assert sorted(os.listdir(tmp_path)) == ["in.jsonl"]


def test_a_control_character_in_a_string_is_named_once(tmp_path, capsys):
    src = bad_jsonl(tmp_path, '{"text": "a\x00b"}')
    err = one_error_line(capsys, main(prepare_argv([src], tmp_path / "out")))
    assert "(Invalid control character at column 12)" in err and "at at" not in err, err


@pytest.mark.parametrize("name", ["p.idx", "p.bin", "p.mask.bin", "p.mask.idx"])
def test_prepare_never_writes_over_its_input(tmp_path, capsys, name):
    """Even with --overwrite 1: an input among PREFIX.bin/.idx/.mask.* would be replaced (or removed)."""
    src = tmp_path / name
    src.write_text('{"text": "hello"}\n')
    rc = main(["prepare", "--input", str(src), "--output", str(tmp_path / "p"), "--overwrite", "1"])
    assert "is one of the files --output" in one_error_line(capsys, rc)
    assert listing(tmp_path) == {name: b'{"text": "hello"}\n'}


def test_a_float_binidx_is_refused_not_truncated(tmp_path, one_line_error):
    """Code 6 (float32) is a valid binidx dtype, but ids 17.5 would silently train as 17."""
    prefix = tmp_path / "f"
    write_binidx(prefix, [np.array([1.5, 17.5, 3.0, 0.0], dtype=np.float32)] * 4, dtype=np.float32)
    one_line_error(
        make_dataset, str(prefix), "binidx", "pad", 8, 1, 1, "pad", 0, 100,
        match="declares float32 values .* token ids must be integers",
    )  # fmt: skip


@pytest.mark.parametrize("dtype,value", [(np.float32, np.nan), (np.int32, -5), (np.float64, 0.5)])
def test_an_answer_mask_sidecar_that_is_not_uint8_is_refused(tmp_path, one_line_error, dtype, value):
    """Mask values weight the loss: NaN made every loss NaN, -5 trained away from the answers."""
    docs = [np.arange(1, 11, dtype=np.int32) for _ in range(4)]
    prefix = str(tmp_path / "w")
    write_binidx(prefix, docs)
    write_binidx(prefix + ".mask", [np.full(10, value, dtype) for _ in docs], dtype)
    one_line_error(
        make_dataset, prefix, "binidx", "pad", 8, 1, 0, "qa", 0, 100,
        match=f"w.mask.idx declares {np.dtype(dtype).name} values .* answer masks are uint8",
    )  # fmt: skip


def test_an_answer_mask_byte_above_one_counts_once(tmp_path):
    """A hand-made uint8 sidecar holding 200 for an answer token: that token counts as 1, not 200 times."""
    docs = [np.arange(1, 11, dtype=np.int32) for _ in range(4)]
    prefix = str(tmp_path / "b")
    write_binidx(prefix, docs)
    write_binidx(prefix + ".mask", [np.full(10, 200, np.uint8) for _ in docs], np.uint8)
    ds = make_dataset(prefix, "binidx", "pad", 16, 1, 0, "qa", 0, 100)
    assert set(ds[0]["mask"].tolist()) == {0.0, 1.0} and float(ds[0]["mask"].sum()) == 9.0


def test_a_bom_of_a_text_file_is_no_token(tmp_path, capsys):
    """A UTF-8 BOM (Windows editors write one) starting a text input: prepare and --data_type utf-8 both
    skip it; prepare used to keep it as a token of its own at the start of the first document."""
    from rwkv_disha.data.sources import load_text

    src = tmp_path / "notes.txt"
    src.write_bytes(b"\xef\xbb\xbfhello\r\n\r\nworld\r\n")
    assert main(prepare_argv([src], tmp_path / "p", "--progress", "0")) == 0
    prepared = BinIdx(tmp_path / "p")
    read, _, _ = load_text(str(src), "utf-8")
    plain = tmp_path / "plain.txt"
    plain.write_text("hello\n\nworld\n")
    assert main(prepare_argv([plain], tmp_path / "q", "--progress", "0")) == 0
    want = [BinIdx(tmp_path / "q").doc(i).tolist() for i in range(2)]
    assert [prepared.doc(i).tolist() for i in range(len(prepared))] == want
    assert [read.doc(i).tolist() for i in range(len(read))] == want


def test_a_bom_of_a_text_prompt_file_is_no_prompt_text(tmp_path):
    from rwkv_disha.generate import read_prompts

    path = tmp_path / "prompts.txt"
    path.write_bytes(b"\xef\xbb\xbfHello\r\n\r\nWorld\r\n")
    assert read_prompts(str(path)) == ["Hello", "World"]
