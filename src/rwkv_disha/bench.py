"""Measure this machine: a real training step (default), the WKV-7 kernels, or the matmul peak.

``--what step`` times the training step of ``rwkv-disha train`` on a named shape (``--shape 0.1B`` ...,
or ``--n_layer --n_embd``) with random weights: the same model build (adapters, --quant, grad_cp,
--compile), loss (chunked head + cross-entropy), backward, gradient clipping and AdamW step; only the
data loading and Lightning's loop are left out. It reports tokens/s, the training FLOPs per token
(adapters included), the dense matmul peak measured between the steps of the same run, MFU, and peak
memory (RSS on CPU, ``max_memory_allocated`` on GPU). ``--sweep micro_bsz`` doubles micro_bsz while it
fits and names the fastest. Results of the project's benchmarks: docs/BENCHMARKS.md.
"""

from __future__ import annotations

import contextlib
import json
import platform
import statistics
import sys
import time
from dataclasses import dataclass, fields

import torch

from rwkv_disha.choices import (
    BENCH_ADAPTERS,
    BENCH_SHAPES,
    BENCH_SWEEPS,
    BENCH_WHAT,
    MODEL_VERSIONS,
    OPS,
    PRECISIONS,
    QUANT_CHOICES,
)
from rwkv_disha.config import given_options, opt
from rwkv_disha.errors import RWKVDishaError
from rwkv_disha.hardware import available_bytes
from rwkv_disha.kernels import check_op_device, check_op_fits
from rwkv_disha.measure import (  # noqa: F401  (re-exported: benchmarks/ import them from here)
    MatmulProbe,
    _peak_rss_bytes,
    _reset_peak_rss,
    _sync,
    _timed,
    best_time,
    flops_per_token,
    interleaved_times,
    kernel_step,
    matmul_peak_flops,
    paired_median_ratio,
    random_base,
    rss_bytes,
    time_kernel,
    wkv_inputs,
)

# named shapes (n_layer, n_embd): the RWKV-7 releases of these sizes (docs/MODEL.md)
SHAPES = {"0.1B": (12, 768), "0.4B": (24, 1024), "1.5B": (24, 2048), "3B": (32, 2560), "7B": (32, 4096)}
assert tuple(SHAPES) == BENCH_SHAPES


@dataclass
class Config:
    what: str = opt(
        "step",
        "what to time: step (one training step), kernel (the WKV ops) or matmul (this machine's peak)",
        BENCH_WHAT,
    )
    device: str = opt("auto", "auto (cuda when visible), cpu, cuda or cuda:N")
    json: str = opt("", "also write the result to this JSON file (a new file in an existing folder)")
    overwrite: bool = opt(False, "replace an existing --json file (refused otherwise)")
    # --what step
    shape: str = opt("0.1B", "step: model shape (n_layer / n_embd 12/768 ... 32/4096)", BENCH_SHAPES)
    n_layer: int = opt(0, "step: blocks (0: from --shape)")
    n_embd: int = opt(0, "step: width (0: from --shape)")
    vocab_size: int = opt(65536, "step: vocabulary size")
    version: str = opt(
        "x070", "step and kernel: model version (kernel: x070 times WKV-7, x060 / x052 WKV-6)", MODEL_VERSIONS
    )
    adapter: str = opt(
        "bone",
        "step: none (frozen base, only --train_parts train), bone, bat, lora, state, full",
        BENCH_ADAPTERS,
    )
    r: int = opt(64, "step: adapter rank (LoRA: lora_r, alpha 2r)")
    train_parts: list[str] = opt(["time", "ln"], "step: base tensors that train too, as in train")
    ctx_len: int = opt(512, "step: tokens per sequence")
    micro_bsz: int = opt(1, "step: sequences per step (--sweep micro_bsz: the first one tried)")
    precision: str = opt("bf16", "step: fp32, tf32, fp16 or bf16 (mixed), as in train", tuple(PRECISIONS))
    op: str = opt("auto", "step: WKV kernel", OPS)
    grad_cp: bool = opt(False, "step: activation checkpointing per block")
    quant: str = opt("none", "step: quantize the frozen base of adapted layers", QUANT_CHOICES)
    compile: bool = opt(False, "step: torch.compile each block (the warm-up steps compile)")
    cuda_graphs: bool = opt(False, "step: with --compile 1 on a GPU, replay blocks as CUDA graphs")
    steps: int = opt(5, "step: timed steps (the median is reported)")
    warmup: int = opt(2, "step: untimed steps first (allocator, compile, autotune)")
    sweep: str = opt(
        "none", "step: micro_bsz = double micro_bsz while it fits, report the fastest", BENCH_SWEEPS
    )
    sweep_max: int = opt(64, "step: the largest micro_bsz --sweep tries")
    # --what kernel
    B: int = opt(1, "kernel: batch size")
    T: int = opt(512, "kernel: sequence length")
    H: int = opt(12, "kernel: heads")
    N: int = opt(64, "kernel: head size")
    ops: str = opt("torch,loop", "kernel: comma-separated kernels; the first is compared with the others")
    repeat: int = opt(5, "kernel: interleaved rounds (medians and paired median ratios are reported)")
    kernel_dtype: str = opt(
        "fp32", "kernel: dtype of the inputs (bf16: as a bf16 run feeds the kernel)", ("fp32", "bf16")
    )


