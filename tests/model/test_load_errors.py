"""Every way a model file can be wrong gives one line naming the problem and the fix."""

import pytest
import torch

from rwkv_disha import RWKVDishaError, load_model
from rwkv_disha.cli import main
from rwkv_disha.model.init import init_state_dict
from rwkv_disha.model.load import infer_config, load_state_dict, save_state_dict


class Payload:  # anything that needs pickled code to rebuild
    def __reduce__(self):
        return (print, ("this must never run",))


def one_line(exc: pytest.ExceptionInfo) -> str:
    msg = str(exc.value)
    assert "\n" not in msg
    return msg


def test_missing_file(tmp_path):
    with pytest.raises(RWKVDishaError, match="model file not found: .*nope.pth") as e:
        load_model(tmp_path / "nope.pth")
    one_line(e)


def test_directory(tmp_path):
    with pytest.raises(RWKVDishaError, match="is a directory"):
        load_model(tmp_path)


@pytest.mark.parametrize("content", [b"", b"\x00\x01binary junk", b"PK\x03\x04garbage"])
def test_not_a_checkpoint(tmp_path, content):
    p = tmp_path / "bad.pth"
    p.write_bytes(content)
    with pytest.raises(RWKVDishaError, match="not a torch checkpoint or is truncated") as e:
        load_model(p)
    one_line(e)


def test_truncated_checkpoint(tmp_path, tiny_model_path):
    data = tiny_model_path.read_bytes()
    p = tmp_path / "cut.pth"
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(
        RWKVDishaError, match="not a torch checkpoint or is truncated.*download or copy it again"
    ):
        load_model(p)


def test_pickled_code_is_refused_not_run(tmp_path, capsys):
    p = tmp_path / "evil.pth"
    torch.save({"emb.weight": torch.zeros(2, 2), "x": Payload()}, p)
    with pytest.raises(RWKVDishaError, match="refused for safety \\(weights_only\\)") as e:
        load_model(p)
    one_line(e)
    assert "this must never run" not in capsys.readouterr().out


def test_a_plain_pickle_is_refused_in_one_line_without_torchs_warning(tmp_path, recwarn):
    """A plain pickle (not torch's zip format) made torch warn about its protocol before our line."""
    import pickle

    p = tmp_path / "evil_plain.pth"
    p.write_bytes(pickle.dumps({"emb.weight": Payload()}, protocol=4))
    with pytest.raises(RWKVDishaError, match="refused for safety"):
        load_model(p)
    assert not [w for w in recwarn if "pickle protocol" in str(w.message)]


def test_not_an_rwkv_state_dict(tmp_path):
    p = tmp_path / "gpt.pth"
    torch.save({"transformer.wte.weight": torch.zeros(4, 2), "lm_head.weight": torch.zeros(4, 2)}, p)
    with pytest.raises(RWKVDishaError, match="not an RWKV checkpoint: .*found e.g. transformer.wte.weight"):
        load_model(p)


def test_not_a_dict(tmp_path):
    p = tmp_path / "t.pth"
    torch.save(torch.zeros(3), p)
    with pytest.raises(RWKVDishaError, match="does not hold a state dict"):
        load_model(p)


def test_unsupported_version(tmp_path):
    p = tmp_path / "old.pth"
    torch.save({"emb.weight": torch.zeros(4, 2), "blocks.0.att.time_mix_k": torch.zeros(2)}, p)
    with pytest.raises(
        RWKVDishaError,
        match=r"RWKV-4 \(x040\) checkpoints are not supported; supported: RWKV-7 \(x070\), RWKV-6 \(x060\)",
    ):
        load_model(p)


@pytest.mark.parametrize("marker,name", [("att.time_maa_x", "RWKV-6"), ("att.time_faaaa", "RWKV-5.2")])
def test_rwkv6_5_fragment_is_named_by_version(tmp_path, marker, name):
    """A file with the version's marker but not its layout: one line naming the version and the tensor."""
    p = tmp_path / "old.pth"
    torch.save({"emb.weight": torch.zeros(4, 2), f"blocks.0.{marker}": torch.zeros(2)}, p)
    match = rf"consistent {name} shape: head_size \(blocks.0.att.time_faaaa"
    with pytest.raises(RWKVDishaError, match=match):
        load_model(p)


def test_adapter_file_given_as_model(tmp_path):
    p = tmp_path / "rwkv-0.pth"
    torch.save({"blocks.0.att.key.disha": torch.zeros(8, 64), "blocks.0.ln1.weight": torch.ones(64)}, p)
    with pytest.raises(RWKVDishaError, match="adapter checkpoint .* not a base model"):
        load_model(p)


