"""Training datasets: ``--data_type`` x ``--dataload`` x ``--loss_mask`` (RWKV-PEFT flag semantics).

:func:`make_dataset` validates the options (one-line :class:`RWKVDishaError`) and returns a map-style
:class:`TokenDataset`. Item ``i`` is a dict of ``input_ids`` (LongTensor ``(T,)``), ``labels`` (the next
tokens, LongTensor ``(T,)``) and ``mask`` (FloatTensor ``(T,)``, 1 where the loss counts). Batch with
:func:`collate` (pads to the longest item with mask 0) and take the loss with :func:`masked_lm_loss`.

Sampling
--------
- ``pad``: one document per sample, cut to ``ctx_len + 1`` tokens, padded to ``T = ctx_len``.
- ``only``: one document per sample at its own length (``T = min(len, ctx_len + 1) - 1``); needs
  ``micro_bsz == 1``.
- ``get``: ``ctx_len + 1`` token windows of the whole stream (RWKV-LM pretraining style).

Documents (``pad`` / ``only``) or windows (``get``, starting every ``ctx_len`` tokens from a per-pass
random offset) are visited in *passes*: each pass is a permutation of all of them, drawn
deterministically from ``seed`` and the pass number (``shuffle=False``: file order). The global
sample sequence ``g = 0, 1, 2, ...`` runs through pass 0, then pass 1, ... Rank ``r`` of ``world_size``
takes ``g = s * world_size + r`` for its own sample counter ``s``, so ranks never share a sample and
together cover every one.

Epochs (RWKV-PEFT semantics)
----------------------------
An epoch is ``epoch_steps * micro_bsz`` samples per rank (``len(ds)``); ``epoch_steps <= 0`` means one
pass over the data. Epochs *continue* through the sample sequence: epoch ``e`` is rank-local samples
``s = e * len(ds) ... (e + 1) * len(ds) - 1``, so epoch 1 does not repeat epoch 0's documents.

Two equivalent ways to select the epoch (use one, not both):

- ``ds.set_epoch(e)``: then ``ds[i]`` is sample ``s = e * len(ds) + i``. Fine with ``num_workers=0``
  or non-persistent workers (call it before iterating the DataLoader).
- ``DataLoader(ds, sampler=ds.sampler(start_sample))``: the :class:`EpochSampler` yields absolute
  sample numbers (``ds[s]`` accepts any ``s >= 0``); Lightning calls its ``set_epoch``, it works with
  persistent workers, and ``start_sample`` restarts a resumed run at an exact sample (micro-batches
  done so far x ``micro_bsz``). With Lightning use ``use_distributed_sampler=False``: the dataset
  already splits the data by rank.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Sequence

import numpy as np
import torch

from rwkv_disha.data.binidx import BinIdx, split_prefix
from rwkv_disha.errors import RWKVDishaError

DATA_TYPES = ("binidx", "jsonl", "utf-8", "utf-16le", "numpy", "uint16", "dummy")
DATALOADS = ("pad", "only", "get")
LOSS_MASKS = ("none", "pad", "qa")
MASK_SUFFIX = ".mask"
FULL_CHECK_TOKENS = 1 << 26  # scan smaller data for out-of-vocabulary ids when the dataset is built

# --- deterministic shuffling without storing a permutation --------------------------------------------
_M64 = (1 << 64) - 1


def _mix64(x: int) -> int:
    """splitmix64 finaliser: a well-mixed 64-bit hash of ``x``."""
    x = (x + 0x9E3779B97F4A7C15) & _M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


class Permutation:
    """A pseudo-random permutation of ``range(n)`` from ``key``: a 6-round Feistel network on the next
    even power of two, cycle-walked back into range. O(1) memory, so huge corpora cost nothing."""

    def __init__(self, n: int, key: int):
        self.n = int(n)
        bits = max(2, (self.n - 1).bit_length())
        bits += bits & 1
        self.half = bits // 2
        self.lo = (1 << self.half) - 1
        self.keys = [_mix64((key & _M64) ^ _mix64(r + 1)) for r in range(6)]

    def __call__(self, i: int) -> int:
        if not 0 <= i < self.n:
            raise IndexError(f"{i} outside range({self.n})")
        x, half, lo = i, self.half, self.lo
        while True:
            left, right = x >> half, x & lo
            for k in self.keys:
                left, right = right, left ^ (_mix64(right ^ k) & lo)
            x = (left << half) | right
            if x < self.n:
                return x

    def __len__(self) -> int:
        return self.n


def _pass_key(seed: int, pass_no: int) -> int:
    return _mix64(_mix64(seed & _M64) ^ (pass_no & _M64))


# --- token sources ------------------------------------------------------------------------------------
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


# --- the dataset --------------------------------------------------------------------------------------
class TokenDataset(torch.utils.data.Dataset):
    """See the module docstring. Build it with :func:`make_dataset`."""

    def __init__(
        self,
        source,
        masks,
        *,
        name: str,
        dataload: str,
        ctx_len: int,
        micro_bsz: int,
        epoch_steps: int,
        loss_mask: str,
        seed: int,
        vocab_size: int,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
    ):
        self.source, self.masks, self.name = source, masks, name
        self.dataload, self.ctx_len, self.micro_bsz = dataload, ctx_len, micro_bsz
        self.loss_mask, self.seed, self.vocab_size = loss_mask, seed, vocab_size
        self.rank, self.world_size, self.shuffle = rank, world_size, shuffle
        self.epoch = 0
        if dataload == "get":
            self.n_items = (source.num_tokens - 1) // ctx_len
            self.slack = source.num_tokens - 1 - self.n_items * ctx_len
        else:
            self.n_items = len(source)
            self.slack = 0
        if epoch_steps and epoch_steps > 0:
            self.samples_per_epoch = epoch_steps * micro_bsz
        else:  # one pass over the data per epoch
            self.samples_per_epoch = math.ceil(self.n_items / world_size / micro_bsz) * micro_bsz
        self._perm_pass = -1
        self._perm: Permutation | None = None

    # -- epochs -----------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return self.samples_per_epoch

    def set_epoch(self, epoch: int) -> None:
        """``ds[i]`` becomes rank-local sample ``epoch * len(ds) + i``."""
        self.epoch = int(epoch)

    def sampler(self, start_sample: int = 0) -> EpochSampler:
        """A sampler yielding absolute sample numbers by epoch; ``start_sample`` resumes mid-run."""
        return EpochSampler(self, start_sample)

    # -- which document / window ------------------------------------------------------------------------
    def global_index(self, s: int) -> int:
        """Position in the global sample sequence of this rank's sample ``s``."""
        return s * self.world_size + self.rank

    def _order(self, pass_no: int, j: int) -> int:
        if not self.shuffle:
            return j
        if self._perm_pass != pass_no:
            self._perm = Permutation(self.n_items, _pass_key(self.seed, pass_no))
            self._perm_pass = pass_no
        return self._perm(j)

    def locate(self, s: int) -> int:
        """Rank-local sample ``s`` -> document index (``pad`` / ``only``) or window start token (``get``)."""
        if s < 0:
            raise IndexError(f"sample {s} < 0")
        pass_no, j = divmod(self.global_index(s), self.n_items)
        item = self._order(pass_no, j)
        if self.dataload != "get":
            return item
        offset = _mix64(_pass_key(self.seed, pass_no) ^ 0x5EED) % (self.slack + 1) if self.shuffle else 0
        return offset + item * self.ctx_len

    # -- items ------------------------------------------------------------------------------------------
    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return self.sample(self.epoch * self.samples_per_epoch + int(i))

    def sample(self, s: int) -> dict[str, torch.Tensor]:
        """Rank-local sample ``s`` (any ``s >= 0``; epochs continue through the sequence)."""
        where = self.locate(s)
        L = self.ctx_len + 1
        if self.dataload == "get":
            toks = self.source.tokens(where, L)
            ans = self.masks.tokens(where, L) if self.masks is not None else None
        else:
            toks = self.source.doc(where)[:L]
            ans = self.masks.doc(where)[:L] if self.masks is not None else None
        toks = np.asarray(toks, dtype=np.int64)
        n = toks.size
        T = self.ctx_len if self.dataload == "pad" else max(n - 1, 1)
        x = np.zeros(T, dtype=np.int64)
        y = np.zeros(T, dtype=np.int64)
        m = np.zeros(T, dtype=np.float32)
        if n >= 2:
            x[: n - 1], y[: n - 1] = toks[:-1], toks[1:]
            m[: n - 1] = 1.0 if ans is None or self.loss_mask != "qa" else np.asarray(ans[1:n], np.float32)
        elif n == 1:
            x[0] = toks[0]
        if n and (toks.max() >= self.vocab_size or toks.min() < 0):
            bad = int(toks.max() if toks.max() >= self.vocab_size else toks.min())
            raise RWKVDishaError(
                f"token id {bad} in {self.name} is outside the vocabulary (vocab_size {self.vocab_size}); "
                "the data was tokenized for another model"
            )
        return {"input_ids": torch.from_numpy(x), "labels": torch.from_numpy(y), "mask": torch.from_numpy(m)}


