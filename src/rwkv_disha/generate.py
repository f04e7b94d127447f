"""`rwkv-disha generate`: sample text from a base model with an adapter applied on the fly (no merge
needed) or from a merged model. Only the generated text goes to stdout, streamed; logs go to stderr.

The prompt is read once through the model; then one token at a time through the recurrent state, so
each new token costs one step, not a pass over the whole text. --prompt_file gives several prompts (each
from a fresh state); --chat_loop holds a conversation read from stdin, one user turn per line, keeping the
state between turns. RWKV's repetition penalties (--alpha_presence, --alpha_frequency, --alpha_decay) lower
the logits of tokens already generated in the current reply.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import torch

from rwkv_disha.choices import OPS
from rwkv_disha.config import opt
from rwkv_disha.data.sft import SFT_END, SFT_PROMPT
from rwkv_disha.errors import RWKVDishaError
from rwkv_disha.model.load import hf_folder_error, is_hf_model_folder

MODEL_FLAGS = ("--load_model", "--compare")  # flags that may name a whole model (eval's --compare too)
# flags that name an adapter or state file: what each expects (a model folder there is the wrong input)
ADAPTER_FLAGS = {"--peft_checkpoint": "an adapter", "--state": "a state", "--state_checkpoint": "a state"}


def check_input_file(path: str, flag: str) -> None:
    """One line for an input path that is missing or a directory (before anything loads)."""
    from rwkv_disha.adapters.peft_folder import is_peft_folder

    p = Path(path)
    if flag != "--load_model" and is_peft_folder(p):  # a peft adapter folder is an adapter input
        return
    if (flag in MODEL_FLAGS or flag in ADAPTER_FLAGS) and is_hf_model_folder(p):
        raise hf_folder_error(f"{flag} {path}", p, ADAPTER_FLAGS.get(flag, "model"))
    if p.is_dir():
        fix = "a prompt file (.jsonl, or text)" if flag == "--prompt_file" else "the .pth file inside it"
        raise RWKVDishaError(f"{flag} {path} is a directory; give {fix}")
    if not p.is_file():
        raise RWKVDishaError(f"{flag} {path}: file not found")


def check_op_for_model(op: str, path: str) -> None:
    """Refuse a kernel that cannot run the heads of the model in ``path`` (its shape read by mmap, before
    a compiled kernel is built or the weights load)."""
    from rwkv_disha.kernels import check_op_fits
    from rwkv_disha.model.load import infer_config, load_state_dict

    mcfg = infer_config(load_state_dict(path), source=path)
    check_op_fits(op, mcfg.version, mcfg.head_size)


def check_finite(tensors, what: str) -> None:
    """Refuse NaN / inf in any floating-point tensor of ``tensors`` (name -> tensor): one line, not a
    traceback (or garbage text) later."""
    from rwkv_disha.model.load import non_finite_names

    bad = non_finite_names(tensors)
    if bad:
        raise RWKVDishaError(
            f"{what} holds non-finite weights (NaN/inf), first in {bad[0]} — probably from a diverged "
            "run; use an earlier checkpoint, or retrain with a lower --lr_init / gradient clipping"
        )


def _note(msg: str) -> None:
    """A notice on stderr: stdout carries only the generated text (generate) or the results (eval)."""
    print(msg, file=sys.stderr)


def open_adapter(path: str, lora_alpha: float = 0.0, log=_note):
    """Adapter file ``path`` read and checked, with --lora_alpha applied (``lora_alpha`` 0: none given):
    it settles a LoRA file without sidecar, replaces a sidecar's value (one notice to ``log``), and is
    refused for every other kind."""
    from rwkv_disha.adapters.adapter_file import apply_lora_alpha, open_adapter_file

    file = open_adapter_file(path, lora_alpha or None)  # also refuses NaN / inf
    apply_lora_alpha(file, lora_alpha, log)
    return file


def check_adapters(adapters: list[str], lora_alpha: float, where: str) -> None:
    """Open every adapter file before any model loads, so a bad one (or a LoRA file without sidecar and
    without --lora_alpha) is one line first; and refuse a --lora_alpha that is negative, has no adapter to
    scale (``where`` names the flags that give one), or meets an adapter that is not LoRA."""
    if not lora_alpha >= 0:
        raise RWKVDishaError(f"--lora_alpha must be > 0 (or 0: from the sidecar), got {lora_alpha:g}")
    if lora_alpha and not adapters:
        raise RWKVDishaError(
            f"--lora_alpha {lora_alpha:g} scales a LoRA adapter file, and none is given: "
            f"give one with {where}, or drop --lora_alpha"
        )
    for path in adapters:
        open_adapter(path, lora_alpha, log=lambda msg: None)  # the notice comes when it loads


def load_for_inference(
    model_path: str, adapter_path: str = "", op: str = "auto", lora_alpha: float = 0.0, state: str = ""
):
    """Base model (+ adapter file: its sidecar, or the tensor shapes for RWKV-PEFT files, gives the
    settings; a base quantized in training is quantized the same way) (+ a state file every sequence
    starts from) in fp32 eval mode. A model or adapter holding NaN / inf is refused. ``lora_alpha`` (0:
    none) replaces a LoRA sidecar's, with one notice on stderr, as merge does."""
    from rwkv_disha.model.load import load_model

    adapter = open_adapter(adapter_path, lora_alpha, log=_note) if adapter_path else None
    model = load_model(model_path, dtype=torch.float32, op=op)
    check_finite(model.state_dict().items(), f"model {model_path}")
    if adapter is not None:
        from rwkv_disha.adapters import inject_adapters, load_adapter_file

        inject_adapters(model, adapter.cfg)
        load_adapter_file(model, adapter, adapter.cfg)
    if state:
        from rwkv_disha.adapters.state import load_state_file

        load_state_file(model, state)  # replaces the adapter's own states, if it has any
    return model.eval().requires_grad_(False)


