"""Datasets: exact tensors for every dataload x loss_mask, rank splitting, epochs, data types, loss."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from rwkv_disha.data.binidx import write_binidx
from rwkv_disha.data.dataset import collate, make_dataset, masked_lm_loss
from rwkv_disha.data.sampling import Permutation

DOCS = [[1, 2, 3, 0], [4, 5, 0], [6, 7, 8, 9, 10, 11, 0], [12, 0]]
ANSWERS = [[0, 0, 1, 1], [0, 1, 1], [0, 0, 0, 1, 1, 1, 1], [1, 1]]


@pytest.fixture
def corpus(tmp_path):
    prefix = str(tmp_path / "c")
    write_binidx(prefix, [np.array(d) for d in DOCS])
    write_binidx(prefix + ".mask", [np.array(a) for a in ANSWERS], dtype=np.uint8)
    return prefix


def ds_for(prefix, dataload="pad", loss_mask="pad", ctx_len=4, micro_bsz=1, epoch_steps=4, seed=0, **kw):
    kw.setdefault("shuffle", False)
    return make_dataset(
        prefix, "binidx", dataload, ctx_len, micro_bsz, epoch_steps, loss_mask, seed, 100, **kw
    )


def as_lists(item):
    return item["input_ids"].tolist(), item["labels"].tolist(), item["mask"].tolist()


def test_pad_exact(corpus):
    ds = ds_for(corpus, "pad", "pad")
    assert len(ds) == 4
    assert as_lists(ds[0]) == ([1, 2, 3, 0], [2, 3, 0, 0], [1, 1, 1, 0])
    assert as_lists(ds[1]) == ([4, 5, 0, 0], [5, 0, 0, 0], [1, 1, 0, 0])
    assert as_lists(ds[2]) == ([6, 7, 8, 9], [7, 8, 9, 10], [1, 1, 1, 1])  # cut to ctx_len + 1 tokens
    assert as_lists(ds[3]) == ([12, 0, 0, 0], [0, 0, 0, 0], [1, 0, 0, 0])
    item = ds[0]
    assert item["input_ids"].dtype == torch.long and item["labels"].dtype == torch.long
    assert item["mask"].dtype == torch.float32
    # loss_mask none: padding still never counts
    assert as_lists(ds_for(corpus, "pad", "none")[1]) == ([4, 5, 0, 0], [5, 0, 0, 0], [1, 1, 0, 0])


def test_pad_qa_exact(corpus):
    ds = ds_for(corpus, "pad", "qa")
    assert [ds[i]["mask"].tolist() for i in range(4)] == [
        [0, 1, 1, 0],
        [1, 1, 0, 0],
        [0, 0, 1, 1],
        [1, 0, 0, 0],
    ]


def test_only_exact(corpus):
    ds = ds_for(corpus, "only", "pad")
    assert as_lists(ds[0]) == ([1, 2, 3], [2, 3, 0], [1, 1, 1])
    assert as_lists(ds[1]) == ([4, 5], [5, 0], [1, 1])
    assert as_lists(ds[2]) == ([6, 7, 8, 9], [7, 8, 9, 10], [1, 1, 1, 1])
    assert as_lists(ds[3]) == ([12], [0], [1])
    qa = ds_for(corpus, "only", "qa")
    assert [qa[i]["mask"].tolist() for i in range(4)] == [[0, 1, 1], [1, 1], [0, 0, 1, 1], [1]]


def test_get_exact(corpus):
    # stream: 1 2 3 0 4 5 0 6 7 8 9 10 11 0 12 0 (16 tokens) -> 3 windows of 5 tokens at 0, 4, 8
    ds = ds_for(corpus, "get", "none", epoch_steps=3)
    assert [ds.locate(s) for s in range(4)] == [0, 4, 8, 0]
    assert as_lists(ds[0]) == ([1, 2, 3, 0], [2, 3, 0, 4], [1, 1, 1, 1])
    assert as_lists(ds[1]) == ([4, 5, 0, 6], [5, 0, 6, 7], [1, 1, 1, 1])
    assert as_lists(ds[2]) == ([7, 8, 9, 10], [8, 9, 10, 11], [1, 1, 1, 1])
    qa = ds_for(corpus, "get", "qa", epoch_steps=3)
    # answer stream: 0 0 1 1 | 0 1 1 | 0 0 0 1 1 1 1 | 1 1 ; the mask of a position is its label's
    assert [qa[i]["mask"].tolist() for i in range(3)] == [[0, 1, 1, 0], [1, 1, 0, 0], [0, 1, 1, 1]]


def test_get_shuffled_windows_cover_stream(corpus):
    ds = ds_for(corpus, "get", "none", epoch_steps=3, shuffle=True, seed=5)
    starts = [ds.locate(s) for s in range(3)]
    offset = min(starts) % 4
    assert sorted(s - offset for s in starts) == [0, 4, 8] and 0 <= offset <= 3  # slack is 3 tokens
    for s in range(6):
        w = ds.sample(s)
        st = ds.locate(s)
        stream = np.concatenate(DOCS)
        assert w["input_ids"].tolist() == stream[st : st + 4].tolist()
        assert w["labels"].tolist() == stream[st + 1 : st + 5].tolist()


def test_collate_pads_with_mask_zero(corpus):
    ds = ds_for(corpus, "only", "pad")
    batch = collate([ds[0], ds[1], ds[3]])
    assert batch["input_ids"].tolist() == [[1, 2, 3], [4, 5, 0], [12, 0, 0]]
    assert batch["labels"].tolist() == [[2, 3, 0], [5, 0, 0], [0, 0, 0]]
    assert batch["mask"].tolist() == [[1, 1, 1], [1, 1, 0], [1, 0, 0]]


def test_two_ranks_disjoint_complete_deterministic(tmp_path):
    prefix = str(tmp_path / "many")
    write_binidx(prefix, [np.array([i + 1, 0]) for i in range(10)])

    def docs_of(rank, seed, epoch=0):
        ds = make_dataset(prefix, "binidx", "pad", 4, 1, 5, "pad", seed, 100, rank=rank, world_size=2)
        ds.set_epoch(epoch)
        return [int(ds[i]["input_ids"][0]) - 1 for i in range(len(ds))]

    r0, r1 = docs_of(0, 42), docs_of(1, 42)
    assert not set(r0) & set(r1)
    assert sorted(r0 + r1) == list(range(10))
    assert r0 == docs_of(0, 42) and r1 == docs_of(1, 42)  # same seed, same order
    assert r0 + r1 != docs_of(0, 7) + docs_of(1, 7)  # another seed, another order
    assert r0 != [0, 2, 4, 6, 8]  # shuffled (unshuffled, rank 0 would take every second document)
    # epoch 1 is the next pass (10 docs = one epoch of 5 samples x 2 ranks), with a new order
    e1 = docs_of(0, 42, 1) + docs_of(1, 42, 1)
    assert sorted(e1) == list(range(10)) and e1 != r0 + r1


def test_epochs_continue_through_documents(tmp_path):
    prefix = str(tmp_path / "many")
    write_binidx(prefix, [np.array([i + 1, 0]) for i in range(10)])
    ds = make_dataset(prefix, "binidx", "pad", 4, 2, 2, "pad", 3, 100)  # 4 samples per epoch
    seen = []
    for e in range(3):
        ds.set_epoch(e)
        seen += [int(ds[i]["input_ids"][0]) - 1 for i in range(len(ds))]
    assert sorted(seen[:10]) == list(range(10))  # epochs 0-2 walk through every document first
    assert seen == [int(ds.sample(s)["input_ids"][0]) - 1 for s in range(12)]
    # the sampler yields absolute sample numbers; start_sample resumes at an exact position
    sampler = ds.sampler(start_sample=6)
    assert sampler.epoch == 1 and list(sampler) == [6, 7] and len(sampler) == 2
    sampler.set_epoch(2)
    assert list(sampler) == [8, 9, 10, 11]
    fresh = make_dataset(prefix, "binidx", "pad", 4, 2, 2, "pad", 3, 100)
    assert [int(fresh[s]["input_ids"][0]) - 1 for s in sampler] == seen[8:12]


def test_epoch_steps_zero_is_one_pass(corpus):
    ds = make_dataset(corpus, "binidx", "pad", 4, 1, 0, "pad", 0, 100, rank=1, world_size=2)
    assert len(ds) == 2
    assert len(make_dataset(corpus, "binidx", "get", 4, 2, 0, "pad", 0, 100)) == 4  # 3 windows -> 2 batches


def test_permutation_is_a_permutation():
    for n in (1, 2, 3, 10, 1000, 4097):
        p = Permutation(n, 12345)
        assert sorted(p(i) for i in range(n)) == list(range(n))
    assert [Permutation(50, 1)(i) for i in range(50)] != [Permutation(50, 2)(i) for i in range(50)]


def test_dataloader_spawn_workers(corpus):
    ds = make_dataset(corpus, "binidx", "pad", 4, 2, 4, "qa", 9, 100)
    dl = torch.utils.data.DataLoader(
        ds,
        batch_size=2,
        num_workers=2,
        collate_fn=collate,
        multiprocessing_context="spawn",
        sampler=ds.sampler(),
    )
    got = [b["input_ids"] for b in dl]
    want = [collate([ds.sample(2 * k), ds.sample(2 * k + 1)])["input_ids"] for k in range(4)]
    assert all(torch.equal(g, w) for g, w in zip(got, want)) and len(got) == 4


# --- other data types ---------------------------------------------------------------------------------
def test_jsonl_on_the_fly(tmp_path, tok):
    src = tmp_path / "d.jsonl"
    recs = [{"text": "hello"}, {"question": "q", "answer": "a"}]
    src.write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    ds = make_dataset(str(src), "jsonl", "only", 64, 1, 2, "qa", 0, 65536, shuffle=False)
    first = ds[0]
    ids = tok.encode("hello") + [0]
    assert first["input_ids"].tolist() == ids[:-1] and first["labels"].tolist() == ids[1:]
    assert first["mask"].tolist() == [1.0] * (len(ids) - 1)
    chat = tok.encode("User: q\n\nAssistant: a\n\n") + [0]
    second = ds[1]
    assert second["labels"].tolist() == chat[1:]
    answer = [t for t, m in zip(second["labels"].tolist(), second["mask"].tolist()) if m]
    assert tok.decode(answer) == " a\n\n"


def test_jsonl_is_tokenised_once_per_dataset(tmp_path, monkeypatch):
    """Built once per run and moved between epochs with set_epoch, the jsonl dataset never re-tokenises."""
    import rwkv_disha.data.records as records

    calls = []
    encode = records.encode_items
    monkeypatch.setattr(records, "encode_items", lambda *a, **k: calls.append(a[0]) or encode(*a, **k))
    src = tmp_path / "d.jsonl"
    src.write_text("".join(json.dumps({"text": f"document {i}"}) + "\n" for i in range(10)))
    ds = make_dataset(str(src), "jsonl", "pad", 8, 2, 0, "pad", 0, 65536)
    assert calls == ["jsonl"]  # one chunk of a small file: one call
    seen = []
    for epoch in range(3):
        ds.set_epoch(epoch)
        seen += [tuple(ds[i]["input_ids"].tolist()) for i in range(len(ds))]
    assert calls == ["jsonl"] and len(seen) == 30 and len(set(seen)) == 10


@pytest.mark.parametrize("encoding", ["utf-8", "utf-16le"])
def test_text_file_types(tmp_path, tok, encoding):
    src = tmp_path / "t.txt"
    src.write_bytes("One block.\n\n二つ目 😀\n".encode(encoding))
    ds = make_dataset(str(src), encoding, "only", 64, 1, 2, "pad", 0, 65536, shuffle=False)
    for i, text in enumerate(["One block.", "二つ目 😀"]):
        ids = tok.encode(text) + [0]
        assert ds[i]["input_ids"].tolist() == ids[:-1] and ds[i]["labels"].tolist() == ids[1:]


def test_numpy_and_uint16_types(tmp_path):
    stream = np.concatenate([np.array(d) for d in DOCS])
    np.save(tmp_path / "t.npy", stream.astype(np.int64))
    stream.astype("<u2").tofile(tmp_path / "t.u16")
    for path, kind in ((tmp_path / "t.npy", "numpy"), (tmp_path / "t.u16", "uint16")):
        pad = make_dataset(str(path), kind, "pad", 4, 1, 4, "pad", 0, 100, shuffle=False)
        assert as_lists(pad[2]) == ([6, 7, 8, 9], [7, 8, 9, 10], [1, 1, 1, 1])  # documents end after a 0
        assert as_lists(pad[3]) == ([12, 0, 0, 0], [0, 0, 0, 0], [1, 0, 0, 0])
        get = make_dataset(str(path), kind, "get", 4, 1, 3, "none", 0, 100, shuffle=False)
        assert as_lists(get[1]) == ([4, 5, 0, 6], [5, 0, 6, 7], [1, 1, 1, 1])


def test_dummy_data():
    a = make_dataset("", "dummy", "pad", 16, 2, 3, "qa", 1, 50)
    b = make_dataset("", "dummy", "pad", 16, 2, 3, "qa", 1, 50)
    c = make_dataset("", "dummy", "pad", 16, 2, 3, "qa", 2, 50)
    assert all(torch.equal(a[i]["input_ids"], b[i]["input_ids"]) for i in range(6))
    assert not all(torch.equal(a[i]["input_ids"], c[i]["input_ids"]) for i in range(6))
    full = make_dataset("", "dummy", "pad", 16, 2, 3, "pad", 1, 50)
    qa_total = full_total = 0
    for i in range(6):
        item, all_real = a[i], full[i]["mask"]
        assert torch.equal(item["input_ids"], full[i]["input_ids"])
        assert int(item["input_ids"].max()) < 50 and item["mask"].sum() > 0
        assert bool((item["mask"] <= all_real).all())  # qa counts a subset of the real tokens ...
        on = torch.nonzero(item["mask"]).flatten().tolist()
        assert on == list(range(on[0], on[-1] + 1)) and on[-1] == int(all_real.sum()) - 1  # ... a final run
        qa_total, full_total = qa_total + float(item["mask"].sum()), full_total + float(all_real.sum())
    assert qa_total < full_total


# --- bad inputs ---------------------------------------------------------------------------------------
def test_bad_inputs_one_line(tmp_path, corpus, one_line_error):
    mk = make_dataset
    one_line_error(
        mk, corpus, "parquet", "pad", 4, 1, 4, "pad", 0, 100, match="unknown --data_type 'parquet'"
    )
    one_line_error(mk, corpus, "wds_img", "pad", 4, 1, 4, "pad", 0, 100, match="image data is not supported")
    one_line_error(
        mk, corpus, "binidx", "only", 4, 2, 4, "pad", 0, 100, match="--dataload only needs --micro_bsz 1"
    )
    one_line_error(mk, corpus, "binidx", "pack", 4, 1, 4, "pad", 0, 100, match="unknown --dataload")
    one_line_error(mk, corpus, "binidx", "pad", 4, 1, 4, "all", 0, 100, match="unknown --loss_mask")
    one_line_error(mk, corpus, "binidx", "pad", 0, 1, 4, "pad", 0, 100, match="--ctx_len must be")
    one_line_error(mk, corpus, "binidx", "pad", 4, 1, 4, "pad", 0, 100, rank=2, world_size=2, match="rank 2")
    one_line_error(mk, corpus, "binidx", "pad", 4, 1, 4, "pad", 0, 10, match="outside the vocabulary")
    one_line_error(mk, corpus, "binidx", "get", 16, 1, 4, "pad", 0, 100, match="fewer than the ctx_len")
    one_line_error(mk, str(tmp_path / "nope"), "binidx", "pad", 4, 1, 4, "pad", 0, 100, match="not found")
    one_line_error(mk, "", "binidx", "pad", 4, 1, 4, "pad", 0, 100, match="no --data_file")
    one_line_error(mk, str(tmp_path / "x.npy"), "numpy", "pad", 4, 1, 4, "pad", 0, 100, match="not found")
    one_line_error(mk, corpus + ".bin", "numpy", "pad", 4, 1, 4, "qa", 0, 100, match="qa needs answer masks")
    one_line_error(mk, corpus + ".bin", "numpy", "pad", 4, 1, 4, "pad", 0, 100, match="not a .npy file")
    np.save(tmp_path / "two_d.npy", np.ones((2, 3), np.int32))
    one_line_error(mk, str(tmp_path / "two_d.npy"), "numpy", "pad", 4, 1, 4, "pad", 0, 100, match="1-D")
    write_binidx(tmp_path / "plain", [np.array([1, 0])])
    one_line_error(
        mk, str(tmp_path / "plain"), "binidx", "pad", 4, 1, 4, "qa", 0, 100, match="plain.mask.bin"
    )
    write_binidx(tmp_path / "empty", [])
    one_line_error(mk, str(tmp_path / "empty"), "binidx", "pad", 4, 1, 4, "pad", 0, 100, match="is empty")
    (tmp_path / "odd.u16").write_bytes(b"\x01\x00\x02")
    one_line_error(mk, str(tmp_path / "odd.u16"), "uint16", "pad", 4, 1, 4, "pad", 0, 100, match="odd number")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a"}\n{oops\n')
    one_line_error(
        mk, str(bad), "jsonl", "pad", 4, 1, 4, "pad", 0, 65536, match=r"bad\.jsonl:2: not valid JSON"
    )


def test_bin_suffix_accepted_and_bad_files(tmp_path, corpus, one_line_error):
    for name in (corpus + ".bin", corpus + ".idx"):
        assert as_lists(ds_for(name, "pad", "qa")[0]) == ([1, 2, 3, 0], [2, 3, 0, 0], [0, 1, 1, 0])
    before = {p: (tmp_path / p).read_bytes() for p in os.listdir(tmp_path)}
    os.rename(corpus + ".idx", corpus + ".idx.away")
    one_line_error(ds_for, corpus, match=r"not found: .*c\.idx")
    os.rename(corpus + ".idx.away", corpus + ".idx")
    os.rename(corpus + ".bin", corpus + ".bin.away")
    one_line_error(ds_for, corpus + ".bin", match=r"not found: .*c\.bin")
    os.rename(corpus + ".bin.away", corpus + ".bin")
    data = before["c.bin"]
    (tmp_path / "trunc.bin").write_bytes(data[:-2])
    (tmp_path / "trunc.idx").write_bytes(before["c.idx"])
    one_line_error(ds_for, str(tmp_path / "trunc"), match="truncated")
    (tmp_path / "magic.bin").write_bytes(data)
    (tmp_path / "magic.idx").write_bytes(b"GARBAGE!!" + before["c.idx"][9:])
    one_line_error(ds_for, str(tmp_path / "magic"), match="magic")
    for p, content in before.items():  # nothing on disk was changed by the failures
        assert (tmp_path / p).read_bytes() == content


# --- loss -----------------------------------------------------------------------------------------------
def test_masked_lm_loss_values():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 11)
    labels = torch.randint(0, 11, (2, 5))
    full = torch.ones(2, 5)
    ref = torch.nn.functional.cross_entropy(logits.reshape(-1, 11), labels.reshape(-1))
    assert torch.allclose(masked_lm_loss(logits, labels, full), ref, atol=1e-6)
    mask = torch.tensor([[1, 1, 0, 0, 0], [0, 1, 0, 0, 1]], dtype=torch.float32)
    keep = mask.reshape(-1) > 0
    ref2 = torch.nn.functional.cross_entropy(logits.reshape(-1, 11)[keep], labels.reshape(-1)[keep])
    assert torch.allclose(masked_lm_loss(logits, labels, mask), ref2, atol=1e-6)
    bf = masked_lm_loss(logits.bfloat16(), labels, mask)
    assert bf.dtype == torch.float32 and abs(bf.item() - ref2.item()) < 0.05


def test_all_masked_batch_is_zero_not_nan():
    logits = torch.randn(2, 3, 7, requires_grad=True)
    labels = torch.zeros(2, 3, dtype=torch.long)
    loss = masked_lm_loss(logits, labels, torch.zeros(2, 3))
    loss.backward()
    assert loss.item() == 0.0
    assert torch.count_nonzero(logits.grad) == 0
    # non-finite logits at masked positions do not leak into the loss or the gradient
    bad = torch.randn(1, 3, 7)
    bad[0, 2] = float("nan")
    bad.requires_grad_(True)
    loss = masked_lm_loss(bad, torch.zeros(1, 3, dtype=torch.long), torch.tensor([[1.0, 1.0, 0.0]]))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(bad.grad).all()
    assert torch.count_nonzero(bad.grad[0, 2]) == 0 and torch.count_nonzero(bad.grad[0, :2]) > 0


def test_pad_batch_through_loss(corpus):
    ds = ds_for(corpus, "pad", "qa")
    batch = collate([ds[3], ds[3]])
    batch["mask"].zero_()
    logits = torch.randn(2, 4, 100, requires_grad=True)
    loss = masked_lm_loss(logits, batch["labels"], batch["mask"])
    loss.backward()
    assert loss.item() == 0.0 and torch.count_nonzero(logits.grad) == 0


def test_large_data_tokenized_for_another_vocabulary_is_refused_at_start(tmp_path, monkeypatch):
    """Over FULL_CHECK_TOKENS the start scans evenly spaced windows, not the whole .bin: data tokenized for
    a bigger vocabulary shows there; one stray id between the windows is left to the per-sample check."""
    import rwkv_disha.data.dataset as dataset
    from rwkv_disha.errors import RWKVDishaError

    monkeypatch.setattr(dataset, "FULL_CHECK_TOKENS", 100)
    monkeypatch.setattr(dataset, "SCAN_TOKENS", 64)  # 16 windows of 4 tokens in 2,000
    docs = [np.array([5, 6, 7, 8, 9, 10, 11, 12, 13, 0], np.int32) for _ in range(200)]
    other = [d * 40 for d in docs]  # ids up to 520: another model's vocabulary
    write_binidx(tmp_path / "other", other)

    def build(name):
        return make_dataset(str(tmp_path / name), "binidx", "pad", 4, 1, 4, "pad", 0, 256, shuffle=False)

    with pytest.raises(
        RWKVDishaError, match=r"holds token id \d+, outside the vocabulary \(vocab_size 256\)"
    ):
        build("other")
    stray = [d.copy() for d in docs]
    stray[100][3] = 300  # token 1,003: between the windows at 931 and 1,064
    write_binidx(tmp_path / "stray", stray)
    ds = build("stray")
    ds.sample(99)
    with pytest.raises(RWKVDishaError, match="token id 300 in .* is outside the vocabulary"):
        ds.sample(100)
