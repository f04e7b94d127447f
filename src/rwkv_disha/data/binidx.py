"""binidx ("MMIDIDX") token files: the format RWKV-LM, RWKV-PEFT and json2binidx use.

A dataset is a path *prefix*; the files are ``prefix.bin`` (every document's tokens back to back) and
``prefix.idx`` (little-endian)::

    9 bytes  magic  b"MMIDIDX\\x00\\x00"
    u64      version (1)
    u8       dtype code (1 u8, 2 i8, 3 i16, 4 i32, 5 i64, 6 f32, 7 f64, 8 u16)
    u64      n, the number of documents
    u64      number of doc_idx entries (n + 1)
    i32      sizes[n]         tokens per document
    i64      pointers[n]      byte offset of each document in .bin
    i64      doc_idx[n + 1]   0, 1, ..., n

:class:`BinIdx` reads one (memory-mapped, opened lazily so that pickling it into DataLoader worker
processes, ``spawn`` included, copies only a few numbers); :func:`write_binidx` and
:class:`BinIdxWriter` write one atomically (temporary files named as :mod:`rwkv_disha.fsio` names them,
then ``os.replace``), so an interrupted or failed write never leaves a half file under the final name,
an OS error (full disk, read-only folder) is one line naming the file and the cause, and temporaries
of a killed earlier run are removed by the next writer in that folder. docs/DATA.md ("binidx files")
describes the bytes.
"""

from __future__ import annotations

import contextlib
import os
import re
import struct
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from rwkv_disha.errors import RWKVDishaError
from rwkv_disha.fsio import clean_stale_temps, os_error_cause, pid_alive, temp_path

MAGIC = b"MMIDIDX\x00\x00"
MASK_SUFFIX = ".mask"  # answer masks of PREFIX live in PREFIX.mask.bin / .idx (uint8, same documents)
FILE_SUFFIXES = (".bin", ".idx", MASK_SUFFIX + ".bin", MASK_SUFFIX + ".idx")  # every file of a PREFIX
VERSION = 1
HEADER = struct.Struct("<9sQBQQ")  # magic, version, dtype code, n, n_doc_idx: 34 bytes

DTYPES: dict[int, type] = {
    1: np.uint8,
    2: np.int8,
    3: np.int16,
    4: np.int32,
    5: np.int64,
    6: np.float32,
    7: np.float64,
    8: np.uint16,
}
CODES: dict[np.dtype, int] = {np.dtype(t): c for c, t in DTYPES.items()}


def split_prefix(path: str | os.PathLike) -> str:
    """``data/x``, ``data/x.bin`` and ``data/x.idx`` all name the dataset ``data/x``."""
    p = os.fspath(path)
    for suffix in (".bin", ".idx"):
        if p.endswith(suffix):
            return p[: -len(suffix)]
    return p


def dtype_code(dtype) -> int:
    dt = np.dtype(dtype)
    code = CODES.get(np.dtype(dt.name))
    if code is None:
        known = ", ".join(np.dtype(t).name for t in DTYPES.values())
        raise RWKVDishaError(f"binidx cannot store dtype {dt}; use one of {known}")
    return code


_OLD_TEMP = re.compile(r"^(?P<name>.+)\.tmp-(?P<pid>\d+)$")  # what versions before 0.2 named temporaries


def _remove(path: str | os.PathLike) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.remove(path)


def clean_stale_binidx_temps(folder: str | os.PathLike) -> None:
    """Remove temporaries of killed writers in ``folder``: ``.x.bin.<pid>.<random>.tmp`` (via
    :func:`rwkv_disha.fsio.clean_stale_temps`) and the ``x.bin.tmp-<pid>`` names older versions used."""
    clean_stale_temps(folder)
    with contextlib.suppress(OSError):
        for entry in os.scandir(folder):
            m = _OLD_TEMP.match(entry.name)
            if m and m["name"].endswith((".bin", ".idx")) and not pid_alive(int(m["pid"])):
                with contextlib.suppress(OSError):
                    os.remove(entry.path)


def _file_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


