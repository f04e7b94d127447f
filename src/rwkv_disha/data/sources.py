"""Token sources, one per ``--data_type``, all read the same way (docs/DATA.md, "Data types").

A source holds documents back to back: ``len(src)`` documents, ``src.doc(i)``, ``src.tokens(start,
length)`` (any range of the whole stream), ``src.num_tokens`` and ``src.sizes``. :class:`BinIdx` is one;
:class:`ArrayDocs` holds tokenised jsonl / text / dummy data in memory; :class:`StreamDocs` maps a flat
``.npy`` or ``uint16`` token file. :func:`open_source` returns ``(source, answer masks or None, name)``
for a data type; the masks are a source of the same shape holding 1 for each answer token.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from rwkv_disha.data.binidx import MASK_SUFFIX, BinIdx, split_prefix
from rwkv_disha.data.sampling import M64
from rwkv_disha.data.sft import SftSpec, load_sft
from rwkv_disha.errors import RWKVDishaError


class ArrayDocs:
    """Documents held in memory (one flat array + sizes), with the same reading API as :class:`BinIdx`."""

    def __init__(self, flat: np.ndarray, sizes: Sequence[int]):
        self.flat = np.ascontiguousarray(flat)
        self.sizes = np.asarray(sizes, dtype=np.int64)
        self.offsets = np.zeros(self.sizes.size + 1, dtype=np.int64)
        np.cumsum(self.sizes, out=self.offsets[1:])
        self.num_tokens = int(self.offsets[-1])
        if self.num_tokens != self.flat.size:
            raise ValueError("sizes do not add up to the tokens")

    @classmethod
    def from_docs(cls, docs: Sequence[np.ndarray], dtype=np.int32) -> ArrayDocs:
        flat = np.concatenate([np.asarray(d, dtype=dtype) for d in docs]) if docs else np.zeros(0, dtype)
        return cls(flat, [len(d) for d in docs])

    def __len__(self) -> int:
        return int(self.sizes.size)

    def doc(self, i: int) -> np.ndarray:
        return self.flat[self.offsets[i] : self.offsets[i + 1]]

    def tokens(self, start: int, length: int) -> np.ndarray:
        return self.flat[start : start + length]


class StreamDocs:
    """A flat token file (``.npy`` or raw ``uint16``), memory-mapped lazily; documents end after each
    token 0 (end of text), the last one at the end of the file."""

    def __init__(self, path: str, kind: str, split_docs: bool):
        self.path, self.kind = path, kind
        self._arr = None
        arr = self._array()
        if arr.ndim != 1:
            raise RWKVDishaError(
                f"{path} holds a {arr.ndim}-D array; --data_type numpy needs a 1-D token array"
            )
        if not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.bool_)):
            raise RWKVDishaError(f"{path} holds {arr.dtype} values; token ids must be integers")
        self.num_tokens = int(arr.size)
        self.offsets = None
        self.sizes = None
        if split_docs and arr.size:
            ends = np.flatnonzero(arr == 0) + 1
            if ends.size == 0 or ends[-1] != arr.size:
                ends = np.append(ends, arr.size)
            self.offsets = np.concatenate([[0], ends]).astype(np.int64)
            self.sizes = np.diff(self.offsets)

    def _array(self) -> np.ndarray:
        if self._arr is None:
            if self.kind == "numpy":
                self._arr = np.load(self.path, mmap_mode="r", allow_pickle=False)
            elif os.path.getsize(self.path) == 0:
                self._arr = np.zeros(0, np.uint16)
            else:
                self._arr = np.asarray(np.memmap(self.path, dtype="<u2", mode="r"))
        return self._arr

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_arr": None}

    def __len__(self) -> int:
        return 0 if self.sizes is None else int(self.sizes.size)

    def doc(self, i: int) -> np.ndarray:
        return self._array()[self.offsets[i] : self.offsets[i + 1]]

    def tokens(self, start: int, length: int) -> np.ndarray:
        return self._array()[start : start + length]


Opened = tuple[object, object, str]  # (source, answer masks or None, name for messages)


def _resolve_file(data_file: str, data_type: str) -> str:
    if not data_file:
        raise RWKVDishaError(f"no --data_file given for --data_type {data_type}")
    if os.path.isdir(data_file):
        raise RWKVDishaError(f"--data_file {data_file} is a directory; give a file (--data_type {data_type})")
    if not os.path.isfile(data_file):
        raise RWKVDishaError(f"data file not found: {data_file} (--data_type {data_type})")
    return data_file


def open_binidx(data_file: str, with_masks: bool) -> Opened:
    """``prefix.bin/.idx`` (+ the ``prefix.mask.bin/.idx`` answer masks ``prepare`` writes)."""
    if not data_file:
        raise RWKVDishaError(
            "no --data_file given: pass the binidx prefix (data/x for data/x.bin + data/x.idx)"
        )
    source = BinIdx(data_file)
    if np.issubdtype(source.dtype, np.floating):  # a valid binidx, but as ids 17.5 would train as 17
        raise RWKVDishaError(
            f"{source.idx_path} declares {source.dtype.name} values (dtype code {source.code}); token ids "
            "must be integers: re-create it with `rwkv-disha prepare`"
        )
    if not with_masks:
        return source, None, source.prefix
    mp = split_prefix(data_file) + MASK_SUFFIX
    if not (os.path.isfile(mp + ".bin") and os.path.isfile(mp + ".idx")):
        raise RWKVDishaError(
            f"--loss_mask qa needs the answer masks {mp}.bin/.idx, which `rwkv-disha prepare` "
            "writes for chat / Q&A input; re-run prepare on that input or use --loss_mask pad"
        )
    masks = BinIdx(mp)
    if masks.dtype != np.uint8:  # as weights, float / signed values would give NaN or negative losses
        raise RWKVDishaError(
            f"{mp}.idx declares {masks.dtype.name} values (dtype code {masks.code}); answer masks are uint8 "
            "(dtype code 1), 1 for each answer token: re-run `rwkv-disha prepare`"
        )
    if len(masks) != len(source) or not np.array_equal(masks.sizes, source.sizes):
        raise RWKVDishaError(
            f"{mp}.idx does not match {source.prefix}.idx (different documents); re-run `rwkv-disha prepare`"
        )
    return source, masks, source.prefix


def load_jsonl(path: str, sft_fields: tuple[str, str] | None = None) -> Opened:
    """Tokenise a jsonl file (every record form ``prepare`` takes, or with ``sft_fields`` RWKV-PEFT's SFT
    query / response records) into memory, once."""
    from rwkv_disha.data.records import LineNumbers, encode_items, iter_chunks

    path = _resolve_file(path, "jsonl")
    toks, masks, sizes = [], [], []
    number = LineNumbers()
    try:
        for kind, p, items, _ in iter_chunks(path):
            enc = encode_items(kind, p, items, sft_fields=sft_fields)
            errors = number(kind, p, enc)
            if errors:
                where, why = errors[0]
                raise RWKVDishaError(
                    f"{where}: {why}; fix the line (or `rwkv-disha prepare --on_error skip`)"
                )
            toks.append(enc.tokens)
            sizes.append(enc.sizes)
            masks.append(enc.masks if enc.masks is not None else np.ones(enc.tokens.size, np.uint8))
    except ValueError as e:
        raise RWKVDishaError(str(e)) from None
    flat = np.concatenate(toks) if toks else np.zeros(0, np.int32)
    sz = np.concatenate(sizes) if sizes else np.zeros(0, np.int64)
    mflat = np.concatenate(masks) if masks else np.zeros(0, np.uint8)
    return ArrayDocs(flat, sz), ArrayDocs(mflat, sz), path


def load_text(path: str, encoding: str) -> Opened:
    """A text file (``utf-8`` / ``utf-16le``), one document per blank-line separated block."""
    from rwkv_disha.data.records import encode_segments_doc, split_text
    from rwkv_disha.data.tokenizer import get_tokenizer

    path = _resolve_file(path, encoding)
    try:
        with open(path, encoding=encoding) as f:
            text = f.read()
    except UnicodeDecodeError as e:
        raise RWKVDishaError(f"{path} is not {encoding} text ({e.reason} at byte {e.start})") from None
    tok = get_tokenizer()
    docs = [
        encode_segments_doc([(t, True)], "text", tok)[0] for t in split_text(text.lstrip("\ufeff"), "blank")
    ]
    return ArrayDocs.from_docs([d for d in docs if d.size]), None, path


def open_stream(path: str, data_type: str, split_docs: bool) -> Opened:
    """A flat token file: ``numpy`` (a 1-D ``.npy`` array) or ``uint16`` (raw little-endian ids)."""
    path = _resolve_file(path, data_type)
    if data_type == "uint16" and os.path.getsize(path) % 2:
        raise RWKVDishaError(f"{path} has an odd number of bytes; a uint16 token file is 2 bytes per token")
    if data_type == "numpy":
        with open(path, "rb") as f:
            if f.read(6) != b"\x93NUMPY":
                raise RWKVDishaError(f"{path} is not a .npy file (no NUMPY magic); write it with numpy.save")
    try:
        return StreamDocs(path, data_type, split_docs), None, path
    except ValueError as e:
        raise RWKVDishaError(f"{path} is not a readable .npy token array ({e})".replace("\n", " ")) from None


def dummy_corpus(ctx_len: int, vocab_size: int, seed: int, n_docs: int = 256) -> tuple[ArrayDocs, ArrayDocs]:
    """Synthetic documents for smoke tests: arithmetic token sequences (learnable) of 2 .. 2*ctx_len+2
    tokens ending with 0; their answer mask is the second half of each document."""
    rng = np.random.default_rng([seed & M64, 0xD0])
    top = max(vocab_size - 1, 1)
    docs, masks = [], []
    for _ in range(n_docs):
        n = int(rng.integers(2, 2 * ctx_len + 3))
        a, b = int(rng.integers(0, top)), int(rng.integers(1, 17))
        d = 1 + (a + b * np.arange(n - 1, dtype=np.int64)) % top
        docs.append(np.append(d, 0))
        masks.append((np.arange(n) >= n // 2).astype(np.uint8))
    return ArrayDocs.from_docs(docs, np.int64), ArrayDocs.from_docs(masks, np.uint8)


def open_source(
    data_file: str,
    data_type: str,
    dataload: str,
    loss_mask: str,
    ctx_len: int,
    vocab_size: int,
    seed: int,
    sft: SftSpec | None = None,
) -> Opened:
    """``(source, masks, name)`` for ``--data_type``; masks only where they apply (else None): with
    ``--loss_mask qa``, and for ``sft`` data unless ``--loss_mask none`` (RWKV-PEFT never trains on its
    prompts)."""
    qa = loss_mask == "qa" or (data_type == "sft" and loss_mask != "none")
    if data_type == "sft":
        source, masks, name = load_sft(data_file, sft or SftSpec())
    elif data_type == "binidx":
        source, masks, name = open_binidx(data_file, qa)
    elif data_type == "jsonl":
        source, masks, name = load_jsonl(data_file)
    elif data_type in ("utf-8", "utf-16le"):
        source, masks, name = load_text(data_file, data_type)
    elif data_type in ("numpy", "uint16"):
        source, masks, name = open_stream(data_file, data_type, split_docs=dataload != "get")
    else:  # dummy
        source, masks = dummy_corpus(ctx_len, vocab_size, seed)
        name = "dummy data"
    return source, masks if qa else None, name