def sampling_probs(logits: torch.Tensor, temperature: float, top_p: float, top_k: int) -> torch.Tensor:
    """The probabilities :func:`sample_token` draws from, by the `rwkv` package's rules
    (``PIPELINE.sample_logits``, as ChatRWKV and RWKV Runner): top-p (the likeliest tokens whose mass
    reaches ``top_p``, with every token tied at the cutoff) and top-k choose the tokens from the
    probabilities at temperature 1; the temperature then reshapes the probabilities among them
    (``p ** (1 / temperature)``), so it never lets more tokens in. Greedy (the argmax alone) at temperature
    0. Unlike the package, ``top_p`` 1 keeps every token (its float32 sum often falls short of 1, and the
    package then keeps only the likeliest)."""
    logits = logits.float()
    # a temperature below float32's smallest normal is greedy in effect (any gap between logits becomes
    # inf), and one that rounds to 0 in float32 would divide 0 by 0: both take the argmax
    if temperature < torch.finfo(torch.float32).tiny:
        return torch.zeros_like(logits).index_fill(0, torch.argmax(logits).view(1), 1.0)
    probs = torch.softmax(logits, dim=-1)
    keep = torch.ones_like(probs, dtype=torch.bool)
    if top_p < 1:
        sorted_p = torch.sort(probs, descending=True).values
        reached = torch.nonzero(torch.cumsum(sorted_p, dim=-1) >= top_p).flatten()
        if len(reached):  # a top_p below float32's range compares as 0: the likeliest token(s)
            keep &= probs >= sorted_p[reached[0]]
    if 0 < top_k < probs.numel():
        keep &= probs >= torch.topk(probs, top_k).values[-1]
    # shifted so the best logit is 0: a tiny temperature then sends the others to -inf (greedy), not inf / inf
    scaled = torch.where(keep, (logits - logits.max()) / temperature, -torch.inf)
    return torch.softmax(scaled, dim=-1)


