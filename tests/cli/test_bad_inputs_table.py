"""Bad inputs to every command, one table: each gives exit status 2, exactly one `error: ` line on stderr,
no traceback, and leaves every file of the test's folders as it was (nothing created, changed or removed).

The inputs live in one folder built once per module (a tiny base, a NaN model, a finished training run
with its adapter, binidx data, malformed jsonl / YAML files, ...); each case runs with a fresh empty
working folder as the current directory, and both folders are snapshotted (path, size, mtime, sha256)
before and after. `.rwkv-disha.lock` files are left out of the snapshot: a folder lock is a kept file by
design (an flock), rewritten by every command that takes it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from rwkv_disha.cli import main
from rwkv_disha.data.binidx import write_binidx

CUDA = torch.cuda.is_available()
LOCK_NAME = ".rwkv-disha.lock"
BONE16 = '{"mode":"bone","load":"","r":16}'

# argv prefix of a small valid training run; a case appends flags (argparse: the last one wins)
TRAIN = [
    "train", "--load_model", "@base", "--proj_dir", "@work/proj", "--data_file", "@data",
    "--data_type", "binidx", "--ctx_len", "32", "--micro_bsz", "2", "--epoch_steps", "2",
    "--epoch_count", "1", "--epoch_save", "1", "--lr_init", "1e-3", "--lr_final", "1e-3",
    "--accelerator", "cpu", "--precision", "fp32", "--strategy", "auto", "--progress_bar", "0",
    "--disha_config", BONE16, "--random_seed", "1",
]  # fmt: skip
MERGE = ["merge", "--base_model", "@base", "--peft_checkpoint", "@adapter", "--output", "@work/m.pth"]
GEN = ["generate", "--load_model", "@base", "--prompt", "a", "--max_tokens", "2"]
EVAL = ["eval", "--load_model", "@base", "--data_file", "@data", "--ctx_len", "32", "--max_samples", "2"]
BENCH = ["bench", "--what", "kernel", "--T", "16", "--H", "1", "--N", "16", "--repeat", "1"]
BSTEP = [
    "bench", "--n_layer", "1", "--n_embd", "64", "--vocab_size", "64", "--ctx_len", "8", "--steps", "1",
    "--warmup", "0", "--precision", "fp32", "--r", "16", "--device", "cpu",
]  # fmt: skip
DEMO = ["demo", "--out", "@work/demo", "--n_embd", "64", "--epochs", "1", "--epoch_steps", "1"]
PREP = ["prepare", "--input", "@good_jsonl", "--output", "@work/d", "--workers", "1", "--progress", "0"]
INIT = ["init", "--output", "@work/i.pth", "--n_layer", "1", "--n_embd", "64", "--vocab_size", "64"]

# (id, argv, a lower-case fragment the error line must contain: it names the flag / the cause)
CASES: list[tuple[str, list[str], str]] = [
    # --- whole CLI
    ("cli-unknown-command", ["trian", "--x", "1"], "unknown command"),
    # --- init
    ("init-head_size-0", [*INIT, "--head_size", "0"], "head_size"),
    ("init-n_layer-0", [*INIT, "--n_layer", "0"], "n_layer"),
    ("init-n_embd-not-multiple", [*INIT, "--n_embd", "100"], "n_embd"),
    ("init-vocab-0", [*INIT, "--vocab_size", "0"], "vocab_size"),
    # /proc exists and root passes os.access there: only creating a file shows it takes none
    ("init-output-in-proc", [*INIT, "--output", "/proc/i.pth"], "no file can be created in /proc"),
    ("merge-output-in-proc", [*MERGE, "--output", "/proc/m.pth"], "no file can be created in /proc"),
    ("init-output-is-dir", [*INIT, "--output", "@adir"], "directory"),
    ("init-output-trailing-slash", [*INIT, "--output", "@work/new/"], "ends with a slash"),
    ("init-output-exists", [*INIT, "--output", "@base"], "exists"),
    ("init-output-dangling-symlink", [*INIT, "--output", "@dangling"], "exists"),
    ("init-output-under-file", [*INIT, "--output", "@afile/x.pth"], "afile"),
    ("init-bad-dtype", [*INIT, "--dtype", "fp8"], "dtype"),
    ("init-n_layer-not-int", [*INIT, "--n_layer", "two"], "n_layer"),
    # --- prepare
    ("prepare-no-input", ["prepare", "--output", "@work/d"], "input"),
    ("prepare-missing-input", [*PREP, "--input", "@work/nope.jsonl"], "nope.jsonl"),
    ("prepare-input-is-dir", [*PREP, "--input", "@adir"], "adir"),
    ("prepare-nested-200k", [*PREP, "--input", "@deep_jsonl"], "deep.jsonl"),
    ("prepare-lone-surrogate", [*PREP, "--input", "@surrogate_jsonl"], "surrogate.jsonl"),
    ("prepare-5000-digit-int", [*PREP, "--input", "@bigint_jsonl"], "bigint.jsonl"),
    ("prepare-malformed-line", [*PREP, "--input", "@broken_jsonl"], "broken.jsonl"),
    ("prepare-output-exists", [*PREP, "--output", "@data"], "exists"),
    ("prepare-ctx_len-0", [*PREP, "--ctx_len", "0"], "ctx_len"),
    ("prepare-workers-negative", [*PREP, "--workers", "-1"], "workers"),
    ("prepare-bad-on_error", [*PREP, "--on_error", "ignore"], "on_error"),
    ("prepare-output-under-file", [*PREP, "--output", "@afile/d"], "afile"),
    ("prepare-preview-negative", [*PREP, "--preview", "-1"], "preview"),
    (
        "prepare-preview-malformed",
        ["prepare", "--input", "@broken_jsonl", "--preview", "3"],
        "broken.jsonl:2",
    ),
    ("prepare-preview-missing-input", ["prepare", "--input", "@work/no.jsonl", "--preview", "1"], "no.jsonl"),
    # --- train: flags checked before the model loads
    ("train-beta1-1", [*TRAIN, "--beta1", "1"], "beta1"),
    ("train-beta1-negative", [*TRAIN, "--beta1", "-0.1"], "beta1"),
    ("train-beta2-1.5", [*TRAIN, "--beta2", "1.5"], "beta2"),
    ("train-adam_eps-0", [*TRAIN, "--adam_eps", "0"], "adam_eps"),
    ("train-adam_eps-negative", [*TRAIN, "--adam_eps=-1e-8"], "adam_eps"),
    ("train-num_workers-negative", [*TRAIN, "--num_workers", "-1"], "num_workers"),
    ("train-warmup-negative", [*TRAIN, "--warmup_steps", "-1"], "warmup_steps"),
    (
        "train-wsd_decay_frac-1.5",
        [*TRAIN, "--lr_schedule", "wsd", "--wsd_decay_frac", "1.5"],
        "wsd_decay_frac",
    ),
    ("train-wsd_decay_frac-negative", [*TRAIN, "--wsd_decay_frac", "-0.1"], "wsd_decay_frac"),
    ("train-grad_clip-negative", [*TRAIN, "--grad_clip", "-1"], "grad_clip"),
    ("train-lr_init-nan", [*TRAIN, "--lr_init", "nan"], "lr_init"),
    ("train-lr_init-inf", [*TRAIN, "--lr_init", "inf"], "lr_init"),
    ("train-beta1-nan", [*TRAIN, "--beta1", "nan"], "beta1"),
    ("train-weight_decay-inf", [*TRAIN, "--weight_decay", "inf"], "weight_decay"),
    ("train-random_seed-huge", [*TRAIN, "--random_seed", str(2**70)], "random_seed"),
    ("train-ctx_len-0", [*TRAIN, "--ctx_len", "0"], "ctx_len"),
    # more activations than this machine holds, even at 2 bytes per value: refused before any work
    ("train-ctx_len-beyond-memory", [*TRAIN, "--ctx_len", "10000000000"], "lower --ctx_len or --micro_bsz"),
    (
        "train-infctx-chunk-beyond-memory",
        [*TRAIN, "--train_type", "infctx", "--ctx_len", "10000000000", "--chunk_ctx", "10000000000"],
        "lower --ctx_len",
    ),  # fmt: skip
    ("train-cuda_graphs-without-compile", [*TRAIN, "--cuda_graphs", "1"], "add --compile 1"),
    ("bench-cuda_graphs-without-compile", [*BSTEP, "--cuda_graphs", "1"], "add --compile 1"),
    ("train-micro_bsz-0", [*TRAIN, "--micro_bsz", "0"], "micro_bsz"),
    ("train-epoch_count-0", [*TRAIN, "--epoch_count", "0"], "epoch_count"),
    (
        "train-accumulate-not-dividing",
        [*TRAIN, "--epoch_steps", "3", "--accumulate_grad_batches", "2"],
        "accumulate",
    ),
    ("train-micro_bsz-not-int", [*TRAIN, "--micro_bsz", "abc"], "micro_bsz"),
    ("train-unknown-flag", [*TRAIN, "--bogus_flag", "1"], "bogus_flag"),
    ("train-bad-disha-json", [*TRAIN, "--disha_config", "{mode:bone}"], "disha_config"),
    ("train-unknown-mode", [*TRAIN, "--disha_config", '{"mode":"bane","r":8}'], "bane"),
    ("train-bone-r-too-big", [*TRAIN, "--disha_config", '{"mode":"bone","r":1000}'], "r=1000"),
    ("train-dataload-only-bsz2", [*TRAIN, "--dataload", "only"], "micro_bsz"),
    ("train-wds_img", [*TRAIN, "--data_type", "wds_img"], "image"),
    ("train-n_layer-disagrees", [*TRAIN, "--n_layer", "24"], "n_layer"),
    ("train-missing-model", [*TRAIN, "--load_model", "@work/nope.pth"], "nope.pth"),
    ("train-model-is-dir", [*TRAIN, "--load_model", "@adir"], "is a directory"),
    ("train-adapter-as-base", [*TRAIN, "--load_model", "@adapter"], "adapter"),
    ("train-base-bad-tensor-shape", [*TRAIN, "--load_model", "@badshape"], "shape"),
    ("train-missing-data", [*TRAIN, "--data_file", "@work/nodata"], "nodata"),
    ("train-all-tokens-masked", [*TRAIN, "--data_file", "@masked_data", "--loss_mask", "qa"], "mask"),
    ("train-config-missing", [*TRAIN, "--config", "@work/nope.yaml"], "nope.yaml"),
    ("train-config-not-mapping", [*TRAIN, "--config", "@list_yaml"], "mapping"),
    ("train-config-unknown-key", [*TRAIN, "--config", "@unknown_yaml"], "bogus_option"),
    ("train-config-rwkv-peft-key", [*TRAIN, "--config", "@rwkv_peft_yaml"], "is not an option of `train`"),
    ("train-config-wrong-type", [*TRAIN, "--config", "@badtype_yaml"], "micro_bsz"),
    ("init-config-list-injects-flags", [*INIT, "--config", "@inject_yaml"], "n_layer: takes one value"),
    ("init-config-list-for-scalar", [*INIT, "--config", "@scalarlist_yaml"], "n_layer: takes one value"),
    ("init-config-bool-for-int", [*INIT, "--config", "@boolint_yaml"], "n_layer: takes a value, not true"),
    ("init-config-key-twice", [*INIT, "--config", "@twice_yaml"], "given twice"),
    ("init-config-null", [*INIT, "--config", "@null_yaml"], "output: has no value"),
    ("init-config-unquoted-version", [*INIT, "--config", "@octal_yaml"], "quote the value in yaml"),
    ("generate-state-is-a-base-model", [*GEN, "--state", "@base"], "pass an adapter or state file"),
    ("train-config-is-dir", [*TRAIN, "--config", "@adir"], "directory"),
    # --- train: folders and resume
    ("train-into-used-proj_dir", [*TRAIN, "--proj_dir", "@run"], "overwrite"),
    ("train-proj_dir-under-file", [*TRAIN, "--proj_dir", "@afile/out"], "afile"),
    ("train-dry_run-proj_dir-under-file", [*TRAIN, "--dry_run", "1", "--proj_dir", "@afile/out"], "afile"),
    ("train-dry_run-into-used-proj_dir", [*TRAIN, "--dry_run", "1", "--proj_dir", "@run"], "overwrite"),
    ("train-dry_run-beta1-1", [*TRAIN, "--dry_run", "1", "--beta1", "1"], "beta1"),
    (
        "train-load-nan-adapter",
        [*TRAIN, "--disha_config", '{"mode":"bone","load":"@nan_adapter","r":16}'],
        "non-finite",
    ),  # fmt: skip
    ("train-resume-no-ckpt", [*TRAIN, "--resume", "@adir"], "resume.ckpt"),
    ("train-resume-corrupt-ckpt", [*TRAIN, "--resume", "@corrupt_run"], "resume.ckpt"),
    ("train-resume-pickle-payload", [*TRAIN, "--resume", "@pickle_run"], "resume.ckpt"),
    ("train-resume-corrupt-config", [*TRAIN, "--resume", "@badconfig_run"], "train_config.json"),
    (
        "train-resume-other-adapter-shape",
        [*TRAIN, "--resume", "@run", "--disha_config", '{"mode":"bone","r":8}'],
        "shape",
    ),  # fmt: skip
    # --- merge
    ("merge-nan-adapter", [*MERGE, "--peft_checkpoint", "@nan_adapter"], "non-finite"),
    ("merge-output-exists", [*MERGE, "--output", "@afile"], "exists"),
    ("merge-output-is-dir", [*MERGE, "--output", "@adir"], "directory"),
    ("merge-output-trailing-slash", [*MERGE, "--output", "@work/merged/"], "ends with a slash"),
    ("merge-output-is-base", [*MERGE, "--output", "@base"], "overwrite"),
    ("merge-output-under-file", [*MERGE, "--output", "@afile/m.pth"], "afile"),
    ("merge-missing-base", [*MERGE, "--base_model", "@work/nope.pth"], "nope.pth"),
    ("merge-base-is-dir", [*MERGE, "--base_model", "@adir"], "directory"),
    ("merge-adapter-is-dir", [*MERGE, "--peft_checkpoint", "@adir"], "directory"),
    ("merge-sidecar-wrong-types", [*MERGE, "--peft_checkpoint", "@badsidecar_adapter"], "badsidecar"),
    ("merge-other-base", [*MERGE, "--base_model", "@other_base"], "base"),
    ("merge-base-as-adapter", [*MERGE, "--peft_checkpoint", "@base"], "base.pth"),
    ("merge-bad-quant", [*MERGE, "--quant", "int3"], "quant"),
    ("merge-lora_alpha-nan", [*MERGE, "--lora_alpha", "nan"], "lora_alpha"),
    ("merge-lora_alpha-on-bone", [*MERGE, "--lora_alpha", "77"], "scales lora adapters"),
    ("merge-no-arguments", ["merge"], "base_model"),
    # --- RWKV-PEFT's other dialects (adapters/dialects.py) and PiSSA
    ("train-peft-miss-unknown-key", [*TRAIN, "--peft", "miss", "--peft_config", '{"rr":8}'], "rr"),
    (
        "train-peft-miss-bad-init",
        [*TRAIN, "--peft", "miss", "--peft_config", '{"init_weights":"x"}'],
        "init_weights",
    ),
    (
        "train-peft-miss-dropout",
        [*TRAIN, "--peft", "miss", "--peft_config", '{"miss_dropout":0.1}'],
        "miss_dropout",
    ),
    (
        "train-peft-miss-bad-target",
        [*TRAIN, "--peft", "miss", "--peft_config", '{"target_modules":["gate_proj"]}'],
        "gate_proj",
    ),
    (
        "train-peft-miss-mini_r-not-dividing",
        [*TRAIN, "--peft", "miss", "--peft_config", '{"r":8,"init_weights":"mini","mini_r":7}'],
        "mini_r",
    ),
    (
        "train-peft-miss-bat-r",
        [*TRAIN, "--peft", "miss", "--peft_config", '{"r":48,"init_weights":"bat"}'],
        "r=48",
    ),
    (
        "train-bone-config-our-key",
        [*TRAIN, "--peft", "bone", "--bone_config", '{"mode":"bone"}'],
        "bone_mode",
    ),
    ("train-peft-lora-old-key", [*TRAIN, "--peft", "lora", "--peft_config", '{"lora_r":8}'], "lora_r"),
    (
        "train-pissa-init-file",
        [*TRAIN, "--peft", "pissa", "--pissa_config", '{"pissa_init":"i.pth"}'],
        "pissa_init",
    ),
    ("train-pissa-r-too-big", [*TRAIN, "--peft", "pissa", "--pissa_config", '{"pissa_r":1000}'], "pissa_r"),
    (
        "train-pissa-niter-negative",
        [*TRAIN, "--peft", "pissa", "--pissa_config", '{"svd_niter":-1}'],
        "svd_niter",
    ),
    # --- export
    ("export-no-arguments", ["export"], "peft_checkpoint"),
    (
        "export-bad-format",
        ["export", "--peft_checkpoint", "@adapter", "--output", "@work/p", "--format", "onnx"],
        "format",
    ),
    ("export-output-is-input", ["export", "--peft_checkpoint", "@adapter", "--output", "@adapter"], "input"),
    ("export-peft-onto-file", ["export", "--peft_checkpoint", "@adapter", "--output", "@afile"], "is a file"),
    (
        "export-pth-exists",
        ["export", "--peft_checkpoint", "@adapter", "--format", "pth", "--output", "@base"],
        "exists",
    ),
    ("export-not-peft-folder", ["export", "--peft_checkpoint", "@adir", "--output", "@work/p"], "directory"),
    (
        "export-lora-of-bone",
        ["export", "--peft_checkpoint", "@adapter", "--format", "lora", "--output", "@work/l.pth"],
        "pissa",
    ),
    ("export-hf-no-model", ["export", "--format", "hf", "--output", "@work/hf"], "load_model"),
    (
        "export-hf-adapter-given",
        [
            "export",
            "--format",
            "hf",
            "--load_model",
            "@base",
            "--peft_checkpoint",
            "@adapter",
            "--output",
            "@work/h",
        ],
        "merge the adapter first",
    ),
    (
        "export-hf-not-rwkv7",
        ["export", "--format", "hf", "--load_model", "@adapter", "--output", "@work/h"],
        "rwkv-7",
    ),
    (
        "export-hf-onto-file",
        ["export", "--format", "hf", "--load_model", "@base", "--output", "@afile"],
        "is a file",
    ),
    ("import-no-arguments", ["import"], "hf_model"),
    ("import-not-a-folder", ["import", "--hf_model", "@base", "--output", "@work/m.pth"], "not a folder"),
    ("import-no-config", ["import", "--hf_model", "@adir", "--output", "@work/m.pth"], "config.json"),
    ("import-output-exists", ["import", "--hf_model", "@adir", "--output", "@base"], "exists"),
    # --- generate
    ("generate-temperature-negative", [*GEN, "--temperature", "-1"], "temperature"),
    ("generate-temperature-nan", [*GEN, "--temperature", "nan"], "temperature"),
    ("generate-top_p-0", [*GEN, "--top_p", "0"], "top_p"),
    ("generate-top_p-1.5", [*GEN, "--top_p", "1.5"], "top_p"),
    ("generate-top_p-inf", [*GEN, "--top_p", "inf"], "top_p"),
    ("generate-top_k-negative", [*GEN, "--top_k", "-1"], "top_k"),
    ("generate-max_tokens-negative", [*GEN, "--max_tokens", "-1"], "max_tokens"),
    ("generate-seed-negative", [*GEN, "--seed", "-1"], "seed"),
    ("generate-bad-op", [*GEN, "--op", "cudnn"], "op"),
    ("generate-no-model", ["generate", "--prompt", "a"], "load_model"),
    ("generate-model-is-dir", [*GEN, "--load_model", "@adir"], "is a directory"),
    ("generate-adapter-is-dir", [*GEN, "--peft_checkpoint", "@adir"], "is a directory"),
    ("generate-nan-model", [*GEN, "--load_model", "@nan_base"], "non-finite"),
    ("generate-nan-adapter", [*GEN, "--peft_checkpoint", "@nan_adapter"], "non-finite"),
    ("generate-base-bad-tensor-shape", [*GEN, "--load_model", "@badshape"], "shape"),
    ("generate-prompt-beyond-vocab", [*GEN, "--prompt", "世界 RWKV"], "vocabulary is 256"),
    ("generate-alpha_presence-negative", [*GEN, "--alpha_presence", "-0.1"], "alpha_presence"),
    ("generate-alpha_frequency-negative", [*GEN, "--alpha_frequency", "-1"], "alpha_frequency"),
    ("generate-alpha_decay-1.5", [*GEN, "--alpha_decay", "1.5"], "alpha_decay"),
    ("generate-alpha_decay-nan", [*GEN, "--alpha_decay", "nan"], "alpha_decay"),
    ("generate-prompt_file-missing", [*GEN[:3], "--prompt_file", "@work/nope.txt"], "nope.txt"),
    ("generate-prompt_file-is-dir", [*GEN[:3], "--prompt_file", "@adir"], "is a directory"),
    ("generate-prompt_file-malformed", [*GEN[:3], "--prompt_file", "@broken_jsonl"], "broken.jsonl:2"),
    ("generate-prompt-and-prompt_file", [*GEN, "--prompt_file", "@afile"], "not both"),
    ("generate-chat_loop-with-prompt", [*GEN, "--chat_loop", "1"], "chat_loop"),
    # --- eval
    ("eval-micro_bsz-0", [*EVAL, "--micro_bsz", "0"], "micro_bsz"),
    ("eval-max_samples-negative", [*EVAL, "--max_samples", "-1"], "max_samples"),
    ("eval-ctx_len-0", [*EVAL, "--ctx_len", "0"], "ctx_len"),
    ("eval-no-data", ["eval", "--load_model", "@base"], "data_file"),
    ("eval-missing-data", [*EVAL, "--data_file", "@work/nodata"], "nodata"),
    ("eval-qa-without-masks", [*EVAL, "--loss_mask", "qa"], "mask"),
    ("eval-dataload-only-bsz4", [*EVAL, "--dataload", "only"], "micro_bsz"),
    ("eval-bad-data_type", [*EVAL, "--data_type", "parquet"], "data_type"),
    ("eval-nan-model", [*EVAL, "--load_model", "@nan_base"], "non-finite"),
    ("eval-model-is-dir", [*EVAL, "--load_model", "@adir"], "is a directory"),
    ("eval-nan-adapter", [*EVAL, "--peft_checkpoint", "@nan_adapter"], "non-finite"),
    ("eval-all-tokens-masked", [*EVAL, "--data_file", "@masked_data", "--loss_mask", "qa"], "mask"),
    ("eval-compare-missing", [*EVAL, "--compare", "@work/nope.pth"], "nope.pth"),
    ("eval-compare-is-dir", [*EVAL, "--compare", "@adir"], "is a directory"),
    ("eval-compare-nan-adapter", [*EVAL, "--compare", "@nan_adapter"], "non-finite"),
    ("eval-compare-nan-model", [*EVAL, "--compare", "@nan_base"], "non-finite"),
    ("eval-json-is-dir", [*EVAL, "--json", "@adir"], "directory"),
    ("eval-json-exists-as-file-parent", [*EVAL, "--json", "@afile/r.json"], "afile"),
    # --- bench
    ("bench-T-0", [*BENCH, "--T", "0"], "--t"),
    ("bench-H-negative", [*BENCH, "--H", "-1"], "--h"),
    ("bench-repeat-0", [*BENCH, "--repeat", "0"], "repeat"),
    ("bench-B-0", [*BENCH, "--B", "0"], "--b"),
    ("bench-bad-device", [*BENCH, "--device", "tpu"], "device"),
    ("bench-unknown-op", [*BENCH, "--ops", "torch,warp"], "--ops: unknown kernel 'warp'"),
    ("bench-empty-ops", [*BENCH, "--ops", ","], "ops"),
    ("bench-bad-what", [*BENCH, "--what", "flops"], "what"),
    ("bench-step-ctx_len-0", [*BSTEP, "--ctx_len", "0"], "--ctx_len"),
    ("bench-step-ctx_len-beyond-memory", [*BSTEP, "--ctx_len", "10000000000"], "lower --ctx_len"),
    ("bench-step-micro_bsz-0", [*BSTEP, "--micro_bsz", "0"], "--micro_bsz"),
    ("bench-step-steps-0", [*BSTEP, "--steps", "0"], "--steps"),
    ("bench-step-warmup-negative", [*BSTEP, "--warmup", "-1"], "--warmup"),
    ("bench-step-bat-r-not-dividing", [*BSTEP, "--adapter", "bat", "--r", "48"], "48"),
    ("bench-step-n_embd-not-multiple", [*BSTEP, "--n_embd", "100"], "n_embd"),
    ("bench-step-unknown-shape", [*BSTEP, "--shape", "2B"], "--shape"),
    ("bench-step-unknown-adapter", [*BSTEP, "--adapter", "dora"], "--adapter"),
    ("bench-step-quant-without-adapter", [*BSTEP, "--adapter", "none", "--quant", "nf4"], "--quant"),
    ("bench-step-json-is-dir", [*BSTEP, "--json", "@adir"], "directory"),
    ("bench-step-json-under-file", [*BSTEP, "--json", "@afile/r.json"], "afile"),
    (
        "bench-step-sweep-start-above-max",
        [*BSTEP, "--sweep", "micro_bsz", "--micro_bsz", "8", "--sweep_max", "4"],
        "sweep_max",
    ),
    # --- demo: everything refused before the corpus, the base or the data is written
    ("demo-epochs-0", [*DEMO, "--epochs", "0"], "epochs"),
    ("demo-epoch_steps-0", [*DEMO, "--epoch_steps", "0"], "epoch_steps"),
    ("demo-n_embd-not-multiple", [*DEMO, "--n_embd", "100"], "n_embd"),
    ("demo-n_embd-0", [*DEMO, "--n_embd", "0"], "n_embd"),
    ("demo-n_layer-0", [*DEMO, "--n_layer", "0"], "n_layer"),
    ("demo-r-0", [*DEMO, "--r", "0"], "--r"),
    ("demo-r-wider-than-model", [*DEMO, "--r", "1000"], "--r"),
    ("demo-lr-0", [*DEMO, "--lr", "0"], "--lr"),
    ("demo-lr-nan", [*DEMO, "--lr", "nan"], "--lr"),
    ("demo-seed-negative", [*DEMO, "--seed", "-3"], "seed"),
    ("demo-out-is-file", [*DEMO, "--out", "@afile"], "is a file"),
]
if not CUDA:  # these refuse a GPU-only setting on a machine without one
    CASES += [
        ("train-fp16-on-cpu", [*TRAIN, "--precision", "fp16"], "fp16"),
        ("train-deepspeed-on-cpu", [*TRAIN, "--strategy", "deepspeed_stage_1"], "deepspeed"),
        # RWKV-PEFT flags spelled otherwise here: the fix, not argparse's bare "unrecognized arguments"
        ("train-rwkv-peft-fla", [*TRAIN, "--fla", "1"], "use --op fla"),
        ("train-rwkv-peft-lora_r", [*TRAIN, "--lora_r", "64"], "--lora_config"),
        ("train-rwkv-peft-train_type-state", [*TRAIN, "--train_type", "state"], "use --peft state"),
        ("train-rwkv-peft-my_pile_stage", [*TRAIN, "--my_pile_stage", "1"], "pretraining option"),
        ("train-fsdp-on-cpu", [*TRAIN, "--strategy", "fsdp"], "fsdp"),
        ("train-accelerator-gpu", [*TRAIN, "--accelerator", "gpu"], "gpu"),
        ("bench-device-cuda", [*BENCH, "--device", "cuda"], "cuda"),
        ("bench-fla-on-cpu", [*BENCH, "--ops", "fla"], "fla"),
        ("bench-step-fp16-on-cpu", [*BSTEP, "--precision", "fp16"], "fp16"),
        ("bench-step-fla-on-cpu", [*BSTEP, "--op", "fla"], "fla"),
        ("train-op-cuda-on-cpu", [*TRAIN, "--op", "cuda"], "--op cuda needs a cuda gpu"),
        ("train-cuda_graphs-on-cpu", [*TRAIN, "--compile", "1", "--cuda_graphs", "1"], "cuda_graphs 1 needs"),
        ("bench-cuda_graphs-on-cpu", [*BSTEP, "--compile", "1", "--cuda_graphs", "1"], "cuda_graphs 1 needs"),
        ("generate-op-cuda-on-cpu", [*GEN, "--op", "cuda"], "--op cuda needs a cuda gpu"),
        ("bench-step-op-cuda-on-cpu", [*BSTEP, "--op", "cuda"], "--op cuda"),
        ("bench-cuda-kernel-on-cpu", [*BENCH, "--ops", "cuda"], "cuda"),
    ]

# a few cases again as a real process: the entry point, exit status and streams as a shell sees them
SUBPROCESS_CASES = [
    "cli-unknown-command",
    "init-output-is-dir",
    "train-micro_bsz-not-int",
    "merge-nan-adapter",
    "generate-top_p-1.5",
    "eval-micro_bsz-0",
    "demo-epochs-0",
]


class _PicklePayload:
    """A `resume.ckpt` that runs code when unpickled without weights_only: it creates a folder."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.makedirs, (self.marker,))