class EpochSampler(torch.utils.data.Sampler):
    """Yields rank-local sample numbers ``e * len(ds) ... (e + 1) * len(ds) - 1`` for epoch ``e``
    (skipping those below ``start_sample``); Lightning calls :meth:`set_epoch` before each epoch."""

    def __init__(self, dataset: TokenDataset, start_sample: int = 0):
        self.n = len(dataset)
        self.start = int(start_sample)
        self.epoch = self.start // self.n if self.n else 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _range(self) -> range:
        lo = self.epoch * self.n
        return range(max(lo, self.start), lo + self.n)

    def __iter__(self) -> Iterator[int]:
        return iter(self._range())

    def __len__(self) -> int:
        return len(self._range())


# --- building -----------------------------------------------------------------------------------------
def _resolve_file(data_file: str, data_type: str) -> str:
    if not data_file:
        raise RWKVDishaError(f"no --data_file given for --data_type {data_type}")
    if not os.path.isfile(data_file):
        raise RWKVDishaError(f"data file not found: {data_file} (--data_type {data_type})")
    return data_file


def _encode_texts(texts: list[str], name: str) -> ArrayDocs:
    from rwkv_disha.data.records import encode_segments_doc
    from rwkv_disha.data.tokenizer import get_tokenizer

    tok = get_tokenizer()
    docs = [encode_segments_doc([(t, True)], "text", tok)[0] for t in texts]
    return ArrayDocs.from_docs([d for d in docs if d.size])


