"""The options of `rwkv-disha train`, in groups; the saved ``train_config.json`` and ``--resume``.

The flags stay RWKV-PEFT's flat names (``--lr_init``, ``--micro_bsz``); in code they live in groups:
``cfg.data.micro_bsz``, ``cfg.optim.lr_init``. docs/TRAINING.md "Flags" lists them.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rwkv_disha.choices import (
    ACCELERATORS,
    DATA_TYPES,
    DATALOADS,
    LOSS_MASKS,
    LR_SCHEDULES,
    OPS,
    PEFT_ALIASES,
    PEFT_KINDS,
    PRECISIONS,
    QUANT_CHOICES,
    STRATEGIES,
    TRAIN_TYPES,
)
from rwkv_disha.config import flat_dict, from_mapping, given_options, group, opt, option_fields
from rwkv_disha.errors import RWKVDishaError

# wds_img is accepted so that its refusal can say why (image data), instead of argparse's "invalid choice"
TRAIN_DATA_TYPES = (*DATA_TYPES, "wds_img")
DEFAULT_SEED = 42  # --random_seed -1
SEED_MAX = 2**32 - 1  # numpy's and Lightning's seed range


@dataclass
class ModelArgs:
    """model shape: 0 / '' = read from --load_model; a value that disagrees with the file is an error"""

    vocab_size: int = opt(0, "vocabulary size (0: from the model; 65536 for World models)")
    n_layer: int = opt(0, "number of blocks (0: from the model)")
    n_embd: int = opt(0, "model width (0: from the model)")
    head_size: int = opt(0, "head size (0: from the model)")
    my_testing: str = opt("", "model version, x070 for RWKV-7 ('': from the model)")


@dataclass
class DataArgs:
    """data"""

    data_file: str = opt(
        "", "training data: binidx prefix (no .bin/.idx needed), or a file for other data_types"
    )
    data_type: str = opt("binidx", "format of data_file", TRAIN_DATA_TYPES)
    ctx_len: int = opt(2048, "training context length in tokens")
    micro_bsz: int = opt(4, "sequences per device per step")
    dataload: str = opt(
        "pad",
        "pad: one document per sample, padded; only: one document at its own length "
        "(micro_bsz 1); get: random ctx_len windows over the token stream",
        DATALOADS,
    )
    loss_mask: str = opt(
        "pad", "none | pad: ignore padding | qa: train only on answer tokens (sft data: pad = qa)", LOSS_MASKS
    )
    sft_field: list[str] = opt(
        ["query", "response"], "--data_type sft: the query and the response key of each record (RWKV-PEFT's)"
    )
    sft_split: str = opt(
        "train", "--data_type sft: the split, in datasets' syntax: train, train[:1000], train[10%:20%]"
    )
    num_workers: int = opt(0, "DataLoader worker processes")
    data_shuffle: bool = opt(
        True, "each epoch visits the samples in a new seeded order (0: in file order, as RWKV-PEFT's default)"
    )


@dataclass
class OptimArgs:
    """optimisation: epochs, learning rate, Adam, clipping, seed"""

    epoch_steps: int = opt(1200, "micro-batches per epoch on each device")
    epoch_count: int = opt(4, "number of epochs to train in this run")
    epoch_begin: int = opt(0, "index of the first epoch (continue a run: shifts the LR schedule and names)")
    epoch_save: int = opt(1, "save rwkv-N.pth every this many epochs (and always at the end)")
    lr_init: float = opt(2e-5, "initial learning rate (2e-5 recommended for DiSHA, at most 1e-4)")
    lr_final: float = opt(2e-5, "final learning rate")
    warmup_steps: int = opt(0, "linear warmup, in optimizer steps")
    lr_schedule: str = opt("cos_decay", "cos_decay or wsd (warmup-stable-decay)", LR_SCHEDULES)
    wsd_decay_frac: float = opt(0.1, "wsd: share of the steps spent in the final decay, in [0, 1]")
    beta1: float = opt(0.9, "Adam beta1, in [0, 1)")
    beta2: float = opt(0.99, "Adam beta2, in [0, 1)")
    adam_eps: float = opt(1e-8, "Adam epsilon (> 0)")
    weight_decay: float = opt(0.0, "decoupled weight decay (AdamW); 0 = Adam")
    accumulate_grad_batches: int = opt(1, "micro-batches per optimizer step")
    grad_clip: float = opt(1.0, "gradient norm clipping (0: off)")
    random_seed: int = opt(
        -1, f"seed for weights, data order and dropout (-1: {DEFAULT_SEED}; else 0 .. {SEED_MAX})"
    )

    @property
    def seed(self) -> int:
        return DEFAULT_SEED if self.random_seed < 0 else self.random_seed


@dataclass
class EngineArgs:
    """engine: devices, precision, strategy, kernels"""

    accelerator: str = opt(
        "auto", "cpu, gpu (cuda is the same) or auto (gpu when CUDA is visible)", ACCELERATORS
    )
    devices: int = opt(1, "devices (processes) per node")
    num_nodes: int = opt(1, "nodes (launch with torchrun or SLURM; see docs/TRAINING.md)")
    precision: str = opt(
        "bf16", "fp32, tf32, fp16 or bf16 (mixed precision; the WKV state stays fp32)", tuple(PRECISIONS)
    )
    strategy: str = opt("auto", "Lightning strategy (deepspeed_* need CUDA)", STRATEGIES)
    grad_cp: bool = opt(False, "activation checkpointing per block: less memory, ~30 % slower")
    op: str = opt(
        "auto",
        "WKV kernel: auto (fla on a GPU, else torch), torch (chunked, any device), fla (GPU), cuda (our "
        "RWKV-7 GPU kernel), cpp (our compiled CPU kernel for RWKV-7/6/5, built at first use: 1.1-1.5x "
        "faster steps); triton means fla",
        OPS,
    )
    compile: bool = opt(False, "torch.compile each block (inductor; the first steps pay the compile time)")
    cuda_graphs: bool = opt(
        False, "with --compile 1 on a GPU: replay each compiled block as CUDA graphs (mode reduce-overhead)"
    )
    train_type: str = opt(
        "none",
        "none: each ctx_len sample in one pass; infctx: in chunks of --chunk_ctx tokens carrying the "
        "recurrent state (memory grows with chunk_ctx, not ctx_len)",
        TRAIN_TYPES,
    )
    chunk_ctx: int = opt(512, "infctx: tokens per chunk (the last chunk of a sample may be shorter)")


@dataclass
class AdapterArgs:
    """adapter"""

    peft: str = opt(
        "disha",
        "disha (Bone/Bat), lora, state (only the initial WKV states), or none (full fine-tuning)",
        (*PEFT_KINDS, *PEFT_ALIASES),
    )
    disha_config: str = opt(
        '{"mode":"bone","load":"","r":64}', "DiSHA JSON: mode bone|bat, load (adapter file to start from), r"
    )
    lora_config: str = opt('{"lora_load":"","lora_r":8,"lora_alpha":32,"lora_dropout":0.01}', "LoRA JSON")
    peft_config: str = opt(
        "",
        'RWKV-PEFT\'s peft JSON: --peft miss \'{"r":8,"init_weights":true|"bat"|"mini"}\', --peft lora '
        '\'{"r":8,"lora_alpha":32,"lora_dropout":0.05}\' (docs/MIGRATING.md)',
    )
    bone_config: str = opt("", "RWKV-PEFT's older --peft bone JSON: bone_mode bone|bat, bone_load, bone_r")
    pissa_config: str = opt("", "PiSSA JSON: pissa_load, pissa_init, pissa_r, svd_niter")
    train_parts: list[str] = opt(["time", "ln"], "base tensors to train too: time ln emb head")
    quant: str = opt("none", "store the frozen base of adapted layers quantized", QUANT_CHOICES)
    train_state: bool = opt(
        False, "also train each block's initial WKV state (saved in the adapter file); --peft state: only it"
    )
    state_lr_scale: float = opt(
        1e4,
        "with --train_state 1 next to an adapter: the states' learning rate is --lr_init/--lr_final times "
        "this (states want ~1e-2..1, adapters ~2e-5); --peft state uses --lr_init as given",
    )


@dataclass
class LogArgs:
    """logging"""

    wandb: str = opt("", "Weights & Biases project name (offline works: WANDB_MODE=offline)")
    tensorboard: bool = opt(False, "also log to TensorBoard (proj_dir/tb)")
    progress_bar: bool = opt(True, "show the progress bar")
    log_every_n_steps: int = opt(1, "metrics.csv / logger interval in steps")
    log_samples: bool = opt(
        False, "write proj_dir/samples-rank{R}.txt: each sample's first token ids (check data order)"
    )


@dataclass
class Config:
    load_model: str = opt("", "base RWKV model (.pth or .safetensors); shapes are read from it")
    proj_dir: str = opt("out", "output folder: rwkv-N.pth adapters, train_log.txt, metrics.csv, loss.png")
    resume: str = opt(
        "", "continue the run saved in this proj_dir (adapter, optimizer, schedule, data position)"
    )
    overwrite: bool = opt(False, "allow a new run into a proj_dir that holds an earlier run's adapters")
    dry_run: bool = opt(
        False, "check everything and report layers, trainable params, memory, speed and schedule; no training"
    )
    model: ModelArgs = group(ModelArgs)
    data: DataArgs = group(DataArgs)
    optim: OptimArgs = group(OptimArgs)
    engine: EngineArgs = group(EngineArgs)
    adapter: AdapterArgs = group(AdapterArgs)
    logging: LogArgs = group(LogArgs)


SAVED_CONFIG = "train_config.json"
RESUME_FILE = "resume.ckpt"
# train_config.json's record of what the run started on: {"data": data.fingerprint, "base": the base
# model's adapters.fingerprint}; --resume compares with it (a run of an older version has none)
RUN_RECORD = "fingerprints"


# the paths a resumed run reads again: stored absolute, so --resume works from any folder
PATH_OPTIONS = ("load_model", "data_file", "proj_dir")
ADAPTER_JSON = ("disha_config", "lora_config", "bone_config", "pissa_config", "peft_config")
LOAD_KEYS = ("load", "lora_load", "bone_load", "pissa_load")  # the adapter file to start from


def config_json(cfg: Config) -> dict[str, Any]:
    """What ``train_config.json`` holds: the resolved options, by group, with absolute paths."""
    import dataclasses
    import os

    out = {k: v for k, v in dataclasses.asdict(cfg).items() if not k.startswith("_")}
    for part in (out, out["data"]):
        for name in PATH_OPTIONS:
            if part.get(name):
                part[name] = os.path.abspath(part[name])
    for name in ADAPTER_JSON:
        try:
            opts = json.loads(out["adapter"][name] or "null")
        except json.JSONDecodeError:
            continue  # the JSON of a peft this run does not use is never read
        loads = [k for k in LOAD_KEYS if isinstance(opts, dict) and isinstance(opts.get(k), str) and opts[k]]
        for k in loads:
            opts[k] = os.path.abspath(opts[k])
        if loads:
            out["adapter"][name] = json.dumps(opts)
    return out


def _check_saved_types(values: dict[str, Any], source: str) -> None:
    types = {f.name: tp for _, f, tp in option_fields(Config)}
    for name, value in values.items():
        tp = types.get(name)
        ok = {
            bool: isinstance(value, bool),
            int: isinstance(value, int) and not isinstance(value, bool),
            float: isinstance(value, (int, float)) and not isinstance(value, bool),
            str: isinstance(value, str),
        }.get(tp, isinstance(value, list) and all(isinstance(v, str) for v in value))
        if tp is not None and not ok:
            raise RWKVDishaError(f"{source}: option {name} has the wrong type ({value!r})")


def load_saved_config(path: str | Path) -> dict[str, Any]:
    """The flat ``{option: value}`` of a saved ``train_config.json`` (grouped, or the older flat shape)."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        cause = getattr(e, "strerror", None) or str(e).splitlines()[0]
        raise RWKVDishaError(f"{path} is not a readable train_config.json ({cause})") from None
    if not isinstance(raw, dict):
        raise RWKVDishaError(f"{path} is not an rwkv-disha train_config.json (not a mapping)")
    flat: dict[str, Any] = {}
    for key, value in raw.items():
        if key == RUN_RECORD:
            continue
        if isinstance(value, dict):  # a group
            flat.update(value)
        else:
            flat[key] = value
    known = {f.name for _, f, _ in option_fields(Config)}
    unknown = sorted(set(flat) - known)
    if unknown:
        raise RWKVDishaError(
            f"{path} is not an rwkv-disha train_config.json (unknown options: {', '.join(unknown[:5])})"
        )
    _check_saved_types(flat, str(path))
    return flat