@pytest.mark.parametrize(
    "flag,value,have",
    [("n_layer", 24, 2), ("n_embd", 1024, 128), ("vocab_size", 65536, 1000), ("head_size", 32, 64)],
)
def test_flag_disagreeing_with_file(tiny_model_path, flag, value, have):
    with pytest.raises(
        RWKVDishaError, match=f"--{flag} {value} disagrees with the checkpoint, which has {flag} = {have}"
    ):
        load_model(tiny_model_path, **{flag: value})


def test_matching_flags_and_auto_values_are_accepted(tiny_model_path):
    m = load_model(tiny_model_path, n_layer=2, n_embd=128, vocab_size=0, my_testing="x070")
    assert m.config.n_layer == 2 and m.config.vocab_size == 1000
    with pytest.raises(RWKVDishaError, match=r"--my_testing x060 \(RWKV-6\) disagrees .* is RWKV-7 \(x070"):
        load_model(tiny_model_path, my_testing="x060")
    with pytest.raises(RWKVDishaError, match="unknown --my_testing x099: choose one of x070, x060, x052"):
        load_model(tiny_model_path, my_testing="x099")


def test_missing_tensor_is_named(tmp_path):
    sd = init_state_dict(2, 64, 100)
    del sd["blocks.1.att.g2"]
    p = save_state_dict(sd, tmp_path / "m.pth")
    with pytest.raises(RWKVDishaError, match="missing \\['blocks.1.att.g2'\\]"):
        load_model(p)


def test_wrong_shape_is_named(tmp_path):
    sd = init_state_dict(2, 64, 100)
    sd["blocks.1.ffn.value.weight"] = torch.zeros(64, 100)
    p = save_state_dict(sd, tmp_path / "m.pth")
    with pytest.raises(RWKVDishaError, match="blocks.1.ffn.value.weight \\(64, 100\\) != \\(64, 256\\)"):
        load_model(p)


def test_infer_config_reads_every_width():
    sd = init_state_dict(3, 192, 777)
    cfg = infer_config(sd)
    assert (cfg.version, cfg.n_layer, cfg.n_embd, cfg.vocab_size, cfg.head_size) == ("x070", 3, 192, 777, 64)
    assert cfg.dim_ffn == 768
    assert (cfg.d_decay, cfg.d_aaa, cfg.d_mv, cfg.d_gate) == tuple(
        sd[k].shape[1] for k in ("blocks.0.att.w1", "blocks.0.att.a1", "blocks.1.att.v1", "blocks.0.att.g1")
    )


def test_safetensors_loads_the_same(tmp_path, tiny_model_path):
    sd = load_state_dict(tiny_model_path)
    p = save_state_dict(dict(sd), tmp_path / "m.safetensors")
    idx = torch.randint(0, 1000, (1, 10))
    with torch.no_grad():
        torch.testing.assert_close(load_model(p)(idx), load_model(tiny_model_path)(idx), atol=0, rtol=0)


def test_pth_is_memory_mapped_and_not_copied(tiny_model_path):
    # mmap'ed tensors are backed by the file, not by a private heap copy: their storage is not resizable
    sd = load_state_dict(tiny_model_path)
    assert not sd["emb.weight"].untyped_storage().resizable()
    m = load_model(tiny_model_path)  # assign=True: the model's parameters are those mapped tensors
    assert not m.blocks[1].ffn.value.weight.untyped_storage().resizable()


class Unpicklable:
    def __reduce__(self):
        raise RuntimeError("disk full (simulated)")


def test_save_is_atomic_on_failure(tmp_path):
    target = tmp_path / "out.pth"
    target.write_bytes(b"previous content")
    with pytest.raises(RuntimeError, match="disk full"):
        save_state_dict({"x": Unpicklable()}, target)
    assert target.read_bytes() == b"previous content"
    assert [p.name for p in tmp_path.iterdir()] == ["out.pth"]  # no temp file left behind


def test_cli_init_writes_a_loadable_model(tmp_path, capsys):
    out = tmp_path / "m.pth"
    assert (
        main(["init", "--output", str(out), "--n_layer", "3", "--n_embd", "64", "--vocab_size", "300"]) == 0
    )
    m = load_model(out)
    assert (m.config.n_layer, m.config.n_embd, m.config.vocab_size) == (3, 64, 300)
    assert m.blocks[0].att.output.weight.abs().sum() == 0  # pretrain style: zero output projections
    assert "wrote" in capsys.readouterr().out


