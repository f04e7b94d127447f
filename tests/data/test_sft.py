"""`--data_type sft`: RWKV-PEFT's query / response records in its SFT template, loss on the response only."""

from __future__ import annotations

import json
import sys
import types

import numpy as np
import pytest
import torch

from rwkv_disha.cli import main
from rwkv_disha.data.dataset import make_dataset
from rwkv_disha.data.sft import SftSpec, split_rows

# RWKV-PEFT's SFTdataset.py template, written out by hand (not taken from the module under test)
PROMPT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the "
    "request.\n\n### Instruction:\n{q}\n\n### Response:"
)
RECORDS = [
    {"query": "What is 2+2?", "response": "4", "type": "math"},
    {"query": "Name a colour.", "response": "Blue"},
    {"query": "Capital of France?", "response": "Paris"},
    {"query": "Say hi", "response": "Hi there!"},
]


@pytest.fixture
def sft_file(tmp_path):
    path = tmp_path / "sft.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in RECORDS), encoding="utf-8")
    return path


def _dataset(path, split="train", fields=("query", "response"), loss_mask="pad", ctx_len=128):
    return make_dataset(
        str(path), "sft", "pad", ctx_len, 1, 0, loss_mask, 0, 65536, shuffle=False, sft=SftSpec(fields, split)
    )


def _text_and_answer(ds, i, tok):
    """The document's text and the text of the tokens the loss sees (labels where mask = 1)."""
    item = ds.sample(i)
    m = item["mask"].numpy() > 0
    n = int((item["labels"].numpy() != 0).sum() + 1)  # no token 0 anywhere in an sft document
    ids = np.concatenate([item["input_ids"].numpy()[:1], item["labels"].numpy()[: n - 1]])
    return tok.decode(ids.tolist()), tok.decode(item["labels"].numpy()[m].tolist())


def test_each_record_is_rwkv_peft_template_and_only_the_response_counts(sft_file, tok):
    ds = _dataset(sft_file)
    assert len(ds.source) == len(RECORDS)
    for i, r in enumerate(RECORDS):
        text, answer = _text_and_answer(ds, i, tok)
        assert text == PROMPT.format(q=r["query"]) + r["response"] + "\n\x17"
        assert answer == r["response"] + "\n\x17"
        assert 0 not in ds.source.doc(i)  # RWKV-PEFT ends with \x17, not with token 0


def test_loss_mask_none_trains_on_the_prompt_too(sft_file, tok):
    ds = _dataset(sft_file, loss_mask="none")
    text, seen = _text_and_answer(ds, 0, tok)
    assert seen == text[len(tok.decode(ds.source.doc(0)[:1].tolist())) :]  # every label counts


@pytest.mark.parametrize(
    "split, rows",
    [
        ("train", [0, 1, 2, 3]),
        ("train[:2]", [0, 1]),
        ("train[1:]", [1, 2, 3]),
        ("train[-1:]", [3]),
        ("train[25%:75%]", [1, 2]),
        ("train[:50%]", [0, 1]),
    ],
)
def test_split_selects_records_as_datasets_slicing_does(sft_file, tok, split, rows):
    ds = _dataset(sft_file, split=split)
    assert [_text_and_answer(ds, i, tok)[1] for i in range(len(ds.source))] == [
        RECORDS[k]["response"] + "\n\x17" for k in rows
    ]


def test_percent_bounds_round_as_datasets_does():
    """datasets' "closest" rounding is Python's round(): half to even."""
    assert list(split_rows("train[:33%]", 10)) == list(range(3))  # 3.3 -> 3
    assert list(split_rows("train[:35%]", 10)) == list(range(4))  # 3.5 -> 4
    assert list(split_rows("train[:25%]", 10)) == list(range(2))  # 2.5 -> 2, not 3
    assert list(split_rows("train[-20%:]", 10)) == [8, 9]


def test_percent_bounds_beyond_100_are_refused(sft_file, one_line_error):
    from rwkv_disha.data.sft import check_sft_options

    fields = ("query", "response")
    one_line_error(
        check_sft_options, fields, "train[:200%]", match=r"percent bounds lie within -100% .. 100%"
    )


def test_other_field_names(tmp_path, tok):
    path = tmp_path / "alpaca.json"
    path.write_text(json.dumps([{"instruction": "Add 1 and 1", "output": "2"}]), encoding="utf-8")
    ds = _dataset(path, fields=("instruction", "output"))
    assert _text_and_answer(ds, 0, tok) == (PROMPT.format(q="Add 1 and 1") + "2\n\x17", "2\n\x17")


