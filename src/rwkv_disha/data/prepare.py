"""Tokenize jsonl / text files into binidx (PREFIX.bin + PREFIX.idx) with the RWKV World tokenizer.

  rwkv-disha prepare --input data.jsonl --output data/mydata

Each record becomes one document with token 0 appended, stored as int32 exactly like json2binidx
(`{"text": ...}` input gives byte-identical files). Input forms: {"text": ...}; chat
{"messages": [{"role": "user"|"assistant"|"system", "content": ...}]}; Q&A {"question"|"prompt"|
"instruction": ..., "answer"|"response"|"output": ...}; plain text files (--txt_split blank: one document
per blank-line separated block; file: the whole file). For chat / Q&A input the per-token answer mask
used by --loss_mask qa is written next to the data as PREFIX.mask.bin / PREFIX.mask.idx (uint8).
Files appear only when everything succeeded (temporary files, then rename); the output is locked while
a run writes it; an existing output is replaced only with --overwrite 1. See docs/DATA.md.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import sys
import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from rwkv_disha.config import opt
from rwkv_disha.data.binidx import FILE_SUFFIXES, MASK_SUFFIX, BinIdxWriter, exists, split_prefix
from rwkv_disha.data.records import TXT_SPLITS, Encoded, LineNumbers, encode_items, iter_chunks
from rwkv_disha.data.sft import check_sft_options
from rwkv_disha.errors import RWKVDishaError
from rwkv_disha.fsio import check_output_path, lock_holder, os_error_cause

MAX_REPORTED = 10
CHUNK_BYTES = 1 << 20  # input bytes per task sent to a worker
WORKERS_PER_CORE = 4  # --workers above this many per core is a typo, not a plan (each one is a process)


# the files --output PREFIX names (cli.py refuses a --config file among them)
OUTPUT_SUFFIXES = FILE_SUFFIXES


@dataclass
class Config:
    input: list[str] = opt([], "input file(s): .jsonl/.json records (text, chat or Q&A) or plain text files")
    output: str = opt("", "output prefix: writes PREFIX.bin and PREFIX.idx (+ PREFIX.mask.* for chat/Q&A)")
    ctx_len: int = opt(1024, "the summary counts documents longer than ctx_len+1 tokens (they get truncated)")
    workers: int = opt(0, "tokenizing processes (0 = all cores, at most one per MB of input)")
    on_error: str = opt(
        "stop", "a malformed input line: stop (write nothing) or skip it", choices=("stop", "skip")
    )
    text_key: str = opt("text", "JSON key holding a plain-text document")
    append_eos: bool = opt(
        True, "append token 0 (end of text) to every document, like json2binidx --append-eod"
    )
    txt_split: str = opt(
        "blank", "plain text files: one document per blank-line block, or the whole file", choices=TXT_SPLITS
    )
    dtype: str = opt(
        "int32", "token dtype in .bin (int32 is what json2binidx writes)", choices=("int32", "uint16")
    )
    overwrite: bool = opt(False, "replace an existing PREFIX.bin/.idx")
    progress: bool = opt(True, "show a progress bar (only on a terminal)")
    preview: int = opt(
        0, "show the first N records as training sees them (loss tokens marked, token counts); writes nothing"
    )
    sft_field: list[str] = opt(
        [],
        "RWKV-PEFT SFT records: their query and response keys (e.g. query response); each record becomes "
        "RWKV-PEFT's template with the response as answer tokens, as train --data_type sft reads it",
    )


@dataclass
class PrepareStats:
    output: str = ""
    mask_output: str | None = None
    documents: int = 0
    tokens: int = 0
    longest: int = 0
    over_ctx: int = 0
    ctx_len: int = 0
    empty: int = 0
    malformed: int = 0
    chat: int = 0
    answer_tokens: int = 0
    workers: int = 1
    seconds: float = 0.0
    errors: list[tuple[str, str]] = field(default_factory=list)

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / max(self.seconds, 1e-9)

    def summary(self) -> str:
        files = f"{self.output}.bin / .idx"
        if self.mask_output:
            files += f", answer masks {self.mask_output}.bin / .idx"
        lines = [
            f"wrote {files}",
            f"  documents         {self.documents:,}" + (f" ({self.chat:,} chat / Q&A)" if self.chat else ""),
            f"  tokens            {self.tokens:,}"
            + (f" ({self.answer_tokens:,} answer tokens)" if self.mask_output else ""),
            f"  longest document  {self.longest:,} tokens",
            f"  longer than ctx_len+1 = {self.ctx_len + 1:,}: {self.over_ctx:,} documents"
            " (truncated by --dataload pad/only)",
        ]
        if self.empty:
            lines.append(f"  skipped {self.empty:,} empty documents (as json2binidx does)")
        if self.malformed:
            lines.append(f"  skipped {self.malformed:,} malformed lines (--on_error skip)")
        lines.append(
            f"  {self.seconds:.1f} s, {self.tokens_per_second:,.0f} tokens/s, {self.workers} worker(s)"
        )
        return "\n".join(lines)


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _init_worker() -> None:
    from rwkv_disha.data.tokenizer import get_tokenizer

    get_tokenizer()


def _encoded(
    chunks: Iterator, workers: int, text_key: str, append_eos: bool, sft_fields: tuple[str, str] | None
) -> Iterator[tuple]:
    """``(kind, path, Encoded, bytes)`` per chunk, in input order, encoded in this process or in a
    pool of ``workers`` (bounded read-ahead; jsonl workers read their byte ranges themselves)."""
    if workers <= 1:
        for kind, path, items, nbytes in chunks:
            yield kind, path, encode_items(kind, path, items, text_key, append_eos, sft_fields), nbytes
        return
    ctx = mp.get_context("spawn")  # safe with threads (torch) in the parent, same on every OS
    with ctx.Pool(workers, initializer=_init_worker) as pool:
        pending: deque = deque()

        def submit() -> bool:
            chunk = next(chunks, None)
            if chunk is None:
                return False
            kind, path, items, nbytes = chunk
            res = pool.apply_async(encode_items, (kind, path, items, text_key, append_eos, sft_fields))
            pending.append((kind, path, res, nbytes))
            return True

        for _ in range(2 * workers + 2):
            if not submit():
                break
        while pending:
            kind, path, res, nbytes = pending.popleft()
            submit()
            yield kind, path, res.get(), nbytes


def _check(cfg: Config) -> list[str]:
    inputs = [cfg.input] if isinstance(cfg.input, str) else list(cfg.input)
    if not inputs:
        raise RWKVDishaError("no input: pass --input FILE.jsonl [FILE2 ...]")
    if cfg.preview < 0:
        raise RWKVDishaError(f"--preview must be >= 0 (0 = off), got {cfg.preview}")
    if not cfg.output and not cfg.preview:
        raise RWKVDishaError("no output: pass --output PREFIX (writes PREFIX.bin and PREFIX.idx)")
    for p in inputs:
        if os.path.isdir(p):
            raise RWKVDishaError(f"--input {p} is a directory; give the files inside it")
        if not os.path.isfile(p):
            raise RWKVDishaError(f"input file not found: {p}")
    if cfg.ctx_len < 1:
        raise RWKVDishaError(f"--ctx_len must be >= 1 (got {cfg.ctx_len})")
    if cfg.workers < 0:
        raise RWKVDishaError(f"--workers must be >= 0 (0 = all cores), got {cfg.workers}")
    most = WORKERS_PER_CORE * _cpu_count()
    if cfg.workers > most:
        raise RWKVDishaError(
            f"--workers {cfg.workers} is more than {most} ({WORKERS_PER_CORE} per core of this machine); "
            "pass --workers 0 to use all cores"
        )
    if not cfg.text_key:
        raise RWKVDishaError('--text_key must not be empty (the JSON key of plain-text records, e.g. "text")')
    if cfg.on_error not in ("stop", "skip"):
        raise RWKVDishaError(f"--on_error must be stop or skip (got {cfg.on_error!r})")
    if cfg.txt_split not in TXT_SPLITS:
        raise RWKVDishaError(f"--txt_split must be blank or file (got {cfg.txt_split!r})")
    if cfg.dtype not in ("int32", "uint16"):
        raise RWKVDishaError(f"--dtype must be int32 or uint16 (got {cfg.dtype!r})")
    _check_sft(cfg, inputs)
    return inputs


def _sft_fields(cfg: Config) -> tuple[str, str] | None:
    return check_sft_options(cfg.sft_field, "train").fields if cfg.sft_field else None


def _check_sft(cfg: Config, inputs: list[str]) -> None:
    """--sft_field: JSON inputs only, and no flag that SFT records would ignore."""
    from rwkv_disha.config import given_options
    from rwkv_disha.data.records import is_json_file

    if not _sft_fields(cfg):
        return
    ignored = [f"--{n}" for n in ("text_key", "append_eos", "txt_split") if n in given_options(cfg)]
    if ignored:
        raise RWKVDishaError(
            f"{', '.join(ignored)}: not used with --sft_field (every record is a query / response pair in "
            "RWKV-PEFT's template, ending with \\x17); drop it"
        )
    text = next((p for p in inputs if not is_json_file(p)), None)
    if text:
        raise RWKVDishaError(f"--sft_field reads .jsonl / .json records; {text} is a text file")


def _check_output(output: str) -> str:
    """The output prefix, refused (one line) when it names a folder or cannot be written."""
    prefix = split_prefix(output)
    if not os.path.basename(prefix) or os.path.isdir(prefix):
        raise RWKVDishaError(
            f"--output {output} is a directory; give a prefix inside it, such as "
            f"{os.path.join(prefix, 'data')} (writes data.bin and data.idx there)"
        )
    check_output_path(prefix + ".bin", "--output")
    return prefix


def _lock_path(prefix: str) -> Path:
    return Path(os.path.dirname(prefix) or ".") / f".{os.path.basename(prefix)}.prepare.lock"


def _refuse_input_as_output(inputs: list[str], prefix: str) -> None:
    """An input among the files prepare writes (or removes, with --overwrite 1): refused even with
    --overwrite 1, as merge / import / export refuse to write over their inputs."""
    outputs = {os.path.realpath(prefix + suffix) for suffix in OUTPUT_SUFFIXES}
    outputs.add(os.path.realpath(_lock_path(prefix)))  # removed when the run ends
    for path in inputs:
        if os.path.realpath(path) in outputs:
            raise RWKVDishaError(
                f"--input {path} is one of the files --output {prefix} writes ({prefix}.bin/.idx, "
                f"{prefix}{MASK_SUFFIX}.bin/.idx): choose another --output"
            )


def _refuse_existing(prefix: str) -> None:
    for p in (prefix, prefix + MASK_SUFFIX):
        if exists(p):
            raise RWKVDishaError(
                f"{p}.bin/.idx already exists; pass --overwrite 1 to replace it, or another --output"
            )


@contextmanager
def output_lock(prefix: str) -> Iterator[Path]:
    """Hold an exclusive lock on the output ``prefix`` (a ``.NAME.prepare.lock`` file next to it, removed
    afterwards), so two ``prepare`` runs never write one output at once; the second gets one line naming
    the first's pid. It is an ``flock``: a killed holder never leaves a stale lock."""
    import fcntl

    lock = _lock_path(prefix)
    try:
        while True:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = lock_holder(fd)
                os.close(fd)
                raise RWKVDishaError(
                    f"{prefix}.bin/.idx is being written by {holder}: wait for it to finish "
                    "or choose another --output"
                ) from None
            try:  # the previous holder may have removed the file between our open and flock
                if os.fstat(fd).st_ino == os.stat(lock).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"rwkv-disha prepare (pid {os.getpid()})".encode(), 0)
    except OSError as e:
        raise RWKVDishaError(f"cannot write {prefix}.bin: {os_error_cause(e)}") from None
    try:
        yield lock
    finally:
        with suppress(OSError):
            lock.unlink()
        os.close(fd)  # releases the flock