def _load_jsonl(path: str) -> tuple[ArrayDocs, ArrayDocs]:
    from rwkv_disha.data.records import LineNumbers, encode_items, iter_chunks

    toks, masks, sizes = [], [], []
    number = LineNumbers()
    try:
        for kind, p, items, _ in iter_chunks(path):
            enc = encode_items(kind, p, items)
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
    return ArrayDocs(flat, sz), ArrayDocs(mflat, sz)


def dummy_corpus(ctx_len: int, vocab_size: int, seed: int, n_docs: int = 256) -> tuple[ArrayDocs, ArrayDocs]:
    """Synthetic documents for smoke tests: arithmetic token sequences (learnable) of 2 .. 2*ctx_len+2
    tokens ending with 0; their answer mask is the second half of each document."""
    rng = np.random.default_rng([seed & _M64, 0xD0])
    top = max(vocab_size - 1, 1)
    docs, masks = [], []
    for _ in range(n_docs):
        n = int(rng.integers(2, 2 * ctx_len + 3))
        a, b = int(rng.integers(0, top)), int(rng.integers(1, 17))
        d = 1 + (a + b * np.arange(n - 1, dtype=np.int64)) % top
        docs.append(np.append(d, 0))
        masks.append((np.arange(n) >= n // 2).astype(np.uint8))
    return ArrayDocs.from_docs(docs, np.int64), ArrayDocs.from_docs(masks, np.uint8)


def _check_choice(value: str, choices: tuple, flag: str) -> None:
    if value not in choices:
        raise RWKVDishaError(f"unknown --{flag} {value!r} (choose one of: {', '.join(choices)})")


def make_dataset(
    data_file: str,
    data_type: str,
    dataload: str,
    ctx_len: int,
    micro_bsz: int,
    epoch_steps: int,
    loss_mask: str,
    seed: int,
    vocab_size: int,
    rank: int = 0,
    world_size: int = 1,
    shuffle: bool = True,
) -> TokenDataset:
    """Validate the data options and build the dataset (see the module docstring).

    ``data_file``: a binidx prefix (``x``, ``x.bin`` or ``x.idx``) or a file for the other data types
    (ignored for ``dummy``). ``data_type``: binidx, jsonl (tokenized on load), utf-8 / utf-16le (text,
    one document per blank-line block), numpy (1-D ``.npy`` token array), uint16 (raw token file), dummy.
    ``loss_mask``: none / pad (padding never counts either way), qa (only answer tokens count; needs the
    ``x.mask`` sidecar written by ``prepare`` for binidx, or jsonl / dummy data).
    """
    if data_type == "wds_img":
        raise RWKVDishaError(
            "image data is not supported (--data_type wds_img): rwkv-disha trains text models; "
            f"use one of {', '.join(DATA_TYPES)}"
        )
    _check_choice(data_type, DATA_TYPES, "data_type")
    _check_choice(dataload, DATALOADS, "dataload")
    _check_choice(loss_mask, LOSS_MASKS, "loss_mask")
    for flag, v in (("ctx_len", ctx_len), ("micro_bsz", micro_bsz), ("vocab_size", vocab_size)):
        if not isinstance(v, (int, np.integer)) or v < 1:
            raise RWKVDishaError(f"--{flag} must be a positive integer (got {v!r})")
    if dataload == "only" and micro_bsz != 1:
        raise RWKVDishaError(
            f"--dataload only needs --micro_bsz 1 (got {micro_bsz}): its samples have different lengths; "
            "use --dataload pad to batch documents"
        )
    ints = (int, np.integer)
    if not (isinstance(world_size, ints) and isinstance(rank, ints) and 0 <= rank < world_size):
        raise RWKVDishaError(
            f"rank {rank} / world_size {world_size} is not valid (need 0 <= rank < world_size)"
        )

    if loss_mask == "qa" and data_type not in ("binidx", "jsonl", "dummy"):
        raise RWKVDishaError(
            f"--loss_mask qa needs answer masks, which --data_type {data_type} cannot carry; "
            "prepare chat / Q&A jsonl into binidx (or use --data_type jsonl), or use --loss_mask pad"
        )
    masks = None
    name = data_file
    if data_type == "binidx":
        if not data_file:
            raise RWKVDishaError(
                "no --data_file given: pass the binidx prefix (data/x for data/x.bin + data/x.idx)"
            )
        source = BinIdx(data_file)
        name = source.prefix
        if loss_mask == "qa":
            mp = split_prefix(data_file) + MASK_SUFFIX
            if not (os.path.isfile(mp + ".bin") and os.path.isfile(mp + ".idx")):
                raise RWKVDishaError(
                    f"--loss_mask qa needs the answer masks {mp}.bin/.idx, which `rwkv-disha prepare` "
                    "writes for chat / Q&A input; re-run prepare on that input or use --loss_mask pad"
                )
            masks = BinIdx(mp)
            if len(masks) != len(source) or not np.array_equal(masks.sizes, source.sizes):
                raise RWKVDishaError(
                    f"{mp}.idx does not match {source.prefix}.idx (different documents); "
                    "re-run `rwkv-disha prepare`"
                )
    elif data_type == "jsonl":
        source, masks = _load_jsonl(_resolve_file(data_file, data_type))
    elif data_type in ("utf-8", "utf-16le"):
        from rwkv_disha.data.records import split_text

        path = _resolve_file(data_file, data_type)
        try:
            with open(path, encoding=data_type) as f:
                text = f.read()
        except UnicodeDecodeError as e:
            raise RWKVDishaError(f"{path} is not {data_type} text ({e.reason} at byte {e.start})") from None
        source = _encode_texts(split_text(text.lstrip("\ufeff"), "blank"), path)
    elif data_type in ("numpy", "uint16"):
        path = _resolve_file(data_file, data_type)
        if data_type == "uint16" and os.path.getsize(path) % 2:
            raise RWKVDishaError(
                f"{path} has an odd number of bytes; a uint16 token file is 2 bytes per token"
            )
        if data_type == "numpy":
            with open(path, "rb") as f:
                if f.read(6) != b"\x93NUMPY":
                    raise RWKVDishaError(
                        f"{path} is not a .npy file (no NUMPY magic); write it with numpy.save"
                    )
        try:
            source = StreamDocs(path, data_type, split_docs=dataload != "get")
        except ValueError as e:
            raise RWKVDishaError(
                f"{path} is not a readable .npy token array ({e})".replace("\n", " ")
            ) from None
    else:  # dummy
        source, masks = dummy_corpus(ctx_len, vocab_size, seed)
        name = "dummy data"

    if loss_mask != "qa":
        masks = None
    if source.num_tokens == 0 or (dataload != "get" and len(source) == 0):
        raise RWKVDishaError(
            f"{name} is empty (no documents); check --data_file or re-run `rwkv-disha prepare`"
        )
    if dataload == "get" and source.num_tokens < ctx_len + 1:
        raise RWKVDishaError(
            f"{name} has {source.num_tokens} tokens, fewer than the ctx_len+1 = {ctx_len + 1} that "
            "--dataload get needs; lower --ctx_len or use --dataload pad"
        )
    if source.num_tokens <= FULL_CHECK_TOKENS:
        arr = source.tokens(0, source.num_tokens)
        hi, lo = int(arr.max()), int(arr.min())
        if hi >= vocab_size or lo < 0:
            raise RWKVDishaError(
                f"{name} holds token id {hi if hi >= vocab_size else lo}, outside the vocabulary "
                f"(vocab_size {vocab_size}); the data was tokenized for another model"
            )
    return TokenDataset(
        source,
        masks,
        name=name,
        dataload=dataload,
        ctx_len=int(ctx_len),
        micro_bsz=int(micro_bsz),
        epoch_steps=int(epoch_steps or 0),
        loss_mask=loss_mask,
        seed=int(seed),
        vocab_size=int(vocab_size),
        rank=int(rank),
        world_size=int(world_size),
        shuffle=shuffle,
    )


# --- batching and loss --------------------------------------------------------------------------------
def collate(batch: Sequence[dict[str, torch.Tensor]], pad_to_multiple: int = 1) -> dict[str, torch.Tensor]:
    """Stack items into ``(B, T)`` tensors, padding to the longest (rounded up to ``pad_to_multiple``)
    with token 0 and mask 0, so padding never counts in the loss."""
    T = max(int(b["input_ids"].shape[0]) for b in batch)
    T = -(-T // pad_to_multiple) * pad_to_multiple
    out = {
        "input_ids": torch.zeros(len(batch), T, dtype=torch.long),
        "labels": torch.zeros(len(batch), T, dtype=torch.long),
        "mask": torch.zeros(len(batch), T, dtype=torch.float32),
    }
    for k, b in enumerate(batch):
        n = b["input_ids"].shape[0]
        for key in out:
            out[key][k, :n] = b[key]
    return out


def masked_lm_loss(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Cross-entropy averaged over the positions where ``mask`` > 0 (``mask`` may also weight tokens):
    ``sum(CE * mask) / max(sum(mask), 1)``, computed in float32 (or float64).

    Masked positions are dropped before the softmax, so they get exactly zero gradient even if their
    logits are inf / NaN, and a batch whose mask is all zero gives loss 0 with zero gradients, never NaN.
    """
    V = logits.shape[-1]
    flat, lab, m = logits.reshape(-1, V), labels.reshape(-1), mask.reshape(-1)
    keep = m > 0
    if not bool(keep.all()):
        idx = keep.nonzero().squeeze(1)
        flat, lab, m = flat.index_select(0, idx), lab.index_select(0, idx), m.index_select(0, idx)
    if flat.dtype not in (torch.float32, torch.float64):
        flat = flat.float()
    m = m.to(flat.dtype)
    ce = torch.nn.functional.cross_entropy(flat, lab.long(), reduction="none")
    return (ce * m).sum() / m.sum().clamp(min=1.0)
