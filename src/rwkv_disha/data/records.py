"""Input records -> tokens (+ answer masks), shared by ``prepare`` and the on-the-fly ``jsonl`` dataset.

Accepted JSON records (one per line of a ``.jsonl`` file):

- ``{"text": "..."}`` (the key is ``--text_key``; a list of strings is joined with ``"\\n\\n"``; a bare
  JSON string is also a text document), tokenized exactly as json2binidx does;
- chat: ``{"messages": [{"role": "user"|"assistant"|"system", "content": "..."}, ...]}`` (ShareGPT's
  ``{"conversations": [{"from": "human"|"gpt"|"system", "value": ...}]}`` too; an optional top-level
  ``"system"`` string becomes a first system turn), rendered in the RWKV chat format;
- Q&A: one of ``question`` / ``prompt`` / ``instruction`` and one of ``answer`` / ``response`` /
  ``output`` (an optional non-empty ``input`` is appended to the question after a newline, an optional
  ``system`` becomes a system turn), rendered as a one-turn chat.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from rwkv_disha.data.sft import sft_segments
from rwkv_disha.data.tokenizer import EOS, WorldTokenizer, encode_segments, get_tokenizer, render_chat

QUESTION_KEYS = ("question", "prompt", "instruction")
ANSWER_KEYS = ("answer", "response", "output")
JSON_SUFFIXES = (".jsonl", ".jsonlines", ".json", ".ndjson")
TXT_SPLITS = ("blank", "file")


def record_segments(obj, text_key: str = "text") -> tuple[list[tuple[str, bool]], str]:
    """One parsed JSON record -> ``(segments, kind)``, kind ``text`` / ``chat`` / ``qa``.

    Text records are one segment marked as answer (every token of a plain-text document counts in
    the ``qa`` loss mask). Raises ``ValueError`` with the reason for a malformed record.
    """
    if isinstance(obj, str):
        return [(obj, True)], "text"
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
    if text_key in obj:
        text = obj[text_key]
        if isinstance(text, list) and all(isinstance(t, str) for t in text):
            text = "\n\n".join(text)
        if not isinstance(text, str):
            raise ValueError(f'"{text_key}" must be a string, got {type(text).__name__}')
        return [(text, True)], "text"
    system = obj.get("system")
    if system is not None and not isinstance(system, str):
        raise ValueError('"system" must be a string')
    head = [{"role": "system", "content": system}] if system else []
    for key in ("messages", "conversations"):
        if key in obj:
            msgs = obj[key]
            if not isinstance(msgs, list):
                raise ValueError(f'"{key}" must be a list of messages')
            try:
                return render_chat(head + msgs), "chat"
            except ValueError as e:
                raise ValueError(f'"{key}": {e}') from None
    q_key = next((k for k in QUESTION_KEYS if k in obj), None)
    a_key = next((k for k in ANSWER_KEYS if k in obj), None)
    if q_key and a_key:
        q, a = obj[q_key], obj[a_key]
        if not isinstance(q, str) or not isinstance(a, str):
            raise ValueError(f'"{q_key}" and "{a_key}" must be strings')
        extra = obj.get("input")
        if isinstance(extra, str) and extra.strip():
            q = f"{q}\n{extra}"
        msgs = head + [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        return render_chat(msgs), "qa"
    keys = ", ".join(sorted(map(str, obj))) or "none"
    raise ValueError(
        f'no "{text_key}", "messages" or question/answer keys (keys: {keys}); '
        "see docs/DATA.md for the input forms"
    )


def encode_segments_doc(
    segments: list[tuple[str, bool]], kind: str, tok: WorldTokenizer, append_eos: bool = True
) -> tuple[np.ndarray, np.ndarray | None]:
    """``(tokens int32, answer mask uint8 or None for plain text)``; empty text gives 0 tokens.

    With ``append_eos`` the end-of-text token 0 is appended; it is an answer token when the last
    segment is (an assistant turn, or plain text).
    """
    if kind == "text":
        text = segments[0][0]
        ids = np.asarray(tok.encode(text) if text else [], dtype=np.int32)
        mask = None
    else:
        lst, m = encode_segments(segments, tok)
        ids, mask = np.asarray(lst, dtype=np.int32), m
    if append_eos and ids.size:
        ids = np.append(ids, np.int32(EOS))
        if mask is not None:
            mask = np.append(mask, np.uint8(1 if segments[-1][1] else 0))
    return ids, mask


def split_text(text: str, txt_split: str) -> list[str]:
    """``blank``: one document per block separated by blank lines; ``file``: the whole text."""
    if txt_split == "file":
        return [text] if text else []
    blocks = re.split(r"\n(?:[ \t]*\n)+", text.replace("\r\n", "\n"))
    return [b.strip("\n") for b in blocks if b.strip()]


def is_json_file(path: str) -> bool:
    return path.lower().endswith(JSON_SUFFIXES)


@dataclass
class Encoded:
    """Several encoded documents back to back (what a worker returns for one chunk of input)."""

    tokens: np.ndarray  # int32, all documents concatenated
    sizes: np.ndarray  # int64 per document
    masks: np.ndarray | None = None  # uint8 per token; None when every document is plain text
    # (path, line or record number, reason); a jsonl chunk numbers lines from 1 within the chunk
    errors: list[tuple[str, int, str]] = field(default_factory=list)
    empty: int = 0  # documents skipped because their text is empty (json2binidx skips them too)
    chat: int = 0  # chat / Q&A documents
    lines: int = 0  # lines read (jsonl chunks), to number the next chunk's lines


def json_problem(e: BaseException) -> str:
    """Why ``json.loads`` refused some input, in one line."""
    if isinstance(e, UnicodeDecodeError):
        return "not valid UTF-8"
    if isinstance(e, json.JSONDecodeError):
        # some messages end in " at" already ("Invalid control character at"): say it once
        return f"not valid JSON ({e.msg.removesuffix(' at')} at column {e.colno})"
    if isinstance(e, RecursionError):
        return "not readable JSON (nested too deeply)"
    if "integer string conversion" in str(e):  # Python refuses ints of more than 4300 digits
        return "not readable JSON (a number with more than 4300 digits)"
    return f"not readable JSON ({str(e).splitlines()[0] if str(e) else type(e).__name__})"


def parse_json_line(raw: bytes) -> object:
    """One JSON value; any way it cannot be read (bad JSON, bad UTF-8, absurd nesting or numbers) is a
    ``ValueError`` with a one-line reason."""
    try:
        return json.loads(raw)
    except (ValueError, RecursionError) as e:
        raise ValueError(json_problem(e)) from None


def _read_lines(path: str, span: tuple[int, int]) -> list[bytes]:
    start, end = span
    with open(path, "rb") as f:
        f.seek(start)
        data = f.read(end - start)
    lines = data.split(b"\n")
    if lines and not lines[-1]:
        lines.pop()
    return lines


def encode_items(
    kind: str,
    path: str,
    items,
    text_key: str = "text",
    append_eos: bool = True,
    sft_fields: tuple[str, str] | None = None,
) -> Encoded:
    """Encode one chunk of input (see :func:`iter_chunks`): ``kind`` ``jsonl`` (items: a byte range
    ``(start, end)`` of the file, read here so that workers, not the parent, do the reading), ``obj``
    (items: ``(record number, parsed object)``) or ``text`` (items: ``(block number, str)``).
    ``sft_fields``: records are RWKV-PEFT SFT query / response pairs (:mod:`rwkv_disha.data.sft`)."""
    tok = get_tokenizer()
    toks: list[np.ndarray] = []
    masks: list[np.ndarray | None] = []
    out = Encoded(np.zeros(0, np.int32), np.zeros(0, np.int64))
    if kind == "jsonl":
        lines = _read_lines(path, items)
        out.lines = len(lines)
        items = ((n, line) for n, line in enumerate(lines, start=1) if line.strip())
    for where, raw in items:
        try:
            obj = parse_json_line(raw) if kind == "jsonl" else raw
            if sft_fields:  # RWKV-PEFT's template ends with its own end-of-turn character, not token 0
                segments, rkind, eos = sft_segments(obj, sft_fields), "qa", False
            else:
                segments, rkind = (
                    record_segments(obj, text_key) if kind != "text" else ([(obj, True)], "text")
                )
                eos = append_eos
            ids, mask = encode_segments_doc(segments, rkind, tok, eos)
        except UnicodeEncodeError as e:  # a lone surrogate such as "\ud800" cannot become UTF-8 bytes
            bad = e.object[e.start : e.end].encode("unicode_escape").decode()
            out.errors.append((path, where, f"the text holds {bad}, a lone surrogate (not valid Unicode)"))
            continue
        except ValueError as e:
            out.errors.append((path, where, str(e)))
            continue
        if ids.size == 0:
            out.empty += 1
            continue
        out.chat += rkind != "text"
        toks.append(ids)
        masks.append(mask)
    if toks:
        out.tokens = np.concatenate(toks)
        out.sizes = np.array([t.size for t in toks], dtype=np.int64)
        if any(m is not None for m in masks):
            out.masks = np.concatenate(
                [m if m is not None else np.ones(t.size, np.uint8) for t, m in zip(toks, masks)]
            )
    return out


class LineNumbers:
    """Turns the chunk-relative error positions of successive :class:`Encoded` results (in input
    order) into ``file:line`` labels."""

    def __init__(self):
        self.path: str | None = None
        self.base = 0

    def __call__(self, kind: str, path: str, enc: Encoded) -> list[tuple[str, str]]:
        if path != self.path:
            self.path, self.base = path, 0
        if kind == "jsonl":
            out = [(f"{p}:{self.base + n}", why) for p, n, why in enc.errors]
            self.base += enc.lines
            return out
        if kind == "obj":
            return [(f"{p}: record {n}", why) for p, n, why in enc.errors]
        return [(f"{p}: block {n}", why) for p, n, why in enc.errors]


def _one_json_object(path: str) -> dict | None:
    """The record a .json file holds as one JSON object spread over lines, or None (then it is JSON lines;
    a file over 64 MB is taken as JSON lines without reading it whole)."""
    if os.path.getsize(path) > 1 << 26:
        return None
    with open(path, "rb") as f:
        data = f.read()
    try:
        obj = json.loads(data)
    except (ValueError, RecursionError):
        return None
    return obj if isinstance(obj, dict) else None


def iter_chunks(
    path: str, txt_split: str = "blank", chunk_bytes: int = 1 << 20, chunk_items: int = 2048
) -> Iterator[tuple[str, str, object, int]]:
    """Yield ``(kind, path, items, bytes)`` chunks of an input file for :func:`encode_items`.

    ``.jsonl`` / ``.json`` files are JSON (a ``.json`` file whose first character is ``[`` is one JSON
    array of records); a jsonl chunk is a byte range ending at a line end. Anything else is UTF-8 text
    split by ``txt_split``. Raises ``ValueError`` for a text file that is not UTF-8 or a JSON array
    file that does not parse.
    """
    if is_json_file(path):
        with open(path, "rb") as f:
            first = f.read(64).removeprefix(b"\xef\xbb\xbf").lstrip()  # a BOM (json.loads of bytes skips it)
        whole = _one_json_object(path) if path.lower().endswith(".json") and first.startswith(b"{") else None
        if whole is not None:  # a pretty-printed .json holding one record
            yield "obj", path, [(1, whole)], os.path.getsize(path)
            return
        if path.lower().endswith(".json") and first.startswith(b"["):
            with open(path, "rb") as f:
                data = f.read()
            try:
                arr = json.loads(data)
            except (ValueError, RecursionError) as e:
                raise ValueError(f"{path}: {json_problem(e)}; expected a JSON array of records") from None
            if not isinstance(arr, list):
                raise ValueError(f"{path}: not a JSON array of records")
            for k in range(0, len(arr), chunk_items):
                part = arr[k : k + chunk_items]
                nbytes = len(data) * len(part) // max(len(arr), 1)
                yield "obj", path, list(enumerate(part, start=k + 1)), nbytes
            return
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            pos = 0
            while pos < size:
                f.seek(min(pos + chunk_bytes, size))
                f.readline()  # extend to the end of the line
                end = f.tell()
                yield "jsonl", path, (pos, end), end - pos
                pos = end
        return
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    docs = split_text(text.removeprefix("\ufeff"), txt_split)  # a BOM is no text (as --data_type utf-8)
    nbytes = len(text.encode("utf-8"))
    step = max(1, min(chunk_items, len(docs) * chunk_bytes // max(nbytes, 1)))
    for k in range(0, len(docs), step):
        part = docs[k : k + step]
        yield "text", path, list(enumerate(part, start=k + 1)), nbytes * len(part) // max(len(docs), 1)