def test_a_hugging_face_dataset_is_read_with_the_datasets_package(sft_file, tok, monkeypatch, tmp_path):
    """Anything but a local JSON file goes to datasets.load_dataset(path, split=...), as in RWKV-PEFT."""
    calls = []

    class Table:
        column_names = ["query", "response", "type"]

        def __getitem__(self, key):
            return [r.get(key) for r in RECORDS[:2]]

    def load_dataset(path, split):
        calls.append((path, split))
        return Table()

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    ds = _dataset("meta-math/MetaMathQA", split="train[:2]")
    assert calls == [("meta-math/MetaMathQA", "train[:2]")]
    local = _dataset(sft_file, split="train[:2]")
    for i in range(2):
        assert np.array_equal(ds.source.doc(i), local.source.doc(i))
        assert np.array_equal(ds.masks.doc(i), local.masks.doc(i))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"split": "test"}, "a local file has one split, train"),
        ({"split": "train[:0]"}, "holds no records"),
        ({"fields": ("question", "response")}, r'sft.jsonl:1: no "question" key .*--sft_field'),
    ],
)
def test_bad_split_or_fields_are_one_line(sft_file, one_line_error, kwargs, match):
    one_line_error(_dataset, sft_file, match=match, **kwargs)


def test_a_dataset_name_without_the_datasets_package_is_one_line(one_line_error, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError
    one_line_error(_dataset, "meta-math/MetaMathQA", match=r"pip install datasets")


# --- the CLI: RWKV-PEFT's flags, checked before any work -------------------------------------------------
@pytest.fixture
def base(make_checkpoint):
    return make_checkpoint(1, 64, 65536)


def _train(base, data, proj, *extra):
    return [
        "train", "--load_model", str(base), "--proj_dir", str(proj), "--data_file", str(data),
        "--data_type", "sft", "--ctx_len", "64", "--micro_bsz", "1", "--epoch_steps", "2",
        "--epoch_count", "1", "--accelerator", "cpu", "--precision", "fp32", "--progress_bar", "0",
        "--disha_config", '{"mode":"bone","load":"","r":16}', *extra,
    ]  # fmt: skip


@pytest.mark.parametrize(
    "extra, words",
    [
        (["--sft_field", "query"], "--sft_field takes two different keys"),
        (["--sft_field", "query", "query"], "--sft_field takes two different keys"),
        (["--sft_split", "train[:x]"], "is not a split"),
        (["--data_type", "jsonl", "--sft_field", "q", "a"], "--sft_field applies to --data_type sft only"),
    ],
)
def test_train_refuses_bad_sft_flags_before_any_work(base, sft_file, tmp_path, capsys, extra, words):
    proj = tmp_path / "proj"
    assert main(_train(base, sft_file, proj, *extra)) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and words in err, err
    assert not proj.exists()


def test_train_and_eval_run_rwkv_peft_sft_flags(base, sft_file, tmp_path, tok):
    proj = tmp_path / "proj"
    args = _train(base, sft_file, proj, "--sft_field", "query", "response", "--sft_split", "train[:3]")
    assert main(args) == 0
    assert (proj / "rwkv-0.pth").is_file()
    out = tmp_path / "eval.json"
    ev = ["eval", "--load_model", str(base), "--peft_checkpoint", str(proj / "rwkv-0.pth"), "--data_file"]
    ev += [
        str(sft_file),
        "--data_type",
        "sft",
        "--sft_split",
        "train[3:]",
        "--ctx_len",
        "64",
        "--json",
        str(out),
    ]
    assert main(ev) == 0
    result = json.loads(out.read_text())  # the last record alone, and only its response's tokens
    assert result["samples"] == 1 and result["tokens"] == len(tok.encode("Hi there!\n\x17"))


def run_sft_sh(base, data, proj, hardware: str) -> list[str]:
    """RWKV-PEFT's scripts/run_sft.sh after `python train.py` -> `rwkv-disha train`, paths and sizes swapped
    for the tiny model; ``hardware`` replaces its GPU flags (and its --wandb, which needs wandb)."""
    n_layer, n_embd, micro_bsz, epoch_save, epoch_steps, ctx_len = 1, 64, 2, 1, 2, 64
    bone_config = '{"bone_mode":"bone","bone_load":"","bone_r":64}'
    return [
        *f"train --load_model {base} --proj_dir {proj} --data_file {data} --vocab_size 65536 "
        f"--n_layer {n_layer} --n_embd {n_embd} --ctx_len {ctx_len} --micro_bsz {micro_bsz} "
        f"--epoch_steps {epoch_steps} --epoch_count 1 --epoch_begin 0 --epoch_save {epoch_save} "
        "--lr_init 2e-5 --lr_final 2e-5 --warmup_steps 0 --beta1 0.9 --beta2 0.99 --adam_eps 1e-8 "
        f"{hardware} --my_testing x070 --peft bone".split(),
        "--bone_config", bone_config,
        "--data_type", "sft", "--sft_field", "query", "response", "--sft_split", "train",
        "--progress_bar", "0",
    ]  # fmt: skip


def test_rwkv_peft_run_sft_script_runs_unchanged(base, sft_file, tmp_path, capsys):
    gpu = "--accelerator gpu --devices 1 --precision bf16 --strategy deepspeed_stage_1 --grad_cp 1"
    if not torch.cuda.is_available():  # every flag is accepted; only the missing GPU is reported
        assert main(run_sft_sh(base, sft_file, tmp_path / "gpu", gpu)) == 2
        assert "no CUDA GPU" in capsys.readouterr().err
        assert not (tmp_path / "gpu").exists()
    cpu = "--accelerator cpu --devices 1 --precision fp32 --strategy auto --grad_cp 1"
    assert main(run_sft_sh(base, sft_file, tmp_path / "cpu", cpu)) == 0
    tensors = torch.load(tmp_path / "cpu" / "rwkv-0.pth", weights_only=True)
    assert tensors["blocks.0.att.key.disha"].shape == (64, 64)  # Bone r64 on a 64-wide layer


def test_prepare_sft_field_writes_what_data_type_sft_reads(sft_file, tmp_path, capsys):
    """`prepare --sft_field query response` + `--data_type binidx --loss_mask qa` trains on the same
    tokens and answer masks as `--data_type sft` (tokenized once, memory-mapped)."""
    prefix = tmp_path / "sft"
    args = ["prepare", "--input", str(sft_file), "--output", str(prefix), "--workers", "1", "--progress", "0"]
    assert main([*args, "--sft_field", "query", "response"]) == 0
    on_the_fly = _dataset(sft_file)
    prepared = make_dataset(str(prefix), "binidx", "pad", 128, 1, 0, "qa", 0, 65536, shuffle=False)
    assert len(prepared.source) == len(on_the_fly.source) == len(RECORDS)
    for i in range(len(RECORDS)):
        a, b = prepared.sample(i), on_the_fly.sample(i)
        assert all(torch.equal(a[k], b[k]) for k in ("input_ids", "labels", "mask"))


@pytest.mark.parametrize(
    "extra, words",
    [
        (["--sft_field", "query"], "--sft_field takes two different keys"),
        (
            ["--sft_field", "query", "response", "--append_eos", "0"],
            "--append_eos: not used with --sft_field",
        ),
        (["--sft_field", "query", "response", "--text_key", "t"], "--text_key: not used with --sft_field"),
    ],
)
def test_prepare_refuses_bad_sft_flags(sft_file, tmp_path, capsys, extra, words):
    prefix = tmp_path / "out"
    assert main(["prepare", "--input", str(sft_file), "--output", str(prefix), *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and words in err, err
    assert list(tmp_path.iterdir()) == [sft_file]


def test_prepare_sft_field_refuses_a_text_input(tmp_path, capsys):
    text = tmp_path / "notes.txt"
    text.write_text("hello\n")
    assert (
        main(["prepare", "--input", str(text), "--output", str(tmp_path / "o"), "--sft_field", "q", "a"]) == 2
    )
    assert "notes.txt is a text file" in capsys.readouterr().err


def test_generate_sft_prompts_in_the_template(base, capsys, tok):
    """`generate --sft` feeds RWKV-PEFT's template around the prompt (the text a --data_type sft model was
    trained on): the same greedy tokens as giving the whole template as --prompt."""
    common = ["generate", "--load_model", str(base), "--max_tokens", "4", "--temperature", "0"]
    assert main([*common, "--sft", "--prompt", "Name a colour."]) == 0
    wrapped = capsys.readouterr()
    assert main([*common, "--prompt", PROMPT.format(q="Name a colour.")]) == 0
    plain = capsys.readouterr()
    assert wrapped.out == plain.out
    n = len(tok.encode(PROMPT.format(q="Name a colour.")))
    assert f"[{n} prompt tokens" in wrapped.err and f"[{n} prompt tokens" in plain.err
    assert main([*common, "--sft", "--chat", "--prompt", "x"]) == 2
    assert "two prompt formats" in capsys.readouterr().err


def test_generate_sft_stops_at_the_end_of_turn(monkeypatch, base, capsys):
    """The reply ends at RWKV-PEFT's \\x17, as chat replies end at a blank line."""
    import rwkv_disha.generate as gen

    seen = []
    monkeypatch.setattr(gen, "stream_text", lambda tok, tokens, stop: seen.append(stop))
    assert main(["generate", "--load_model", str(base), "--sft", "--prompt", "hi", "--max_tokens", "1"]) == 0
    assert seen == [("\x17",)]


@pytest.mark.parametrize(
    "content",
    [
        b'\xef\xbb\xbf[{"query": "a", "response": "b"}]',  # a BOM before a JSON array
        b'{\n "query": "a",\n "response": "b"\n}\n',  # one pretty-printed object
    ],
)
def test_json_files_with_a_bom_or_one_pretty_object_are_read(tmp_path, tok, content):
    path = tmp_path / "one.json"
    path.write_bytes(content)
    ds = _dataset(path)
    assert len(ds.source) == 1 and _text_and_answer(ds, 0, tok)[1] == "b\n\x17"


def test_an_empty_file_is_named_not_its_split(tmp_path, one_line_error):
    path = tmp_path / "none.json"
    path.write_text("[]")
    one_line_error(
        _dataset, path, match=r"none.json holds no records: give a file of query / response records$"
    )


def test_no_response_within_ctx_len_names_the_sft_fixes(tmp_path, one_line_error):
    path = tmp_path / "long.jsonl"
    path.write_text(json.dumps({"query": "What is 2+2?", "response": "4"}) + "\n")
    msg = one_line_error(_dataset, path, ctx_len=16, match="no response token")
    assert msg.endswith("raise --ctx_len, or train on the prompt too with --loss_mask none")


def test_sft_flags_given_with_another_data_type_are_refused_even_at_their_defaults(
    base, sft_file, tmp_path, capsys
):
    """Given explicitly they would be ignored; a resumed run's stored values are not refused (not given)."""
    argv = _train(base, sft_file, tmp_path / "p", "--data_type", "jsonl", "--sft_field", "query", "response")
    assert main(argv) == 2
    assert "--sft_field applies to --data_type sft only" in capsys.readouterr().err
    assert not (tmp_path / "p").exists()


def test_prepare_preview_refuses_flags_it_would_ignore(sft_file, tmp_path, capsys):
    args = ["prepare", "--input", str(sft_file), "--preview", "1", "--output", str(tmp_path / "x")]
    assert main([*args, "--workers", "3"]) == 2
    assert "--preview shows records and writes nothing, so --output, --workers" in capsys.readouterr().err


def test_prepare_never_removes_an_input_named_like_its_lock(tmp_path, capsys):
    lock = tmp_path / ".z.prepare.lock"
    lock.write_text('{"text": "x"}\n')
    assert main(["prepare", "--input", str(lock), "--output", str(tmp_path / "z")]) == 2
    assert lock.read_text() == '{"text": "x"}\n'


def test_a_resumed_sft_run_keeps_its_data_type(base, sft_file, tmp_path, capsys):
    """The stored --sft_split of the run is not the user's flag: the run resumes as it was. Switching the
    data type at --resume would continue the run's data position in other data: refused."""
    proj = tmp_path / "p"
    assert main(_train(base, sft_file, proj, "--sft_split", "train[:3]")) == 0
    resume = ["train", "--resume", str(proj), "--epoch_count", "2", "--progress_bar", "0"]
    assert main([*resume, "--data_type", "dummy"]) == 2
    assert "--data_type dummy differs from the run's sft: --resume continues the run as it was" in (
        capsys.readouterr().err
    )
    assert main(resume) == 0, capsys.readouterr().err
    assert (proj / "rwkv-1.pth").is_file()
