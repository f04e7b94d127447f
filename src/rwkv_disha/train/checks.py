"""Checks of everything a user can get wrong, before the model or the data is loaded (one line each)."""

from __future__ import annotations

import importlib.util
import math
import os
import shlex
from pathlib import Path

from rwkv_disha.config import given_options
from rwkv_disha.data.sft import sft_spec
from rwkv_disha.errors import RWKVDishaError
from rwkv_disha.model.load import hf_folder_error, is_hf_model_folder
from rwkv_disha.train.config import RESUME_FILE, SEED_MAX, Config, non_finite_option

POSITIVE = ("epoch_steps", "epoch_count", "epoch_save", "accumulate_grad_batches")


def validate(cfg: Config) -> None:
    """Every option on its own and together, without touching the model or the data."""
    if not cfg.load_model:
        raise RWKVDishaError("--load_model is required: the base RWKV .pth to fine-tune")
    if is_hf_model_folder(cfg.load_model):
        raise hf_folder_error(f"--load_model {cfg.load_model}", Path(cfg.load_model))
    if Path(cfg.load_model).is_dir():
        raise RWKVDishaError(f"--load_model {cfg.load_model} is a directory: give the model's .pth file")
    if not Path(cfg.load_model).is_file():
        raise RWKVDishaError(f"--load_model {cfg.load_model}: file not found")
    d = cfg.data
    if d.data_type != "dummy" and not d.data_file:
        raise RWKVDishaError("--data_file is required (a binidx prefix, or a file for other data types)")
    bad = non_finite_option(cfg)
    if bad:
        raise RWKVDishaError(bad)
    if d.ctx_len <= 0:
        raise RWKVDishaError(f"--ctx_len must be positive, got {d.ctx_len}")
    if d.num_workers < 0:
        raise RWKVDishaError(f"--num_workers must be >= 0, got {d.num_workers}")
    _validate_optim(cfg)
    for name in ("devices", "num_nodes"):
        if getattr(cfg.engine, name) <= 0:
            raise RWKVDishaError(f"--{name} must be positive, got {getattr(cfg.engine, name)}")
    if cfg.engine.train_type == "infctx" and cfg.engine.chunk_ctx <= 0:
        raise RWKVDishaError(f"--chunk_ctx must be positive (tokens per chunk), got {cfg.engine.chunk_ctx}")
    if cfg.adapter.state_lr_scale <= 0:
        raise RWKVDishaError(f"--state_lr_scale must be > 0, got {cfg.adapter.state_lr_scale}")
    _check_state_lr_scale(cfg)
    if d.dataload == "only" and d.micro_bsz != 1:
        raise RWKVDishaError(
            f"--dataload only takes one document per step: use --micro_bsz 1 (got {d.micro_bsz})"
        )
    if d.data_type == "wds_img":
        raise RWKVDishaError("--data_type wds_img: image data is not supported (text models only)")
    sft_spec(d, given_options(cfg))  # only flags given here: a resumed run brings its own
    _validate_engine(cfg)
    if cfg.logging.wandb and importlib.util.find_spec("wandb") is None:
        raise RWKVDishaError("--wandb needs the wandb package: pip install wandb (WANDB_MODE=offline works)")
    if cfg.logging.tensorboard and importlib.util.find_spec("tensorboard") is None:
        raise RWKVDishaError("--tensorboard needs the tensorboard package: pip install tensorboard")


def _check_state_lr_scale(cfg: Config) -> None:
    """--state_lr_scale sets the states' learning rate next to an adapter (a second optimizer group): given
    where no such group exists, it would be silently ignored."""
    a = cfg.adapter
    if "state_lr_scale" not in given_options(cfg):
        return
    if str(a.peft).strip().lower() == "state":
        raise RWKVDishaError(
            "--state_lr_scale applies with --train_state 1 next to an adapter; with --peft state only the "
            "states train, at --lr_init: drop --state_lr_scale and set --lr_init (e.g. 0.1)"
        )
    if not a.train_state:
        raise RWKVDishaError(
            "--state_lr_scale sets the initial states' learning rate, and no state trains: add "
            "--train_state 1, or drop --state_lr_scale"
        )