def sample_token(
    logits: torch.Tensor, temperature: float, top_p: float, top_k: int, generator: torch.Generator
) -> int:
    """One id from logits (V,) drawn from :func:`sampling_probs` (greedy at temperature 0)."""
    if temperature < torch.finfo(torch.float32).tiny:
        return int(torch.argmax(logits))
    return int(torch.multinomial(sampling_probs(logits, temperature, top_p, top_k), 1, generator=generator))


@dataclass
class Penalties:
    """RWKV's repetition penalties (the `rwkv` package's PIPELINE.generate, as ChatRWKV and RWKV
    Runner): before sampling, every token already generated in this reply has its logit lowered by
    ``presence + count * frequency``, where every count is multiplied by ``decay`` at each new token (so
    old repetitions are forgiven) and then the new token's grows by 1, or by 0 for a token whose text is
    part of ``" \\t0123456789"`` (a space, a tab, a digit, "01", ...: :func:`uncounted`), which so takes the
    presence penalty but never the frequency one. All zero: no penalty."""

    presence: float = 0.0
    frequency: float = 0.0
    decay: float = 0.996

    def apply(self, logits: torch.Tensor, counts: dict[int, float]) -> torch.Tensor:
        if not counts or (self.presence == 0 and self.frequency == 0):
            return logits
        ids = torch.tensor(list(counts))
        penalty = self.presence + torch.tensor(list(counts.values()), dtype=logits.dtype) * self.frequency
        return logits.index_put((ids,), logits[ids] - penalty)

    def update(self, counts: dict[int, float], tok: int) -> None:
        for k in counts:
            counts[k] *= self.decay
        counts[tok] = counts.get(tok, 0.0) + (0.0 if uncounted(tok) else 1.0)


@cache
def uncounted(tok: int) -> bool:
    """Whether generating ``tok`` adds nothing to its repetition count: the `rwkv` package's test
    ``decode([tok]) in " \\t0123456789"`` (space, tab, digits; also " \\t", "01", "12", ... "89" and the
    empty padding tokens, as a substring test does)."""
    from rwkv_disha.data.tokenizer import get_tokenizer

    return get_tokenizer().decode([tok]) in " \t0123456789"


class Session:
    """A model and its recurrent state: :meth:`feed` reads tokens, :meth:`reply` samples new ones and
    feeds each back, so the state always holds everything read and generated (a chat continues from it)."""

    def __init__(self, model):
        self.model, self.state, self.logits = model, None, None

    @torch.no_grad()
    def feed(self, ids: list[int]) -> None:
        logits, self.state = self.model(torch.tensor([ids]), state=self.state, return_state=True)
        self.logits = logits[0, -1]

    def reply(
        self,
        max_tokens: int,
        temperature: float,
        top_p: float,
        top_k: int,
        generator: torch.Generator,
        penalties: Penalties | None = None,
    ) -> Iterator[int]:
        """Yield new token ids; stops at token 0 (not yielded, not fed)."""
        penalties, counts = penalties or Penalties(), {}
        for _ in range(max_tokens):
            tok = sample_token(penalties.apply(self.logits, counts), temperature, top_p, top_k, generator)
            if tok == 0:
                return
            penalties.update(counts, tok)
            self.feed([tok])
            yield tok


def generate_ids(
    model,
    prompt_ids: list[int],
    max_tokens: int,
    temperature: float = 1.0,
    top_p: float = 0.85,
    top_k: int = 0,
    seed: int = 0,
    penalties: Penalties | None = None,
) -> Iterator[int]:
    """Yield new token ids after ``prompt_ids`` from a fresh state (stops at token 0, not yielded)."""
    session = Session(model)
    session.feed(prompt_ids or [0])  # an empty prompt starts from end-of-text, as after a document
    yield from session.reply(
        max_tokens, temperature, top_p, top_k, torch.Generator().manual_seed(seed), penalties
    )


def _wrapped(prompt: str, cfg: Config) -> str:
    """The prompt in the format --chat / --sft ask for (as is otherwise)."""
    if cfg.chat:
        return chat_prompt(prompt)
    return SFT_PROMPT.format(query=prompt) if cfg.sft else prompt


