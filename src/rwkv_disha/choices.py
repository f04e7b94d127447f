"""Every choice a flag offers, defined once. Importable without torch (the CLI builds ``--help`` from it)."""

from __future__ import annotations

# model versions we can load (rwkv_disha.model.registry.MODELS has one entry each)
MODEL_VERSIONS = ("x070", "x060", "x052")
# --op: WKV kernel. cuda is our own CUDA kernel for RWKV-7 (fla for RWKV-6 / 5.2); cpp our compiled CPU
# kernels; triton means fla.
OPS = ("auto", "torch", "loop", "fla", "cuda", "cpp", "triton")
# --peft and the DiSHA modes (state: only the initial WKV states train; rwkv_disha.adapters.registry)
PEFT_KINDS = ("disha", "lora", "miss", "pissa", "state", "none")
# RWKV-PEFT spellings that are no kind of their own: --peft bone is Bone / Bat (adapters/dialects.py)
PEFT_ALIASES = ("bone",)
DISHA_MODES = ("bone", "bat")
# --quant: storage of the frozen base under an adapter
QUANT_MODES = ("int8", "nf4", "fp4")
QUANT_CHOICES = ("none", *QUANT_MODES)
# --train_parts: substrings of base tensor names that also train (RWKV-PEFT semantics)
TRAIN_PARTS = ("time", "ln", "emb", "head")
DEFAULT_TRAIN_PARTS = ("time", "ln")
# data
DATA_TYPES = ("binidx", "jsonl", "sft", "utf-8", "utf-16le", "numpy", "uint16", "dummy")
DATALOADS = ("pad", "only", "get")
LOSS_MASKS = ("none", "pad", "qa")
# engine
PRECISIONS = {"fp32": "32-true", "tf32": "32-true", "fp16": "16-mixed", "bf16": "bf16-mixed"}
ACCELERATORS = ("cpu", "gpu", "cuda", "auto")
STRATEGIES = (
    "auto",
    "ddp",
    "ddp_find_unused_parameters_true",
    "fsdp",
    "deepspeed_stage_1",
    "deepspeed_stage_2",
    "deepspeed_stage_2_offload",
    "deepspeed_stage_3",
    "deepspeed_stage_3_offload",
)
LR_SCHEDULES = ("cos_decay", "wsd")
# --train_type: how a ctx_len sample goes through the model (rwkv_disha.train.modes.TRAIN_TYPES)
TRAIN_TYPES = ("none", "infctx")

# rwkv-disha bench: what to measure, named model shapes (n_layer / n_embd in rwkv_disha.bench.SHAPES),
# adapters (none: frozen base, only --train_parts train; full: every tensor trains), --sweep
BENCH_WHAT = ("step", "kernel", "matmul")
BENCH_SHAPES = ("0.1B", "0.4B", "1.5B", "3B", "7B")
BENCH_ADAPTERS = ("none", "bone", "bat", "lora", "state", "full")
BENCH_SWEEPS = ("none", "micro_bsz")
