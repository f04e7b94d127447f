"""`rwkv-disha generate`: sample text from a base model with an adapter applied on the fly (no merge
needed) or from a merged model. Only the generated text goes to stdout, streamed; logs go to stderr.

The prompt is read once through the model; then one token at a time through the recurrent state, so
each new token costs one step, not a pass over the whole text.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from rwkv_disha.choices import OPS
from rwkv_disha.config import opt
from rwkv_disha.errors import RWKVDishaError


def check_input_file(path: str, flag: str) -> None:
    """One line for an input path that is missing or a directory (before anything loads)."""
    p = Path(path)
    if p.is_dir():
        raise RWKVDishaError(f"{flag} {path} is a directory; give the .pth file inside it")
    if not p.is_file():
        raise RWKVDishaError(f"{flag} {path}: file not found")


def check_finite(tensors, what: str) -> None:
    """Refuse NaN / inf in any floating-point tensor of ``tensors`` (name -> tensor): one line, not a
    traceback (or garbage text) later."""
    for name, t in tensors:
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise RWKVDishaError(
                f"{what} holds non-finite weights (NaN/inf), first in {name} — probably from a diverged "
                "run; use an earlier checkpoint, or retrain with a lower --lr_init / gradient clipping"
            )


def load_for_inference(model_path: str, adapter_path: str = "", op: str = "auto", lora_alpha: float = 0.0):
    """Base model (+ adapter file: its sidecar, or the tensor shapes for RWKV-PEFT files, gives the
    settings; a base quantized in training is quantized the same way) in fp32 eval mode. A model or
    adapter holding NaN / inf is refused."""
    from rwkv_disha.model.load import load_model

    model = load_model(model_path, dtype=torch.float32, op=op)
    check_finite(model.state_dict().items(), f"model {model_path}")
    if adapter_path:
        from rwkv_disha.adapters import inject_adapters, load_adapter_file, open_adapter_file

        adapter = open_adapter_file(adapter_path, lora_alpha or None)  # also refuses NaN / inf
        inject_adapters(model, adapter.cfg)
        load_adapter_file(model, adapter, adapter.cfg)
    return model.eval().requires_grad_(False)


def sample_token(
    logits: torch.Tensor, temperature: float, top_p: float, top_k: int, generator: torch.Generator
) -> int:
    """One id from logits (V,): greedy at temperature 0, else top-k, then nucleus (top-p) sampling."""
    if temperature <= 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_k > 0:
        kth = torch.topk(probs, min(top_k, probs.numel())).values[-1]
        probs = torch.where(probs >= kth, probs, 0.0)
    if 0 < top_p < 1:
        sorted_p, order = torch.sort(probs, descending=True)
        cum = torch.cumsum(sorted_p, dim=-1)
        keep = cum - sorted_p < top_p  # the smallest prefix whose mass reaches top_p
        probs = torch.zeros_like(probs).scatter(0, order, sorted_p * keep)
    return int(torch.multinomial(probs / probs.sum(), 1, generator=generator))


@torch.no_grad()
def generate_ids(
    model,
    prompt_ids: list[int],
    max_tokens: int,
    temperature: float = 1.0,
    top_p: float = 0.85,
    top_k: int = 0,
    seed: int = 0,
) -> Iterator[int]:
    """Yield new token ids (stops at token 0, which is not yielded)."""
    if not prompt_ids:
        prompt_ids = [0]  # an empty prompt starts from end-of-text, as after a document
    gen = torch.Generator().manual_seed(seed)
    logits, state = model(torch.tensor([prompt_ids]), return_state=True)
    for _ in range(max_tokens):
        tok = sample_token(logits[0, -1], temperature, top_p, top_k, gen)
        if tok == 0:
            return
        yield tok
        logits, state = model(torch.tensor([[tok]]), state=state, return_state=True)


def chat_prompt(text: str) -> str:
    from rwkv_disha.data.tokenizer import clean_turn

    return f"User: {clean_turn(text)}\n\nAssistant:"


@dataclass
class Config:
    load_model: str = opt("", "base or merged RWKV model (.pth / .safetensors)")
    peft_checkpoint: str = opt("", "adapter file (rwkv-N.pth) to apply on the fly; '' for a merged model")
    prompt: str = opt("", "prompt text; '' or '-' reads it from stdin")
    max_tokens: int = opt(200, "most new tokens to generate")
    temperature: float = opt(1.0, "sampling temperature; 0 = greedy")
    top_p: float = opt(0.85, "nucleus sampling mass (1 = off)")
    top_k: int = opt(0, "sample among the k most likely tokens (0 = off)")
    seed: int = opt(0, "random seed (same prompt + seed = same text)")
    stop: str = opt("", "stop when the output contains this string (chat mode: a blank line)")
    chat: bool = opt(False, "wrap the prompt as 'User: ...\\n\\nAssistant:' (RWKV chat format)")
    op: str = opt("auto", "WKV kernel: auto, torch, loop, fla", OPS)
    lora_alpha: float = opt(0.0, "LoRA alpha for RWKV-PEFT LoRA files without a sidecar")


def validate(cfg: Config) -> None:
    """Every option checked before the model loads (non-finite floats are refused by the CLI)."""
    from rwkv_disha.kernels import resolve_op

    if not cfg.load_model:
        raise RWKVDishaError(
            "--load_model is required: a base model (with --peft_checkpoint) or a merged model"
        )
    check_input_file(cfg.load_model, "--load_model")
    if cfg.peft_checkpoint:
        check_input_file(cfg.peft_checkpoint, "--peft_checkpoint")
    if cfg.max_tokens < 0:
        raise RWKVDishaError(f"--max_tokens must be >= 0, got {cfg.max_tokens}")
    if cfg.temperature < 0:
        raise RWKVDishaError(f"--temperature must be >= 0 (0 = greedy), got {cfg.temperature}")
    if not 0 < cfg.top_p <= 1:
        raise RWKVDishaError(f"--top_p must be in (0, 1] (1 = off), got {cfg.top_p}")
    if cfg.top_k < 0:
        raise RWKVDishaError(f"--top_k must be >= 0 (0 = off), got {cfg.top_k}")
    if cfg.lora_alpha < 0:
        raise RWKVDishaError(f"--lora_alpha must be >= 0 (0 = from the sidecar), got {cfg.lora_alpha}")
    if not 0 <= cfg.seed < 2**64:
        raise RWKVDishaError(f"--seed must be in [0, 2**64), got {cfg.seed}")
    resolve_op(cfg.op)


def run(cfg: Config) -> int:
    from rwkv_disha.data.tokenizer import get_tokenizer

    validate(cfg)
    prompt = cfg.prompt if cfg.prompt not in ("", "-") else sys.stdin.read()
    stop = cfg.stop
    if cfg.chat:
        prompt = chat_prompt(prompt)
        stop = stop or "\n\n"
    model = load_for_inference(cfg.load_model, cfg.peft_checkpoint, cfg.op, cfg.lora_alpha)
    tok = get_tokenizer()
    ids = tok.encode(prompt)
    vocab = model.config.vocab_size
    if ids and max(ids) >= vocab:
        raise RWKVDishaError(
            f"the prompt has World-tokenizer ids up to {max(ids)} but the model's vocabulary is {vocab}: "
            "use a model with the 65536-token World vocabulary"
        )
    print(f"[{len(ids)} prompt tokens, {model.config.summary()}]", file=sys.stderr)
    out_ids: list[int] = []
    shown = ""
    for t in generate_ids(model, ids, cfg.max_tokens, cfg.temperature, cfg.top_p, cfg.top_k, cfg.seed):
        out_ids.append(t)
        text = tok.decode(out_ids)
        if stop and stop in text:
            text = text[: text.index(stop)]
            sys.stdout.write(text[len(shown) :])
            shown = text
            break
        if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
            sys.stdout.write(text[len(shown) :])
            sys.stdout.flush()
            shown = text
    final = tok.decode(out_ids)
    if not stop or stop not in final:
        sys.stdout.write(final[len(shown) :])
    sys.stdout.write("\n")
    sys.stdout.flush()
    return 0
