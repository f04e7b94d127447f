"""World tokenizer: both backends agree; decode; chat rendering and answer masks."""

from __future__ import annotations

import random

import numpy as np
import pytest

from rwkv_disha.data.tokenizer import encode_segments, render_chat

TEXTS = [
    "Hello world! The quick brown fox jumps over the lazy dog.",
    "中文文本：今天天气很好，我们去公园散步吧。日本語のテキストもあります。한국어 문장.",
    "emoji 😀🎉👨‍👩‍👧‍👦 flags 🇫🇷 and symbols ∑∫√ ≠ ≤",
    "def f(x):\n\treturn x ** 2  # code\n\n\n    indented\r\nwindows line",
    "User: hi\n\nAssistant: Hello there!\n\n",
    " " * 300 + "-" * 90 + "\x00\x01\x7f",
    "",
]


def random_text(seed: int, n: int = 3000) -> str:
    rng = random.Random(seed)
    pools = [
        range(0x20, 0x7F),
        range(0x4E00, 0x4FFF),
        range(0x1F600, 0x1F650),
        range(0xAC00, 0xAC80),
        [10, 9],
    ]
    return "".join(chr(rng.choice(rng.choice(pools))) for _ in range(n))


def test_pyrwkv_and_trie_give_identical_ids(tok, trie_tok):
    assert tok.backend == "pyrwkv"
    for text in TEXTS + [random_text(s) for s in range(3)]:
        assert tok.encode(text) == trie_tok.encode(text), text[:40]


def test_decode_round_trip_and_token_zero(tok):
    for text in TEXTS + [random_text(11)]:
        assert tok.decode(tok.encode(text)) == text
    ids = tok.encode("Hello")
    assert tok.decode(ids + [0]) == "Hello"  # end of text decodes to nothing
    # a character the vocabulary spells as several byte tokens: a cut sequence gives U+FFFD, never raises
    rare = next(c for c in map(chr, range(0x20000, 0x20100)) if len(tok.encode(c)) > 1)
    ids = tok.encode(rare)
    assert tok.token_bytes(ids) == rare.encode()
    assert tok.decode(ids[:1]) == "\ufffd"
    assert tok.decode(ids) == rare
    assert tok.token_lengths[tok.encode("Hello")[0]] == 5


def test_known_ids(tok):
    # ids of rwkv_vocab_v20230424, checked by hand against the vocabulary file
    assert tok.encode("User: hi\n\n") == [24281, 59, 4571, 261]
    assert tok.encode("Assistant:") == [5585, 41693, 59]


def test_render_chat_segments():
    segs = render_chat(
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "  hi\n\n\nthere \r\n"},
            {"role": "assistant", "content": "Hello!"},
        ]
    )
    assert segs == [
        ("System: Be brief.\n\n", False),
        ("User: hi\nthere\n\n", False),  # stripped, blank lines folded: \n\n ends a turn
        ("Assistant:", False),
        (" Hello!\n\n", True),
    ]
    sharegpt = render_chat([{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}])
    assert sharegpt == [("User: q\n\n", False), ("Assistant:", False), (" a\n\n", True)]


@pytest.mark.parametrize(
    "bad, match",
    [
        ([], "non-empty"),
        ([{"role": "bot2", "content": "x"}], "role"),
        ([{"role": "user"}], "content"),
        (["x"], "object"),
    ],
)
def test_render_chat_rejects(bad, match):
    with pytest.raises(ValueError, match=match):
        render_chat(bad)


def test_encode_segments_answer_tokens(tok):
    msgs = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "Hello there!"},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
    ]
    segs = render_chat(msgs)
    ids, mask = encode_segments(segs, tok)
    full = "".join(t for t, _ in segs)
    assert ids == tok.encode(full)  # identical to tokenizing the whole rendered text
    expected = [0] * 13 + [1, 1, 1, 1] + [0] * 10 + [1, 1]
    assert mask.tolist() == expected
    answer_text = "".join(tok.decode([i]) for i, m in zip(ids, mask) if m)
    assert answer_text == " Hello there!\n\n 4\n\n"
    prompt_text = "".join(tok.decode([i]) for i, m in zip(ids, mask) if not m)
    assert prompt_text.endswith("User: 2+2?\n\nAssistant:")


def test_encode_segments_cjk_answer(tok):
    segs = render_chat([{"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好！😀"}])
    ids, mask = encode_segments(segs, tok)
    assert tok.decode(ids) == "User: 你好\n\nAssistant: 你好！😀\n\n"
    answer = [i for i, m in zip(ids, mask) if m]
    assert tok.decode(answer) == " 你好！😀\n\n"
    assert np.all(np.diff(np.flatnonzero(mask)) == 1)  # one contiguous answer span
