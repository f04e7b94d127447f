"""Sweep 4: a LoRA alpha whose scale alpha / r float32 cannot hold is refused wherever it enters; --stop
adds to the --chat / --sft end of turn; a Hugging Face model folder given as an adapter, a state or a
training base gets the fix that works."""

import json
import types

import pytest

from rwkv_disha.adapters import AdapterConfig, inject_adapters, mark_trainable, save_adapter_file
from rwkv_disha.cli import main
from rwkv_disha.errors import RWKVDishaError
from rwkv_disha.generate import stop_strings, stream_text
from rwkv_disha.model.load import load_model
from rwkv_disha.train.checks import check_lora_scale

TOO_BIG = (
    "error: --lora_alpha 1e+40 makes LoRA's scale alpha / r = 1e+40 / 8 = 1.25e+39, which does not fit "
    "float32: give --lora_alpha at most 2.72e+39\n"
)


@pytest.fixture(scope="module")
def base(make_checkpoint):
    return make_checkpoint(1, 64, 65536, seed=3)


@pytest.fixture(scope="module")
def lora_file(base, tmp_path_factory):
    """A LoRA r=8 alpha=32 adapter with its sidecar, saved as training saves it."""
    model = load_model(base)
    cfg = AdapterConfig.from_cli("lora", lora_config='{"lora_r":8,"lora_alpha":32,"lora_dropout":0}')
    inject_adapters(model, cfg)
    mark_trainable(model, cfg)
    return save_adapter_file(model, cfg, tmp_path_factory.mktemp("lora") / "rwkv-0.pth")


@pytest.fixture
def hf_folder(tmp_path):
    """A folder laid out as `export --format hf` writes it (only its config.json is looked at)."""
    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(b"")
    return folder


def test_lora_scale_bounds_are_exact_and_pass_themselves():
    with pytest.raises(RWKVDishaError) as e:
        check_lora_scale("--lora_alpha", 1e45, 64)
    assert str(e.value).endswith("give --lora_alpha at most 2.17e+40")
    check_lora_scale("--lora_alpha", 2.17e40, 64)  # the offered bound (rounded down) passes
    with pytest.raises(RWKVDishaError) as e:
        check_lora_scale("--lora_alpha", 1e-50, 8)
    assert str(e.value).endswith("give --lora_alpha at least 9.41e-38")
    check_lora_scale("--lora_alpha", 9.41e-38, 8)
    with pytest.raises(RWKVDishaError, match=r"^x must be a positive finite number, got inf$"):
        check_lora_scale("x", float("inf"), 8)


@pytest.mark.parametrize(
    "command",
    [
        ["generate", "--prompt", "hi", "--max_tokens", "3", "--peft_checkpoint"],
        ["eval", "--data_type", "dummy", "--max_samples", "1", "--peft_checkpoint"],
        ["eval", "--data_type", "dummy", "--max_samples", "1", "--compare"],
    ],
)
def test_huge_lora_alpha_flag_is_refused(base, lora_file, command, capsys):
    args = [*command, str(lora_file), "--load_model", str(base), "--lora_alpha", "1e40"]
    assert main(args) == 2
    assert capsys.readouterr().err == TOO_BIG


def test_huge_lora_alpha_is_refused_by_export(base, lora_file, tmp_path, capsys):
    out = tmp_path / "ex.pth"
    args = ["export", "--load_model", str(base), "--peft_checkpoint", str(lora_file), "--format", "pth"]
    assert main([*args, "--lora_alpha", "1e40", "--output", str(out)]) == 2
    assert capsys.readouterr().err == TOO_BIG
    assert list(tmp_path.iterdir()) == []


def test_sidecar_with_huge_lora_alpha_is_refused(base, lora_file, tmp_path, capsys):
    bad = tmp_path / "rwkv-0.pth"
    bad.write_bytes(lora_file.read_bytes())
    meta = json.loads(lora_file.with_suffix(".json").read_text())
    meta["adapter"]["lora_alpha"] = 1e40
    bad.with_suffix(".json").write_text(json.dumps(meta))
    assert main(["generate", "--load_model", str(base), "--peft_checkpoint", str(bad), "--prompt", "hi"]) == 2
    assert capsys.readouterr().err == (
        f"error: the .json sidecar of adapter file {bad} holds bad settings (lora_alpha 1e+40 makes LoRA's "
        "scale alpha / r = 1e+40 / 8 = 1.25e+39, which does not fit float32: give lora_alpha at most "
        "2.72e+39)\n"
    )


