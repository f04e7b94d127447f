"""RWKV-7 in the Hugging Face layout of fla's hub models (``config.json`` + safetensors), both ways.

    ours (official .pth)                    Hugging Face (fla / rwkv7-hf)
    emb.weight                              model.embeddings.weight
    blocks.i.ln0 / ln1 / ln2 .weight/.bias  model.layers.i.pre_norm / attn_norm / ffn_norm .weight/.bias
    blocks.i.att.receptance/key/value/output.weight   model.layers.i.attn.r_proj/k_proj/v_proj/o_proj.weight
    blocks.i.att.ln_x.weight/.bias          model.layers.i.attn.g_norm.weight/.bias
    blocks.i.att.X1 (C, D)                  model.layers.i.attn.X_lora.lora.0.weight (D, C)   X in w a v g
    blocks.i.att.X2 (D, C)                  model.layers.i.attn.X_lora.lora.2.weight (C, D)
    blocks.i.att.X0 (1, 1, C)               model.layers.i.attn.X_lora.lora.2.bias (C,)       X in w a v
    blocks.i.att.k_k, k_a (1, 1, C)         model.layers.i.attn.k_k, k_a (C,)
    blocks.i.att.x_r.. x_g (1,1,C), r_k (H, N)        model.layers.i.attn.x_r.. x_g, r_k (same shapes)
    blocks.i.ffn.x_k (1, 1, C)              model.layers.i.ffn.x_k (C,)
    blocks.i.ffn.key/value.weight           model.layers.i.ffn.key/value.weight
    ln_out.weight/.bias, head.weight        model.norm.weight/.bias, lm_head.weight

Each rule is written once (:func:`hf_name`) and read both ways, so export -> import gives back every tensor
exactly (values and dtypes). The unused ``blocks.0.att.v0/v1/v2`` of some releases have no HF tensor and
are dropped, as fla's converter drops them.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch

from rwkv_disha.errors import RWKVDishaError

Tensor = torch.Tensor

_TOP = {
    "emb.weight": "model.embeddings.weight",
    "ln_out.weight": "model.norm.weight",
    "ln_out.bias": "model.norm.bias",
    "head.weight": "lm_head.weight",
}
_BLOCK_PART = {"att": "attn", "ffn": "ffn", "ln0": "pre_norm", "ln1": "attn_norm", "ln2": "ffn_norm"}
_ATT_NAME = {"receptance": "r_proj", "key": "k_proj", "value": "v_proj", "output": "o_proj", "ln_x": "g_norm"}
_LORA = {"1": ("lora.0.weight", "t"), "2": ("lora.2.weight", "t"), "0": ("lora.2.bias", "flat")}
_FLAT = {("attn", "k_k"), ("attn", "k_a"), ("ffn", "x_k")}  # (1, 1, C) here, (C,) there
UNUSED = {"blocks.0.att.v0", "blocks.0.att.v1", "blocks.0.att.v2"}


def hf_name(name: str) -> tuple[str, str]:
    """Our tensor name -> (its HF name, how the tensor changes: "same", "t" (transpose) or "flat")."""
    if name in _TOP:
        return _TOP[name], "same"
    parts = name.split(".")
    if len(parts) < 4 or parts[0] != "blocks" or not parts[1].isdigit() or parts[2] not in _BLOCK_PART:
        raise RWKVDishaError(f"{name} is not an RWKV-7 tensor name: only RWKV-7 (x070) models convert")
    part = _BLOCK_PART[parts[2]]
    rest = parts[3:]
    how = "same"
    if part == "attn" and re.fullmatch(r"[wavg][012]", rest[0]):
        suffix, how = _LORA[rest[0][1]]
        rest = [f"{rest[0][0]}_lora", *suffix.split(".")]
    elif part == "attn" and rest[0] in _ATT_NAME:
        rest = [_ATT_NAME[rest[0]], *rest[1:]]
    elif (part, rest[0]) in _FLAT:
        how = "flat"
    return ".".join(["model.layers", parts[1], part, *rest]), how


def official_names(n_layer: int) -> list[str]:
    """Every tensor name an RWKV-7 of n_layer blocks can have, in the official order (SPEC section 1)."""
    names = ["emb.weight"]
    for i in range(n_layer):
        b = f"blocks.{i}"
        names += [f"{b}.{ln}.{wb}" for ln in ("ln0", "ln1", "ln2") for wb in ("weight", "bias")]
        names += [f"{b}.att.x_{x}" for x in "rwkvag"]
        names += [f"{b}.att.{x}{n}" for x in "wavg" for n in "012" if x + n != "g0"]  # the gate has no bias
        names += [f"{b}.att.{p}" for p in ("k_k", "k_a", "r_k")]
        names += [f"{b}.att.{m}.weight" for m in ("receptance", "key", "value", "output")]
        names += [f"{b}.att.ln_x.weight", f"{b}.att.ln_x.bias"]
        names += [f"{b}.ffn.x_k", f"{b}.ffn.key.weight", f"{b}.ffn.value.weight"]
    return [*names, "ln_out.weight", "ln_out.bias", "head.weight"]


def to_hf(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Our RWKV-7 state dict -> the HF one (own-storage contiguous copies, ready for safetensors)."""
    out: dict[str, Tensor] = {}
    for name, t in sd.items():
        if name in UNUSED:
            continue
        theirs, how = hf_name(name)
        t = t.detach()
        t = t.t() if how == "t" else t.reshape(-1) if how == "flat" else t
        out[theirs] = t.contiguous().clone()
    return out