class BinIdxWriter:
    """Streaming writer: ``add(doc)`` any number of times, then ``commit()`` (or ``abort()``).

    Tokens go to a temporary ``.x.bin.<pid>.<random>.tmp`` next to the output; ``commit`` writes the
    index the same way and renames both files into place (``.bin`` first, then ``.idx``). Any failure
    deletes the temporaries and leaves an existing dataset untouched; an OS error becomes one
    :class:`RWKVDishaError` line naming the file and the cause. Used as a context manager it commits on
    success and aborts on an exception.
    """

    def __init__(self, prefix: str | os.PathLike, dtype=np.int32):
        self.prefix = split_prefix(prefix)
        self.dtype = np.dtype(np.dtype(dtype).name)
        self.code = dtype_code(self.dtype)
        self._bin_tmp: Path | None = None
        self._idx_tmp: Path | None = None
        self._f = None
        self._sizes: list[np.ndarray] = []
        self._pending: list[int] = []
        self.num_docs = 0
        self.num_tokens = 0
        self.closed = False
        with self._os_errors(".bin"):
            parent = os.path.dirname(self.prefix) or "."
            os.makedirs(parent, exist_ok=True)
            clean_stale_binidx_temps(parent)
            self._bin_tmp = temp_path(self.prefix + ".bin")
            self._f = open(self._bin_tmp, "wb")  # noqa: SIM115 - closed in commit/abort

    @contextlib.contextmanager
    def _os_errors(self, suffix: str):
        """Turn an OS error while writing into one line (after deleting the temporaries)."""
        try:
            yield
        except OSError as e:
            self.abort()
            raise RWKVDishaError(f"cannot write {self.prefix}{suffix}: {os_error_cause(e)}") from None

    def _write(self, arr: np.ndarray) -> None:
        with self._os_errors(".bin"):
            self._f.write(
                np.ascontiguousarray(arr).astype(self.dtype.newbyteorder("<"), copy=False).tobytes()
            )

    def _cast(self, doc) -> np.ndarray:
        arr = np.asarray(doc)
        if arr.ndim != 1:
            arr = arr.reshape(-1)
        if arr.dtype == self.dtype:
            return arr
        out = arr.astype(self.dtype)
        if arr.size and not np.array_equal(out, arr):
            raise RWKVDishaError(
                f"values of a document do not fit binidx dtype {self.dtype.name}; use a wider --dtype"
            )
        return out

    def add(self, doc) -> None:
        """Append one document (any 1-D array-like of token ids)."""
        arr = self._cast(doc)
        if arr.size > np.iinfo(np.int32).max:
            raise RWKVDishaError("a binidx document holds at most 2**31-1 tokens; split the document")
        self._write(arr)
        self._pending.append(int(arr.size))
        if len(self._pending) >= 65536:
            self._flush_sizes()
        self.num_docs += 1
        self.num_tokens += int(arr.size)

    def add_many(self, flat: np.ndarray, sizes: np.ndarray) -> None:
        """Append ``len(sizes)`` documents given as one flat token array and their sizes (fast path)."""
        flat = self._cast(flat)
        sizes = np.asarray(sizes, dtype=np.int64)
        if int(sizes.sum()) != flat.size:
            raise ValueError("sizes do not add up to the number of tokens")
        self._write(flat)
        self._flush_sizes()
        self._sizes.append(sizes.astype(np.int32))
        self.num_docs += int(sizes.size)
        self.num_tokens += int(flat.size)

    def sizes_so_far(self) -> np.ndarray:
        """Sizes of the documents added so far (int32)."""
        self._flush_sizes()
        return np.concatenate(self._sizes) if self._sizes else np.zeros(0, np.int32)

    def _flush_sizes(self) -> None:
        if self._pending:
            self._sizes.append(np.asarray(self._pending, dtype=np.int32))
            self._pending = []

    def _write_index(self) -> None:
        sizes = np.concatenate(self._sizes) if self._sizes else np.zeros(0, np.int32)
        pointers = np.zeros(sizes.size, dtype=np.int64)
        if sizes.size > 1:
            np.cumsum(sizes[:-1].astype(np.int64) * self.dtype.itemsize, out=pointers[1:])
        doc_idx = np.arange(sizes.size + 1, dtype=np.int64)
        self._idx_tmp = temp_path(self.prefix + ".idx")
        with open(self._idx_tmp, "wb") as f:
            f.write(HEADER.pack(MAGIC, VERSION, self.code, sizes.size, doc_idx.size))
            f.write(sizes.astype("<i4").tobytes())
            f.write(pointers.astype("<i8").tobytes())
            f.write(doc_idx.astype("<i8").tobytes())
            f.flush()
            os.fsync(f.fileno())

    def finish(self) -> None:
        """Write everything to the temporary files (tokens flushed, index written), renaming nothing yet:
        a caller writing several datasets at once finishes all before it publishes any."""
        if self.closed or self._idx_tmp is not None:
            return
        try:
            self._flush_sizes()
            with self._os_errors(".bin"):
                self._f.flush()
                os.fsync(self._f.fileno())
                self._f.close()
            with self._os_errors(".idx"):
                self._write_index()
        except BaseException:
            self.abort()
            raise

    def publish(self) -> None:
        """Rename the finished temporary files into place (``.bin`` first, then ``.idx``)."""
        if self.closed:
            return
        try:
            with self._os_errors(".bin"):
                os.chmod(self._bin_tmp, _file_mode())
                os.chmod(self._idx_tmp, _file_mode())
                os.replace(self._bin_tmp, self.prefix + ".bin")
                os.replace(self._idx_tmp, self.prefix + ".idx")
        except BaseException:
            self.abort()
            raise
        self.closed = True

    def commit(self) -> None:
        self.finish()
        self.publish()

    def abort(self) -> None:
        """Forget everything written; the temporary files are deleted, the final names untouched."""
        if self._f is not None and not self._f.closed:
            with contextlib.suppress(OSError):  # closing flushes, which fails again on a full disk
                self._f.close()
        for tmp in (self._bin_tmp, self._idx_tmp):
            if tmp is not None:
                _remove(tmp)
        self.closed = True

    def __enter__(self) -> BinIdxWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()