class _Output:
    """The binidx writer (and the answer-mask writer, opened at the first chat / Q&A record), fed one
    encoded chunk at a time; ``commit`` renames the files into place, ``abort`` leaves nothing."""

    def __init__(self, prefix: str, dtype, stats: PrepareStats):
        self.prefix, self.stats = prefix, stats
        self.writer = BinIdxWriter(prefix, dtype)
        self.masks: BinIdxWriter | None = None

    def add(self, enc: Encoded, ctx_len: int) -> None:
        stats = self.stats
        stats.empty += enc.empty
        stats.chat += enc.chat
        if enc.sizes.size == 0:
            return
        if enc.masks is not None and self.masks is None:
            self.masks = BinIdxWriter(self.prefix + MASK_SUFFIX, np.uint8)
            earlier = self.writer.sizes_so_far()  # plain text before the first chat: every token counts
            if earlier.size:
                self.masks.add_many(np.ones(int(earlier.sum()), np.uint8), earlier)
        self.writer.add_many(enc.tokens, enc.sizes)
        if self.masks is not None:
            masks = enc.masks if enc.masks is not None else np.ones(enc.tokens.size, np.uint8)
            self.masks.add_many(masks, enc.sizes)
            stats.answer_tokens += int(masks.sum(dtype=np.int64))
        stats.longest = max(stats.longest, int(enc.sizes.max()))
        stats.over_ctx += int((enc.sizes > ctx_len + 1).sum())

    def commit(self) -> None:
        self.stats.documents, self.stats.tokens = self.writer.num_docs, self.writer.num_tokens
        self.writer.finish()  # both datasets complete on disk before either is renamed into place
        if self.masks is not None:
            self.masks.finish()
        self.writer.publish()
        if self.masks is not None:
            self.masks.publish()
            self.stats.mask_output = self.prefix + MASK_SUFFIX
            return
        for suffix in (".bin", ".idx"):  # a stale sidecar from an earlier run would be wrong now
            with suppress(FileNotFoundError):
                os.remove(self.prefix + MASK_SUFFIX + suffix)

    def abort(self) -> None:
        self.writer.abort()
        if self.masks is not None:
            self.masks.abort()