def load_run_record(path: str | Path) -> dict[str, Any]:
    """The fingerprints a saved ``train_config.json`` records (empty: none, or no readable file)."""
    try:
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}
    record = raw.get(RUN_RECORD) if isinstance(raw, dict) else None
    return {k: v for k, v in record.items() if isinstance(v, dict)} if isinstance(record, dict) else {}


def resolve_resume(cfg: Config) -> Config:
    """With ``--resume DIR``, every option not given (as a flag or in ``--config``) takes the value of the
    run being resumed; options given keep their value, even when it equals the default. The run continues
    in DIR itself (a copied or moved run never writes back into the folder it came from). Refused here:
    DIR without resume.ckpt or train_config.json, a train_config.json that describes no run, and a
    relative path stored by an older version that is not found from the current folder."""
    if not cfg.resume:
        return cfg
    folder = Path(cfg.resume)
    if not (folder / RESUME_FILE).exists():
        raise RWKVDishaError(
            f"--resume {cfg.resume}: no {RESUME_FILE} there (it is written at each epoch end)"
        )
    saved = folder / SAVED_CONFIG
    if not saved.is_file():
        raise RWKVDishaError(
            f"--resume {cfg.resume}: no {SAVED_CONFIG} there (every run writes it when training starts): "
            'restore it, or start a new run from the last adapter ("load" in --disha_config)'
        )
    given = given_options(cfg)
    stored = load_saved_config(saved)
    if not isinstance(stored.get("load_model"), str) or not stored["load_model"]:
        raise RWKVDishaError(f"--resume {cfg.resume}: {saved} does not describe a run (it has no load_model)")
    _check_stored_paths(stored, given, saved)
    mine = flat_dict(cfg)
    _check_same_run(stored, mine, given, cfg.resume, "data" in load_run_record(saved))
    merged = {k: v for k, v in stored.items() if k not in given}
    merged.update({k: mine[k] for k in given})
    merged["resume"] = cfg.resume
    if "proj_dir" not in given:  # a given one must name this folder too (checks.check_resume_folder)
        merged["proj_dir"] = cfg.resume
    out = from_mapping(Config, merged, source=f"options in {saved}")
    object.__setattr__(out, "_given", given)
    return out


