"""Training datasets: ``--data_type`` x ``--dataload`` x ``--loss_mask`` (RWKV-PEFT flag semantics).

:func:`make_dataset` validates the options (one-line :class:`RWKVDishaError`), opens the data once
(:mod:`rwkv_disha.data.sources`: jsonl and text are tokenised here, once per call) and returns a map-style
:class:`TokenDataset`; move it between epochs with ``set_epoch``, never rebuild it. Item ``i`` is a
dict of ``input_ids`` (LongTensor ``(T,)``), ``labels`` (the next tokens, LongTensor ``(T,)``) and
``mask`` (FloatTensor ``(T,)``, 1 where the loss counts). Batch with
:func:`collate` (pads to the longest item with mask 0) and take the loss with :func:`masked_lm_loss`.

See docs/DATA.md ("Sampling", "Epochs", "Loss masks") for the same with examples.

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
from collections.abc import Iterator, Sequence

import numpy as np
import torch

from rwkv_disha.choices import DATA_TYPES, DATALOADS, LOSS_MASKS
from rwkv_disha.data.sampling import Permutation, mix64, pass_key
from rwkv_disha.data.sft import SftSpec
from rwkv_disha.data.sources import open_source
from rwkv_disha.errors import RWKVDishaError

FULL_CHECK_TOKENS = 1 << 26  # scan smaller data for out-of-vocabulary ids when the dataset is built
SCAN_TOKENS = 1 << 24  # tokens per step when scanning answer masks


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
            self._perm = Permutation(self.n_items, pass_key(self.seed, pass_no))
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
        offset = mix64(pass_key(self.seed, pass_no) ^ 0x5EED) % (self.slack + 1) if self.shuffle else 0
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
            m[: n - 1] = 1.0 if ans is None else np.asarray(ans[1:n]) != 0  # an answer token counts once
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
def _check_choice(value: str, choices: tuple, flag: str) -> None:
    if value not in choices:
        raise RWKVDishaError(f"unknown --{flag} {value!r} (choose one of: {', '.join(choices)})")


def check_options(
    data_type: str, dataload: str, loss_mask: str, ctx_len: int, micro_bsz: int, vocab_size: int,
    rank: int, world_size: int,
) -> None:  # fmt: skip
    """The data options on their own, before any file is opened (one line each)."""
    if data_type == "wds_img":
        raise RWKVDishaError(
            "image data is not supported (--data_type wds_img): rwkv-disha trains text models; "
            f"use one of {', '.join(DATA_TYPES)}"
        )
    _check_choice(data_type, DATA_TYPES, "data_type")
    _check_choice(dataload, DATALOADS, "dataload")
    _check_choice(loss_mask, LOSS_MASKS, "loss_mask")
    ints = (int, np.integer)
    for flag, v in (("ctx_len", ctx_len), ("micro_bsz", micro_bsz), ("vocab_size", vocab_size)):
        if not isinstance(v, ints) or v < 1:
            raise RWKVDishaError(f"--{flag} must be a positive integer (got {v!r})")
    if dataload == "only" and micro_bsz != 1:
        raise RWKVDishaError(
            f"--dataload only needs --micro_bsz 1 (got {micro_bsz}): its samples have different lengths; "
            "use --dataload pad to batch documents"
        )
    if not (isinstance(world_size, ints) and isinstance(rank, ints) and 0 <= rank < world_size):
        raise RWKVDishaError(
            f"rank {rank} / world_size {world_size} is not valid (need 0 <= rank < world_size)"
        )
    if loss_mask == "qa" and data_type not in ("binidx", "jsonl", "sft", "dummy"):
        raise RWKVDishaError(
            f"--loss_mask qa needs answer masks, which --data_type {data_type} cannot carry; "
            "prepare chat / Q&A jsonl into binidx (or use --data_type jsonl), or use --loss_mask pad"
        )


def _answer_counts(source, masks, dataload: str, ctx_len: int) -> bool:
    """Whether some answer token is a label the loss sees: in a window past its first token (``get``),
    or at positions 1 .. ctx_len of a document (``pad`` / ``only`` cut documents to ctx_len + 1)."""
    offsets = np.zeros(len(source) + 1, np.int64) if dataload != "get" else None
    if offsets is not None:
        np.cumsum(source.sizes, out=offsets[1:])
    for start in range(0, source.num_tokens, SCAN_TOKENS):
        chunk = np.asarray(masks.tokens(start, min(SCAN_TOKENS, source.num_tokens - start)))
        pos = start + np.flatnonzero(chunk)
        if offsets is None:
            if (pos >= 1).any():
                return True
            continue
        within = pos - offsets[np.searchsorted(offsets, pos, side="right") - 1]
        if ((within >= 1) & (within <= ctx_len)).any():
            return True
    return False


def _token_range(source, windows: int = 16) -> tuple[int, int]:
    """(max, min) token id of all of ``source`` up to FULL_CHECK_TOKENS tokens, else of ``windows`` evenly
    spaced windows holding SCAN_TOKENS in all: data tokenized for another vocabulary shows at once, without
    reading a large .bin whole (each sample is checked again when it is read)."""
    n = source.num_tokens
    if n <= FULL_CHECK_TOKENS:
        spans = [(0, n)]
    else:
        width = max(min(SCAN_TOKENS // windows, n // windows), 1)
        spans = [(i * (n - width) // (windows - 1), width) for i in range(windows)]
    parts = [source.tokens(start, count) for start, count in spans]
    return max(int(p.max()) for p in parts), min(int(p.min()) for p in parts)


def check_data(
    source, masks, name: str, dataload: str, ctx_len: int, loss_mask: str, vocab_size: int, sft: bool = False
) -> None:
    """Refuse data that cannot train: empty, shorter than a window, ids outside the vocabulary, or no
    token that counts toward the loss (which would run silently at loss 0)."""
    if source.num_tokens == 0 or (dataload != "get" and len(source) == 0):
        raise RWKVDishaError(
            f"{name} is empty (no documents); check --data_file or re-run `rwkv-disha prepare`"
        )
    if dataload == "get" and source.num_tokens < ctx_len + 1:
        raise RWKVDishaError(
            f"{name} has {source.num_tokens} tokens, fewer than the ctx_len+1 = {ctx_len + 1} that "
            "--dataload get needs; lower --ctx_len or use --dataload pad"
        )
    hi, lo = _token_range(source)
    if hi >= vocab_size or lo < 0:
        raise RWKVDishaError(
            f"{name} holds token id {hi if hi >= vocab_size else lo}, outside the vocabulary "
            f"(vocab_size {vocab_size}); the data was tokenized for another model"
        )
    if dataload != "get" and not (np.asarray(source.sizes) >= 2).any():
        raise RWKVDishaError(
            f"every document of {name} has fewer than 2 tokens, so no token counts toward the loss "
            "(a token is predicted from the ones before it); use longer documents or --dataload get"
        )
    if masks is None or _answer_counts(source, masks, dataload, ctx_len):
        return
    if sft:  # the template's prompt alone is ~30 tokens, and for sft data pad already means "the response"
        raise RWKVDishaError(
            f"--loss_mask {loss_mask}: no response token of {name} lies within the first ctx_len = {ctx_len} "
            "tokens of its record (RWKV-PEFT's template puts the prompt first): raise --ctx_len, or train on "
            "the prompt too with --loss_mask none"
        )
    raise RWKVDishaError(
        f"--loss_mask {loss_mask}: no token of {name} counts toward the loss (no answer tokens within "
        f"the first ctx_len = {ctx_len} tokens of any document); give chat / Q&A records with "
        "assistant answers, raise --ctx_len, or use --loss_mask pad"
    )


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
    sft: SftSpec | None = None,
) -> TokenDataset:
    """Validate the data options, open (and for jsonl / text, tokenise) the data once, build the dataset.

    ``data_file``: a binidx prefix (``x``, ``x.bin`` or ``x.idx``) or a file for the other data types
    (ignored for ``dummy``). ``data_type``: binidx, jsonl (tokenized on load), utf-8 / utf-16le (text,
    one document per blank-line block), numpy (1-D ``.npy`` token array), uint16 (raw token file), dummy.
    ``loss_mask``: none / pad (padding never counts either way), qa (only answer tokens count; needs the
    ``x.mask`` sidecar written by ``prepare`` for binidx, or jsonl / dummy data). Data in which no token
    counts toward the loss is refused here, so training and evaluation both refuse it.
    """
    check_options(data_type, dataload, loss_mask, ctx_len, micro_bsz, vocab_size, rank, world_size)
    source, masks, name = open_source(
        data_file, data_type, dataload, loss_mask, ctx_len, vocab_size, seed, sft
    )
    check_data(source, masks, name, dataload, ctx_len, loss_mask, vocab_size, sft=data_type == "sft")
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
TRIM_MULTIPLE = 16  # trimmed lengths are whole chunks of the WKV kernels, and few distinct shapes


def trim_padding(batch: dict[str, torch.Tensor], multiple: int = TRIM_MULTIPLE) -> dict[str, torch.Tensor]:
    """``batch`` without its trailing positions where no row counts toward the loss (rounded up to a
    multiple of ``multiple``). The model is causal, so the positions kept see exactly what they saw
    before and the masked mean loss and its gradients do not change; `--dataload pad` pads every
    document to ctx_len, so short documents (SFT / chat data) cost their own length instead."""
    mask = batch["mask"]
    T = mask.shape[1]
    counted = torch.nonzero(mask.detach().any(0))
    if counted.numel() == 0:
        return batch
    keep = min(T, -(-(int(counted[-1]) + 1) // multiple) * multiple)
    if keep == T:
        return batch
    return {k: v[:, :keep] if v.dim() == 2 and v.shape[1] == T else v for k, v in batch.items()}


def collate(batch: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stack items into ``(B, T)`` tensors, padding to the longest with token 0 and mask 0, so padding
    never counts in the loss."""
    T = max(int(b["input_ids"].shape[0]) for b in batch)
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
    total = masked_ce_sum(logits, labels, mask)
    return total / mask.sum().to(total.dtype).clamp(min=1.0)


def counted_rows(
    x: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x (B, T, D), labels and mask (B, T) -> the positions where mask > 0, flattened: (N, D), (N,), (N,).

    Both losses drop masked positions before any arithmetic on them, so those get exactly zero gradient
    even when x there is inf / NaN; with nothing masked, nothing is copied."""
    D = x.shape[-1]
    flat, lab, m = x.reshape(-1, D), labels.reshape(-1), mask.reshape(-1)
    keep = m > 0
    if not bool(keep.all()):
        idx = keep.nonzero().squeeze(1)
        flat, lab, m = flat.index_select(0, idx), lab.index_select(0, idx), m.index_select(0, idx)
    return flat, lab, m


def masked_ce_sum(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``sum(CE * mask)`` over logits (B, T, V), labels and mask (B, T): the numerator of
    :func:`masked_lm_loss` (infctx adds it up chunk by chunk); 0 when every position is masked."""
    flat, lab, m = counted_rows(logits, labels, mask)
    if flat.dtype not in (torch.float32, torch.float64):
        flat = flat.float()
    m = m.to(flat.dtype)
    ce = torch.nn.functional.cross_entropy(flat, lab.long(), reduction="none")
    return (ce * m).sum()
