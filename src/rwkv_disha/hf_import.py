"""`rwkv-disha import`: a Hugging Face RWKV-7 folder (fla's layout: config.json + safetensors) -> an official
`.pth` that the `rwkv` package, RWKV-PEFT and rwkv-disha load (rwkv_disha/hf_layout.py has the mapping).

    rwkv-disha import --hf_model fla-hub-rwkv7-0.1B --output RWKV-x070-0.1B.pth

Reads `model.safetensors`, or the shards a `model.safetensors.index.json` names.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from rwkv_disha.config import opt
from rwkv_disha.errors import RWKVDishaError


@dataclass
class Config:
    hf_model: str = opt("", "the Hugging Face RWKV-7 folder (config.json + model.safetensors or shards)")
    output: str = opt("", "the .pth (or .safetensors) to write, official key names and order")
    overwrite: bool = opt(False, "replace an existing --output file")


def read_hf_folder(folder: Path) -> dict:
    """Every tensor of an HF model folder (single file or shards), by HF name."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not folder.is_dir():
        raise RWKVDishaError(f"--hf_model {folder} is not a folder: give the folder holding config.json")
    try:
        conf = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RWKVDishaError(
            f"--hf_model {folder} has no config.json: it is not a Hugging Face model"
        ) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RWKVDishaError(
            f"{folder / 'config.json'} is not valid JSON ({str(e).splitlines()[0]})"
        ) from None
    if not isinstance(conf, dict) or conf.get("model_type") != "rwkv7":
        got = conf.get("model_type") if isinstance(conf, dict) else None
        raise RWKVDishaError(f"--hf_model {folder} holds model_type {got!r}: only rwkv7 imports")
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
            raise RWKVDishaError(f"{index} is not a safetensors index (no weight_map)") from None
    elif (folder / "model.safetensors").is_file():
        shards = ["model.safetensors"]
    else:
        raise RWKVDishaError(f"--hf_model {folder} has no model.safetensors (nor an index of shards)")
    tensors: dict = {}
    for shard in shards:
        try:
            tensors.update(load_file(str(folder / shard)))
        except (SafetensorError, OSError) as e:
            raise RWKVDishaError(f"{folder / shard} is not a readable safetensors file ({e})") from None
    return tensors


def run(cfg: Config) -> int:
    from rwkv_disha.fsio import check_output_path
    from rwkv_disha.hf_layout import from_hf
    from rwkv_disha.model.load import save_state_dict

    if not cfg.hf_model or not cfg.output:
        raise RWKVDishaError(
            "--hf_model and --output are required: rwkv-disha import --hf_model FOLDER --output m.pth"
        )
    out = check_output_path(cfg.output, overwrite=cfg.overwrite)
    sd = from_hf(read_hf_folder(Path(cfg.hf_model)))
    save_state_dict(sd, out, what="imported model")
    print(f"imported {cfg.hf_model} -> {out} ({len(sd)} tensors)")
    return 0
