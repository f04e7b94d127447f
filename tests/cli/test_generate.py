"""`rwkv-disha generate`: reproducible sampling, adapter on the fly == merged model, streaming, errors."""

import io
import sys

import pytest
import torch

from rwkv_disha.adapters import AdapterConfig
from rwkv_disha.cli import main
from rwkv_disha.generate import chat_prompt, generate_ids, load_for_inference, sample_token


@pytest.fixture(scope="module")
def world_model(make_checkpoint):
    return make_checkpoint(2, 64, 65536, seed=5)  # the World vocabulary, so real prompts tokenize


@pytest.fixture(scope="module")
def adapter_file(world_model, tmp_path_factory, random_adapter):
    """A Bone adapter with random (non-zero) weights, saved as training saves it."""
    cfg = AdapterConfig.from_cli("disha", '{"mode":"bone","r":16}', "", ["time", "ln"])
    return random_adapter(world_model, cfg, tmp_path_factory.mktemp("adapter") / "rwkv-0.pth", seed=0)


def run(capsys, *args):
    assert main(["generate", *map(str, args)]) == 0
    cap = capsys.readouterr()
    return cap.out, cap.err


def test_same_prompt_and_seed_give_the_same_text(world_model, capsys):
    a, err = run(capsys, "--load_model", world_model, "--prompt", "The cat", "--max_tokens", 20, "--seed", 7)
    b, _ = run(capsys, "--load_model", world_model, "--prompt", "The cat", "--max_tokens", 20, "--seed", 7)
    c, _ = run(capsys, "--load_model", world_model, "--prompt", "The cat", "--max_tokens", 20, "--seed", 8)
    assert a == b and a.strip()
    assert a != c  # another seed samples another text (random model: near-uniform distribution)
    assert "prompt tokens" in err and "prompt tokens" not in a  # logs on stderr only


def test_greedy_with_adapter_equals_greedy_with_merged_model(world_model, adapter_file, tmp_path, capsys):
    merged = tmp_path / "merged.pth"
    assert main(["merge", "--base_model", str(world_model), "--peft_checkpoint", str(adapter_file),
                 "--output", str(merged)]) == 0  # fmt: skip
    capsys.readouterr()
    common = ["--prompt", "User: hi\n\nAssistant:", "--temperature", 0, "--max_tokens", 24]
    on_the_fly, _ = run(capsys, "--load_model", world_model, "--peft_checkpoint", adapter_file, *common)
    from_merged, _ = run(capsys, "--load_model", merged, *common)
    base_only, _ = run(capsys, "--load_model", world_model, *common)
    assert on_the_fly == from_merged
    assert on_the_fly != base_only  # the adapter changes the model


def test_prompt_from_stdin_and_chat_wrapping(world_model, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO("What is RWKV?"))
    a, _ = run(capsys, "--load_model", world_model, "--temperature", 0, "--max_tokens", 5, "--chat")
    b, _ = run(capsys, "--load_model", world_model, "--temperature", 0, "--max_tokens", 5, "--chat",
               "--prompt", "What is RWKV?")  # fmt: skip
    assert a == b
    assert chat_prompt("  What is\n\nRWKV? ") == "User: What is\nRWKV?\n\nAssistant:"


def test_generation_uses_the_state_like_a_full_forward(world_model):
    model = load_for_inference(str(world_model))
    prompt = [510, 3319, 22590]
    ids = list(generate_ids(model, prompt, 8, temperature=0))
    with torch.no_grad():  # the same greedy choices from full re-reads of the growing text
        seq = list(prompt)
        for _ in range(len(ids)):
            seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    assert seq[len(prompt) :] == ids


def test_sampling_filters():
    g = torch.Generator().manual_seed(0)
    logits = torch.tensor([0.0, 5.0, 4.9, -3.0])
    assert sample_token(logits, 0, 1.0, 0, g) == 1
    draws = {sample_token(logits, 1.0, 1.0, 2, g) for _ in range(200)}
    assert draws == {1, 2}  # top-k 2
    draws = {sample_token(logits, 1.0, 0.3, 0, g) for _ in range(200)}
    assert draws == {1}  # the top token alone holds >= 30 % of the mass


def test_sampling_at_the_edges_of_float32():
    """A temperature or top_p below float32's range: greedy, not NaN probabilities (multinomial crashed)."""
    g = torch.Generator().manual_seed(0)
    logits = torch.tensor([0.0, 5.0, 4.9, -3.0])
    assert {sample_token(logits, 1e-45, 1.0, 0, g) for _ in range(20)} == {1}
    assert {sample_token(logits, 1e-30, 0.85, 2, g) for _ in range(20)} == {1}
    assert {sample_token(logits, 1.0, 1e-300, 0, g) for _ in range(20)} == {1}


def test_a_prompt_that_is_not_unicode_text_is_one_error_line(world_model, tmp_path, capsys, monkeypatch):
    """Undecodable bytes reach Python as lone surrogates (argv, stdin), as does a JSON "\\ud800" escape."""
    bad = "caf\udce9"  # b"caf\xe9" as Python's surrogateescape decodes argv
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text('{"prompt": "a \\ud800 b"}\n')
    monkeypatch.setattr(sys, "stdin", io.StringIO(bad))
    for extra in (["--prompt", bad], ["--prompt_file", str(jsonl)], []):
        assert main(["generate", "--load_model", str(world_model), "--max_tokens", "2", *extra]) == 2
        err = capsys.readouterr().err
        errors = [line for line in err.splitlines() if line.startswith("error: ")]
        assert len(errors) == 1 and "the prompt is not valid Unicode text" in errors[0], err
        assert "Traceback" not in err


def test_stop_string(world_model, capsys):
    full, _ = run(
        capsys, "--load_model", world_model, "--prompt", "a", "--temperature", 0, "--max_tokens", 30
    )
    text = full.rstrip("\n")
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    if not stop.strip():
        pytest.skip("degenerate sample")
    cut, _ = run(capsys, "--load_model", world_model, "--prompt", "a", "--temperature", 0, "--max_tokens", 30,
                 "--stop", stop)  # fmt: skip
    assert cut.rstrip("\n") == text[: text.index(stop)]


def test_errors(world_model, make_checkpoint, tmp_path, capsys):
    assert main(["generate", "--prompt", "x"]) == 2
    assert "--load_model is required" in capsys.readouterr().err
    assert main(["generate", "--load_model", str(world_model), "--peft_checkpoint", str(tmp_path / "no.pth"),
                 "--prompt", "x"]) == 2  # fmt: skip
    assert "--peft_checkpoint" in capsys.readouterr().err
    small = make_checkpoint(2, 64, 300)
    assert main(["generate", "--load_model", str(small), "--prompt", "Hello world"]) == 2
    assert "model's vocabulary is 300" in capsys.readouterr().err
