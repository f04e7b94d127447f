"""`rwkv-disha train`: DiSHA (Bone / Bat) or LoRA fine-tuning of an RWKV model, on Lightning.

Takes the flags of RWKV-PEFT's train.py as used by the DiSHA tutorial's run_disha.sh (same names;
defaults are the tutorial's values): replace `python train.py` with `rwkv-disha train`.
n_layer / n_embd / vocab_size / my_testing are read from --load_model and may be omitted.
Every epoch_save epochs and at the end, proj_dir/rwkv-{epoch}.pth holds the adapter (+ train_parts)
tensors; merge it with `rwkv-disha merge`. `--resume proj_dir` continues an interrupted run exactly.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

from rwkv_disha.config import opt
from rwkv_disha.errors import RWKVDishaError

PRECISIONS = {"fp32": "32-true", "tf32": "32-true", "fp16": "16-mixed", "bf16": "bf16-mixed"}
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
DATA_TYPES = ("binidx", "jsonl", "utf-8", "utf-16le", "numpy", "uint16", "dummy", "wds_img")


@dataclass
class Config:
    # paths
    load_model: str = opt("", "base RWKV model (.pth or .safetensors); shapes are read from it")
    proj_dir: str = opt("out", "output folder: rwkv-N.pth adapters, train_log.txt, metrics.csv, loss.png")
    data_file: str = opt(
        "", "training data: binidx prefix (no .bin/.idx needed), or a file for other data_types"
    )
    data_type: str = opt("binidx", "format of data_file", DATA_TYPES)
    # model shape: 0 / '' = read from --load_model; a value that disagrees with the file is an error
    vocab_size: int = opt(0, "vocabulary size (0: from the model; 65536 for World models)")
    n_layer: int = opt(0, "number of blocks (0: from the model)")
    n_embd: int = opt(0, "model width (0: from the model)")
    head_size: int = opt(0, "head size (0: from the model)")
    my_testing: str = opt("", "model version, x070 for RWKV-7 ('': from the model)")
    # data
    ctx_len: int = opt(2048, "training context length in tokens")
    micro_bsz: int = opt(4, "sequences per device per step")
    dataload: str = opt(
        "pad",
        "pad: one document per sample, padded; only: one document at its own length "
        "(micro_bsz 1); get: random ctx_len windows over the token stream",
        ("pad", "only", "get"),
    )
    loss_mask: str = opt(
        "pad", "none | pad: ignore padding | qa: train only on answer tokens", ("none", "pad", "qa")
    )
    num_workers: int = opt(0, "DataLoader worker processes")
    # schedule
    epoch_steps: int = opt(1200, "micro-batches per epoch on each device")
    epoch_count: int = opt(4, "number of epochs to train in this run")
    epoch_begin: int = opt(0, "index of the first epoch (continue a run: shifts the LR schedule and names)")
    epoch_save: int = opt(1, "save rwkv-N.pth every this many epochs (and always at the end)")
    lr_init: float = opt(2e-5, "initial learning rate (2e-5 recommended for DiSHA, at most 1e-4)")
    lr_final: float = opt(2e-5, "final learning rate")
    warmup_steps: int = opt(0, "linear warmup, in optimizer steps")
    lr_schedule: str = opt("cos_decay", "cos_decay or wsd (warmup-stable-decay)", ("cos_decay", "wsd"))
    wsd_decay_frac: float = opt(0.1, "wsd: share of the steps spent in the final decay")
    beta1: float = opt(0.9, "Adam beta1")
    beta2: float = opt(0.99, "Adam beta2")
    adam_eps: float = opt(1e-8, "Adam epsilon")
    weight_decay: float = opt(0.0, "decoupled weight decay (AdamW); 0 = Adam")
    accumulate_grad_batches: int = opt(1, "micro-batches per optimizer step")
    grad_clip: float = opt(1.0, "gradient norm clipping (0: off)")
    random_seed: int = opt(-1, "seed for weights, data order and dropout (-1: 42)")
    # engine
    accelerator: str = opt("auto", "cpu, gpu or auto", ("cpu", "gpu", "cuda", "auto"))
    devices: int = opt(1, "devices (processes) per node")
    num_nodes: int = opt(1, "nodes (launch with torchrun or SLURM; see docs/TRAINING.md)")
    precision: str = opt(
        "bf16", "fp32, tf32, fp16 or bf16 (mixed precision; the WKV state stays fp32)", tuple(PRECISIONS)
    )
    strategy: str = opt("auto", "Lightning strategy (deepspeed_* need CUDA)", STRATEGIES)
    grad_cp: bool = opt(False, "activation checkpointing per block: less memory, ~30 % slower")
    op: str = opt(
        "auto",
        "WKV kernel: torch (chunked, any device), fla (GPU); cuda/triton mean fla",
        ("auto", "torch", "loop", "fla", "cuda", "triton"),
    )
    # adapters
    peft: str = opt("disha", "disha (Bone/Bat), lora, or none (full fine-tuning)", ("disha", "lora", "none"))
    disha_config: str = opt(
        '{"mode":"bone","load":"","r":64}', "DiSHA JSON: mode bone|bat, load (adapter file to start from), r"
    )
    lora_config: str = opt('{"lora_load":"","lora_r":8,"lora_alpha":32,"lora_dropout":0.01}', "LoRA JSON")
    train_parts: list[str] = opt(["time", "ln"], "base tensors to train too: time ln emb head")
    quant: str = opt(
        "none", "store the frozen base of adapted layers quantized", ("none", "int8", "nf4", "fp4")
    )
    # bookkeeping
    resume: str = opt(
        "", "continue the run saved in this proj_dir (adapter, optimizer, schedule, data position)"
    )
    wandb: str = opt("", "Weights & Biases project name (offline works: WANDB_MODE=offline)")
    tensorboard: bool = opt(False, "also log to TensorBoard (proj_dir/tb)")
    progress_bar: bool = opt(True, "show the progress bar")
    log_every_n_steps: int = opt(1, "metrics.csv / logger interval in steps")
    log_samples: bool = opt(
        False, "write proj_dir/samples-rank{R}.txt: each sample's first token ids (check data order)"
    )


def validate(cfg: Config) -> None:
    """Cheap checks of everything a user can get wrong, before any model or data is loaded."""
    from rwkv_disha.kernels import resolve_op

    if cfg.resume and not (Path(cfg.resume) / "resume.ckpt").is_file():
        raise RWKVDishaError(f"--resume {cfg.resume}: no resume.ckpt there (it is written at each epoch end)")
    if not cfg.load_model:
        raise RWKVDishaError("--load_model is required: the base RWKV .pth to fine-tune")
    if not Path(cfg.load_model).is_file():
        raise RWKVDishaError(f"--load_model {cfg.load_model}: file not found")
    if cfg.data_type != "dummy" and not cfg.data_file:
        raise RWKVDishaError("--data_file is required (a binidx prefix, or a file for other data types)")
    if cfg.ctx_len <= 0:
        raise RWKVDishaError(f"--ctx_len must be positive, got {cfg.ctx_len}")
    for name in (
        "micro_bsz",
        "epoch_steps",
        "epoch_count",
        "epoch_save",
        "devices",
        "num_nodes",
        "accumulate_grad_batches",
    ):
        if getattr(cfg, name) <= 0:
            raise RWKVDishaError(f"--{name} must be positive, got {getattr(cfg, name)}")
    if cfg.epoch_begin < 0:
        raise RWKVDishaError(f"--epoch_begin must be >= 0, got {cfg.epoch_begin}")
    if cfg.epoch_steps % cfg.accumulate_grad_batches:
        raise RWKVDishaError(
            f"--epoch_steps {cfg.epoch_steps} must be a multiple of --accumulate_grad_batches "
            f"{cfg.accumulate_grad_batches}, so every epoch ends on an optimizer step"
        )
    if cfg.lr_init <= 0 or cfg.lr_final < 0:
        raise RWKVDishaError("--lr_init must be > 0 and --lr_final >= 0")
    if cfg.dataload == "only" and cfg.micro_bsz != 1:
        raise RWKVDishaError(
            f"--dataload only takes one document per step: use --micro_bsz 1 (got {cfg.micro_bsz})"
        )
    if cfg.data_type == "wds_img":
        raise RWKVDishaError("--data_type wds_img: image data is not supported (text models only)")
    import torch

    if cfg.accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise RWKVDishaError("--accelerator gpu but no CUDA GPU is visible; use --accelerator cpu (or auto)")
    on_gpu = uses_gpu(cfg)
    if cfg.strategy == "fsdp" and not on_gpu:
        raise RWKVDishaError(
            "--strategy fsdp needs CUDA GPUs (Lightning's FSDP does not run on CPU); use ddp on CPU"
        )
    if cfg.strategy.startswith("deepspeed") and not on_gpu:
        raise RWKVDishaError(
            f"--strategy {cfg.strategy} needs CUDA GPUs (DeepSpeed does not train on CPU); "
            "use --strategy auto (one device) or ddp on CPU"
        )
    if cfg.strategy.startswith("deepspeed") and importlib.util.find_spec("deepspeed") is None:
        raise RWKVDishaError(f"--strategy {cfg.strategy} needs deepspeed: pip install 'rwkv-disha[gpu]'")
    if cfg.precision == "fp16" and not on_gpu:
        raise RWKVDishaError("--precision fp16 is GPU-only; on CPU use bf16 or fp32")
    resolve_op(cfg.op)
    if cfg.wandb and importlib.util.find_spec("wandb") is None:
        raise RWKVDishaError("--wandb needs the wandb package: pip install wandb (WANDB_MODE=offline works)")
    if cfg.tensorboard and importlib.util.find_spec("tensorboard") is None:
        raise RWKVDishaError("--tensorboard needs the tensorboard package: pip install tensorboard")


def uses_gpu(cfg: Config) -> bool:
    """Whether this run trains on CUDA (--accelerator gpu, or auto with a GPU present)."""
    import torch

    return cfg.accelerator in ("gpu", "cuda") or (cfg.accelerator == "auto" and torch.cuda.is_available())


def check_proj_dir(cfg: Config) -> None:
    """Create proj_dir and prove it writable (the last check: a failed run before it writes nothing)."""
    proj = Path(cfg.proj_dir)
    try:
        proj.mkdir(parents=True, exist_ok=True)
        probe = proj / f".write-test-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise RWKVDishaError(f"--proj_dir {cfg.proj_dir} is not writable ({e.strerror or e})") from None


def check_model_shape(cfg: Config):
    """Read the checkpoint's shape (mmap, no model built) and refuse flags that disagree with it."""
    from rwkv_disha.model.load import check_expected, infer_config, load_state_dict

    mcfg = infer_config(load_state_dict(cfg.load_model))
    check_expected(
        mcfg,
        n_layer=cfg.n_layer,
        n_embd=cfg.n_embd,
        vocab_size=cfg.vocab_size,
        head_size=cfg.head_size,
        my_testing=cfg.my_testing,
    )
    return mcfg


def seed_of(cfg: Config) -> int:
    return 42 if cfg.random_seed < 0 else cfg.random_seed


def run(cfg: Config) -> int:
    from rwkv_disha.train.trainer import fit

    return fit(cfg)
