"""`rwkv-disha prepare`: exact tokens, json2binidx-identical bytes, input forms, masks, errors."""

from __future__ import annotations

import json
import os
import struct

import numpy as np
import pytest

from rwkv_disha import cli
from rwkv_disha.data.binidx import BinIdx
from rwkv_disha.data.prepare import Config, prepare

LONG = ("Long document 长文档 🚀 " * 9000) + "end."
TEXTS = [
    "The quick brown fox jumps over the lazy dog.\nSecond line.",
    "中文测试：你好，世界！日本語とかな。한국어.",
    "emoji 😀🎉👨‍👩‍👧‍👦 🇫🇷 mixed with text",
    "",
    LONG,
    "   ",
    "tab\tand\r\nCRLF\n\n\nblank lines",
]


def write_jsonl(path, records) -> str:
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n")
    return str(path)


def run_prepare(tmp_path, inputs, name="out", **kw):
    cfg = Config(
        input=[str(p) for p in inputs], output=str(tmp_path / name), workers=kw.pop("workers", 1), **kw
    )
    cfg.progress = False
    return prepare(cfg, log=lambda m: None)


def json2binidx_reference(texts, tokenizer, prefix):
    """What json2binidx writes for {"text": t} lines (RWKV World tokenizer, --append-eod), built by hand
    from docs/DATA.md ("binidx files"): empty texts are skipped, token 0 ends each document, int32
    (dtype code 4)."""
    docs = [tokenizer.encode(t) + [0] for t in texts if t]
    sizes = [len(d) for d in docs]
    pointers = [4 * sum(sizes[:i]) for i in range(len(docs))]
    idx = b"MMIDIDX\x00\x00" + struct.pack("<QBQQ", 1, 4, len(docs), len(docs) + 1)
    idx += struct.pack(f"<{len(docs)}i", *sizes) + struct.pack(f"<{len(docs)}q", *pointers)
    idx += struct.pack(f"<{len(docs) + 1}q", *range(len(docs) + 1))
    data = b"".join(struct.pack(f"<{len(d)}i", *d) for d in docs)
    with open(prefix + ".bin", "wb") as f:
        f.write(data)
    with open(prefix + ".idx", "wb") as f:
        f.write(idx)


def test_text_jsonl_tokens_counts_and_decoding(tmp_path, tok):
    src = write_jsonl(tmp_path / "d.jsonl", [{"text": t} for t in TEXTS])
    stats = run_prepare(tmp_path, [src], ctx_len=100)
    kept = [t for t in TEXTS if t]
    b = BinIdx(tmp_path / "out")
    assert stats.documents == len(b) == len(kept) == 6
    assert stats.empty == 1
    expected = [tok.encode(t) + [0] for t in kept]
    assert stats.tokens == b.num_tokens == sum(len(e) for e in expected)
    assert b.dtype == np.int32 and b.code == 4
    for i, t in enumerate(kept):
        doc = b.doc(i)
        assert doc[-1] == 0 and doc.tolist() == expected[i]
        assert tok.decode(doc[:-1].tolist()) == t
    assert stats.longest == len(expected[kept.index(LONG)]) > 30000
    assert stats.over_ctx == sum(len(e) > 101 for e in expected) == 1
    assert stats.mask_output is None and not (tmp_path / "out.mask.idx").exists()


def test_byte_identical_to_json2binidx(tmp_path, trie_tok):
    src = write_jsonl(tmp_path / "d.jsonl", [{"text": t} for t in TEXTS])
    run_prepare(tmp_path, [src])
    json2binidx_reference(TEXTS, trie_tok, str(tmp_path / "ref"))
    assert (tmp_path / "out.bin").read_bytes() == (tmp_path / "ref.bin").read_bytes()
    assert (tmp_path / "out.idx").read_bytes() == (tmp_path / "ref.idx").read_bytes()


