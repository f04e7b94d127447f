"""`rwkv-disha export`: write an adapter in the format the next tool reads (docs/MIGRATING.md).

    rwkv-disha export --peft_checkpoint out/rwkv-3.pth --format peft --output out/peft-adapter
        a Hugging Face peft folder (adapter_config.json + adapter_model.safetensors) that
        peft.PeftModel.from_pretrained loads onto an RWKV-7 module: Bone / MiSS -> MISS, LoRA / PiSSA -> LORA
    rwkv-disha export --peft_checkpoint out/rwkv-3.pth --format lora --output out/lora.pth
        PiSSA -> the plain LoRA of rank 2r with the same ΔW (merges onto the released base)
    rwkv-disha export --peft_checkpoint peft-folder --format pth --output out/rwkv-0.pth
        any adapter we read (a peft folder too) -> our .pth + .json sidecar (RWKV-PEFT's merge reads the .pth)
    rwkv-disha export --load_model merged.pth --format hf --output out/hf-model
        an RWKV-7 model (base or merged) -> fla's Hugging Face layout: config.json + model.safetensors
        (rwkv_disha/hf_layout.py; `rwkv-disha import` turns it back into the same .pth)

The input is read by the same reader as merge / generate / eval / train, so it accepts and refuses the same
files. RWKV-PEFT's Bat has no peft form: one line says so.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from rwkv_disha.config import opt
from rwkv_disha.errors import RWKVDishaError

FORMATS = ("peft", "lora", "pth", "hf")


@dataclass
class Config:
    peft_checkpoint: str = opt("", "the adapter: rwkv-N.pth (ours or RWKV-PEFT's) or a peft adapter folder")
    load_model: str = opt("", "--format hf: the RWKV-7 model (.pth / .safetensors, base or merged)")
    format: str = opt(
        "peft",
        "peft: a peft folder; lora: PiSSA as plain LoRA .pth; pth: our .pth; hf: a model for HF",
        FORMATS,
    )
    output: str = opt("", "where to write: a folder for --format peft / hf, a .pth file otherwise")
    lora_alpha: float = opt(
        0.0,
        "LoRA alpha: needed for a LoRA file without its .json sidecar; replaces the sidecar's value when "
        "given (0 = from the sidecar; refused for other adapter kinds)",
    )
    lora_init: str = opt(
        "",
        "RWKV-PEFT's init_pissa.pth: the initial factors of an RWKV-PEFT PiSSA rwkv-N.pth (ours hold them)",
    )
    overwrite: bool = opt(False, "replace an existing --output")


def _check_output(cfg: Config, inputs: list[Path]) -> Path:
    from rwkv_disha.adapters.adapter_file import sidecar_path
    from rwkv_disha.fsio import check_output_path, clean_stale_temps

    out = Path(cfg.output)
    if any(out.resolve() == p.resolve() for p in inputs):
        raise RWKVDishaError(f"--output {out} is the input: choose another name")
    if cfg.format in ("peft", "hf"):
        if out.exists() and not out.is_dir():
            raise RWKVDishaError(f"--output {out} is a file: --format {cfg.format} writes a folder")
        # a killed export's temporaries are no user's files: a folder holding only them counts as empty
        clean_stale_temps(out)
        if out.is_dir() and any(out.iterdir()) and not cfg.overwrite:
            raise RWKVDishaError(
                f"--output {out} is a folder that is not empty: choose another or --overwrite 1"
            )
        written = _hf_model_file if cfg.format == "hf" else _peft_folder_file
        for src in inputs:  # a file export writes (or removes as stale) inside --output would be the input
            if src.resolve().parent == out.resolve() and written(src.name):
                raise RWKVDishaError(f"--output {out} would overwrite the input {src}: choose another folder")
        return out
    out = check_output_path(cfg.output, overwrite=cfg.overwrite)  # the raw text: a trailing slash is refused
    side = sidecar_path(out)
    if out.suffix == ".json" or side == out:
        raise RWKVDishaError(
            f"--output {out}: its .json sidecar would replace it; name it .pth or .safetensors"
        )
    if any(side.resolve() in (p.resolve(), sidecar_path(p).resolve()) for p in inputs):
        raise RWKVDishaError(
            f"--output {out}: its sidecar {side} would overwrite an input; choose another name"
        )
    if (side.exists() or side.is_symlink()) and not cfg.overwrite:
        raise RWKVDishaError(
            f"--output {out}: its sidecar {side} already exists: choose another name or pass --overwrite 1"
        )
    return out


def _hf_model_file(name: str) -> bool:
    """A file name export --format hf writes, or removes as a stale model file (shards, index)."""
    return name in ("config.json", "model.safetensors", "model.safetensors.index.json") or bool(
        re.fullmatch(r"model-\d+-of-\d+\.safetensors", name)
    )


def _peft_folder_file(name: str) -> bool:
    from rwkv_disha.adapters.peft_folder import CONFIG_NAME, WEIGHTS_NAME

    return name in (CONFIG_NAME, WEIGHTS_NAME)


def _sidecar(file, cfg) -> dict:
    meta = file.meta or {}
    return {"adapter": cfg.to_dict(), "base": meta.get("base"), "weight_dtype": meta.get("weight_dtype")}


def run(cfg: Config) -> int:
    from rwkv_disha.adapters.adapter_file import apply_lora_alpha, open_adapter_file, write_adapter_file
    from rwkv_disha.adapters.config import AdapterConfig
    from rwkv_disha.adapters.peft_folder import write_peft_folder
    from rwkv_disha.adapters.pissa import pissa_as_lora

    if cfg.format == "hf":
        return export_hf(cfg)
    for flag in ("peft_checkpoint", "output"):
        if not getattr(cfg, flag):
            raise RWKVDishaError(
                f"--{flag} is required: rwkv-disha export --peft_checkpoint rwkv-N.pth --format peft "
                f"--output FOLDER"
            )
    if not cfg.lora_alpha >= 0:
        raise RWKVDishaError(f"--lora_alpha must be > 0 (or 0: from the sidecar), got {cfg.lora_alpha:g}")
    src = Path(cfg.peft_checkpoint)
    out = _check_output(cfg, [src, *([Path(cfg.lora_init)] if cfg.lora_init else [])])
    file = open_adapter_file(src, cfg.lora_alpha or None, cfg.lora_init)
    apply_lora_alpha(file, cfg.lora_alpha, print)  # the value written out, as merge would merge it
    acfg = file.cfg
    if not acfg.adapts_layers:
        raise RWKVDishaError(f"{file.source} holds {acfg.describe()}: export writes adapter layers only")
    if cfg.format == "peft":
        write_peft_folder(dict(file.tensors), acfg, out)
        print(f"exported {acfg.describe()} ({len(file.tensors)} tensors) -> peft folder {out}")
        return 0
    tensors, written = dict(file.tensors), acfg
    if cfg.format == "lora":
        if acfg.layer_class.kind != "pissa":
            raise RWKVDishaError(f"--format lora converts PiSSA files; {file.source} holds {acfg.describe()}")
        names = set(acfg.layer_class.adapter_names)
        layers: dict[str, dict] = {}
        tensors = {}
        for key, t in file.tensors.items():
            prefix, _, suffix = key.rpartition(".")
            if suffix in names:
                layers.setdefault(prefix, {})[suffix] = t
            else:
                tensors[key] = t
        for prefix, parts in layers.items():
            tensors.update({f"{prefix}.{k}": v for k, v in pissa_as_lora(parts).items()})
        values = {**acfg.to_dict(), "peft": "lora", "mode": "bone", "r": 2 * acfg.r}
        written = AdapterConfig.from_dict({**values, "lora_alpha": float(2 * acfg.r), "lora_dropout": 0.0})
    write_adapter_file(out, tensors, _sidecar(file, written))
    print(f"exported {acfg.describe()} -> {written.describe()} {out} (+ .json sidecar)")
    return 0


def export_hf(cfg: Config) -> int:
    """--format hf: config.json + model.safetensors in fla's RWKV-7 layout (hf_layout.py)."""
    from rwkv_disha.fsio import atomic_write_json, atomic_write_safetensors
    from rwkv_disha.hf_layout import UNUSED, hf_config, to_hf
    from rwkv_disha.model.load import load_state_dict

    if not cfg.load_model or not cfg.output:
        raise RWKVDishaError(
            "--load_model and --output are required: rwkv-disha export --format hf --load_model model.pth "
            "--output FOLDER"
        )
    if cfg.peft_checkpoint:
        raise RWKVDishaError(
            "--format hf converts a model: merge the adapter first (rwkv-disha merge), then export"
        )
    for flag in ("lora_alpha", "lora_init"):
        if getattr(cfg, flag):
            raise RWKVDishaError(
                f"--format hf converts a model and reads no --{flag}: drop it (merge takes it, with the "
                f"adapter)"
            )
    src = Path(cfg.load_model)
    out = _check_output(cfg, [src])
    sd = load_state_dict(src, what="model")
    if "blocks.0.att.r_k" not in sd or "emb.weight" not in sd:
        raise RWKVDishaError(f"{src} is not an RWKV-7 (x070) model: --format hf converts RWKV-7 only")
    conf = hf_config(sd)
    hf = to_hf(sd)
    atomic_write_safetensors(out / "model.safetensors", hf, {"format": "pt"}, what="HF model")
    atomic_write_json(out / "config.json", conf, what="HF config")
    # an old sharded model left in the folder would shadow the new model.safetensors on import: removed
    # only once the new one is written, and only files of the model's own names
    stale = [
        p
        for p in out.iterdir()
        if _hf_model_file(p.name) and p.name not in ("config.json", "model.safetensors")
    ]
    for p in stale:
        p.unlink()
    dropped = [k for k in sd if k in UNUSED]
    note = f" (dropped the unused {', '.join(dropped)})" if dropped else ""
    note += f" (removed the stale {', '.join(sorted(p.name for p in stale))})" if stale else ""
    print(f"exported {src} -> {out}: config.json + model.safetensors, {len(hf)} tensors{note}")
    return 0
