"""`rwkv-disha generate`: repetition penalties, --prompt_file, and --chat_loop keeping its state."""

import io
import sys

import pytest
import torch

from rwkv_disha.cli import main
from rwkv_disha.data.tokenizer import get_tokenizer
from rwkv_disha.generate import Penalties, chat_prompt, generate_ids, load_for_inference


@pytest.fixture(scope="module")
def world_model(make_checkpoint):
    return make_checkpoint(2, 64, 65536, seed=5)


def run(capsys, monkeypatch, *args, stdin=""):
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    capsys.readouterr()
    assert main(["generate", *map(str, args)]) == 0
    return capsys.readouterr().out


def test_penalties_follow_rwkv_pipeline_arithmetic():
    p = Penalties(presence=0.5, frequency=0.25, decay=0.5)
    counts: dict[int, float] = {}
    logits = torch.zeros(6)
    assert torch.equal(p.apply(logits, counts), logits)  # nothing generated yet
    p.update(counts, 3)
    p.update(counts, 3)
    p.update(counts, 1)
    assert counts == {3: 1.5 * 0.5, 1: 1.0}  # 3: (1 * 0.5 + 1) * 0.5; 1: new
    out = p.apply(logits, counts)
    assert out.tolist() == [0, -(0.5 + 0.25), 0, -(0.5 + 0.75 * 0.25), 0, 0]
    assert logits.tolist() == [0] * 6  # the caller's logits stay as they were


def test_presence_penalty_stops_greedy_repetition(make_checkpoint):
    model = load_for_inference(str(make_checkpoint(2, 64, 256, style="pretrain", seed=3)))
    prompt = [1, 2, 3]
    plain = list(generate_ids(model, prompt, 40, temperature=0))
    strict = list(
        generate_ids(model, prompt, 40, temperature=0, penalties=Penalties(presence=1e4, decay=1.0))
    )
    assert len(set(strict)) == len(strict) == 40  # a huge presence penalty: no token twice in the reply
    assert len(set(plain)) < 20  # greedy on this model falls into a loop
    assert strict[0] == plain[0]  # nothing is penalised before the first token


def test_prompt_file_runs_each_prompt_from_a_fresh_state(world_model, tmp_path, capsys, monkeypatch):
    common = ["--load_model", world_model, "--temperature", 0, "--max_tokens", 6]
    one = run(capsys, monkeypatch, *common, "--prompt", "The cat")
    two = run(capsys, monkeypatch, *common, "--prompt", "A dog\nran")
    text = tmp_path / "prompts.txt"
    text.write_text("The cat\n\n\nA dog\nran\n")
    both = run(capsys, monkeypatch, *common, "--prompt_file", text)
    assert both == f"=== prompt 1/2\n{one}\n=== prompt 2/2\n{two}"
    jsonl = tmp_path / "prompts.jsonl"
    jsonl.write_text('{"prompt": "The cat"}\n\n"A dog\\nran"\n')
    assert run(capsys, monkeypatch, *common, "--prompt_file", jsonl) == both


def test_chat_loop_keeps_the_state_between_turns(world_model, capsys, monkeypatch):
    n = 6
    out = run(capsys, monkeypatch, "--load_model", world_model, "--chat_loop", 1, "--temperature", 0,
              "--max_tokens", n, stdin="Hi there\n\nWhat is RWKV?\n")  # fmt: skip
    # reference: each answer from a full read of the whole conversation so far
    tok, model = get_tokenizer(), load_for_inference(str(world_model))
    history: list[int] = []
    expected = ""
    for turn in ("Hi there", "What is RWKV?"):
        history += tok.encode(chat_prompt(turn))
        reply = list(generate_ids(model, history, n, temperature=0))
        text = tok.decode(reply)
        if "\n\n" in text:  # the answer stops at its blank line; the state read that token
            k = next(i for i in range(1, len(reply) + 1) if "\n\n" in tok.decode(reply[:i]))
            history += reply[:k]
            text = text[: text.index("\n\n")]
        else:  # cut by --max_tokens: the turn is closed with a blank line
            history += reply + tok.encode("\n\n")
        expected += text + "\n"
    assert out == expected
    single = run(capsys, monkeypatch, "--load_model", world_model, "--chat", "--prompt", "Hi there",
                 "--temperature", 0, "--max_tokens", n)  # fmt: skip
    assert out.startswith(single)  # the first turn is the one-shot --chat answer