def _report(cfg: Config, errors: list[tuple[str, str]], stats: PrepareStats, log) -> None:
    """Stop at a malformed line (``--on_error stop``) or log it and count it as skipped."""
    if not errors:
        return
    where, why = errors[0]
    if cfg.on_error == "stop":
        raise RWKVDishaError(f"{where}: {why}; fix the line or pass --on_error skip (nothing was written)")
    for where, why in errors:
        if stats.malformed < MAX_REPORTED:
            log(f"warning: {where}: {why} (skipped)")
        stats.errors.append((where, why))
        stats.malformed += 1


def _workers(cfg: Config, inputs: list[str]) -> int:
    """Processes to start: --workers (0 = all cores), never more than one per started MB of the whole
    input, so a small input is done in-process however many files hold it."""
    megabytes = -(-sum(os.path.getsize(p) for p in inputs) // CHUNK_BYTES)
    return max(1, min(cfg.workers or _cpu_count(), megabytes))


def _tokenise(cfg: Config, inputs: list[str], prefix: str, log) -> PrepareStats:
    total_bytes = sum(os.path.getsize(p) for p in inputs)
    workers = _workers(cfg, inputs)
    stats = PrepareStats(output=prefix, ctx_len=cfg.ctx_len, workers=workers)

    def all_chunks():
        for p in inputs:
            try:
                yield from iter_chunks(p, cfg.txt_split, chunk_bytes=CHUNK_BYTES)
            except ValueError as e:
                raise RWKVDishaError(f"{e}; nothing was written") from None

    from tqdm import tqdm

    out = _Output(prefix, np.int32 if cfg.dtype == "int32" else np.uint16, stats)
    bar = tqdm(
        total=total_bytes, unit="B", unit_scale=True, desc="prepare", disable=None if cfg.progress else True
    )
    try:
        number = LineNumbers()
        encoded = _encoded(all_chunks(), workers, cfg.text_key, cfg.append_eos, _sft_fields(cfg))
        for kind, path, enc, nbytes in encoded:
            bar.update(nbytes)
            _report(cfg, number(kind, path, enc), stats, log)
            out.add(enc, cfg.ctx_len)
        bar.close()
        if stats.malformed > MAX_REPORTED:
            log(f"warning: {stats.malformed - MAX_REPORTED} more malformed lines skipped")
        if out.writer.num_docs == 0:
            raise RWKVDishaError(
                f"no documents in {', '.join(inputs)} (all records empty or malformed); nothing was written"
            )
        out.commit()
    except BaseException:
        bar.close()
        out.abort()
        raise
    return stats


def prepare(cfg: Config, log=None) -> PrepareStats:
    """Run ``prepare``; returns the statistics (``run`` prints them). Writes nothing on an error.

    The output prefix is locked for the whole run, so two runs into one output never both write it.
    """
    log = log or (lambda msg: print(msg, file=sys.stderr))
    inputs = _check(cfg)
    prefix = _check_output(cfg.output)
    _refuse_input_as_output(inputs, prefix)
    if not cfg.overwrite:
        _refuse_existing(prefix)
    t0 = time.perf_counter()
    created = _make_folders(os.path.dirname(prefix))
    try:
        with output_lock(prefix):
            if not cfg.overwrite:  # again under the lock: another run may have finished meanwhile
                _refuse_existing(prefix)
            stats = _tokenise(cfg, inputs, prefix, log)
    except BaseException:
        _remove_folders(created)
        raise
    stats.seconds = time.perf_counter() - t0
    return stats


def _make_folders(folder: str) -> list[str]:
    """Create ``folder`` and its missing parents; returns those this call created, outermost first."""
    missing: list[str] = []
    while folder and not os.path.isdir(folder):
        missing.append(folder)
        folder = os.path.dirname(folder)
    created: list[str] = []
    for path in reversed(missing):
        try:
            os.mkdir(path)
        except FileExistsError:  # made by another run meanwhile: theirs, not ours to remove
            continue
        except OSError as e:
            _remove_folders(created)
            raise RWKVDishaError(f"cannot create the folder {path}: {os_error_cause(e)}") from None
        created.append(path)
    return created


def _remove_folders(created: list[str]) -> None:
    """Undo :func:`_make_folders` after a failure: only folders this run made, and only while empty
    (rmdir refuses one that another run has written into meanwhile)."""
    for path in reversed(created):
        with suppress(OSError):
            os.rmdir(path)


def run(cfg: Config) -> int:
    if cfg.preview:  # checks the flags and inputs, tokenizes the first records, writes nothing
        from rwkv_disha.config import given_options
        from rwkv_disha.data.preview import preview

        unused = [
            f"--{n}"
            for n in ("output", "overwrite", "workers", "dtype", "progress")
            if n in given_options(cfg)
        ]
        if unused:
            raise RWKVDishaError(
                f"--preview shows records and writes nothing, so {', '.join(unused)} would do nothing: drop "
                "them (or drop --preview to write the data)"
            )
        inputs = _check(cfg)
        preview(
            inputs, cfg.preview, cfg.ctx_len, cfg.txt_split, cfg.text_key, cfg.append_eos, cfg.on_error,
            sft_fields=_sft_fields(cfg),
        )  # fmt: skip
        return 0
    stats = prepare(cfg)
    print(stats.summary())
    return 0
