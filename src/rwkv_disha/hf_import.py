"""`rwkv-disha import`: a Hugging Face RWKV-7 folder (fla's layout: config.json + safetensors) -> an official
`.pth` that the `rwkv` package, RWKV-PEFT and rwkv-disha load (rwkv_disha/hf_layout.py has the mapping).

    rwkv-disha import --hf_model fla-hub-rwkv7-0.1B --output RWKV-x070-0.1B.pth

Reads `model.safetensors`, or the shards a `model.safetensors.index.json` names (never both), and writes
only a model that is exactly an official RWKV-7 agreeing with config.json.
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


def _shard_names(index: Path) -> list[str]:
    """The shard file names an index names, each refused unless a plain name inside the folder."""
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        values = list(weight_map.values())
    # ValueError: bad JSON / UTF-8, an integer of > 4300 digits; RecursionError: nested too deeply
    except (ValueError, RecursionError, KeyError, TypeError, AttributeError):
        raise RWKVDishaError(f"{index} is not a safetensors index (no weight_map)") from None
    for name in values:
        # a shard outside the folder (absolute, ../, a sub-path) would read a file the user did not give
        if not isinstance(name, str) or not name or name in (".", "..") or "/" in name or "\\" in name:
            raise RWKVDishaError(
                f"{index} names the shard {name!r}: a shard must be a file name in the same folder; "
                "fix the weight_map"
            )
    return sorted(set(values))


def hf_files(folder: Path) -> tuple[dict, list[Path]]:
    """config.json's contents and every file an import of ``folder`` reads (config, index, shards)."""
    if not folder.is_dir():
        raise RWKVDishaError(f"--hf_model {folder} is not a folder: give the folder holding config.json")
    config = folder / "config.json"
    if config.exists() and not config.is_file():  # a FIFO would be waited on forever
        raise RWKVDishaError(f"{config} is not a regular file (a FIFO, device or folder); it must be JSON")
    try:
        conf = json.loads(config.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RWKVDishaError(
            f"--hf_model {folder} has no config.json: it is not a Hugging Face model"
        ) from None
    except (ValueError, RecursionError) as e:  # + an integer of > 4300 digits, nesting too deep
        raise RWKVDishaError(f"{config} is not valid JSON ({str(e).splitlines()[0]})") from None
    if not isinstance(conf, dict) or conf.get("model_type") != "rwkv7":
        got = conf.get("model_type") if isinstance(conf, dict) else None
        raise RWKVDishaError(f"--hf_model {folder} holds model_type {got!r}: only rwkv7 imports")
    index, single = folder / "model.safetensors.index.json", folder / "model.safetensors"
    if index.is_file() and single.is_file():
        # a leftover index would shadow the real weights (or the other way round): no guessing which
        raise RWKVDishaError(
            f"--hf_model {folder} holds both model.safetensors and model.safetensors.index.json: "
            "remove the stale one (and its shards)"
        )
    if index.is_file():
        shards = _shard_names(index)
        for name in shards:
            if (folder / name).exists() and not (folder / name).is_file():  # a FIFO: waited on forever
                raise RWKVDishaError(
                    f"{index} names the shard {name}, which is not a regular file (a FIFO, device or folder)"
                )
        return conf, [folder / "config.json", index, *(folder / s for s in shards)]
    if single.is_file():
        return conf, [folder / "config.json", single]
    raise RWKVDishaError(f"--hf_model {folder} has no model.safetensors (nor an index of shards)")


def read_hf_folder(folder: Path) -> dict:
    """Every tensor of an HF model folder (single file or shards), by HF name."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    _, files = hf_files(folder)
    tensors: dict = {}
    for path in files:
        if path.suffix != ".safetensors":
            continue
        try:
            tensors.update(load_file(str(path)))
        except (SafetensorError, OSError, ValueError) as e:
            raise RWKVDishaError(f"{path} is not a readable safetensors file ({e})") from None
    return tensors


# config.json field -> the ModelConfig attribute it must equal
_CONFIG_FIELDS = {
    "hidden_size": "n_embd",
    "num_hidden_layers": "n_layer",
    "vocab_size": "vocab_size",
    "head_dim": "head_size",
    "num_heads": "n_head",
}


def check_imported(sd: dict, conf: dict, folder: Path):
    """Refuse a converted model that is not exactly an official RWKV-7 or disagrees with config.json."""

    from rwkv_disha.model.load import infer_config, non_finite_names

    where = f"--hf_model {folder}"
    cfg = infer_config(sd, source=where)  # every key, shape and dtype against the registry's layout
    for field, attr in _CONFIG_FIELDS.items():
        if field not in conf:
            continue
        value, want = conf[field], getattr(cfg, attr)
        if type(value) is not int or value != want:  # bool and 64.0 / "64" are not widths
            raise RWKVDishaError(
                f"{folder / 'config.json'} has {field} {value!r} but the tensors give {want}: "
                f"fix config.json ({field}: {want}) or the weights"
            )
    bad = non_finite_names(sd)
    if bad:
        raise RWKVDishaError(
            f"{where} has NaN / inf values in {', '.join(bad[:3])}: the weights are damaged; "
            "download them again"
        )
    return cfg


def run(cfg: Config) -> int:
    from rwkv_disha.fsio import check_output_path
    from rwkv_disha.hf_layout import from_hf
    from rwkv_disha.model.load import save_state_dict

    if not cfg.hf_model or not cfg.output:
        raise RWKVDishaError(
            "--hf_model and --output are required: rwkv-disha import --hf_model FOLDER --output m.pth"
        )
    folder = Path(cfg.hf_model)
    out = check_output_path(cfg.output, overwrite=cfg.overwrite)
    conf, files = hf_files(folder)
    if any(out.resolve() == f.resolve() for f in files):
        raise RWKVDishaError(f"--output {out} would overwrite an input of --hf_model: choose another name")
    sd = from_hf(read_hf_folder(folder))
    check_imported(sd, conf, folder)
    save_state_dict(sd, out, what="imported model")
    print(f"imported {cfg.hf_model} -> {out} ({len(sd)} tensors)")
    return 0