def test_train_lora_config_with_huge_alpha_is_refused_first(base, tmp_path, capsys):
    proj = tmp_path / "run"
    lora = '{"lora_load":"","lora_r":8,"lora_alpha":1e40,"lora_dropout":0}'
    args = ["train", "--load_model", str(base), "--data_type", "dummy", "--proj_dir", str(proj)]
    args += ["--peft", "lora", "--lora_config", lora, "--accelerator", "cpu", "--precision", "fp32"]
    assert main(args) == 2
    assert capsys.readouterr().err == (
        "error: lora_alpha 1e+40 makes LoRA's scale alpha / r = 1e+40 / 8 = 1.25e+39, which does not fit "
        "float32: give lora_alpha at most 2.72e+39\n"
    )
    assert not proj.exists()


def _cfg(**values):
    """A generate Config's stop-related fields."""
    return types.SimpleNamespace(**{"chat": False, "chat_loop": False, "sft": False, "stop": "", **values})


def test_stop_adds_to_the_modes_end_of_turn():
    assert stop_strings(_cfg(sft=True, stop="zz")) == ("\x17", "zz")
    assert stop_strings(_cfg(chat=True, stop="zz")) == ("\n\n", "zz")
    assert stop_strings(_cfg(chat_loop=True, stop="zz")) == ("\n\n", "zz")
    assert stop_strings(_cfg(stop="zz")) == ("zz",)
    assert stop_strings(_cfg(sft=True)) == ("\x17",)
    assert stop_strings(_cfg()) == ()


class _CharTokenizer:
    """One character per token id (its code point)."""

    def decode(self, ids):
        return "".join(map(chr, ids))


@pytest.mark.parametrize(
    ("text", "written", "stopped"),
    [("ab\x17cd zz", "ab", "\x17"), ("ab zz\x17", "ab ", "zz"), ("abc", "abc", "")],
)
def test_stream_text_stops_at_the_first_stop(text, written, stopped, capsys):
    result = stream_text(_CharTokenizer(), iter(map(ord, text)), ("\x17", "zz"))
    assert result == (written, stopped)
    assert capsys.readouterr().out == written + "\n"


def test_train_refuses_a_hf_folder_with_the_import_command(hf_folder, tmp_path, capsys):
    args = [
        "train",
        "--load_model",
        str(hf_folder),
        "--data_type",
        "dummy",
        "--proj_dir",
        str(tmp_path / "p"),
    ]
    assert main(args) == 2
    assert capsys.readouterr().err == (
        f"error: --load_model {hf_folder} is a Hugging Face model folder: convert it with "
        f"`rwkv-disha import --hf_model {hf_folder} --output model.pth` and give the .pth\n"
    )
    assert not (tmp_path / "p").exists()


@pytest.mark.parametrize(
    ("command", "flag", "what"),
    [
        (["generate", "--prompt", "hi"], "--peft_checkpoint", "an adapter"),
        (["generate", "--prompt", "hi"], "--state", "a state"),
        (["eval", "--data_type", "dummy"], "--state", "a state"),
        (["eval", "--data_type", "dummy"], "--peft_checkpoint", "an adapter"),
    ],
)
def test_hf_folder_as_adapter_or_state_is_named(base, hf_folder, command, flag, what, capsys):
    assert main([*command, "--load_model", str(base), flag, str(hf_folder)]) == 2
    assert capsys.readouterr().err == (
        f"error: {flag} {hf_folder} is a Hugging Face model folder, not {what} file: give {what} file (.pth) "
        f"there; a model goes to --load_model / --base_model, converted with "
        f"`rwkv-disha import --hf_model {hf_folder} --output model.pth`\n"
    )


def test_eval_refuses_a_loss_that_overflows(base, tmp_path, capsys, random_adapter):
    """A LoRA scale that fits float32 (1e39 / 8) can still overflow the forward: NaN is no result."""
    cfg = AdapterConfig.from_cli("lora", lora_config='{"lora_r":8,"lora_alpha":32,"lora_dropout":0}')
    path = random_adapter(base, cfg, tmp_path / "rwkv-0.pth")  # zero-init B would make any scale harmless
    out = tmp_path / "r.json"
    args = ["eval", "--load_model", str(base), "--peft_checkpoint", str(path), "--data_type", "dummy"]
    assert main([*args, "--max_samples", "1", "--lora_alpha", "1e39", "--json", str(out)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[-1] == (
        f"error: the loss of {path} is nan on this data: the model overflows (a diverged adapter, or a "
        "--lora_alpha far too large); nothing written"
    )
    assert not out.exists()
