"""End-to-end `rwkv-disha train` on CPU: learning, files on disk, merge, the rwkv package, the tutorial."""

import csv
import json

import pytest
import torch

from rwkv_disha.cli import main
from rwkv_disha.data.binidx import BinIdx
from rwkv_disha.evaluate import evaluate_loss
from rwkv_disha.generate import load_for_inference
from rwkv_disha.model.load import load_state_dict

TARGETS = ("att.receptance", "att.key", "att.value", "att.output", "ffn.key", "ffn.value")


def ln_keys(n_layer):
    keys = {"blocks.0.ln0.weight", "blocks.0.ln0.bias", "ln_out.weight", "ln_out.bias"}
    for i in range(n_layer):
        for ln in ("ln1", "ln2", "att.ln_x"):
            keys |= {f"blocks.{i}.{ln}.weight", f"blocks.{i}.{ln}.bias"}
    return keys


VOCAB = 256  # tests/train/conftest.py's base model


def data_loss(model_path, data, adapter=""):
    from rwkv_disha.data.dataset import make_dataset

    ds = make_dataset(data, "binidx", "pad", 32, 4, 16, "pad", 0, VOCAB, shuffle=False)
    return evaluate_loss(load_for_inference(str(model_path), adapter), ds, 4, 64)["loss"]


def test_train_merge_and_rwkv_package(tmp_path, base_path, count_data, rwkv_oracle, capsys, train_args):
    proj = tmp_path / "out"
    assert main(train_args(base_path, count_data, proj, epochs=2, steps=12)) == 0
    printed = capsys.readouterr().out
    assert "training finished" in printed and "rwkv-disha merge --base_model" in printed

    # the files a user finds, exactly
    names = sorted(p.name for p in proj.iterdir())
    assert names == sorted(
        ["rwkv-0.pth", "rwkv-0.json", "rwkv-1.pth", "rwkv-1.json", "resume.ckpt", "train_config.json",
         "train_log.txt", "metrics.csv", "loss.png", ".rwkv-disha.lock"]
    )  # fmt: skip
    sd = load_state_dict(proj / "rwkv-1.pth")
    expected = {f"blocks.{i}.{t}.disha" for i in range(2) for t in TARGETS} | ln_keys(2)
    assert set(sd) == expected
    assert sd["blocks.0.att.key.disha"].shape == (16, 64) and sd["blocks.1.ffn.value.disha"].shape == (16, 64)
    assert sd["blocks.1.ffn.key.disha"].shape == (16, 256)
    assert all(sd[f"blocks.{i}.{t}.disha"].abs().sum() > 0 for i in range(2) for t in TARGETS)
    side = json.loads((proj / "rwkv-1.json").read_text())
    assert side["adapter"]["mode"] == "bone" and side["adapter"]["r"] == 16

    # the loss went down, in the log and in the metrics
    rows = list(csv.DictReader((proj / "metrics.csv").read_text().splitlines()))
    assert len(rows) == 24
    first, last = [float(r["loss"]) for r in rows[:4]], [float(r["loss"]) for r in rows[-4:]]
    assert sum(last) / 4 < sum(first) / 4 - 0.5
    log = (proj / "train_log.txt").read_text()
    assert "epoch 0 loss" in log and "epoch 1 loss" in log

    # merge: the base's keys exactly, loads in the rwkv package, same logits as the adapter model
    merged = tmp_path / "merged.pth"
    assert main(["merge", "--base_model", str(base_path), "--peft_checkpoint", str(proj / "rwkv-1.pth"),
                 "--output", str(merged)]) == 0  # fmt: skip
    assert set(load_state_dict(merged)) == set(load_state_dict(base_path))
    tokens = BinIdx(count_data).doc(3)[:40].tolist()
    ours = load_for_inference(str(base_path), str(proj / "rwkv-1.pth"))(torch.tensor([tokens]))[0]
    torch.testing.assert_close(rwkv_oracle(merged, tokens), ours, atol=1e-4, rtol=1e-4)

    # the merged model is better than the base on the training data
    assert data_loss(merged, count_data) < data_loss(base_path, count_data) - 0.5


