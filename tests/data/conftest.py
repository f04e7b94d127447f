"""Fixtures for the data tests: the World tokenizer (both backends) and a one-line-error checker."""

from __future__ import annotations

import pytest

from rwkv_disha.errors import RWKVDishaError


@pytest.fixture(scope="session")
def tok():
    from rwkv_disha.data.tokenizer import get_tokenizer

    return get_tokenizer()


@pytest.fixture(scope="session")
def trie_tok():
    """The fallback backend: BlinkDL's pure-Python TRIE tokenizer from the `rwkv` package (an
    implementation independent of pyrwkv-tokenizer)."""
    pytest.importorskip("rwkv")
    from rwkv_disha.data.tokenizer import WorldTokenizer

    t = WorldTokenizer(backend="trie")
    assert t.backend == "trie"
    return t


@pytest.fixture
def one_line_error():
    """one_line_error(fn, *args, match=...) -> message; asserts a one-line RWKVDishaError."""

    def check(fn, *args, match: str, **kwargs) -> str:
        with pytest.raises(RWKVDishaError, match=match) as info:
            fn(*args, **kwargs)
        msg = str(info.value)
        assert "\n" not in msg, f"error message is not one line: {msg!r}"
        return msg

    return check