def _validate_optim(cfg: Config) -> None:
    o = cfg.optim
    for name, value in [("micro_bsz", cfg.data.micro_bsz)] + [(n, getattr(o, n)) for n in POSITIVE]:
        if value <= 0:
            raise RWKVDishaError(f"--{name} must be positive, got {value}")
    if o.epoch_begin < 0:
        raise RWKVDishaError(f"--epoch_begin must be >= 0, got {o.epoch_begin}")
    if o.epoch_steps % o.accumulate_grad_batches:
        raise RWKVDishaError(
            f"--epoch_steps {o.epoch_steps} must be a multiple of --accumulate_grad_batches "
            f"{o.accumulate_grad_batches}, so every epoch ends on an optimizer step"
        )
    if o.lr_init <= 0 or o.lr_final < 0:
        raise RWKVDishaError("--lr_init must be > 0 and --lr_final >= 0")
    for name in ("beta1", "beta2"):
        if not 0 <= getattr(o, name) < 1:
            raise RWKVDishaError(f"--{name} must be in [0, 1), got {getattr(o, name)}")
    if o.adam_eps <= 0:
        raise RWKVDishaError(f"--adam_eps must be > 0, got {o.adam_eps}")
    if o.weight_decay < 0:
        raise RWKVDishaError(f"--weight_decay must be >= 0, got {o.weight_decay}")
    if o.warmup_steps < 0:
        raise RWKVDishaError(f"--warmup_steps must be >= 0, got {o.warmup_steps}")
    if not 0 <= o.wsd_decay_frac <= 1:
        raise RWKVDishaError(f"--wsd_decay_frac must be in [0, 1], got {o.wsd_decay_frac}")
    if o.grad_clip < 0:
        raise RWKVDishaError(f"--grad_clip must be >= 0 (0: off), got {o.grad_clip}")
    _validate_float32(cfg)
    if o.random_seed != -1 and not 0 <= o.random_seed <= SEED_MAX:
        raise RWKVDishaError(
            f"--random_seed must be -1 (the default seed) or in 0 .. {SEED_MAX}, got {o.random_seed}"
        )


FLOAT32_MAX = 3.4028234663852886e38  # torch.finfo(torch.float32).max
FLOAT32_TINY = 1.1754943508222875e-38  # torch.finfo(torch.float32).tiny: the smallest normal float32


def check_float32(flag: str, value: float, positive: bool = False) -> None:
    """Refuse a float option torch computes with in float32 (AdamW's lr, eps and weight decay, the clipping
    norm) that float32 cannot hold: above its largest value torch fails (or the step turns the adapter
    into inf); a positive value below its smallest normal one loses its precision, or rounds to 0 (an eps
    of 0 divides by 0)."""
    if abs(value) > FLOAT32_MAX:
        raise RWKVDishaError(
            f"{flag} {value:g} does not fit float32, which torch computes it in: give at most "
            f"{FLOAT32_MAX:.1e}"
        )
    if positive and 0 < value < FLOAT32_TINY:
        raise RWKVDishaError(
            f"{flag} {value:g} is below float32's smallest normal number, which torch computes it in: give "
            f"at least {FLOAT32_TINY:.1e}"
        )


def _three_digits(x: float, up: bool) -> str:
    """``x`` to three significant digits, rounded up or down (not to nearest): a bound the message offers
    must itself pass the check."""
    step = 10.0 ** (math.floor(math.log10(x)) - 2)
    digits = math.ceil(x / step) if up else math.floor(x / step)
    return f"{digits * step:.3g}"


def check_lora_scale(name: str, alpha: float, r: int) -> None:
    """Refuse a LoRA ``alpha`` whose scale alpha / r float32 cannot hold: the forward multiplies by it in
    float32, so a scale above float32's largest value fails in torch ("cannot be converted ... without
    overflow") or turns every output into inf / NaN, and one below its smallest normal number loses the
    adapter. ``name`` says where the value came from (a flag, a JSON key, a sidecar's key)."""
    scale = alpha / r if isinstance(alpha, (int, float)) and math.isfinite(alpha) else math.nan
    if not scale > 0:
        raise RWKVDishaError(f"{name} must be a positive finite number, got {alpha!r}")
    if scale > FLOAT32_MAX:
        raise RWKVDishaError(
            f"{name} {alpha:g} makes LoRA's scale alpha / r = {alpha:g} / {r} = {scale:.3g}, which does not "
            f"fit float32: give {name} at most {_three_digits(FLOAT32_MAX * r, up=False)}"
        )
    if scale < FLOAT32_TINY:
        raise RWKVDishaError(
            f"{name} {alpha:g} makes LoRA's scale alpha / r = {alpha:g} / {r} = {scale:.3g}, below float32's "
            f"smallest normal number: give {name} at least {_three_digits(FLOAT32_TINY * r, up=True)}"
        )


