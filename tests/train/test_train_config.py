"""The grouped train Config: flat RWKV-PEFT flags, the saved train_config.json, --resume's given flags,
and a data set built once per run."""

import dataclasses
import json

import pytest

from rwkv_disha.cli import main, parse_config
from rwkv_disha.config import flat_dict, from_mapping, given_options
from rwkv_disha.data.tokenizer import WorldTokenizer
from rwkv_disha.errors import RWKVDishaError
from rwkv_disha.train.config import Config, config_json, load_saved_config, resolve_resume


def test_flat_flags_fill_the_groups():
    _, cfg = parse_config(
        "train", ["--lr_init", "3e-4", "--micro_bsz", "2", "--grad_cp", "1", "--peft", "lora"]
    )
    assert (cfg.optim.lr_init, cfg.data.micro_bsz, cfg.engine.grad_cp, cfg.adapter.peft) == (
        3e-4,
        2,
        True,
        "lora",
    )
    assert cfg.optim.lr_final == 2e-5 and cfg.data.ctx_len == 2048  # defaults untouched
    assert given_options(cfg) == {"lr_init", "micro_bsz", "grad_cp", "peft"}
    assert from_mapping(Config, flat_dict(cfg)) == cfg  # flat_dict inverts from_mapping


def test_every_option_has_one_flat_name_and_help():
    from rwkv_disha.config import option_fields

    names = [f.name for _, f, _ in option_fields(Config)]
    assert len(names) == len(set(names)) == 62
    assert all(f.metadata["help"].strip() for _, f, _ in option_fields(Config))
    with pytest.raises(RWKVDishaError, match="unknown options: lr"):
        from_mapping(Config, {"lr": 1.0})


def test_help_is_grouped_and_percent_safe(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "~30 % slower" in out  # a % in help text is escaped, not read as a format
    for title in ("model shape:", "data:", "optimisation:", "engine:", "adapter:", "logging:"):
        assert title in out


def _old_flat(cfg: Config) -> dict:
    return flat_dict(cfg)


def test_saved_config_grouped_and_older_flat_shape(tmp_path):
    paths = ["--load_model", str(tmp_path / "m.pth"), "--proj_dir", str(tmp_path / "out")]  # stored as is
    _, cfg = parse_config("train", [*paths, "--lr_init", "1e-3", "--train_parts", "emb"])
    grouped, flat = tmp_path / "grouped.json", tmp_path / "flat.json"
    grouped.write_text(json.dumps(config_json(cfg)))
    flat.write_text(json.dumps(_old_flat(cfg)))  # what train_config.json looked like before the groups
    assert json.loads(grouped.read_text())["optim"]["lr_init"] == 1e-3
    assert load_saved_config(grouped) == load_saved_config(flat) == flat_dict(cfg)


@pytest.mark.parametrize("shape", ["grouped", "flat"])
def test_resume_keeps_flags_given_at_their_default(tmp_path, shape):
    old = dataclasses.replace(
        Config(),
        load_model=str(tmp_path / "base.pth"),
        optim=dataclasses.replace(Config().optim, grad_clip=0.5, lr_init=1e-3),
    )
    saved = config_json(old) if shape == "grouped" else flat_dict(old)
    (tmp_path / "train_config.json").write_text(json.dumps(saved))
    (tmp_path / "resume.ckpt").write_bytes(b"")  # resolve_resume only asks that it is there
    # --grad_clip 1.0 is the default: given explicitly, it still wins over the old run's 0.5
    _, cfg = parse_config("train", ["--resume", str(tmp_path), "--grad_clip", "1.0"])
    cfg = resolve_resume(cfg)
    assert cfg.optim.grad_clip == 1.0
    assert cfg.optim.lr_init == 1e-3 and cfg.load_model == str(tmp_path / "base.pth")  # the old run's
    assert cfg.resume == cfg.proj_dir == str(tmp_path)


def test_jsonl_run_of_three_epochs_tokenises_once(tmp_path, base_path, train_args, monkeypatch):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"text": f"document number {i} " * 3}) + "\n" for i in range(12)))
    calls = []
    real = WorldTokenizer.encode

    def counting(self, text):
        calls.append(text)
        return [1 + t % 200 for t in real(self, text)]  # ids inside the tiny test model's vocabulary

    monkeypatch.setattr(WorldTokenizer, "encode", counting)
    from rwkv_disha.data.dataset import make_dataset

    make_dataset(str(data), "jsonl", "pad", 32, 2, 3, "pad", 0, 256)
    once = len(calls)
    assert once >= 12
    calls.clear()
    argv = train_args(base_path, data, tmp_path / "p", epochs=3, steps=3)
    argv[argv.index("--data_type") + 1] = "jsonl"
    assert main(argv) == 0
    assert len(calls) == once