def test_tutorial_command_line_on_cpu(tmp_path, base_path, count_data, train_args):
    """run_disha.sh's appendix, with only paths and sizes swapped and --accelerator cpu."""
    load_model, proj_dir, data_file = str(base_path), str(tmp_path / "disha"), count_data
    n_layer, n_embd, micro_bsz, epoch_save, epoch_steps, ctx_len = 2, 64, 2, 1, 4, 32
    disha_config = '{"mode":"bone","load":"","r":64}'
    args = (
        f"train --load_model {load_model} --proj_dir {proj_dir} --data_file {data_file} --vocab_size {VOCAB} "
        f"--n_layer {n_layer} --n_embd {n_embd} --data_type binidx --dataload pad --loss_mask pad "
        f"--ctx_len {ctx_len} --micro_bsz {micro_bsz} --epoch_steps {epoch_steps} "
        f"--epoch_count 2 --epoch_begin 0 "
        f"--epoch_save {epoch_save} --lr_init 2e-5 --lr_final 2e-5 --warmup_steps 0 --beta1 0.9 --beta2 0.99 "
        f"--adam_eps 1e-8 --accelerator cpu --devices 1 --precision bf16 --strategy auto --grad_cp 1 "
        f"--my_testing x070 --peft disha"
    ).split() + ["--disha_config", disha_config, "--progress_bar", "0"]
    assert main(args) == 0
    sd = load_state_dict(tmp_path / "disha" / "rwkv-1.pth")
    assert sd["blocks.0.att.key.disha"].shape == (64, 64)
    assert sd["blocks.0.att.key.disha"].dtype == torch.float32


def test_accelerator_gpu_without_gpu_is_a_clear_error(tmp_path, base_path, count_data, capsys, train_args):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    rc = main(train_args(base_path, count_data, tmp_path / "o", "--accelerator", "gpu"))
    assert rc == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: --accelerator gpu but no CUDA GPU is visible; use --accelerator cpu (or auto)"


@pytest.mark.parametrize(
    "extra",
    [
        ["--quant", "nf4"],
        ["--quant", "int8"],
        ["--precision", "bf16"],
        ["--peft", "lora", "--lora_config", '{"lora_load":"","lora_r":8,"lora_alpha":16,"lora_dropout":0.0}'],
        ["--disha_config", '{"mode":"bat","load":"","r":16}'],
    ],
    ids=["nf4", "int8", "bf16", "lora", "bat"],
)
def test_variants_train_and_learn(tmp_path, base_path, count_data, extra, train_args):
    pytest.importorskip("bitsandbytes") if "--quant" in extra else None
    proj = tmp_path / "o"
    assert main(train_args(base_path, count_data, proj, *extra, epochs=1, steps=10)) == 0
    rows = list(csv.DictReader((proj / "metrics.csv").read_text().splitlines()))
    losses = [float(r["loss"]) for r in rows]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3  # it learns
    assert (proj / "rwkv-0.pth").is_file()
    side = json.loads((proj / "rwkv-0.json").read_text())
    if "--quant" in extra:
        assert side["adapter"]["quant"] == extra[1]


def test_train_prints_no_library_adverts_or_deprecations(
    tmp_path, base_path, count_data, caplog, recwarn, train_args
):
    """Lightning's logger advert and its use of a torch API torch deprecates are nothing a user can act
    on: they never reach a handler (its other lines do) and the warning is not shown."""
    with caplog.at_level("INFO", logger="lightning.pytorch"):
        assert main(train_args(base_path, count_data, tmp_path / "out", epochs=1, steps=2)) == 0
    lines = [r.getMessage() for r in caplog.records]
    assert any("GPU available" in line for line in lines) and not any("Tip:" in line for line in lines)
    assert not [w for w in recwarn if "LeafSpec" in str(w.message)]


def test_out_of_memory_is_one_line_naming_the_fixes(tmp_path, base_path, count_data, capsys, train_args):
    """An allocation that fails mid-run (CPU: a RuntimeError from the allocator) ends with one error line
    naming --ctx_len, --micro_bsz and --grad_cp, exit 2; not a traceback."""
    import rwkv_disha.train.module as module

    def no_memory(*args, **kwargs):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory")

    argv = train_args(base_path, count_data, tmp_path / "out", epochs=1, steps=2)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(module, "sample_loss", no_memory)
        assert main(argv) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and errors[0].startswith("error: out of memory at --ctx_len 32 x"), err
    assert "--grad_cp 1" in errors[0] and "Traceback" not in err


def _first_tokens(path):
    return [int(line.split()[0]) for line in path.read_text().split("\n") if line]


def test_data_shuffle_0_visits_documents_in_file_order(tmp_path, base_path, unique_data, train_args):
    """RWKV-PEFT's --data_shuffle: 0 takes the documents in file order epoch after epoch; 1 (our default)
    draws a new order each epoch."""
    seen = {}
    for shuffle in ("0", "1"):
        proj = tmp_path / f"shuffle{shuffle}"
        argv = train_args(base_path, unique_data, proj, "--data_shuffle", shuffle, "--log_samples", "1")
        assert main(argv) == 0
        seen[shuffle] = _first_tokens(proj / "samples-rank0.txt")
    n = len(seen["0"])
    assert seen["0"] == [1 + i % 40 for i in range(n)]
    assert sorted(seen["1"]) != seen["1"] and len(set(seen["1"])) == len(seen["1"])