def chat_prompt(text: str) -> str:
    from rwkv_disha.data.tokenizer import clean_turn

    return f"User: {clean_turn(text)}\n\nAssistant:"


@dataclass
class Config:
    load_model: str = opt("", "base or merged RWKV model (.pth / .safetensors)")
    peft_checkpoint: str = opt("", "adapter file (rwkv-N.pth) to apply on the fly; '' for a merged model")
    state: str = opt("", "state file (rwkv-N.pth of --peft state): every sequence starts from its states")
    prompt: str = opt("", "prompt text; '' or '-' reads it from stdin")
    max_tokens: int = opt(200, "most new tokens to generate")
    temperature: float = opt(1.0, "sampling temperature; 0 = greedy")
    top_p: float = opt(0.85, "nucleus sampling mass (1 = off)")
    top_k: int = opt(0, "sample among the k most likely tokens (0 = off)")
    seed: int = opt(0, "random seed (same prompt + seed = same text)")
    stop: str = opt(
        "",
        "stop when the output contains this string; with --chat / --sft also at their own end of turn "
        "(a blank line / \\x17), whichever comes first",
    )
    chat: bool = opt(False, "wrap the prompt as 'User: ...\\n\\nAssistant:' (RWKV chat format)")
    sft: bool = opt(
        False,
        "wrap the prompt in RWKV-PEFT's SFT template ('### Instruction: ... ### Response:') and stop at its "
        "end-of-turn \\x17: how a --data_type sft model was trained",
    )
    prompt_file: str = opt(
        "",
        "several prompts, each from a fresh state: .jsonl (a string or {prompt: ...} per line) "
        "or text (prompts separated by blank lines)",
    )
    chat_loop: bool = opt(
        False, "a conversation: each stdin line is a user turn; the state carries over between turns"
    )
    alpha_presence: float = opt(0.0, "penalty on every token already in the reply (RWKV: 0.2-0.4; 0 = off)")
    alpha_frequency: float = opt(0.0, "penalty per (decayed) repetition of a token in the reply (0 = off)")
    alpha_decay: float = opt(0.996, "repetition counts are multiplied by this at every new token, in [0, 1]")
    op: str = opt("auto", "WKV kernel: auto, torch, loop, cpp (CPU), fla or cuda (GPU)", OPS)
    lora_alpha: float = opt(
        0.0,
        "LoRA alpha of --peft_checkpoint: needed for a LoRA file without its .json sidecar, and replaces the "
        "sidecar's value when given (0 = from the sidecar; refused for other adapter kinds)",
    )


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
    if cfg.state:
        check_input_file(cfg.state, "--state")
    if cfg.max_tokens < 0:
        raise RWKVDishaError(f"--max_tokens must be >= 0, got {cfg.max_tokens}")
    if cfg.temperature < 0:
        raise RWKVDishaError(f"--temperature must be >= 0 (0 = greedy), got {cfg.temperature}")
    if not 0 < cfg.top_p <= 1:
        raise RWKVDishaError(f"--top_p must be in (0, 1] (1 = off), got {cfg.top_p}")
    if cfg.top_k < 0:
        raise RWKVDishaError(f"--top_k must be >= 0 (0 = off), got {cfg.top_k}")
    if not 0 <= cfg.seed < 2**64:
        raise RWKVDishaError(f"--seed must be in [0, 2**64), got {cfg.seed}")
    for name in ("alpha_presence", "alpha_frequency"):
        if getattr(cfg, name) < 0:
            raise RWKVDishaError(f"--{name} must be >= 0 (0 = off), got {getattr(cfg, name)}")
    if not 0 <= cfg.alpha_decay <= 1:
        raise RWKVDishaError(f"--alpha_decay must be in [0, 1], got {cfg.alpha_decay}")
    if cfg.prompt_file:
        check_input_file(cfg.prompt_file, "--prompt_file")
        if cfg.prompt:
            raise RWKVDishaError("give --prompt or --prompt_file, not both")
    if cfg.sft and (cfg.chat or cfg.chat_loop):
        raise RWKVDishaError("--sft and --chat / --chat_loop are two prompt formats: give one")
    if cfg.chat_loop and (cfg.prompt or cfg.prompt_file):
        raise RWKVDishaError("--chat_loop reads the user's turns from stdin: drop --prompt / --prompt_file")
    adapters = [cfg.peft_checkpoint] if cfg.peft_checkpoint else []
    check_adapters(adapters, cfg.lora_alpha, "--peft_checkpoint")
    check_op_for_model(cfg.op, cfg.load_model)
    resolve_op(cfg.op)