def _lost(value: Any, absolute_too: bool = False) -> bool:
    """A relative path (older versions stored them as typed; with ``absolute_too`` any path) that does not
    exist from this folder."""
    if not isinstance(value, str) or not value or (Path(value).is_absolute() and not absolute_too):
        return False
    return not any(Path(value + ext).exists() for ext in ("", ".idx", ".bin"))  # a file or binidx prefix


def _check_stored_paths(stored: dict[str, Any], given: frozenset[str], saved: Path) -> None:
    lost = [n for n in ("load_model", "data_file") if n not in given and _lost(stored.get(n))]
    if lost:
        shown = ", ".join(f"{n} {stored[n]}" for n in lost)
        flags = " and ".join(f"--{n}" for n in lost)
        raise RWKVDishaError(
            f"{saved} stores {shown} relative to the folder that run started in, not found from here: pass "
            f"{flags} with the path (or resume from that folder)"
        )


# what --resume may not change: the data position in resume.ckpt counts micro-batches of this rank, so
# another data, sample form, batch, step, seed, epoch index or world size would skip or repeat samples;
# another --quant would swap the frozen base the adapter is trained against (nf4 rounds weights by ~10 %)
RUN_DEFINING = (
    "data_file", "data_type", "dataload", "loss_mask", "sft_field", "sft_split", "data_shuffle", "ctx_len",
    "micro_bsz", "epoch_steps", "accumulate_grad_batches", "random_seed", "epoch_begin", "devices",
    "num_nodes", "quant",
)  # fmt: skip