# The --what modes that read each flag, from its help ("step: ...", "kernel: ..."); a flag not listed
# (--what, --device, --json, --overwrite) is read by every mode.
FLAG_MODES = {
    f.name: tuple(f.metadata["help"].split(":")[0].split(" and "))
    for f in fields(Config)
    if f.metadata["help"].startswith(("step:", "kernel:", "step and kernel:"))
}


# --- timing and memory ----------------------------------------------------------------------------------
def run_kernel(cfg: Config, device: str, ops: list[str]) -> dict:
    from rwkv_disha.model.init import DTYPES

    dtype = DTYPES[cfg.kernel_dtype]
    steps = {op: kernel_step(op, cfg.B, cfg.T, cfg.H, cfg.N, device, dtype, cfg.version) for op in ops}
    times = interleaved_times(steps, cfg.repeat, device)
    first = ops[0]
    return {
        "what": "kernel",
        "version": cfg.version,
        "shape": dict(B=cfg.B, T=cfg.T, H=cfg.H, N=cfg.N),
        "dtype": cfg.kernel_dtype,
        "device": device,
        "threads": torch.get_num_threads(),
        "rounds": cfg.repeat,
        "fwd_bwd_ms_median": {op: round(statistics.median(t) * 1e3, 2) for op, t in times.items()},
        "fwd_bwd_ms_best": {op: round(min(t) * 1e3, 2) for op, t in times.items()},
        # time of op / time of the first op, paired per round: how many times faster the first one is
        "speedup_of_" + first: {
            op: round(paired_median_ratio(times, op, first), 2) for op in ops if op != first
        },
    }


# --- --what step ---------------------------------------------------------------------------------------
def train_config(cfg: Config, precision: str, device: torch.device):
    """The `train` options this bench stands for (what build_adapter_config / adapt_model / the module
    read), so both commands build the same model and step."""
    from rwkv_disha.config import from_mapping
    from rwkv_disha.train.config import Config as TrainConfig

    values = {
        "accelerator": "gpu" if device.type == "cuda" else "cpu",
        "precision": precision,
        "grad_cp": cfg.grad_cp,
        "op": cfg.op,
        "compile": cfg.compile,
        "cuda_graphs": cfg.cuda_graphs,
        "ctx_len": cfg.ctx_len,
        "micro_bsz": cfg.micro_bsz,
        "train_parts": list(cfg.train_parts),
        "quant": cfg.quant,
        "lr_init": 1e-4,
        "lr_final": 1e-4,
    }
    if cfg.adapter in ("bone", "bat"):
        values["peft"] = "disha"
        values["disha_config"] = json.dumps({"mode": cfg.adapter, "load": "", "r": cfg.r})
    elif cfg.adapter == "lora":
        values["peft"] = "lora"
        values["lora_config"] = json.dumps({"lora_load": "", "lora_r": cfg.r, "lora_alpha": 2 * cfg.r})
    else:  # none (frozen: trainables fixed after the build), state, full (= train's --peft none)
        values["peft"] = {"state": "state"}.get(cfg.adapter, "none")
    return from_mapping(TrainConfig, values, source="bench options")


def shape_label(cfg: Config) -> str | None:
    """What --shape gave the model that ran: its name, the name and the overrides, or None (both set)."""
    overrides = [f"{name} {getattr(cfg, name)}" for name in ("n_layer", "n_embd") if getattr(cfg, name)]
    if len(overrides) == 2:
        return None
    return ", ".join([cfg.shape, *overrides])


