"""Read, check and write RWKV checkpoints; infer the model shape from keys and tensor shapes (SPEC §1).

Checkpoints come from the internet, so ``.pth`` files load with ``weights_only=True`` (pickled code is
refused, never run) and ``mmap=True`` (a 15 GB bf16 model loads without a second copy in RAM).
"""

from __future__ import annotations

import os
import pickle
import re
import tempfile
from pathlib import Path

import torch

from rwkv_disha.config import ModelConfig
from rwkv_disha.errors import RWKVDishaError

SAFETENSORS_SUFFIXES = (".safetensors", ".st")
SUPPORTED_VERSIONS = ("x070",)
_VERSION_NAMES = {"x070": "RWKV-7", "x060": "RWKV-6", "x052": "RWKV-5", "x040": "RWKV-4"}
_BLOCK = re.compile(r"^blocks\.(\d+)\.")


def load_state_dict(path: str | os.PathLike, what: str = "model") -> dict[str, torch.Tensor]:
    """Memory-map a ``.pth`` (or read a ``.safetensors``/``.st``) file into a dict of tensors."""
    p = Path(path)
    if not p.exists():
        raise RWKVDishaError(f"{what} file not found: {p} (check the path)")
    if p.is_dir():
        raise RWKVDishaError(f"{what} path {p} is a directory; give the .pth file inside it")
    if p.suffix in SAFETENSORS_SUFFIXES:
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(p))
        except (SafetensorError, OSError, ValueError) as e:
            raise RWKVDishaError(f"{p} is not a readable safetensors file ({e})") from None
    try:
        try:
            obj = torch.load(p, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):  # legacy (non-zip) torch files cannot be memory-mapped
                raise
            obj = torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else "unpickling failed"
        if "weights only" in str(e).lower() or "weights_only" in str(e).lower():
            raise RWKVDishaError(
                f"{p} needs pickled Python code to load, which is refused for safety (weights_only); "
                "re-save it as a plain dict of tensors (torch.save(state_dict, path))"
            ) from None
        raise RWKVDishaError(f"{p} is not a torch checkpoint or is truncated ({first})") from None
    except Exception as e:  # torch raises RuntimeError, KeyError, EOFError... for damaged files
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise RWKVDishaError(
            f"{p} is not a torch checkpoint or is truncated ({first}); download or copy it again"
        ) from None
    if not isinstance(obj, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    ):
        raise RWKVDishaError(f"{p} does not hold a state dict (a dict of name -> tensor)")
    return obj


def detect_version(sd: dict[str, torch.Tensor]) -> str:
    """'x070' / 'x060' / 'x052' / 'x040' from the keys, or raise naming a few unexpected keys."""
    keys = list(sd)
    if any(k.endswith(".disha") or ".lora_" in k for k in keys) and "emb.weight" not in sd:
        raise RWKVDishaError(
            "this is an adapter checkpoint (*.disha / lora_* tensors), not a base model: "
            "give it as --peft_checkpoint (merge/generate) or disha_config 'load', and the base as the model"
        )
    if "emb.weight" not in sd or not any(_BLOCK.match(k) for k in keys):
        sample = ", ".join(keys[:5]) or "(no keys)"
        raise RWKVDishaError(
            f"not an RWKV checkpoint: expected emb.weight and blocks.N.* keys, found e.g. {sample}"
        )
    if any(k.endswith("att.r_k") for k in keys):
        return "x070"
    if any(k.endswith("att.time_maa_x") for k in keys):
        return "x060"
    if any(k.endswith("att.time_faaaa") for k in keys):
        return "x052"
    if any(k.endswith("att.time_mix_k") for k in keys):
        return "x040"
    sample = ", ".join(k for k in keys if k.startswith("blocks.0.att."))[:200]
    raise RWKVDishaError(f"unrecognised RWKV version: block 0 attention has keys {sample}")