def from_hf(hf: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The HF state dict -> ours, in the official key order."""
    layers = {int(m.group(1)) for k in hf if (m := re.match(r"model\.layers\.(\d+)\.", k))}
    names = official_names(max(layers) + 1 if layers else 0)
    table = {hf_name(name)[0]: name for name in names}
    unknown = [k for k in hf if k not in table]
    if unknown:
        raise RWKVDishaError(
            f"the HF model holds tensors that are not RWKV-7's ({', '.join(unknown[:3])}): only fla's RWKV-7 "
            f"layout (model.layers.N.attn.r_proj.weight, ...) imports"
        )
    rank = {name: i for i, name in enumerate(names)}
    ours: dict[str, Tensor] = {}
    for theirs in sorted(hf, key=lambda k: rank[table[k]]):
        name, t = table[theirs], hf[theirs]
        how = hf_name(name)[1]
        ours[name] = t.t().contiguous() if how == "t" else t.reshape(1, 1, -1) if how == "flat" else t
    return ours


def hf_config(sd: Mapping[str, Tensor]) -> dict[str, Any]:
    """config.json for an RWKV-7 state dict (every width read from the tensors)."""
    n_layer = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    vocab, c = sd["emb.weight"].shape
    heads, head_dim = sd["blocks.0.att.r_k"].shape
    ffn = sd["blocks.0.ffn.key.weight"].shape[0]
    v_rank = sd["blocks.1.att.v1"].shape[1] if "blocks.1.att.v1" in sd else 32
    dtype = str(sd["emb.weight"].dtype).replace("torch.", "")
    return {
        "architectures": ["RWKV7ForCausalLM"],
        "model_type": "rwkv7",
        "vocab_size": int(vocab),
        "hidden_size": int(c),
        "num_hidden_layers": int(n_layer),
        "num_heads": int(heads),
        "head_dim": int(head_dim),
        "attention_hidden_size": int(heads * head_dim),
        "intermediate_size": int(ffn),
        "hidden_ratio": ffn / c,
        "decay_low_rank_dim": int(sd["blocks.0.att.w1"].shape[1]),
        "a_low_rank_dim": int(sd["blocks.0.att.a1"].shape[1]),
        "gate_low_rank_dim": int(sd["blocks.0.att.g1"].shape[1]),
        "v_low_rank_dim": int(v_rank),
        "value_dim": [int(heads * head_dim)] * int(n_layer),
        "norm_eps": 1e-5,  # LayerNorms; the GroupNorm ln_x uses head_dim * norm_eps = 64e-5 (docs/MODEL.md)
        "norm_bias": True,
        "tie_word_embeddings": False,
        "attn_mode": "chunk",
        "fuse_norm": False,
        "use_cache": True,
        "bos_token_id": 0,
        "eos_token_id": 0,
        "torch_dtype": dtype,
    }