def model_shape(cfg: Config):
    from rwkv_disha.model.init import make_config

    n_layer, n_embd = SHAPES[cfg.shape]
    return make_config(cfg.n_layer or n_layer, cfg.n_embd or n_embd, cfg.vocab_size, 64, cfg.version)


class TrainStep:
    """The training step of `train` on a random base, with its optimizer; ``measure`` times it."""

    def __init__(self, cfg: Config, device: torch.device, precision: str):
        from rwkv_disha.train.build import adapt_model, build_adapter_config
        from rwkv_disha.train.checks import trainable_shapes
        from rwkv_disha.train.module import DishaModule

        self.cfg, self.device, self.precision = cfg, device, precision
        self.tcfg = tcfg = train_config(cfg, precision, device)
        acfg = build_adapter_config(tcfg)
        self.mcfg = model_shape(cfg)
        trainable_shapes(self.mcfg, acfg, tcfg.engine.op)  # an r the layers cannot take: one line, no build
        model = random_base(self.mcfg, tcfg.engine.op, device)
        adapt_model(model, tcfg, acfg, device.type == "cuda")
        if cfg.adapter == "none":  # the frozen baseline: only --train_parts train
            from rwkv_disha.adapters.inject import train_part_parameters
            from rwkv_disha.train.build import base_dtype_for

            model.requires_grad_(False)
            for p in train_part_parameters(model, cfg.train_parts).values():
                p.requires_grad_(True)
            # built as a full fine-tune (all fp32); frozen, the base takes the dtype train gives a frozen base
            frozen = base_dtype_for(precision, torch.float32, device.type == "cuda")
            for p in model.parameters():
                if not p.requires_grad:
                    p.data = p.data.to(frozen)
        self.model = model.to(device).train()
        self.params = [p for p in model.parameters() if p.requires_grad]
        if not self.params:
            raise RWKVDishaError(
                f"--adapter {cfg.adapter} with --train_parts {cfg.train_parts}: nothing trains"
            )
        optim = DishaModule(model, tcfg, steps_per_epoch=10**9).configure_optimizers()
        self.opt, self.sched = optim["optimizer"], optim["lr_scheduler"]["scheduler"]
        if precision == "tf32":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        low = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
        self.autocast_dtype = low
        self.scaler = torch.amp.GradScaler("cuda") if precision == "fp16" else None

    def batch(self, bsz: int) -> dict[str, torch.Tensor]:
        """Random tokens (B, ctx_len) with their next-token labels and a full mask, on the device."""
        idx = torch.randint(0, self.mcfg.vocab_size, (bsz, self.cfg.ctx_len + 1), device=self.device)
        mask = torch.ones(bsz, self.cfg.ctx_len, device=self.device)
        return {"input_ids": idx[:, :-1], "labels": idx[:, 1:], "mask": mask}

    def step(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """One optimizer step as Lightning runs it for `train`: loss under the precision's autocast,
        backward (scaled for fp16), gradient clipping, AdamW, schedule."""
        from rwkv_disha.train.modes import sample_loss

        e, clip = self.tcfg.engine, self.tcfg.optim.grad_clip
        low = self.autocast_dtype
        ctx = torch.autocast(self.device.type, dtype=low) if low else contextlib.nullcontext()
        with ctx:
            loss = sample_loss(e.train_type, self.model, batch, e.chunk_ctx, trim=not e.compile)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.opt)
        else:
            loss.backward()
        if clip > 0:
            torch.nn.utils.clip_grad_norm_(self.params, clip)
        if self.scaler is not None:
            self.scaler.step(self.opt)
            self.scaler.update()
        else:
            self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        return loss.detach()

    def measure(self, bsz: int, probe: MatmulProbe) -> dict:
        """Warm-up steps, then ``--steps`` rounds of (matmul probe, one step): median step time, MFU per
        round against that round's matmul rate (median), peak memory of the steps."""
        cfg, dev = self.cfg, self.device
        batch = self.batch(bsz)
        tokens = bsz * cfg.ctx_len
        on_gpu = dev.type == "cuda"
        if on_gpu:
            torch.cuda.synchronize(dev)
            torch.cuda.reset_peak_memory_stats(dev)
            resident = torch.cuda.memory_allocated(dev)
        else:
            _reset_peak_rss()
            resident = rss_bytes()
        t0 = time.perf_counter()
        for _ in range(cfg.warmup):
            self.step(batch)
        _sync(dev)
        warm_s = time.perf_counter() - t0
        step_s, rates, loss = [], [], float("nan")
        for _ in range(cfg.steps):
            rates.append(probe.rate())
            _sync(dev)
            t0 = time.perf_counter()
            loss = float(self.step(batch))
            _sync(dev)
            step_s.append(time.perf_counter() - t0)
        # the probe's buffers were allocated before the reset: not in the GPU peak
        peak = torch.cuda.max_memory_allocated(dev) if on_gpu else _peak_rss_bytes()
        fl = flops_per_token(self.model, tokens)
        med = statistics.median(step_s)
        mfu = statistics.median(fl["total"] * tokens / s / r for s, r in zip(step_s, rates))
        return {
            "micro_bsz": bsz,
            "tokens_per_s": round(tokens / med, 1),
            "step_s_median": round(med, 4),
            "step_s": [round(s, 4) for s in step_s],
            "warmup_s": round(warm_s, 2),
            "flops_per_token": round(fl["total"]),
            "flops_per_token_parts": {k: round(v) for k, v in fl.items() if k != "total"},
            "matmul_peak_flops": round(statistics.median(rates)),
            "mfu": float(f"{mfu:.4g}"),  # significant digits: a tiny shape's MFU is ~1e-5
            "peak_mem_bytes": int(peak),
            "resident_bytes_before_steps": int(resident),
            "peak_mem_kind": "cuda max_memory_allocated" if on_gpu else "peak RSS (VmHWM)",
            "loss_last": round(loss, 4),
        }