def infer_config(sd: dict[str, torch.Tensor]) -> ModelConfig:
    """The whole model shape from keys and tensor shapes; refuses versions not supported yet."""
    version = detect_version(sd)
    if version not in SUPPORTED_VERSIONS:
        raise RWKVDishaError(
            f"{_VERSION_NAMES[version]} ({version}) checkpoints are not supported yet; "
            f"supported: {', '.join(_VERSION_NAMES[v] + ' (' + v + ')' for v in SUPPORTED_VERSIONS)}"
        )
    vocab, n_embd = sd["emb.weight"].shape
    n_layer = 1 + max(int(m.group(1)) for k in sd if (m := _BLOCK.match(k)))

    def width(key: str, dim: int, default: int = 0) -> int:
        return int(sd[key].shape[dim]) if key in sd else default

    return ModelConfig(
        version=version,
        n_layer=n_layer,
        n_embd=int(n_embd),
        vocab_size=int(vocab),
        head_size=width("blocks.0.att.r_k", 1),
        dim_ffn=width("blocks.0.ffn.key.weight", 0),
        d_decay=width("blocks.0.att.w1", 1),
        d_aaa=width("blocks.0.att.a1", 1),
        d_mv=width("blocks.1.att.v1", 1, default=32),  # block 0 has no v1/v2
        d_gate=width("blocks.0.att.g1", 1),
    )


def check_expected(cfg: ModelConfig, **given: int | str | None) -> None:
    """Refuse user-given shape flags that disagree with the checkpoint (0 / None / '' mean 'infer')."""
    for name, value in given.items():
        if value in (None, 0, ""):
            continue
        have = cfg.version if name == "my_testing" else getattr(cfg, name)
        if name == "my_testing":
            value = str(value).lower().replace("rwkv", "").strip("-_")
            if value.startswith("x07"):  # x070, x070rc4a, ... are all RWKV-7
                value = "x070"
        if value != have:
            raise RWKVDishaError(
                f"--{name} {value} disagrees with the checkpoint, which has {name} = {have} "
                f"({cfg.summary()}); drop the flag to infer it, or pick the matching model file"
            )


def build_model(cfg: ModelConfig, op: str = "auto", device: str | torch.device = "meta"):
    from rwkv_disha.model.rwkv7 import RWKV7

    with torch.device(device):
        return RWKV7(cfg, op=op)


def load_model(
    path: str | os.PathLike,
    dtype: torch.dtype | None = None,
    op: str = "auto",
    device: str | torch.device = "cpu",
    **expected: int | str | None,
):
    """Load an official RWKV-7 checkpoint into :class:`~rwkv_disha.model.rwkv7.RWKV7` (strict).

    ``dtype`` None keeps the file's dtype (bf16 stays bf16). ``expected`` takes n_layer, n_embd,
    vocab_size, head_size, my_testing: each, if given, must match what the file has.
    """
    sd = load_state_dict(path)
    cfg = infer_config(sd)
    check_expected(cfg, **expected)
    model = build_model(cfg, op=op)
    expected_keys = set(model.state_dict())
    missing, unexpected = sorted(expected_keys - set(sd)), sorted(set(sd) - expected_keys)
    if missing or unexpected:
        raise RWKVDishaError(
            f"{path} does not match the RWKV-7 layout for {cfg.summary()}: "
            f"missing {missing[:4]}, unexpected {unexpected[:4]}"
        )
    bad = [
        f"{k} {tuple(sd[k].shape)} != {tuple(t.shape)}"
        for k, t in model.state_dict().items()
        if sd[k].shape != t.shape
    ]
    if bad:
        raise RWKVDishaError(f"{path} has tensors of unexpected shape: {'; '.join(bad[:3])}")
    model.load_state_dict(sd, strict=True, assign=True)  # assign: keep the mmap'ed tensors, no copy
    if dtype is not None or device != "cpu":
        model.to(device=device, dtype=dtype)
    return model


def save_state_dict(sd: dict[str, torch.Tensor], path: str | os.PathLike) -> Path:
    """Write atomically (temp file + rename): a failure never leaves a partial file at ``path``."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent)
    os.close(fd)
    try:
        if p.suffix in SAFETENSORS_SUFFIXES:
            from safetensors.torch import save_file

            save_file({k: v.contiguous() for k, v in sd.items()}, tmp)
        else:
            torch.save(sd, tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600 files; give the usual permissions
        os.replace(tmp, p)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return p
