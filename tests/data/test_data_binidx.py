"""binidx reader / writer: round trips, an independent reader from docs/DATA.md, bad files, atomic writes."""

from __future__ import annotations

import os
import pickle
import struct

import numpy as np
import pytest
import torch

from rwkv_disha.data.binidx import DTYPES, BinIdx, BinIdxWriter, write_binidx


def sample_docs(dtype) -> list[np.ndarray]:
    info = np.iinfo(dtype) if np.issubdtype(dtype, np.integer) else None
    lo, hi = (int(info.min), int(info.max)) if info else (-1.5e30, 2.5e30)
    return [
        np.array([1, 2, 3, 0], dtype=dtype),
        np.array([], dtype=dtype),
        np.array([lo, hi, 0], dtype=dtype),
        np.arange(100, dtype=dtype),
        np.array([7], dtype=dtype),
    ]


def read_by_hand(prefix: str) -> tuple[int, list[int], list[int], list[int], bytes]:
    """An independent reader written from docs/DATA.md ("binidx files") alone: parse the .idx header
    and arrays byte by byte."""
    with open(prefix + ".idx", "rb") as f:
        raw = f.read()
    assert raw[:9] == b"MMIDIDX\x00\x00"
    (version,) = struct.unpack("<Q", raw[9:17])
    assert version == 1
    code = raw[17]
    n, n_doc = struct.unpack("<QQ", raw[18:34])
    pos = 34
    sizes = list(struct.unpack(f"<{n}i", raw[pos : pos + 4 * n]))
    pos += 4 * n
    pointers = list(struct.unpack(f"<{n}q", raw[pos : pos + 8 * n]))
    pos += 8 * n
    doc_idx = list(struct.unpack(f"<{n_doc}q", raw[pos : pos + 8 * n_doc]))
    assert pos + 8 * n_doc == len(raw)
    with open(prefix + ".bin", "rb") as f:
        return code, sizes, pointers, doc_idx, f.read()


@pytest.mark.parametrize("code", sorted(DTYPES))
def test_round_trip_every_dtype(tmp_path, code):
    dtype = DTYPES[code]
    docs = sample_docs(dtype)
    prefix = str(tmp_path / f"d{code}")
    assert write_binidx(prefix, docs, dtype=dtype) == (5, sum(d.size for d in docs))
    b = BinIdx(prefix)
    assert b.code == code and b.dtype == np.dtype(dtype)
    assert len(b) == 5 and b.num_tokens == 108
    assert b.sizes.tolist() == [4, 0, 3, 100, 1]
    for i, d in enumerate(docs):
        np.testing.assert_array_equal(b.doc(i), d)
    np.testing.assert_array_equal(b.doc(-1), docs[-1])
    stream = np.concatenate(docs)
    np.testing.assert_array_equal(b.tokens(0, b.num_tokens), stream)
    np.testing.assert_array_equal(b.tokens(2, 9), stream[2:11])  # crosses three documents
    assert b.tokens(5, 0).size == 0
    with pytest.raises(IndexError):
        b.tokens(100, 9)
    with pytest.raises(IndexError):
        b.doc(5)


@pytest.mark.parametrize("code", [1, 4, 6, 8])
def test_independent_reader_parses_our_files(tmp_path, code):
    dtype = DTYPES[code]
    docs = sample_docs(dtype)
    prefix = str(tmp_path / "x")
    write_binidx(prefix, docs, dtype=dtype)
    got_code, sizes, pointers, doc_idx, data = read_by_hand(prefix)
    item = np.dtype(dtype).itemsize
    assert got_code == code
    assert sizes == [4, 0, 3, 100, 1]
    assert pointers == [0, 4 * item, 4 * item, 7 * item, 107 * item]
    assert doc_idx == [0, 1, 2, 3, 4, 5]
    assert len(data) == 108 * item
    for d, size, ptr in zip(docs, sizes, pointers):
        got = np.frombuffer(data[ptr : ptr + size * item], dtype=np.dtype(dtype).newbyteorder("<"))
        np.testing.assert_array_equal(got, d)


def test_reader_reads_hand_written_file(tmp_path):
    """Bytes packed by hand (as json2binidx writes int32 files) are read by BinIdx."""
    docs = [[5, 6, 0], [65535, 0]]
    sizes = [3, 2]
    idx = b"MMIDIDX\x00\x00" + struct.pack("<QBQQ", 1, 4, 2, 3)
    idx += struct.pack("<2i", *sizes) + struct.pack("<2q", 0, 12) + struct.pack("<3q", 0, 1, 2)
    (tmp_path / "h.idx").write_bytes(idx)
    (tmp_path / "h.bin").write_bytes(struct.pack("<5i", 5, 6, 0, 65535, 0))
    b = BinIdx(tmp_path / "h")
    assert [b.doc(i).tolist() for i in range(len(b))] == docs
    assert b.tokens(1, 3).tolist() == [6, 0, 65535]
    assert b.doc_idx.tolist() == [0, 1, 2]