def _same_value(name: str, given: Any, stored: Any, data_type: str, recorded: bool) -> bool:
    """Whether ``given`` is the run's ``stored`` value of option ``name``. Another --data_file passes when
    the run recorded its data's fingerprint (checked once the data is opened: the same data moved), or
    when the stored file is gone (an older run: the data moved, nothing recorded to check it by)."""
    import os

    from rwkv_disha.data.binidx import split_prefix

    if name == "random_seed":  # -1 is the default seed
        return (DEFAULT_SEED if given < 0 else given) == (DEFAULT_SEED if stored < 0 else stored)
    if name == "data_file" and isinstance(stored, str):
        if data_type == "dummy" or recorded or _lost(stored, absolute_too=True):
            return True
        given, stored = os.path.realpath(given), os.path.realpath(stored)
        if data_type == "binidx":  # data/x, data/x.bin and data/x.idx name one dataset
            given, stored = split_prefix(given), split_prefix(stored)
    if isinstance(given, (list, tuple)) and isinstance(stored, (list, tuple)):
        return list(given) == list(stored)
    return given == stored


def _shown(value: Any) -> str:
    return " ".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)


def load_hint(peft: str) -> str:
    """Where a new run names the adapter file it starts from, for this --peft."""
    return {"lora": '"lora_load" in --lora_config', "pissa": '"pissa_load" in --pissa_config'}.get(
        peft, '"load" in --disha_config'
    )