def _validate_float32(cfg: Config) -> None:
    """The optimizer's float options, and the initial states' learning rate (lr_init * state_lr_scale)."""
    o = cfg.optim
    for name in ("lr_init", "adam_eps"):
        check_float32(f"--{name}", getattr(o, name), positive=True)
    for name in ("lr_final", "weight_decay", "grad_clip"):
        check_float32(f"--{name}", getattr(o, name))
    if cfg.adapter.train_state and o.lr_init * cfg.adapter.state_lr_scale > FLOAT32_MAX:
        raise RWKVDishaError(
            f"--lr_init {o.lr_init:g} x --state_lr_scale {cfg.adapter.state_lr_scale:g} (the initial states' "
            f"learning rate) does not fit float32, which torch computes it in: lower --state_lr_scale"
        )


def _validate_engine(cfg: Config) -> None:
    import torch

    from rwkv_disha.kernels import check_op_device

    e = cfg.engine
    if e.accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise RWKVDishaError("--accelerator gpu but no CUDA GPU is visible; use --accelerator cpu (or auto)")
    on_gpu = uses_gpu(cfg)
    if e.strategy == "fsdp" and not on_gpu:
        raise RWKVDishaError(
            "--strategy fsdp needs CUDA GPUs (Lightning's FSDP does not run on CPU); use ddp on CPU"
        )
    if e.strategy.startswith("deepspeed") and not on_gpu:
        raise RWKVDishaError(
            f"--strategy {e.strategy} needs CUDA GPUs (DeepSpeed does not train on CPU); "
            "use --strategy auto (one device) or ddp on CPU"
        )
    if e.strategy.startswith("deepspeed") and importlib.util.find_spec("deepspeed") is None:
        raise RWKVDishaError(f"--strategy {e.strategy} needs deepspeed: pip install 'rwkv-disha[gpu]'")
    if e.precision == "fp16" and not on_gpu:
        raise RWKVDishaError("--precision fp16 is GPU-only; on CPU use bf16 or fp32")
    check_compile_flags(e.compile, e.cuda_graphs, on_gpu)
    on_cpu_fix = "use --op fla, cuda or torch on a GPU, or --accelerator cpu"
    check_op_device(e.op, on_gpu, "train with --accelerator gpu", on_cpu_fix)


def check_compile_flags(compile: bool, cuda_graphs: bool, on_gpu: bool) -> None:
    """--cuda_graphs is a torch.compile mode, and CUDA graphs exist only on a GPU (train and bench)."""
    if cuda_graphs and not compile:
        raise RWKVDishaError("--cuda_graphs 1 works through torch.compile: add --compile 1")
    if cuda_graphs and not on_gpu:
        raise RWKVDishaError("--cuda_graphs 1 needs a CUDA GPU; on a CPU use --compile 1 alone")


def uses_gpu(cfg: Config) -> bool:
    """Whether this run trains on CUDA (--accelerator gpu, or auto with a GPU present)."""
    import torch

    acc = cfg.engine.accelerator
    return acc in ("gpu", "cuda") or (acc == "auto" and torch.cuda.is_available())


def check_model_shape(cfg: Config):
    """Read the checkpoint's shape (mmap, no model built) and refuse flags that disagree with it."""
    from rwkv_disha.hardware import check_activations_fit
    from rwkv_disha.kernels import check_op_fits, resolve_op
    from rwkv_disha.model.load import check_expected, infer_config, load_state_dict

    mcfg = infer_config(load_state_dict(cfg.load_model), source=cfg.load_model)
    m = cfg.model
    check_expected(
        mcfg,
        n_layer=m.n_layer,
        n_embd=m.n_embd,
        vocab_size=m.vocab_size,
        head_size=m.head_size,
        my_testing=m.my_testing,
    )
    check_op_fits(cfg.engine.op, mcfg.version, mcfg.head_size)
    e, d = cfg.engine, cfg.data
    tokens = min(d.ctx_len, e.chunk_ctx) if e.train_type == "infctx" else d.ctx_len  # one pass at a time
    check_activations_fit(d.micro_bsz, tokens, mcfg.n_embd, mcfg.n_layer, uses_gpu(cfg))
    resolve_op(cfg.engine.op)  # builds a compiled kernel now (first use), once the heads are known to fit
    return mcfg


