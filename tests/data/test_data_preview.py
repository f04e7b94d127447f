"""`prepare --preview N`: the first records as training sees them, loss tokens marked; nothing written."""

import io
import json
import re

from rwkv_disha.cli import main
from rwkv_disha.data.preview import preview
from rwkv_disha.data.tokenizer import get_tokenizer
from rwkv_disha.demo import make_corpus


class _Tty(io.StringIO):
    def isatty(self):
        return True


def _corpus(tmp_path):
    rows = [r for r in make_corpus(4, seed=0)]
    chat = next(r for r in rows if "messages" in r)
    text = next(r for r in rows if "text" in r)
    path = tmp_path / "c.jsonl"
    path.write_text(json.dumps(chat) + "\n" + json.dumps(text) + "\n" + json.dumps(chat) + "\n")
    return path, chat, text


def test_preview_marks_answer_tokens_and_writes_nothing(tmp_path, capsys, monkeypatch):
    path, chat, text = _corpus(tmp_path)
    monkeypatch.chdir(tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    capsys.readouterr()
    assert main(["prepare", "--input", str(path), "--preview", "2"]) == 0
    out = capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no --output needed, nothing written
    tok = get_tokenizer()
    q, a = chat["messages"][0]["content"], chat["messages"][1]["content"]
    n_chat = len(tok.encode(f"User: {q}\n\nAssistant: {a}\n\n")) + 1  # + token 0
    n_answer = len(tok.encode(f" {a}\n\n")) + 1  # the answer, its blank line and token 0
    n_text = len(tok.encode(text["text"])) + 1
    head = tok.decode(tok.encode(text["text"])[:1])  # the first token is never a label
    assert out.split("\n--- ")[1:] == [
        f"record 1 (chat / Q&A, {path}): {n_chat} tokens; loss counts {n_answer} with --loss_mask qa, "
        f"{n_chat - 1} with pad / none\nUser: {q}\n\nAssistant:[ {a}\n\n<eos>]\n",
        f"record 2 (text, {path}): {n_text} tokens; loss counts {n_text - 1} with --loss_mask qa, "
        f"{n_text - 1} with pad / none\n{head}[{text['text'][len(head) :]}<eos>]\n",
    ]


def test_preview_cuts_at_ctx_len_and_colours_on_a_terminal(tmp_path):
    path, chat, _ = _corpus(tmp_path)
    out = _Tty()
    assert preview([str(path)], 1, 5, "blank", "text", True, out=out) == 1
    text = out.getvalue()
    n_chat = len(get_tokenizer().encode(chat["messages"][0]["content"])) + 10
    assert "\x1b[32m" not in text  # the first 6 tokens are all the user's turn: nothing counts
    assert "loss counts 0 with --loss_mask qa, 5 with pad / none" in text
    assert "cut by ctx_len" in text and n_chat > 6
    out = _Tty()
    preview([str(path)], 1, 1024, "blank", "text", True, out=out)
    assert "\x1b[32m " + chat["messages"][1]["content"] in out.getvalue()  # the answer in green
    plain = re.sub(r"\x1b\[\d+m", "", out.getvalue())
    assert "[" not in plain.split("\n", 1)[1]  # no brackets on a terminal