def test_workers_give_identical_files(tmp_path, monkeypatch):
    import rwkv_disha.data.prepare as P

    monkeypatch.setattr(P, "CHUNK_BYTES", 1 << 16)  # many chunks, so results arrive from both workers
    recs = [{"text": f"document {i}: " + "数据 data " * (i % 50)} for i in range(3000)]
    recs += [
        {"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}
        for i in range(500)
    ]
    src = write_jsonl(tmp_path / "d.jsonl", recs)
    s1 = run_prepare(tmp_path, [src], name="one", workers=1)
    s2 = run_prepare(tmp_path, [src], name="two", workers=2)
    assert s2.workers == 2 and s1.documents == s2.documents == 3500
    for suffix in (".bin", ".idx", ".mask.bin", ".mask.idx"):
        assert (tmp_path / f"one{suffix}").read_bytes() == (tmp_path / f"two{suffix}").read_bytes()


def test_chat_and_qa_masks(tmp_path, tok):
    recs = [
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello there!"}]},
        {"text": "plain text"},
        {"question": "2+2?", "answer": "4"},
        {"instruction": "Add", "input": "2 and 2", "output": "4", "system": "Be brief."},
        {"prompt": "p", "response": "r"},
        {"messages": [{"role": "assistant", "content": "A"}, {"role": "user", "content": "last"}]},
    ]
    src = write_jsonl(tmp_path / "c.jsonl", recs)
    stats = run_prepare(tmp_path, [src])
    assert stats.chat == 5 and stats.documents == 6
    b, m = BinIdx(tmp_path / "out"), BinIdx(tmp_path / "out.mask")
    assert m.dtype == np.uint8 and m.sizes.tolist() == b.sizes.tolist()
    texts = [
        "User: hi\n\nAssistant: Hello there!\n\n",
        "plain text",
        "User: 2+2?\n\nAssistant: 4\n\n",
        "System: Be brief.\n\nUser: Add\n2 and 2\n\nAssistant: 4\n\n",
        "User: p\n\nAssistant: r\n\n",
        "Assistant: A\n\nUser: last\n\n",
    ]
    answers = [" Hello there!\n\n", "plain text", " 4\n\n", " 4\n\n", " r\n\n", " A\n\n"]
    for i, (text, answer) in enumerate(zip(texts, answers)):
        ids, mask = b.doc(i).tolist(), m.doc(i).tolist()
        assert ids == tok.encode(text) + [0]  # same tokens as the whole rendered text
        assert tok.decode([t for t, k in zip(ids, mask) if k]) == answer
        assert mask[-1] == (0 if i == 5 else 1)  # the final token 0 is an answer token after an answer
    assert m.doc(0).tolist() == [0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1]
    assert stats.answer_tokens == int(sum(m.doc(i).sum() for i in range(len(m))))


def test_text_files(tmp_path, tok):
    txt = tmp_path / "t.txt"
    txt.write_text("first block\nstill first\n\n\n  second (indented)\n \nthird 中文\n", encoding="utf-8")
    s = run_prepare(tmp_path, [txt], name="blank")
    b = BinIdx(tmp_path / "blank")
    assert s.documents == 3
    assert [tok.decode(b.doc(i)[:-1].tolist()) for i in range(3)] == [
        "first block\nstill first",
        "  second (indented)",
        "third 中文",
    ]
    run_prepare(tmp_path, [txt], name="whole", txt_split="file")
    w = BinIdx(tmp_path / "whole")
    assert len(w) == 1 and tok.decode(w.doc(0)[:-1].tolist()) == txt.read_text()


def test_several_inputs_and_json_array(tmp_path, tok):
    a = write_jsonl(tmp_path / "a.jsonl", [{"text": "A"}])
    arr = tmp_path / "b.json"
    arr.write_text(json.dumps([{"text": "B"}, {"question": "q", "answer": "C"}]))
    run_prepare(tmp_path, [a, arr], append_eos=False)
    b = BinIdx(tmp_path / "out")
    assert [tok.decode(b.doc(i).tolist()) for i in range(3)] == ["A", "B", "User: q\n\nAssistant: C\n\n"]
    assert BinIdx(tmp_path / "out.mask").doc(0).tolist() == [1]  # plain text: every token counts


def test_malformed_lines_stop_writes_nothing(tmp_path, one_line_error):
    good = write_jsonl(tmp_path / "good.jsonl", [{"text": "old data"}])
    run_prepare(tmp_path, [good])
    before = {p: (tmp_path / p).read_bytes() for p in ("out.bin", "out.idx")}
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"text": "ok"}, "", '{"text": "unterminated', {"text": "ok2"}])
    msg = one_line_error(run_prepare, tmp_path, [bad], overwrite=True, match=r"bad\.jsonl:3: not valid JSON")
    assert "--on_error skip" in msg
    assert {p: (tmp_path / p).read_bytes() for p in before} == before
    assert sorted(os.listdir(tmp_path)) == ["bad.jsonl", "good.jsonl", "out.bin", "out.idx"]


