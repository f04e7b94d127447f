"""The entry point's error handling: one `error:` line for user errors, tracebacks kept for bugs."""

from __future__ import annotations

import errno

import pytest

import rwkv_disha.bench as bench
from rwkv_disha.cli import _yaml_argv, main, parse_config


def _raise(exc):
    def run(cfg):
        raise exc

    return run


@pytest.mark.parametrize(
    "exc,expected",
    [
        (PermissionError(errno.EACCES, "Permission denied", "/data/x.bin"), "/data/x.bin: not writable"),
        (OSError(errno.ENOSPC, "No space left on device", "/out/m.pth"), "/out/m.pth: no space left"),
        (FileNotFoundError(errno.ENOENT, "No such file", "/in/a.jsonl"), "/in/a.jsonl: no such file"),
        (IsADirectoryError(errno.EISDIR, "Is a directory", "/out"), "/out: is a directory"),
    ],
)
def test_an_os_error_about_a_users_file_is_one_line(monkeypatch, capsys, exc, expected):
    monkeypatch.setattr(bench, "run", _raise(exc))
    assert main(["bench"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: " + expected) and err.count("\n") == 1


def test_other_os_errors_keep_their_traceback(monkeypatch):
    monkeypatch.setattr(bench, "run", _raise(OSError(errno.ECONNRESET, "Connection reset")))
    with pytest.raises(ConnectionResetError):
        main(["bench"])
    monkeypatch.setattr(bench, "run", _raise(OSError(errno.EACCES, "no file named")))  # no filename
    with pytest.raises(PermissionError):
        main(["bench"])
    monkeypatch.setattr(bench, "run", _raise(ValueError("a bug")))
    with pytest.raises(ValueError, match="a bug"):
        main(["bench"])


def test_ctrl_c_is_exit_130(monkeypatch, capsys):
    monkeypatch.setattr(bench, "run", _raise(KeyboardInterrupt()))
    assert main(["bench"]) == 130
    assert capsys.readouterr().err == "interrupted\n"


def test_a_multi_line_message_is_printed_as_one_line(monkeypatch, capsys):
    from rwkv_disha.errors import RWKVDishaError

    monkeypatch.setattr(bench, "run", _raise(RWKVDishaError("first\nsecond")))
    assert main(["bench"]) == 2
    assert capsys.readouterr().err == "error: first second\n"


def test_bad_flag_value_is_one_line_naming_the_flag(capsys):
    assert main(["bench", "--T", "many"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith("error: rwkv-disha bench: argument --T: invalid int value: 'many'")
    assert "--help" in err


def test_yaml_values_are_typed_and_checked_like_flags(tmp_path):
    cfg_file = tmp_path / "b.yaml"
    cfg_file.write_text("T: 16\nops: torch\nrepeat: 2\n")
    _, cfg = parse_config("bench", ["--config", str(cfg_file), "--repeat", "3"])
    assert (cfg.T, cfg.ops, cfg.repeat) == (16, "torch", 3)  # the flag overrides the file
    cfg_file.write_text("T: sixteen\n")
    with pytest.raises(Exception, match="config file .*argument --T: invalid int value: 'sixteen'"):
        parse_config("bench", ["--config", str(cfg_file)])
    cfg_file.write_text("what: flops\n")
    with pytest.raises(Exception, match="argument --what: invalid choice: 'flops'"):
        parse_config("bench", ["--config", str(cfg_file)])


def test_yaml_argv():
    """Each YAML value becomes one flag: a dict as JSON, a list only for a many-valued option, a bool only
    for a 0|1 option, and a scalar glued to its flag (so "-1" stays a value)."""
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("--a")
    parser.add_argument("--b", nargs="*")
    parser.add_argument("--c", nargs="?", const=True)
    parser.add_argument("--e")
    json_options = frozenset({"a"})  # the options that take JSON text (a command's JSON_OPTIONS)
    argv = _yaml_argv(
        {"a": {"mode": "bone", "r": 8}, "b": [1, "x"], "c": True, "e": "-1"}, parser, json_options
    )
    assert argv == ['--a={"mode": "bone", "r": 8}', "--b", "1", "x", "--c=1", "--e=-1"]
    from rwkv_disha.errors import RWKVDishaError

    bad_values = [
        ({"d": None}, "has no value"),
        ({"a": [1]}, "takes one value"),
        ({"b": ["--c=1"]}, "takes one value"),
        ({"e": True}, "takes a value, not true"),
    ]
    for bad, why in bad_values:
        with pytest.raises(RWKVDishaError, match=why):
            _yaml_argv(bad, parser, json_options)


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_non_finite_float_options_are_refused(value, capsys):
    assert main(["generate", "--load_model", "x.pth", f"--temperature={value}"]) == 2
    assert capsys.readouterr().err == f"error: --temperature must be a finite number, got {float(value)}\n"


def test_non_finite_float_in_yaml_is_refused(tmp_path, capsys):
    cfg_file = tmp_path / "g.yaml"
    cfg_file.write_text("top_p: .nan\n")
    assert main(["generate", "--config", str(cfg_file)]) == 2
    assert capsys.readouterr().err == "error: --top_p must be a finite number, got nan\n"


def test_a_closed_pipe_ends_quietly():
    """`rwkv-disha generate ... | head`: the reader leaves; exit 141 (SIGPIPE's status), no traceback."""
    import subprocess
    import sys

    code = (
        "import sys, rwkv_disha.bench as b\n"
        "from rwkv_disha.cli import main\n"
        "def run(cfg):\n"
        "    for _ in range(10**6):\n"
        "        print('x' * 1000, flush=True)\n"
        "b.run = run\n"
        "sys.exit(main(['bench']))\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout.read(5) == b"xxxxx"
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141
    assert err == ""