def read_prompts(path: str) -> list[str]:
    """The prompts of --prompt_file: .jsonl, one JSON string or object with "prompt" (or "text") per
    line; any other file, UTF-8 text whose blank-line separated blocks are the prompts."""
    from rwkv_disha.data.records import is_json_file, parse_json_line, split_text

    raw = Path(path).read_bytes()
    prompts: list[str] = []
    if is_json_file(path):
        for n, line in enumerate(raw.split(b"\n"), start=1):
            if not line.strip():
                continue
            try:
                obj = parse_json_line(line)
            except ValueError as e:
                raise RWKVDishaError(f"--prompt_file {path}:{n}: {e}") from None
            text = obj.get("prompt", obj.get("text")) if isinstance(obj, dict) else obj
            if not isinstance(text, str):
                raise RWKVDishaError(
                    f'--prompt_file {path}:{n}: expected a JSON string or {{"prompt": "..."}}, '
                    f"got {line[:60]!r}"
                )
            prompts.append(text)
    else:
        try:
            prompts = split_text(raw.decode("utf-8").removeprefix("\ufeff"), "blank")  # a BOM is no text
        except UnicodeDecodeError as e:
            raise RWKVDishaError(
                f"--prompt_file {path} is not UTF-8 text ({e.reason} at byte {e.start})"
            ) from None
    if not prompts:
        raise RWKVDishaError(f"--prompt_file {path} holds no prompt")
    return prompts


def read_stdin_prompt() -> str:
    """The prompt piped in for --prompt '' / '-'; nothing at all is refused, as an empty --prompt_file is
    (a newline is a prompt: one token)."""
    text = sys.stdin.read()
    if not text:
        raise RWKVDishaError(
            "stdin holds no prompt (--prompt '' or '-' reads it from there): pipe one in, or give "
            "--prompt TEXT"
        )
    return text


def run(cfg: Config) -> int:
    from rwkv_disha.data.tokenizer import get_tokenizer

    validate(cfg)
    if cfg.prompt_file:
        prompts = read_prompts(cfg.prompt_file)
    elif cfg.chat_loop:
        prompts = []
    else:
        prompts = [cfg.prompt if cfg.prompt not in ("", "-") else read_stdin_prompt()]
    model = load_for_inference(cfg.load_model, cfg.peft_checkpoint, cfg.op, cfg.lora_alpha, cfg.state)
    tok = get_tokenizer()
    penalties = Penalties(cfg.alpha_presence, cfg.alpha_frequency, cfg.alpha_decay)
    sampling = (cfg.temperature, cfg.top_p, cfg.top_k)
    if cfg.chat_loop:
        return chat_loop(model, tok, cfg, penalties)
    stops = stop_strings(cfg)
    for k, prompt in enumerate(prompts):
        if len(prompts) > 1:
            gap = "\n" if k else ""  # a blank line between one prompt's text and the next header
            sys.stdout.write(f"{gap}=== prompt {k + 1}/{len(prompts)}\n")
        ids = _encode(tok, _wrapped(prompt, cfg), model.config.vocab_size)
        print(f"[{len(ids)} prompt tokens, {model.config.summary()}]", file=sys.stderr)
        gen = torch.Generator().manual_seed(cfg.seed)  # each prompt: the text it would get on its own
        session = Session(model)
        session.feed(ids or [0])  # an empty prompt starts from end-of-text, as after a document
        stream_text(tok, session.reply(cfg.max_tokens, *sampling, gen, penalties), stops)
    return 0


