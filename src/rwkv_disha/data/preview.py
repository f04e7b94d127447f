"""`rwkv-disha prepare --preview N`: the first N records as training will see them, written to stdout.

Each record is tokenized exactly as `prepare` would, then shown as text with the tokens that count toward
the loss under ``--loss_mask qa`` marked: green on a terminal, ``[...]`` otherwise (``NO_COLOR`` turns
colour off). The first token of a document is never a label and tokens after ``ctx_len + 1`` are cut by
``--dataload pad`` / ``only``, so neither is marked. Nothing is written.
"""

from __future__ import annotations

import os
import sys
from typing import TextIO

import numpy as np

from rwkv_disha.data.records import LineNumbers, encode_items, iter_chunks
from rwkv_disha.errors import RWKVDishaError

EOS_SHOWN = "<eos>"  # token 0 decodes to nothing; show where it is
_GREEN, _DIM, _RESET = "\x1b[32m", "\x1b[2m", "\x1b[0m"


def _runs(flags: np.ndarray) -> list[tuple[int, int, bool]]:
    """``(start, end, flag)`` of each run of equal values in ``flags``."""
    cuts = [0, *(np.flatnonzero(np.diff(flags.astype(np.int8))) + 1).tolist(), len(flags)]
    return [(a, b, bool(flags[a])) for a, b in zip(cuts[:-1], cuts[1:]) if b > a]


def _text(tok, ids: np.ndarray) -> str:
    """The text of ``ids`` with every token 0 shown as ``<eos>``."""
    parts, start = [], 0
    for k in [*np.flatnonzero(ids == 0).tolist(), len(ids)]:
        parts.append(tok.decode(ids[start:k].tolist()))
        if k < len(ids):
            parts.append(EOS_SHOWN)
        start = k + 1
    return "".join(parts)


def render_record(
    tok, ids: np.ndarray, mask: np.ndarray | None, ctx_len: int, colour: bool
) -> tuple[str, dict]:
    """``(marked text, counts)`` of one document: counts are its tokens, the labels that count with
    ``--loss_mask qa`` and with ``pad`` / ``none``, and the tokens cut by ``ctx_len``."""
    n = len(ids)
    seen = min(n, ctx_len + 1)  # a pad / only sample reads at most ctx_len + 1 tokens
    counted = np.ones(seen, bool) if mask is None else mask[:seen].astype(bool)
    counted[0] = False  # the first token is input only, never a label
    out = []
    for a, b, on in _runs(counted):
        text = _text(tok, ids[a:b])
        if colour:
            out.append(f"{_GREEN if on else _DIM}{text}{_RESET}")
        else:
            out.append(f"[{text}]" if on else text)
    counts = {"tokens": n, "qa": int(counted.sum()), "pad": seen - 1, "cut": n - seen}
    return "".join(out), counts


def preview(inputs: list[str], n: int, ctx_len: int, txt_split: str, text_key: str, append_eos: bool,
            on_error: str = "stop", out: TextIO | None = None,
            sft_fields: tuple[str, str] | None = None) -> int:  # fmt: skip
    """Print the first ``n`` documents of ``inputs``; returns how many were shown."""
    from rwkv_disha.data.tokenizer import get_tokenizer

    out = out or sys.stdout
    colour = out.isatty() and not os.environ.get("NO_COLOR")
    tok, shown, number = get_tokenizer(), 0, LineNumbers()
    legend = "green" if colour else "[in brackets]"
    out.write(f"tokens counting toward the loss with --loss_mask qa are {legend}; ctx_len {ctx_len}\n")
    for path in inputs:
        try:  # small chunks: only the first records are tokenized
            chunks = iter_chunks(path, txt_split, chunk_bytes=1 << 16, chunk_items=max(n, 1))
            for kind, p, items, _ in chunks:
                enc = encode_items(kind, p, items, text_key, append_eos, sft_fields)
                for where, why in number(kind, p, enc):
                    if on_error == "stop":
                        raise RWKVDishaError(f"{where}: {why}; fix the line or pass --on_error skip")
                    print(f"warning: {where}: {why} (skipped)", file=sys.stderr)
                ends = np.cumsum(enc.sizes)
                for end, size in zip(ends, enc.sizes):
                    ids = enc.tokens[end - size : end]
                    mask = None if enc.masks is None else enc.masks[end - size : end]
                    kind_name = "text" if mask is None or mask.all() else "chat / Q&A"
                    text, c = render_record(tok, ids, mask, ctx_len, colour)
                    cut = f", {c['cut']} cut by ctx_len" if c["cut"] else ""
                    out.write(
                        f"\n--- record {shown + 1} ({kind_name}, {p}): {c['tokens']} tokens; loss counts "
                        f"{c['qa']} with --loss_mask qa, {c['pad']} with pad / none{cut}\n{text}\n"
                    )
                    shown += 1
                    if shown >= n:
                        return shown
        except ValueError as e:
            raise RWKVDishaError(str(e)) from None
    return shown