def _fits_next(result: dict) -> bool:
    """Whether twice this micro_bsz's activations still fit in the CPU's available memory."""
    avail = available_bytes()
    if avail is None:
        return True
    extra = result["peak_mem_bytes"] - result["resident_bytes_before_steps"]
    return 2 * extra * 1.1 < avail + max(0, rss_bytes() - result["resident_bytes_before_steps"])


def run_step(cfg: Config, device: torch.device) -> dict:
    from rwkv_disha.hardware import cpu_precision

    precision, notice = (cfg.precision, None) if device.type == "cuda" else cpu_precision(cfg.precision)
    if notice:
        print(notice, file=sys.stderr)
    bench = TrainStep(cfg, device, precision)
    mm_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
    probe = MatmulProbe(mm_dtype, device)
    head = {
        "what": "step",
        "model": bench.mcfg.summary(),
        "shape": shape_label(cfg),
        "n_layer": bench.mcfg.n_layer,
        "n_embd": bench.mcfg.n_embd,
        "adapter": cfg.adapter if cfg.adapter in ("none", "state", "full") else f"{cfg.adapter} r{cfg.r}",
        "train_parts": list(cfg.train_parts),
        "ctx_len": cfg.ctx_len,
        "precision": precision,
        "precision_asked": cfg.precision,
        "op": cfg.op,
        "grad_cp": cfg.grad_cp,
        "quant": cfg.quant,
        "compile": cfg.compile,
        "cuda_graphs": cfg.cuda_graphs,
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"cpu ({platform.processor() or platform.machine()})",
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "matmul_dtype": str(mm_dtype).replace("torch.", ""),
        "steps": cfg.steps,
        "warmup": cfg.warmup,
        "date": time.strftime("%Y-%m-%d", time.gmtime()),
    }
    if notice:
        head["notice"] = notice
    if cfg.sweep != "micro_bsz":
        return {**head, **bench.measure(cfg.micro_bsz, probe)}
    runs, bsz, stop = [], cfg.micro_bsz, "reached --sweep_max"
    while bsz <= cfg.sweep_max:
        try:
            res = bench.measure(bsz, probe)
        except torch.cuda.OutOfMemoryError:
            stop = f"micro_bsz {bsz} ran out of GPU memory"
            bench.opt.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()
            break
        runs.append(res)
        print(
            json.dumps({"micro_bsz": bsz, "tokens_per_s": res["tokens_per_s"], "mfu": res["mfu"]}),
            file=sys.stderr,
        )
        bsz *= 2
        if device.type == "cpu" and bsz <= cfg.sweep_max and not _fits_next(res):
            stop = f"micro_bsz {bsz} would not fit in this machine's available memory"
            break
    if not runs:
        raise RWKVDishaError(f"--sweep micro_bsz: even --micro_bsz {cfg.micro_bsz} does not fit on {device}")
    best = max(runs, key=lambda r: r["tokens_per_s"])
    return {
        **head,
        "sweep": "micro_bsz",
        "stopped": stop,
        "best_micro_bsz": best["micro_bsz"],
        "best": best,
        "runs": runs,
    }