def write_binidx(prefix: str | os.PathLike, docs: Iterable, dtype=np.int32) -> tuple[int, int]:
    """Write ``prefix.bin`` / ``prefix.idx`` from an iterable of 1-D token arrays, atomically.

    Returns ``(documents, tokens)``. If ``docs`` raises part-way, nothing is left on disk (an existing
    dataset of the same name is kept as it was).
    """
    with BinIdxWriter(prefix, dtype) as w:
        for doc in docs:
            w.add(doc)
    return w.num_docs, w.num_tokens


def _not_found(path: str, prefix: str) -> RWKVDishaError:
    return RWKVDishaError(
        f"data file not found: {path} (data_file is the prefix of {prefix}.bin and {prefix}.idx; "
        f"write them with `rwkv-disha prepare --output {prefix}`)"
    )


class BinIdx:
    """A binidx dataset, read through memory maps.

    ``BinIdx("data/x")`` (or ``"data/x.bin"`` / ``"data/x.idx"``) validates both files at once and
    raises a one-line :class:`RWKVDishaError` for a missing, truncated or foreign file. The maps are
    opened lazily and dropped when pickled, so the object is cheap to send to worker processes.

    - ``len(b)``: number of documents; ``b.doc(i)``: document ``i`` (read-only array of the file's dtype)
    - ``b.tokens(start, length)``: any range of the whole token stream, across document boundaries
    - ``b.num_tokens``, ``b.sizes`` (int32 per document), ``b.offsets`` (token offset of each document)
    """

    def __init__(self, prefix: str | os.PathLike):
        self.prefix = split_prefix(prefix)
        self.idx_path = self.prefix + ".idx"
        self.bin_path = self.prefix + ".bin"
        for p in (self.idx_path, self.bin_path):
            if not os.path.isfile(p):
                raise _not_found(p, self.prefix)
        self._idx_mm = None
        self._bin_mm = None
        self._offsets = None
        self._read_header()
        self._validate()

    # -- opening ----------------------------------------------------------------------------------------
    def _read_header(self) -> None:
        idx_size = os.path.getsize(self.idx_path)
        with open(self.idx_path, "rb") as f:
            head = f.read(HEADER.size)
        if len(head) < 9 or head[:9] != MAGIC:
            raise RWKVDishaError(
                f"{self.idx_path} is not a binidx index (magic bytes {head[:9]!r}, expected {MAGIC!r}); "
                "re-create it with `rwkv-disha prepare`"
            )
        if len(head) < HEADER.size:
            raise RWKVDishaError(f"{self.idx_path} is truncated ({idx_size} bytes); re-create it")
        _, version, code, n, n_doc = HEADER.unpack(head)
        if version != VERSION:
            raise RWKVDishaError(f"{self.idx_path} has binidx version {version}, only version 1 is known")
        if code not in DTYPES:
            raise RWKVDishaError(
                f"{self.idx_path} has unknown dtype code {code} (known: 1-8); the file is damaged or foreign"
            )
        expected = HEADER.size + 4 * n + 8 * n + 8 * n_doc
        if idx_size != expected:
            raise RWKVDishaError(
                f"{self.idx_path} is truncated or damaged ({idx_size} bytes, its header needs {expected}); "
                "re-create it with `rwkv-disha prepare`"
            )
        self.dtype = np.dtype(DTYPES[code])
        self.code = code
        self._n = int(n)
        self._n_doc_idx = int(n_doc)

    def _validate(self) -> None:
        sizes = self.sizes
        if (sizes < 0).any():
            raise RWKVDishaError(f"{self.idx_path} has negative document sizes; the file is damaged")
        self.num_tokens = int(sizes.sum(dtype=np.int64))
        pointers = self.pointers
        expected = np.zeros(self._n, dtype=np.int64)
        if self._n > 1:
            np.cumsum(sizes[:-1].astype(np.int64) * self.dtype.itemsize, out=expected[1:])
        if not np.array_equal(pointers, expected):
            raise RWKVDishaError(
                f"{self.idx_path} has document pointers that are not back to back; the file is damaged"
            )
        need = self.num_tokens * self.dtype.itemsize
        have = os.path.getsize(self.bin_path)
        if have != need:
            what = "truncated" if have < need else "longer than its index says"
            raise RWKVDishaError(
                f"{self.bin_path} is {what} ({have} bytes, {self.idx_path} describes {need}); "
                "the two files do not belong together - re-create them with `rwkv-disha prepare`"
            )

    def _idx(self) -> np.ndarray:
        if self._idx_mm is None:
            self._idx_mm = np.asarray(np.memmap(self.idx_path, dtype=np.uint8, mode="r"))
        return self._idx_mm

    def _bin(self) -> np.ndarray:
        if self._bin_mm is None:
            if self.num_tokens == 0:
                self._bin_mm = np.zeros(0, dtype=self.dtype)
            else:
                mm = np.memmap(self.bin_path, dtype=self.dtype.newbyteorder("<"), mode="r")
                self._bin_mm = np.asarray(mm)  # a plain read-only view; slicing it never copies
        return self._bin_mm

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_idx_mm"] = None
        state["_bin_mm"] = None
        state["_offsets"] = None
        return state

    # -- reading ----------------------------------------------------------------------------------------
    @property
    def sizes(self) -> np.ndarray:
        """Tokens per document (int32, read-only)."""
        return np.frombuffer(self._idx(), dtype="<i4", count=self._n, offset=HEADER.size)

    @property
    def pointers(self) -> np.ndarray:
        return np.frombuffer(self._idx(), dtype="<i8", count=self._n, offset=HEADER.size + 4 * self._n)

    @property
    def doc_idx(self) -> np.ndarray:
        return np.frombuffer(
            self._idx(), dtype="<i8", count=self._n_doc_idx, offset=HEADER.size + 12 * self._n
        )

    @property
    def offsets(self) -> np.ndarray:
        """Token offset of each document in the stream, plus the total at the end (int64, n + 1)."""
        if self._offsets is None:
            off = np.zeros(self._n + 1, dtype=np.int64)
            np.cumsum(self.sizes, out=off[1:])
            self._offsets = off
        return self._offsets

    def __len__(self) -> int:
        return self._n

    def doc(self, i: int) -> np.ndarray:
        """Document ``i`` (negative ``i`` counts from the end)."""
        n = self._n
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"document {i} out of range ({n} documents)")
        start = int(self.pointers[i]) // self.dtype.itemsize
        return self._bin()[start : start + int(self.sizes[i])]

    def tokens(self, start: int, length: int) -> np.ndarray:
        """``length`` tokens of the whole stream from token ``start`` (documents back to back)."""
        if start < 0 or length < 0 or start + length > self.num_tokens:
            raise IndexError(
                f"token range [{start}, {start + length}) outside the stream of {self.num_tokens}"
            )
        return self._bin()[start : start + length]

    def __repr__(self) -> str:
        return f"BinIdx({self.prefix!r}, docs={self._n}, tokens={self.num_tokens}, dtype={self.dtype.name})"


def exists(prefix: str | os.PathLike) -> bool:
    p = split_prefix(prefix)
    return Path(p + ".bin").exists() or Path(p + ".idx").exists()