def _write_jsonl_text(path: Path, text: str) -> None:
    path.write_text(text, encoding="utf-8")


def _train_run(inputs: Path, base: Path, data: str) -> Path:
    """A finished one-epoch run: rwkv-0.pth (+ .json), resume.ckpt, train_config.json, logs."""
    run = inputs / "run"
    argv = [
        str(a).replace("@base", str(base)).replace("@data", data).replace("@work/proj", str(run))
        for a in TRAIN
    ]
    assert main(argv) == 0
    assert (run / "rwkv-0.pth").is_file() and (run / "resume.ckpt").is_file()
    return run


def _adapter_copy(src: Path, dest: Path, tensors=None, sidecar=None) -> Path:
    """Copy an adapter file and its sidecar, optionally replacing the tensors or the sidecar's content."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    if tensors is None:
        shutil.copy(src, dest)
    else:
        torch.save(tensors, dest)
    side = json.loads(src.with_suffix(".json").read_text())
    dest.with_suffix(".json").write_text(json.dumps(sidecar(side) if sidecar else side))
    return dest


def _resume_copy(run: Path, dest: Path, ckpt_bytes: bytes | None = None, payload=None) -> Path:
    shutil.copytree(run, dest)
    if ckpt_bytes is not None:
        (dest / "resume.ckpt").write_bytes(ckpt_bytes)
    if payload is not None:
        torch.save({"state_dict": payload}, dest / "resume.ckpt")
    return dest


def _bad_sidecar(side: dict) -> dict:
    side["adapter"]["r"] = "sixteen"
    side["adapter"]["train_parts"] = 7
    return side


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, make_checkpoint) -> dict[str, str]:
    """Every input file a case refers to (as @name), in one folder that the cases must leave unchanged."""
    d = tmp_path_factory.mktemp("inputs")
    base = Path(shutil.copy(make_checkpoint(2, 64, 256, style="pretrain", seed=3), d / "base.pth"))
    other = Path(shutil.copy(make_checkpoint(2, 128, 256, style="pretrain", seed=4), d / "other_base.pth"))
    sd = {k: v.clone() for k, v in torch.load(base, weights_only=True).items()}
    sd["blocks.1.att.key.weight"][:] = float("nan")  # what merging a diverged adapter gives
    torch.save(sd, d / "nan_base.pth")
    sd = {k: v.clone() for k, v in torch.load(base, weights_only=True).items()}
    sd["blocks.0.att.r_k"] = torch.zeros(1, 48)  # head size 48 does not divide the width 64
    torch.save(sd, d / "badshape.pth")

    rng = np.random.default_rng(0)
    docs = [np.append(rng.integers(1, 255, int(rng.integers(20, 50))), 0).astype(np.int32) for _ in range(32)]
    write_binidx(d / "data", docs)
    write_binidx(d / "masked", docs)
    write_binidx(d / "masked.mask", [np.zeros(len(x), np.uint8) for x in docs], dtype=np.uint8)

    paths = {
        "base": base,
        "other_base": other,
        "nan_base": d / "nan_base.pth",
        "badshape": d / "badshape.pth",
        "data": d / "data",
        "masked_data": d / "masked",
        "adir": d / "adir",
        "afile": d / "afile",
    }
    paths["adir"].mkdir()
    paths["dangling"] = d / "dangling.pth"
    os.symlink(d / "nowhere", paths["dangling"])  # a user's link, even one pointing nowhere yet
    paths["afile"].write_text("a file, not a folder\n")
    for name, text in {
        "good": '{"text": "hello world"}\n{"text": "a second document"}\n',
        "deep": '{"text": ' + "[" * 200_000 + "]" * 200_000 + "}\n",
        "surrogate": '{"text": "bad \\ud800 half"}\n',
        "bigint": '{"text": "x", "n": ' + "7" * 5000 + "}\n",
        "broken": '{"text": "fine"}\n{"text": \n',
    }.items():
        _write_jsonl_text(d / f"{name}.jsonl", text)
        paths[f"{name}_jsonl"] = d / f"{name}.jsonl"
    for name, text in {
        "list": "- micro_bsz\n- 2\n",
        "unknown": "bogus_option: 1\n",
        "rwkv_peft": "fla: true\n",
        "badtype": "micro_bsz: abc\n",
        # a list spliced into argv used to add flags of its own: here --overwrite and --output
        "inject": 'n_layer: [1, "--overwrite=1", "--output=victim.pth"]\nn_embd: 64\n',
        "scalarlist": "n_layer: [2]\n",
        "boolint": "n_layer: true\n",
        "twice": "n_layer: 2\nn_layer: 3\n",
        "null": "output: null\n",
        "octal": "version: 070\n",  # YAML: the number 56
    }.items():
        (d / f"{name}.yaml").write_text(text)
        paths[f"{name}_yaml"] = d / f"{name}.yaml"
    return {"root": str(d), **{k: str(v) for k, v in paths.items()}}


RUN_KEYS = {
    "run",
    "adapter",
    "nan_adapter",
    "badsidecar_adapter",
    "corrupt_run",
    "pickle_run",
    "badconfig_run",
}


@pytest.fixture(scope="module")
def run_inputs(inputs) -> dict[str, str]:
    """A finished training run in the inputs folder, its adapter, and damaged copies of both (built only
    for the cases that use them, so the other cases still run when training itself is broken)."""
    d = Path(inputs["root"])
    run = _train_run(d, Path(inputs["base"]), inputs["data"])
    adapter = run / "rwkv-0.pth"
    tensors = torch.load(adapter, weights_only=True)
    nan = {k: torch.full_like(v, float("nan")) if k.endswith(".disha") else v for k, v in tensors.items()}
    paths = {
        "run": run,
        "adapter": adapter,
        "nan_adapter": _adapter_copy(adapter, d / "nan" / "rwkv-0.pth", tensors=nan),
        "badsidecar_adapter": _adapter_copy(adapter, d / "badsidecar" / "rwkv-0.pth", sidecar=_bad_sidecar),
        "corrupt_run": _resume_copy(run, d / "corrupt_run", ckpt_bytes=b"PK\x03\x04 not a checkpoint"),
        "pickle_run": _resume_copy(run, d / "pickle_run", payload=_PicklePayload(str(d / "PAYLOAD_RAN"))),
        "badconfig_run": _resume_copy(run, d / "badconfig_run"),
    }
    (paths["badconfig_run"] / "train_config.json").write_text("{not json")
    return {k: str(v) for k, v in paths.items()}


def case_paths(argv: list[str], inputs: dict[str, str], work: Path, request) -> dict[str, str]:
    paths = {**inputs, "work": str(work)}
    if set(re.findall(r"@(\w+)", " ".join(argv))) & RUN_KEYS:
        paths.update(request.getfixturevalue("run_inputs"))
    return paths


def snapshot(*roots: str | Path) -> dict[str, tuple]:
    """path -> ('dir',) or (size, mtime_ns, sha256) for everything under ``roots`` (hidden files too)."""
    state: dict[str, tuple] = {}
    for root in roots:
        for p in sorted(Path(root).rglob("*")):
            if p.name == LOCK_NAME:
                continue
            if p.is_dir() and not p.is_symlink():
                state[str(p)] = ("dir",)
            else:
                st = p.lstat()
                digest = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "special"
                state[str(p)] = (st.st_size, st.st_mtime_ns, digest)
    return state


def expand(argv: list[str], paths: dict[str, str]) -> list[str]:
    return [re.sub(r"@(\w+)", lambda m: paths[m.group(1)], a) for a in argv]


def check_one_error(rc: int, out: str, err: str, fragment: str) -> str:
    assert "Traceback" not in out + err, err[-3000:]
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, f"expected one error line, stderr was:\n{err[-3000:]}"
    assert rc == 2, f"exit status {rc}, stderr:\n{err[-3000:]}"
    assert fragment in lines[0].lower(), f"{fragment!r} not in {lines[0]!r}"
    return lines[0]


def check_unchanged(before: dict, after: dict) -> None:
    created = sorted(set(after) - set(before))
    removed = sorted(set(before) - set(after))
    changed = sorted(k for k in set(before) & set(after) if before[k] != after[k])
    assert not (created or removed or changed), f"created {created}, removed {removed}, changed {changed}"


@pytest.mark.parametrize("argv,fragment", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_error_line_and_writes_nothing(
    argv, fragment, inputs, tmp_path, monkeypatch, capsys, request
):
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")  # an unsafe load would run a pickle payload
    monkeypatch.chdir(tmp_path)  # default output names (out/, demo_out/, rwkv7-init.pth) land here
    paths = case_paths(argv, inputs, tmp_path, request)
    before = snapshot(inputs["root"], tmp_path)
    capsys.readouterr()
    rc = main(expand(argv, paths))
    cap = capsys.readouterr()
    check_one_error(rc, cap.out, cap.err, fragment)
    check_unchanged(before, snapshot(inputs["root"], tmp_path))
    assert not Path(inputs["root"], "PAYLOAD_RAN").exists()


@pytest.mark.parametrize("case_id", SUBPROCESS_CASES)
def test_bad_input_in_a_real_process(case_id, inputs, tmp_path, request):
    _, argv, fragment = next(c for c in CASES if c[0] == case_id)
    paths = case_paths(argv, inputs, tmp_path, request)
    before = snapshot(inputs["root"], tmp_path)
    env = {**os.environ, "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "rwkv_disha.cli", *expand(argv, paths)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    check_one_error(proc.returncode, proc.stdout, proc.stderr, fragment)
    assert proc.stderr.strip().splitlines()[-1].startswith("error: ")  # the last word is the error
    check_unchanged(before, snapshot(inputs["root"], tmp_path))


def test_the_table_is_big_and_covers_every_command():
    commands = {c[1][0] for c in CASES}
    assert {"init", "prepare", "train", "merge", "generate", "eval", "bench", "demo"} <= commands
    assert len(CASES) >= 60
    assert len({c[0] for c in CASES}) == len(CASES)  # ids are unique