# --- checks and the command -------------------------------------------------------------------------
def resolve_device(text: str) -> torch.device:
    """--device as a torch.device, or one line why not."""
    device = text.strip().lower()
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device != "cpu" and not (device == "cuda" or (device.startswith("cuda:") and device[5:].isdigit())):
        raise RWKVDishaError(f"--device must be auto, cpu, cuda or cuda:N, got {text!r}")
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise RWKVDishaError(f"--device {text}: no CUDA GPU is visible here; use --device cpu")
        if device[5:] and int(device[5:]) >= torch.cuda.device_count():
            raise RWKVDishaError(f"--device {text}: this machine has {torch.cuda.device_count()} GPU(s)")
    return torch.device(device)


def _validate_step(cfg: Config, device: torch.device) -> None:
    import importlib.util

    from rwkv_disha.hardware import check_activations_fit
    from rwkv_disha.model.init import parameter_count
    from rwkv_disha.train.checks import check_compile_flags

    for name in ("vocab_size", "ctx_len", "micro_bsz", "steps", "r", "sweep_max"):
        if getattr(cfg, name) < 1:
            raise RWKVDishaError(f"--{name} must be positive, got {getattr(cfg, name)}")
    for name in ("n_layer", "n_embd", "warmup"):
        if getattr(cfg, name) < 0:
            why = " (0: from --shape)" if name != "warmup" else " (0: no untimed steps)"
            raise RWKVDishaError(f"--{name} must be >= 0{why}, got {getattr(cfg, name)}")
    if cfg.sweep == "micro_bsz" and cfg.micro_bsz > cfg.sweep_max:
        raise RWKVDishaError(
            f"--sweep micro_bsz starts at --micro_bsz {cfg.micro_bsz}, above --sweep_max {cfg.sweep_max}"
        )
    if cfg.precision == "fp16" and device.type != "cuda":
        raise RWKVDishaError("--precision fp16 is GPU-only; on CPU use bf16 or fp32")
    check_compile_flags(cfg.compile, cfg.cuda_graphs, device.type == "cuda")
    if cfg.quant != "none":
        if cfg.adapter not in ("bone", "bat", "lora"):
            raise RWKVDishaError(
                f"--quant {cfg.quant} needs an adapter over the frozen base: --adapter bone, bat or lora"
            )
        if importlib.util.find_spec("bitsandbytes") is None:
            raise RWKVDishaError(f"--quant {cfg.quant} needs bitsandbytes: pip install bitsandbytes")
    if "shape" in given_options(cfg) and cfg.n_layer and cfg.n_embd:
        raise RWKVDishaError(
            f"--shape {cfg.shape} is unused when both --n_layer and --n_embd are given: drop --shape, or "
            "one of --n_layer / --n_embd to take it from --shape"
        )
    mcfg = model_shape(cfg)  # n_embd a multiple of 64, version known: one line each
    check_op_fits(cfg.op, mcfg.version, mcfg.head_size)
    _check_op_device(cfg.op, device, "--op")
    check_adapter(cfg, mcfg, device)
    check_activations_fit(cfg.micro_bsz, cfg.ctx_len, mcfg.n_embd, mcfg.n_layer, device.type == "cuda")
    need, have = parameter_count(mcfg) * 4, available_bytes()
    if device.type == "cpu" and have is not None and need > have:
        raise RWKVDishaError(
            f"{mcfg.summary()} needs about {need / 2**30:.1f} GiB for its fp32 weights, more than the "
            f"{have / 2**30:.1f} GiB available here; choose a smaller --shape"
        )


def adapter_config(cfg: Config, device: torch.device):
    """The AdapterConfig train builds from these options (train.build.build_adapter_config's call), made
    here without importing Lightning, so that a bad option is refused in a second, not after four."""
    from rwkv_disha.adapters import AdapterConfig

    a = train_config(cfg, cfg.precision, device).adapter
    return AdapterConfig.from_cli(
        a.peft, a.disha_config, a.lora_config, a.train_parts, a.quant, train_state=a.train_state
    )