def test_streaming_writer_and_suffixes(tmp_path):
    with BinIdxWriter(tmp_path / "s.bin", np.int32) as w:
        w.add([1, 2])
        w.add_many(np.array([3, 4, 5, 6]), np.array([1, 3]))
        w.add(np.array([[7, 8]]))
    for name in ("s", "s.bin", "s.idx"):
        b = BinIdx(tmp_path / name)
        assert [b.doc(i).tolist() for i in range(len(b))] == [[1, 2], [3], [4, 5, 6], [7, 8]]
    assert sorted(os.listdir(tmp_path)) == ["s.bin", "s.idx"]


def test_values_that_do_not_fit_are_refused(tmp_path, one_line_error):
    one_line_error(write_binidx, tmp_path / "u", [np.array([70000])], dtype=np.uint16, match="do not fit")
    assert os.listdir(tmp_path) == []


def test_pickle_is_small_and_works(tmp_path):
    write_binidx(tmp_path / "p", [np.arange(100_000, dtype=np.int32)] * 3)
    b = BinIdx(tmp_path / "p")
    b.doc(0)  # open the maps
    blob = pickle.dumps(b)
    assert len(blob) < 2000  # the maps are not copied
    b2 = pickle.loads(blob)
    np.testing.assert_array_equal(b2.doc(2), np.arange(100_000))


class _DocDataset(torch.utils.data.Dataset):
    def __init__(self, b):
        self.b = b

    def __len__(self):
        return len(self.b)

    def __getitem__(self, i):
        return torch.from_numpy(self.b.doc(i).astype(np.int64))


def test_dataloader_spawn_workers(tmp_path):
    docs = [np.arange(i, i + 5, dtype=np.int32) for i in range(6)]
    write_binidx(tmp_path / "w", docs)
    dl = torch.utils.data.DataLoader(
        _DocDataset(BinIdx(tmp_path / "w")), batch_size=2, num_workers=2, multiprocessing_context="spawn"
    )
    got = torch.cat(list(dl)).numpy()
    np.testing.assert_array_equal(got, np.stack(docs))


def test_failed_write_keeps_old_files(tmp_path):
    write_binidx(tmp_path / "k", [np.array([1, 2, 3])])
    before = {p: (tmp_path / p).read_bytes() for p in ("k.bin", "k.idx")}

    def docs():
        yield np.array([9, 9])
        raise RuntimeError("input broke")

    with pytest.raises(RuntimeError):
        write_binidx(tmp_path / "k", docs())
    assert sorted(os.listdir(tmp_path)) == ["k.bin", "k.idx"]  # no temporary files left
    assert {p: (tmp_path / p).read_bytes() for p in before} == before


def test_bad_files(tmp_path, one_line_error):
    write_binidx(tmp_path / "g", [np.array([1, 2, 3, 0]), np.array([4, 0])])
    good_bin, good_idx = (tmp_path / "g.bin").read_bytes(), (tmp_path / "g.idx").read_bytes()

    def fresh(name, bin_bytes=good_bin, idx_bytes=good_idx):
        if bin_bytes is not None:
            (tmp_path / f"{name}.bin").write_bytes(bin_bytes)
        if idx_bytes is not None:
            (tmp_path / f"{name}.idx").write_bytes(idx_bytes)
        return tmp_path / name

    one_line_error(BinIdx, fresh("noidx", idx_bytes=None), match=r"not found: .*noidx\.idx")
    one_line_error(BinIdx, fresh("nobin", bin_bytes=None), match=r"not found: .*nobin\.bin")
    one_line_error(BinIdx, tmp_path / "nothing", match="not found")
    one_line_error(BinIdx, fresh("shortbin", bin_bytes=good_bin[:-4]), match="truncated")
    one_line_error(BinIdx, fresh("longbin", bin_bytes=good_bin + b"\0" * 4), match="longer than its index")
    one_line_error(BinIdx, fresh("shortidx", idx_bytes=good_idx[:-8]), match="truncated")
    one_line_error(BinIdx, fresh("tinyidx", idx_bytes=good_idx[:20]), match="truncated")
    one_line_error(BinIdx, fresh("magic", idx_bytes=b"NOTBINID\0" + good_idx[9:]), match="magic")
    one_line_error(
        BinIdx, fresh("ver", idx_bytes=good_idx[:9] + struct.pack("<Q", 2) + good_idx[17:]), match="version"
    )
    one_line_error(
        BinIdx, fresh("code", idx_bytes=good_idx[:17] + b"\x09" + good_idx[18:]), match="dtype code 9"
    )
    # the files given to the reader are never modified
    assert (tmp_path / "shortbin.bin").read_bytes() == good_bin[:-4]
    assert (tmp_path / "g.bin").read_bytes() == good_bin


def test_empty_dataset_file(tmp_path):
    assert write_binidx(tmp_path / "e", []) == (0, 0)
    b = BinIdx(tmp_path / "e")
    assert len(b) == 0 and b.num_tokens == 0 and b.tokens(0, 0).size == 0
    assert (tmp_path / "e.bin").stat().st_size == 0