def test_cli_init_bad_width_is_one_line(tmp_path, capsys):
    rc = main(["init", "--output", str(tmp_path / "m.pth"), "--n_embd", "100"])
    assert rc == 2
    assert capsys.readouterr().err.strip() == "error: n_embd 100 must be a multiple of head_size 64"
    assert not (tmp_path / "m.pth").exists()


@pytest.mark.parametrize(
    "argv",
    [
        ["train", "--load_model", "{d}", "--proj_dir", "{tmp}/proj", "--data_file", "{tmp}/data"],
        ["eval", "--load_model", "{d}", "--data_file", "{tmp}/data"],
        ["generate", "--load_model", "{d}", "--prompt", "hi"],
        ["merge", "--base_model", "{d}", "--peft_checkpoint", "{tmp}/a.pth", "--output", "{tmp}/m.pth"],
    ],
    ids=["train", "eval", "generate", "merge"],
)
def test_directory_as_model_in_every_command(tmp_path, capsys, argv):
    d = tmp_path / "RWKV-x070-World-0.1B"
    d.mkdir()
    (tmp_path / "a.pth").write_bytes(b"")
    rc = main([a.format(d=d, tmp=tmp_path) for a in argv])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    assert f"{d} is a directory" in err and "not found" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["RWKV-x070-World-0.1B", "a.pth"]
    assert list(d.iterdir()) == []


@pytest.mark.parametrize(
    "content, kind",
    [(b'{"format": "rwkv-disha-adapter"}', "a JSON file"), (b"hello world, not a checkpoint", "a text file")],
)
def test_a_json_or_text_file_is_named_as_such(tmp_path, content, kind):
    """Not "needs pickled Python code" (what the unpickler makes of such bytes): a sidecar or a jsonl."""
    p = tmp_path / "rwkv-0.json"
    p.write_bytes(content)
    with pytest.raises(RWKVDishaError) as e:
        load_state_dict(p, what="adapter")
    assert (
        one_line(e)
        == f"adapter file {p} is {kind}, not a checkpoint: give the adapter's .pth (or .safetensors)"
    )


def test_a_hugging_face_model_says_to_import_it(tmp_path, tiny_model_path, capsys):
    hf = tmp_path / "hf"
    assert main(["export", "--format", "hf", "--load_model", str(tiny_model_path), "--output", str(hf)]) == 0
    for path in (hf, hf / "model.safetensors"):
        with pytest.raises(RWKVDishaError) as e:
            infer_config(load_state_dict(path))
        assert f"`rwkv-disha import --hf_model {hf} --output model.pth`" in one_line(e)


def test_a_model_without_its_version_keys_names_the_fix(tmp_path):
    sd = init_state_dict(1, 64, 100, 64)
    sd = {k: v for k, v in sd.items() if not k.startswith("blocks.0.att.")}
    with pytest.raises(
        RWKVDishaError, match=r"block 0 attention has keys \(none\); the file is damaged"
    ) as e:
        infer_config(sd)
    one_line(e)


def test_a_fifo_given_as_a_model_is_refused_not_waited_on(
    tmp_path, capsys, tiny_model_path, main_beside_fifo
):
    """Reading a FIFO blocks until something writes to it: merge / export used to wait forever."""
    import os

    fifo = tmp_path / "model.pth"
    os.mkfifo(fifo)
    argv = ["merge", "--base_model", str(fifo), "--peft_checkpoint", str(tiny_model_path)]
    out = [main_beside_fifo([*argv, "--output", str(tmp_path / "m.pth")], fifo)]
    err = capsys.readouterr().err
    assert out == [2] and err.count("\n") == 1, err
    assert f"base model path {fifo} is not a regular file (a FIFO, device or socket)" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pth"]


@pytest.mark.parametrize("command", ["merge-base", "merge-adapter", "export"])
def test_a_symlink_loop_given_as_a_model_is_one_line(tmp_path, capsys, tiny_model_path, command):
    """Path.resolve() raises RuntimeError("Symlink loop from ...") before Python 3.13: was a traceback."""
    loop = tmp_path / "a.pth"
    loop.symlink_to(tmp_path / "b.pth")
    (tmp_path / "b.pth").symlink_to(loop)
    out = str(tmp_path / "m.pth")
    argv = {
        "merge-base": ["merge", "--base_model", str(loop), "--peft_checkpoint", str(tiny_model_path)],
        "merge-adapter": ["merge", "--base_model", str(tiny_model_path), "--peft_checkpoint", str(loop)],
        "export": ["export", "--peft_checkpoint", str(loop)],
    }[command]
    assert main([*argv, "--output", out]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert f"{loop}" in err and ("symbolic links" in err or "not found" in err), err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.pth", "b.pth"]