def _meta_model(mcfg, acfg, op: str):
    """An empty (meta-device) model with this run's adapters injected and trainable: names and shapes only."""
    from rwkv_disha.adapters import AdapterConfig, inject_adapters, mark_trainable
    from rwkv_disha.model.load import build_model

    model = build_model(mcfg, op=op, device="meta")
    plain = AdapterConfig.from_dict({**acfg.to_dict(), "quant": "none", "load": ""})  # same shapes
    inject_adapters(model, plain)
    mark_trainable(model, plain)
    return model


def trainable_shapes(mcfg, acfg, op: str) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor this run trains, from an empty (meta-device) model: no weights read."""
    return {n: tuple(p.shape) for n, p in _meta_model(mcfg, acfg, op).named_parameters() if p.requires_grad}


def check_adapter_load(cfg: Config, mcfg, acfg) -> None:
    """The adapter to start from ("load"): a missing, damaged or NaN file, or one of another kind, r, base
    or set of tensors than this run's, is refused here, before proj_dir exists (building the model checks
    the same again)."""
    from rwkv_disha.adapters import open_adapter_file
    from rwkv_disha.adapters.adapter_file import check_adapter_fits
    from rwkv_disha.model.load import load_state_dict

    file = open_adapter_file(acfg.load, acfg.lora_alpha, acfg.pissa_init)
    # only a sidecar records the base's fingerprint; a .pth base is memory-mapped (a few KB are read)
    base = load_state_dict(cfg.load_model) if (file.meta or {}).get("base") else {}
    check_adapter_fits(file, _meta_model(mcfg, acfg, cfg.engine.op), acfg, base)


def check_proj_dir(cfg: Config) -> None:
    """Create proj_dir and prove it writable (the last check: a failed run before it writes nothing)."""
    from rwkv_disha.fsio import os_error_cause

    proj = Path(cfg.proj_dir)
    try:
        proj.mkdir(parents=True, exist_ok=True)
        probe = proj / f".write-test-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise RWKVDishaError(f"--proj_dir {cfg.proj_dir} is not writable ({os_error_cause(e)})") from None


def check_resume_folder(cfg: Config) -> None:
    """A resumed run continues in its own folder: a --proj_dir naming another one (which would skip the
    earlier-run check of that folder) is refused."""
    if cfg.resume and Path(cfg.proj_dir).resolve() != Path(cfg.resume).resolve():
        raise RWKVDishaError(
            f"--proj_dir {cfg.proj_dir} is not the folder being resumed ({cfg.resume}): a resumed run "
            "continues in its own folder; drop --proj_dir, or copy the run there and resume the copy"
        )


def earlier_run_files(proj: Path) -> list[str]:
    """The files that show ``proj`` holds an earlier run: its adapters (rwkv-*.pth) and resume.ckpt."""
    return sorted(p.name for p in proj.glob("rwkv-*.pth")) + (
        [RESUME_FILE] if (proj / RESUME_FILE).exists() else []
    )


def check_fresh_folder(cfg: Config) -> None:
    """A new run must not silently replace an earlier run's adapters: --resume it, or --overwrite 1."""
    if cfg.resume or cfg.overwrite:
        return
    proj = Path(cfg.proj_dir)
    found = earlier_run_files(proj)
    if found:
        shown = ", ".join(found[:3]) + (", ..." if len(found) > 3 else "")
        raise RWKVDishaError(
            f"--proj_dir {proj} holds an earlier run ({shown}): continue it with --resume "
            f"{shlex.quote(str(proj))}, start anew with --overwrite 1 (its files move to "
            f"{proj / 'previous-<time>'}/), or choose another folder"
        )
