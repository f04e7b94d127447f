"""--config YAML keys and values that no option takes, and demo's --lr: one error line each, naming the
key (or demo's own flag), exit 2, nothing written."""

import pytest

from rwkv_disha.cli import main

NOT_A_NAME = "is not an option name; keys are the command's option names, such as n_layer"
INIT = ["init", "--n_layer", "1", "--n_embd", "64", "--vocab_size", "100"]


def one_error_line(capsys, rc: int) -> str:
    """The whole of stderr: one line, ``error: ...``, with exit status 2; returned without its prefix."""
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    return err.removeprefix("error: ").rstrip("\n")


@pytest.mark.parametrize(
    "text, message",
    [
        # before: TypeError tracebacks (from_mapping's sorted / join of keys that are not text)
        ("1: 2\n", f"the key 1 {NOT_A_NAME}"),
        ("null: 1\n", f"the key null {NOT_A_NAME}"),
        # before: "unhashable type: 'list'" from the duplicate-key loader
        ("n_layer: 2\n? [a, b]\n: 3\n", "line 2: the key [a, b] is a list; a key must be a name (text)"),
        ("n_layer: 2\n? {a: 1}\n: 3\n", "line 2: the key {a: 1} is a map; a key must be a name (text)"),
        # before: "Object of type date is not JSON serializable"
        ("output: x.pth\nseed: {a: 2001-01-01}\n", "seed: takes one value, not the map {a: '2001-01-01'}"),
        # before: str(bytes) / str(set) became the value
        (
            "output: x.pth\nseed: !!binary aGVsbG8=\n",
            "seed: takes a number, text, true / false or a list, not binary data (!!binary)",
        ),
        (
            "output: x.pth\nseed: !!timestamp 2001-01-01\n",
            "seed: takes a number, text, true / false or a list, not the date 2001-01-01",
        ),
        (
            "output: x.pth\nseed: !!set {a}\n",
            "seed: takes a number, text, true / false or a list, not a YAML set (!!set {a: null})",
        ),
        # before: a model file literally named {"a": 1}
        ("output: {a: 1}\n", "output: takes one value, not the map {a: 1}"),
    ],
)
def test_init_config_keys_and_values_no_option_takes(tmp_path, monkeypatch, capsys, text, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "c.yaml").write_text(text)
    rc = main([*INIT, "--config", "c.yaml"])
    sep = "," if message.startswith("line ") else ":"
    assert one_error_line(capsys, rc) == f"config file c.yaml{sep} {message}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.yaml"]


def test_an_unquoted_date_stays_the_text_written(tmp_path, monkeypatch, capsys):
    """YAML 1.1 reads 2001-01-01 as a date: kept as the text, so a file name that looks like one works."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "c.yaml").write_text("output: 2001-01-01.pth\nseed: 2001-01-01\n")
    rc = main([*INIT, "--config", "c.yaml"])
    assert one_error_line(capsys, rc) == (
        "config file c.yaml: rwkv-disha init: argument --seed: invalid int value: '2001-01-01' "
        "(see rwkv-disha init --help)"
    )
    (tmp_path / "c.yaml").write_text("output: 2001-01-01\n")
    assert main([*INIT, "--config", "c.yaml"]) == 0
    assert (tmp_path / "2001-01-01").is_file()


TRAIN = [
    "train", "--load_model", "base.pth", "--data_file", "d", "--data_type", "binidx", "--proj_dir", "run",
]  # fmt: skip


@pytest.mark.parametrize(
    "text, message",
    [
        (
            "disha_config: {mode: bone, load: !!binary aGVsbG8=, r: 8}\n",
            "disha_config.load: takes a number, text, true / false or a list, not binary data (!!binary)",
        ),
        (
            "lora_config: {lora_load: !!timestamp 2001-01-01}\n",
            "lora_config.lora_load: takes a number, text, true / false or a list, not the date 2001-01-01",
        ),
        ("disha_config: {mode: bone, 1: 2}\n", "disha_config: the key 1 is not a name; quote it in YAML"),
        ("disha_config: {mode: bone, r: .nan}\n", "disha_config.r: must be a finite number, got .nan"),
        (
            "peft_config: {target_modules: [a, !!binary aGVsbG8=]}\n",
            "peft_config.target_modules[1]: takes a number, text, true / false or a list, not binary data "
            "(!!binary)",
        ),
        ("train_parts: {time: 1}\n", "train_parts: takes values, not the map {time: 1}"),
        (
            "train_parts: [time, null]\n",
            "train_parts: the item null of [time, null] is not a value; give text or numbers",
        ),
        ("data_file: {a: 1}\n", "data_file: takes one value, not the map {a: 1}"),
    ],
)
def test_train_config_values_no_option_takes(tmp_path, monkeypatch, capsys, text, message):
    """Maps only for the options that take JSON, and inside them only what JSON holds (before: a
    "not JSON serializable" traceback); checked before the model or the data is looked at."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "c.yaml").write_text(text)
    rc = main([*TRAIN, "--config", "c.yaml"])
    assert one_error_line(capsys, rc) == f"config file c.yaml: {message}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.yaml"]


def test_a_map_for_a_json_option_is_still_taken(tmp_path, monkeypatch):
    """--disha_config as a YAML map is written out as its JSON text (what the options above keep)."""
    from rwkv_disha.cli import parse_config

    monkeypatch.chdir(tmp_path)
    (tmp_path / "c.yaml").write_text('disha_config: {mode: bat, load: "", r: 8}\n')
    _, cfg = parse_config("train", ["--config", "c.yaml"])
    assert cfg.adapter.disha_config == '{"mode": "bat", "load": "", "r": 8}'


@pytest.mark.parametrize(
    "lr, message",
    [
        # before: train's --lr_init / --grad_clip named in a "diverged" error, after base.pth, data/ and
        # train/ were written
        ("1e300", "--lr 1e+300 does not fit float32, which torch computes it in: give at most 3.4e+38"),
        (
            "1e-300",
            "--lr 1e-300 is below float32's smallest normal number, which torch computes it in: give at "
            "least 1.2e-38",
        ),
        ("-1", "--lr must be a finite number > 0, got -1.0"),
    ],
)
def test_demo_lr_is_checked_before_anything_is_written(tmp_path, monkeypatch, capsys, lr, message):
    monkeypatch.chdir(tmp_path)
    argv = ["demo", "--out", "demo_t", "--n_embd", "64", "--epochs", "1", "--epoch_steps", "1"]
    rc = main([*argv, "--lr", lr])
    assert one_error_line(capsys, rc) == message
    assert list(tmp_path.iterdir()) == []