def check_adapter(cfg: Config, mcfg, device: torch.device) -> None:
    """--train_parts, and --r against the shapes of the layers it adapts (read from an empty meta-device
    model), before the model is built: one line naming bench's flags (not train's JSON keys)."""
    from rwkv_disha.adapters.inject import adapter_targets, find_targets
    from rwkv_disha.model.load import build_model

    acfg = adapter_config(cfg, device)  # unknown --train_parts: one line
    if cfg.adapter == "none" and not acfg.train_parts:
        raise RWKVDishaError(
            "--adapter none with no --train_parts: nothing trains; give --train_parts (e.g. time ln) "
            "or another --adapter"
        )
    if not acfg.adapts_layers:
        return
    model = build_model(mcfg, op="torch", device="meta")
    targets = find_targets(model, acfg.targets or list(adapter_targets(model)))
    by_shape: dict[tuple[int, int], str] = {}  # each (out, in) once, with the first layer of that shape
    for name, m in targets.items():
        by_shape.setdefault(tuple(m.weight.shape), name)
    shapes = {name: shape for shape, name in by_shape.items()}
    kind = acfg.layer_class
    why = next((p for n, (o, i) in shapes.items() if (p := kind.shape_problem(cfg.r, o, i, n))), None)
    if why:
        best = kind.largest_r(shapes, cfg.r)
        fix = f"the largest --r that fits is {best}" if best else "choose another --adapter"
        raise RWKVDishaError(f"--adapter {cfg.adapter} --r {cfg.r} {why}; {fix}")


def check_mode_flags(cfg: Config) -> None:
    """Refuse a flag given for another --what (``--op`` with --what kernel, which times ``--ops``): the
    mode would silently ignore it."""
    given = given_options(cfg)
    bad = [name for name, modes in FLAG_MODES.items() if name in given and cfg.what not in modes]
    if not bad:
        return
    names = ", ".join(f"--{name}" for name in bad)
    them = "it" if len(bad) == 1 else "them"
    owners = {FLAG_MODES[name] for name in bad}
    whose = ""
    if len(owners) == 1:  # all of one mode: name it
        verb = "is a flag" if len(bad) == 1 else "are flags"
        whose = f"{names} {verb} of --what {' and '.join(owners.pop())}; "
    pair = {"kernel": ("op", "ops"), "step": ("ops", "op")}.get(cfg.what)
    if pair and pair[0] in bad:  # the near-twin flag, easily taken for the other
        hint = f"--what {cfg.what} takes --{pair[1]}" + (" (drop the others)" if len(bad) > 1 else "")
    elif whose:
        hint = f"--what {cfg.what} does not read {them}: drop {them}"
    else:
        hint = f"--what {cfg.what} does not read {names}: drop {them}"
    raise RWKVDishaError(whose + hint)


def _check_op_device(op: str, device: torch.device, flag: str) -> None:
    check_op_device(op, device.type == "cuda", "add --device cuda", "use --device cpu", flag)


def validate(cfg: Config) -> tuple[torch.device, list[str]]:
    """Every option checked before any tensor is made; returns the device and the kernels to time."""
    check_mode_flags(cfg)
    for name in ("B", "T", "H", "N", "repeat"):
        if getattr(cfg, name) < 1:
            raise RWKVDishaError(f"--{name} must be positive, got {getattr(cfg, name)}")
    device = resolve_device(cfg.device)
    if cfg.json:
        from rwkv_disha.fsio import check_new_file

        check_new_file(cfg.json, "--json", cfg.overwrite)
    ops = [o.strip() for o in cfg.ops.split(",") if o.strip()]
    if cfg.what == "kernel" and not ops:
        raise RWKVDishaError("--ops is empty: give kernels to time, e.g. --ops torch,loop")
    for op in ops if cfg.what == "kernel" else []:
        if op not in OPS:
            raise RWKVDishaError(f"--ops: unknown kernel {op!r}; choose from {', '.join(OPS)}")
        check_op_fits(op, cfg.version, cfg.N, "--ops", "--N is")
        _check_op_device(op, device, "--ops")
    if cfg.what == "step":
        _validate_step(cfg, device)
    return device, ops


def run(cfg: Config) -> int:
    device, ops = validate(cfg)
    torch.manual_seed(0)
    if cfg.what == "matmul":
        result = {
            "what": "matmul",
            "device": str(device),
            "threads": torch.get_num_threads(),
            "matmul_gflops": {
                str(d): round(matmul_peak_flops(d, device=str(device)) / 1e9, 1)
                for d in (torch.float32, torch.bfloat16)
            },
        }
    elif cfg.what == "kernel":
        result = run_kernel(cfg, str(device), ops)
    else:
        result = run_step(cfg, device)
    print(json.dumps(result))
    if cfg.json:
        from rwkv_disha.fsio import atomic_write_json

        atomic_write_json(cfg.json, result, "--json", overwrite=cfg.overwrite)
    return 0
