"""`rwkv-disha export`: write an adapter in the format the next tool reads (docs/MIGRATING.md).

    rwkv-disha export --peft_checkpoint out/rwkv-3.pth --format peft --output out/peft-adapter
        a Hugging Face peft folder (adapter_config.json + adapter_model.safetensors) that
        peft.PeftModel.from_pretrained loads onto an RWKV-7 module: Bone / MiSS -> MISS, LoRA / PiSSA -> LORA
    rwkv-disha export --peft_checkpoint out/rwkv-3.pth --format lora --output out/lora.pth
        PiSSA -> the plain LoRA of rank 2r with the same ΔW (merges onto the released base)
    rwkv-disha export --peft_checkpoint peft-folder --format pth --output out/rwkv-0.pth
        any adapter we read (a peft folder too) -> our .pth + .json sidecar (RWKV-PEFT's merge reads the .pth)

The input is read by the same reader as merge / generate / eval / train, so it accepts and refuses the same
files. RWKV-PEFT's Bat has no peft form: one line says so.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from rwkv_disha.config import opt
from rwkv_disha.errors import RWKVDishaError

FORMATS = ("peft", "lora", "pth")


@dataclass
class Config:
    peft_checkpoint: str = opt("", "the adapter: rwkv-N.pth (ours or RWKV-PEFT's) or a peft adapter folder")
    format: str = opt("peft", "peft: a peft folder; lora: PiSSA as plain LoRA .pth; pth: our .pth", FORMATS)
    output: str = opt("", "where to write: a folder for --format peft, a .pth file otherwise")
    lora_alpha: float = opt(0.0, "LoRA alpha, needed only for a LoRA file without its .json sidecar")
    overwrite: bool = opt(False, "replace an existing --output")


def _check_output(cfg: Config, inputs: list[Path]) -> Path:
    from rwkv_disha.fsio import check_output_path

    out = Path(cfg.output)
    if any(out.resolve() == p.resolve() for p in inputs):
        raise RWKVDishaError(f"--output {out} is the input: choose another name")
    if cfg.format == "peft":
        if out.exists() and not out.is_dir():
            raise RWKVDishaError(f"--output {out} is a file: --format peft writes a folder")
        if out.is_dir() and any(out.iterdir()) and not cfg.overwrite:
            raise RWKVDishaError(
                f"--output {out} is a folder that is not empty: choose another or --overwrite 1"
            )
        return out
    return check_output_path(out, overwrite=cfg.overwrite)


def _sidecar(file, cfg) -> dict:
    meta = file.meta or {}
    return {"adapter": cfg.to_dict(), "base": meta.get("base"), "weight_dtype": meta.get("weight_dtype")}


def run(cfg: Config) -> int:
    from rwkv_disha.adapters.adapter_file import open_adapter_file, write_adapter_file
    from rwkv_disha.adapters.config import AdapterConfig
    from rwkv_disha.adapters.peft_folder import write_peft_folder
    from rwkv_disha.adapters.pissa import pissa_as_lora

    for flag in ("peft_checkpoint", "output"):
        if not getattr(cfg, flag):
            raise RWKVDishaError(
                f"--{flag} is required: rwkv-disha export --peft_checkpoint rwkv-N.pth --format peft "
                f"--output FOLDER"
            )
    if not cfg.lora_alpha >= 0:
        raise RWKVDishaError(f"--lora_alpha must be > 0 (or 0: from the sidecar), got {cfg.lora_alpha:g}")
    src = Path(cfg.peft_checkpoint)
    out = _check_output(cfg, [src])
    file = open_adapter_file(src, cfg.lora_alpha or None)
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