@pytest.mark.parametrize(
    "line, match",
    [
        ('{"txt": "x"}', r":1: no \"text\""),
        ("[1, 2]", ":1: expected a JSON object"),
        ('{"text": 5}', ':1: "text" must be a string'),
        ('{"messages": [{"role": "robot", "content": "x"}]}', ":1: .*role 'robot'"),
        ('{"messages": "hi"}', ":1: .*must be a list"),
    ],
)
def test_malformed_record_kinds(tmp_path, one_line_error, line, match):
    src = tmp_path / "m.jsonl"
    src.write_text(line + "\n")
    one_line_error(run_prepare, tmp_path, [src], match=match)
    assert sorted(os.listdir(tmp_path)) == ["m.jsonl"]


def test_malformed_lines_skip(tmp_path, tok):
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"text": "ok"}, "{broken", {"nope": 1}, {"text": "ok2"}])
    warnings = []
    cfg = Config(input=[bad], output=str(tmp_path / "out"), workers=1, on_error="skip", progress=False)
    stats = prepare(cfg, log=warnings.append)
    assert stats.documents == 2 and stats.malformed == 2
    assert len(warnings) == 2
    assert warnings[0].startswith(f"warning: {bad}:2: not valid JSON")
    assert warnings[1].startswith(f'warning: {bad}:3: no "text"') and warnings[1].endswith("(skipped)")
    assert [e[0] for e in stats.errors] == [f"{bad}:2", f"{bad}:3"]
    b = BinIdx(tmp_path / "out")
    assert [tok.decode(b.doc(i)[:-1].tolist()) for i in range(2)] == ["ok", "ok2"]


def test_refuses_overwrite_and_removes_stale_masks(tmp_path, one_line_error):
    chat = write_jsonl(tmp_path / "c.jsonl", [{"question": "q", "answer": "a"}])
    run_prepare(tmp_path, [chat])
    assert (tmp_path / "out.mask.idx").exists()
    text = write_jsonl(tmp_path / "t.jsonl", [{"text": "t"}])
    one_line_error(run_prepare, tmp_path, [text], match="already exists; pass --overwrite 1")
    run_prepare(tmp_path, [text], overwrite=True)
    assert not (tmp_path / "out.mask.idx").exists() and not (tmp_path / "out.mask.bin").exists()
    assert BinIdx(tmp_path / "out").num_tokens == 2


def test_bad_options(tmp_path, one_line_error):
    src = write_jsonl(tmp_path / "d.jsonl", [{"text": "x"}])
    one_line_error(run_prepare, tmp_path, [tmp_path / "missing.jsonl"], match="input file not found")
    one_line_error(run_prepare, tmp_path, [], match="no input")
    empty = write_jsonl(tmp_path / "e.jsonl", [{"text": ""}])
    one_line_error(run_prepare, tmp_path, [empty], match="no documents")
    latin = tmp_path / "l.txt"
    latin.write_bytes("caf\u00e9".encode("latin-1"))
    one_line_error(run_prepare, tmp_path, [latin], match="not UTF-8")
    with pytest.raises(Exception, match="no output"):
        prepare(Config(input=[src], output=""))
    assert sorted(os.listdir(tmp_path)) == ["d.jsonl", "e.jsonl", "l.txt"]


def test_cli(tmp_path, capsys):
    src = write_jsonl(tmp_path / "d.jsonl", [{"text": "hello world"}, {"text": "world"}])
    out = str(tmp_path / "data" / "mydata")
    assert cli.main(["prepare", "--input", src, "--output", out, "--workers", "1", "--ctx_len", "1"]) == 0
    text = capsys.readouterr().out
    assert "documents         2" in text and "longer than ctx_len+1 = 2: 1 documents" in text
    assert len(BinIdx(out)) == 2
    assert cli.main(["prepare", "--input", src, "--output", out]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "already exists" in err and "\n" not in err


def test_line_numbers_across_chunks(tmp_path):
    """jsonl is cut into byte ranges read by the workers; errors still name the right line."""
    from rwkv_disha.data.records import LineNumbers, encode_items, iter_chunks

    lines = [json.dumps({"text": f"line {i} " + "x" * (i % 7)}) for i in range(1, 61)]
    lines[9] = ""  # a blank line is skipped, but counted
    lines[36] = "{bad json"
    lines[52] = '{"nope": 1}'
    src = tmp_path / "n.jsonl"
    src.write_text("\r\n".join(lines))  # CRLF line ends, no final newline
    chunks = list(iter_chunks(str(src), chunk_bytes=50))
    assert len(chunks) > 10 and sum(c[3] for c in chunks) == src.stat().st_size
    number, errors, docs = LineNumbers(), [], 0
    for kind, path, items, _ in chunks:
        enc = encode_items(kind, path, items)
        errors += number(kind, path, enc)
        docs += enc.sizes.size
    assert [e[0] for e in errors] == [f"{src}:37", f"{src}:53"]
    assert docs == 57