def new_run_fix(folder: str | Path, peft: str) -> str:
    """The way to change what --resume may not: a new run from the resumed run's last adapter."""
    return (
        f"start a new run from its last adapter ({Path(folder) / 'rwkv-N.pth'} as {load_hint(peft)}) with a "
        "new --proj_dir"
    )


def _check_same_run(
    stored: dict[str, Any], mine: dict[str, Any], given: frozenset[str], folder: str, recorded: bool
) -> None:
    """Refuse a flag given at --resume that changes which samples the rest of the run sees or how a step
    is formed (:data:`RUN_DEFINING`); the same value as the run's is fine. ``recorded``: the run recorded
    its data's fingerprint."""
    data_type = stored.get("data_type", mine["data_type"])
    changed = [
        n
        for n in RUN_DEFINING
        if n in given and n in stored and not _same_value(n, mine[n], stored[n], data_type, recorded)
    ]
    if not changed:
        return
    flags = ", ".join(f"--{n} {_shown(mine[n])}" for n in changed)
    runs = ", ".join(_shown(stored[n]) for n in changed)
    verb = "differs" if len(changed) == 1 else "differ"
    raise RWKVDishaError(
        f"--resume {folder}: {flags} {verb} from the run's {runs}: --resume continues the run as it was; to "
        f"change {'it' if len(changed) == 1 else 'them'}, {new_run_fix(folder, stored.get('peft', 'disha'))}"
    )


def non_finite_option(cfg: Config) -> str | None:
    """The first float option that is NaN or infinite (they can also come from YAML or train_config)."""
    for name, value in flat_dict(cfg).items():
        if isinstance(value, float) and not math.isfinite(value):
            return f"--{name} must be a finite number, got {value}"
    return None