def stop_strings(cfg: Config) -> tuple[str, ...]:
    """The strings that end a reply: the mode's own end of turn (--chat / --chat_loop: the blank line,
    --sft: \\x17) and --stop. --stop adds to the mode's stop, never replaces it: an SFT or chat model
    would otherwise write its next turn after its end of turn."""
    own = "\n\n" if cfg.chat or cfg.chat_loop else SFT_END if cfg.sft else ""
    return tuple(s for s in dict.fromkeys((own, cfg.stop)) if s)


def _encode(tok, text: str, vocab: int) -> list[int]:
    try:
        ids = tok.encode(text)
    except UnicodeEncodeError as e:  # undecodable bytes (argv, stdin) or a JSON "\ud800" escape
        raise RWKVDishaError(
            f"the prompt is not valid Unicode text ({e.reason} at character {e.start}): save it as UTF-8"
        ) from None
    if ids and max(ids) >= vocab:
        raise RWKVDishaError(
            f"the prompt has World-tokenizer ids up to {max(ids)} but the model's vocabulary is {vocab}: "
            "use a model with the 65536-token World vocabulary"
        )
    return ids


def _first_stop(text: str, stops: tuple[str, ...]) -> str:
    """The stop string of ``stops`` that occurs earliest in ``text`` ("" when none does)."""
    found = [(text.index(s), s) for s in stops if s in text]
    return min(found)[1] if found else ""


def _stop_start(text: str, stops: tuple[str, ...]) -> int:
    """The length of the longest end of ``text`` that begins one of ``stops``: held back until the next
    token says whether the stop follows (it must not reach stdout)."""
    ends = [n for s in stops for n in range(1, len(s)) if text.endswith(s[:n])]
    return max(ends, default=0)


def stream_text(tok, ids: Iterator[int], stops: tuple[str, ...]) -> tuple[str, str]:
    """Write the text of ``ids`` to stdout as it comes (a multi-byte character once complete), up to the
    first of ``stops`` to occur, then a newline. Returns (the text written, the stop string that ended it,
    "" when none did)."""
    out_ids: list[int] = []
    shown = ""
    stopped = ""
    for t in ids:
        out_ids.append(t)
        text = tok.decode(out_ids)
        stopped = _first_stop(text, stops)
        if stopped:
            text = text[: text.index(stopped)]
            sys.stdout.write(text[len(shown) :])
            shown = text
            break
        text = text[: len(text) - _stop_start(text, stops)]  # a stop's beginning may be its start
        if not text.endswith("\ufffd") and len(text) > len(shown):  # wait for a multi-byte character's rest
            sys.stdout.write(text[len(shown) :])
            sys.stdout.flush()
            shown = text
    if not stopped:
        final = tok.decode(out_ids)
        sys.stdout.write(final[len(shown) :])
        shown = final
    sys.stdout.write("\n")
    sys.stdout.flush()
    return shown, stopped


def chat_loop(model, tok, cfg: Config, penalties: Penalties) -> int:
    """One conversation from stdin: each non-empty line is a user turn, answered from the state left by
    every earlier turn (the model reads only the new turn, never the whole history again)."""
    session = Session(model)
    gen = torch.Generator().manual_seed(cfg.seed)
    interactive = sys.stdin.isatty()
    print(f"[chat, {model.config.summary()}; an empty line or Ctrl-D ends it]", file=sys.stderr)
    while True:
        if interactive:
            print("User: ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line or (interactive and not line.strip()):
            return 0
        if not line.strip():
            continue
        # each turn follows the blank line that closed the previous answer: "User: ...\n\nAssistant:"
        session.feed(_encode(tok, chat_prompt(line), model.config.vocab_size))
        reply = session.reply(cfg.max_tokens, cfg.temperature, cfg.top_p, cfg.top_k, gen, penalties)
        _, stopped = stream_text(tok, reply, stop_strings(cfg))
        if stopped != "\n\n":  # token 0, --max_tokens or --stop: close the turn in the state
            session.feed(tok.encode("\n\n"))
