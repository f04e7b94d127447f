"""The RWKV World tokenizer (docs/DATA.md, "The RWKV World tokenizer") and the RWKV chat format.

:func:`get_tokenizer` returns a :class:`WorldTokenizer`: ids come from the compiled
``pyrwkv_tokenizer`` wheel when it is installed (0.2 s to load), else from the pure-Python
``rwkv.rwkv_tokenizer.TRIE_TOKENIZER`` with the vocabulary file shipped in the ``rwkv`` package
(~4 s to build). Both are greedy longest-match over UTF-8 bytes and give identical ids.

Token 0 is end-of-text; it is not in the vocabulary file and decodes to the empty string.

Chat format (what RWKV World models were trained on)::

    System: <system>\\n\\n        (optional)
    User: <question>\\n\\n
    Assistant: <answer>\\n\\n
    ...

:func:`render_chat` splits a conversation into ``(text, is_answer)`` segments. Answer text is, for
each assistant turn, ``" " + content + "\\n\\n"`` (the space after ``Assistant:``, the content and the
blank line that closes the turn); ``"Assistant:"`` itself and every user / system turn are not answer
text. :func:`encode_segments` tokenizes the *concatenated* text in one go (so the ids are exactly what
tokenizing the whole rendered string gives, as json2binidx would on ``{"text": rendered}``) and marks a
token as an answer token when its first byte lies in answer text.
"""

from __future__ import annotations

import ast
import importlib.util
import os
import threading
from collections.abc import Iterable, Sequence
from functools import lru_cache

import numpy as np

from rwkv_disha.errors import RWKVDishaError

EOS = 0
VOCAB_SIZE = 65536  # ids of rwkv_vocab_v20230424 go up to 65535 (0 = end of text)
VOCAB_NAME = "rwkv_vocab_v20230424.txt"


def _vocab_path() -> str:
    for pkg in ("pyrwkv_tokenizer", "rwkv"):
        spec = importlib.util.find_spec(pkg)
        if spec is not None and spec.submodule_search_locations:
            for loc in spec.submodule_search_locations:
                p = os.path.join(loc, VOCAB_NAME)
                if os.path.isfile(p):
                    return p
    raise RWKVDishaError(
        f"the RWKV World vocabulary ({VOCAB_NAME}) was not found; pip install pyrwkv-tokenizer (or rwkv)"
    )


class WorldTokenizer:
    """``encode(str) -> list[int]``, ``decode(ids) -> str``, ``token_bytes``, ``eos = 0``."""

    eos = EOS
    vocab_size = VOCAB_SIZE

    def __init__(self, backend: str = "auto"):
        self.backend = None
        self._impl = None
        if backend in ("auto", "pyrwkv"):
            try:
                import pyrwkv_tokenizer

                self._impl = pyrwkv_tokenizer.RWKVTokenizer()
                self.backend = "pyrwkv"
            except ImportError:
                if backend == "pyrwkv":
                    raise RWKVDishaError(
                        "pyrwkv-tokenizer is not installed; pip install pyrwkv-tokenizer"
                    ) from None
        if self._impl is None:
            if backend not in ("auto", "trie"):
                raise RWKVDishaError(f"unknown tokenizer backend {backend!r} (use auto, pyrwkv or trie)")
            try:
                from rwkv.rwkv_tokenizer import TRIE_TOKENIZER
            except ImportError:
                raise RWKVDishaError(
                    "no RWKV World tokenizer is installed; pip install pyrwkv-tokenizer (or rwkv)"
                ) from None
            spec = importlib.util.find_spec("rwkv")
            path = os.path.join(spec.submodule_search_locations[0], VOCAB_NAME)
            self._impl = TRIE_TOKENIZER(path)
            self.backend = "trie"
        self._lock = threading.Lock()
        self._bytes: list[bytes] | None = None
        self._lengths: np.ndarray | None = None

    def encode(self, text: str) -> list[int]:
        return self._impl.encode(text)

    def _load_vocab(self, with_bytes: bool) -> None:
        with self._lock:
            if self._lengths is not None and (self._bytes is not None or not with_bytes):
                return
            lengths = np.zeros(VOCAB_SIZE, dtype=np.int64)
            table: list[bytes] = [b""] * VOCAB_SIZE
            with open(_vocab_path(), encoding="utf-8") as f:
                for line in f:
                    line = line.rstrip("\r\n")
                    if not line:
                        continue
                    a, b = line.index(" "), line.rindex(" ")
                    i = int(line[:a])
                    lengths[i] = int(line[b + 1 :])
                    if with_bytes:
                        tok = ast.literal_eval(line[a + 1 : b])
                        table[i] = tok.encode("utf-8") if isinstance(tok, str) else tok
            self._lengths = lengths
            if with_bytes:
                self._bytes = table

    @property
    def token_lengths(self) -> np.ndarray:
        """Bytes per token id (0 for token 0 and for unused ids)."""
        if self._lengths is None:
            self._load_vocab(with_bytes=False)
        return self._lengths

    def token_bytes(self, ids: Iterable[int]) -> bytes:
        if self._bytes is None:
            self._load_vocab(with_bytes=True)
        table = self._bytes
        try:
            return b"".join(table[int(i)] for i in ids)
        except IndexError:
            raise RWKVDishaError(f"token id out of the World vocabulary (0..{VOCAB_SIZE - 1})") from None

    def decode(self, ids: Iterable[int], errors: str = "replace") -> str:
        """Text of ``ids``; token 0 gives ``""``; invalid UTF-8 (a cut multi-byte char) gives U+FFFD."""
        return self.token_bytes(ids).decode("utf-8", errors=errors)


@lru_cache(maxsize=4)
def get_tokenizer(backend: str = "auto") -> WorldTokenizer:
    """The (cached) World tokenizer; ``backend`` is ``auto`` (pyrwkv if installed), ``pyrwkv`` or ``trie``."""
    return WorldTokenizer(backend)


# --- chat format --------------------------------------------------------------------------------------
ROLE_NAMES = {"user": "User", "assistant": "Assistant", "system": "System"}
ROLE_ALIASES = {
    "user": "user",
    "human": "user",
    "assistant": "assistant",
    "gpt": "assistant",
    "bot": "assistant",
    "model": "assistant",
    "system": "system",
}


def clean_turn(text: str) -> str:
    """RWKV chat convention: strip the turn and fold blank lines, since ``\\n\\n`` ends a turn."""
    text = text.replace("\r\n", "\n").strip()
    while "\n\n" in text:
        text = text.replace("\n\n", "\n")
    return text


def render_chat(messages: Sequence[dict]) -> list[tuple[str, bool]]:
    """``[{"role", "content"}, ...]`` -> ``[(text, is_answer), ...]`` in the RWKV chat format.

    ``User: q\\n\\n`` and ``System: s\\n\\n`` are one non-answer segment each; an assistant turn is
    ``("Assistant:", False)`` then ``(" " + a + "\\n\\n", True)``. Contents are cleaned with
    :func:`clean_turn`. Raises ``ValueError`` (with the reason) for a malformed conversation.
    """
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ValueError("messages must be a non-empty list of {role, content} objects")
    out: list[tuple[str, bool]] = []
    for k, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ValueError(f"message {k} is not an object")
        role = m.get("role", m.get("from"))
        content = m.get("content", m.get("value"))
        if not isinstance(role, str) or role.lower() not in ROLE_ALIASES:
            raise ValueError(f"message {k} has role {role!r}; use user, assistant or system")
        if not isinstance(content, str):
            raise ValueError(f"message {k} has no string content")
        role = ROLE_ALIASES[role.lower()]
        content = clean_turn(content)
        if role == "assistant":
            out.append(("Assistant:", False))
            out.append((f" {content}\n\n", True))
        else:
            out.append((f"{ROLE_NAMES[role]}: {content}\n\n", False))
    return out


def encode_segments(
    segments: Sequence[tuple[str, bool]], tokenizer: WorldTokenizer | None = None
) -> tuple[list[int], np.ndarray]:
    """Tokenize the concatenated segments in one go; return ``(ids, answer_mask uint8)``.

    A token is an answer token when its first byte lies in an ``is_answer`` segment. The ids are
    identical to ``tokenizer.encode("".join(text for text, _ in segments))``.
    """
    tok = tokenizer or get_tokenizer()
    text = "".join(t for t, _ in segments)
    ids = tok.encode(text)
    lengths = tok.token_lengths[np.asarray(ids, dtype=np.int64)] if ids else np.zeros(0, np.int64)
    starts = np.zeros(len(ids), dtype=np.int64)
    if len(ids) > 1:
        np.cumsum(lengths[:-1], out=starts[1:])
    seg_bytes = np.array([len(t.encode("utf-8")) for t, _ in segments], dtype=np.int64)
    seg_end = np.cumsum(seg_bytes)
    if ids and int(lengths.sum()) != int(seg_end[-1]):
        raise RuntimeError("token byte lengths do not add up to the text; vocabulary mismatch")
    seg_answer = np.array([a for _, a in segments], dtype=bool)
    seg_of_token = np.searchsorted(seg_end, starts, side="right")
    mask = seg_answer[seg_of_token].astype(np.uint8) if ids else np.zeros(0, np.uint8)
    return ids, mask
