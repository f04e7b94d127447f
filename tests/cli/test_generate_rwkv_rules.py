"""`rwkv-disha generate` against the `rwkv` package's own functions (ChatRWKV's and RWKV Runner's rules):
the sampling filters (PIPELINE.sample_logits), the repetition penalties and stop token
(PIPELINE.generate), and the state carried from the prompt into generation (RWKV.forward)."""

import numpy as np
import pytest
import torch

from rwkv_disha import generate
from rwkv_disha.generate import Penalties, Session, generate_ids, load_for_inference, sample_token

rwkv_utils = pytest.importorskip("rwkv.utils")

LOGITS = torch.tensor([2.0, 1.5, 1.0, 0.2, -1.0, 3.0, 0.0, -2.5])
SETTINGS = [  # (temperature, top_p, top_k)
    (1.0, 0.85, 0),
    (2.0, 0.5, 0),
    (0.5, 0.7, 0),
    (1.5, 0.95, 3),
    (3.0, 1e-6, 0),
    (0.7, 0.99, 2),
]


def rwkv_distribution(logits, temperature, top_p, top_k, monkeypatch) -> torch.Tensor:
    """The probabilities PIPELINE.sample_logits draws from (its CPU path hands them to np.random.choice)."""
    seen = []
    with monkeypatch.context() as m:
        m.setattr(np.random, "choice", lambda a, p: seen.append(p.copy()) or 0)
        rwkv_utils.PIPELINE.sample_logits(None, logits.clone(), temperature, top_p, top_k)
    return torch.from_numpy(seen[0]).float()


@pytest.mark.parametrize("temperature, top_p, top_k", SETTINGS)
def test_the_tokens_that_can_be_drawn_are_the_rwkv_packages(temperature, top_p, top_k, monkeypatch):
    """top-p / top-k choose among the probabilities at temperature 1, and the temperature only reshapes
    the survivors, as in PIPELINE.sample_logits: --temperature 2 --top_p 0.5 lets no more tokens in."""
    expected = set(
        torch.nonzero(rwkv_distribution(LOGITS, temperature, top_p, top_k, monkeypatch)).flatten().tolist()
    )
    g = torch.Generator().manual_seed(0)
    drawn = {sample_token(LOGITS, temperature, top_p, top_k, g) for _ in range(600)}
    assert drawn == expected


@pytest.mark.parametrize("temperature, top_p, top_k", SETTINGS)
def test_the_sampling_probabilities_are_the_rwkv_packages(temperature, top_p, top_k, monkeypatch):
    from rwkv_disha.generate import sampling_probs

    expected = rwkv_distribution(LOGITS, temperature, top_p, top_k, monkeypatch)
    assert torch.allclose(sampling_probs(LOGITS, temperature, top_p, top_k), expected, atol=1e-6)


def test_top_p_keeps_every_token_tied_at_the_cutoff_as_the_rwkv_package(monkeypatch):
    logits = torch.tensor([1.0, 1.0, 1.0, 1.0, -5.0])  # four equal tokens; 0.5 is reached after two
    from rwkv_disha.generate import sampling_probs

    expected = rwkv_distribution(logits, 1.0, 0.5, 0, monkeypatch)
    assert torch.allclose(sampling_probs(logits, 1.0, 0.5, 0), expected, atol=1e-6)


class FixedLogits:
    """A stand-in model whose k-th forward call returns fixed random logits (the same in both loops), in
    the `rwkv` package's interface (forward(tokens, state)) and ours (model(x, state=, return_state=))."""

    def __init__(self, vocab=1000):
        self.vocab, self.calls = vocab, 0

    def _next(self):
        self.calls += 1
        return torch.randn(self.vocab, generator=torch.Generator().manual_seed(self.calls)) * 2

    def forward(self, tokens, state):
        return self._next(), state

    def __call__(self, x, state=None, return_state=True):
        return self._next().view(1, 1, -1).expand(1, x.shape[1], -1), state


# a scripted reply: spaces, a tab, digits, '01' / '12' (ChatRWKV counts none of them), words, then token 0
SCRIPT = [33, 50, 500, 33, 621, 500, 50, 10, 700, 500, 632, 632, 49, 0, 5, 6]


def test_penalties_and_the_stop_token_follow_rwkv_pipeline_generate(monkeypatch):
    presence, frequency, decay = 0.4, 0.3, 0.9
    theirs, ours = [], []

    def scripted(record):
        def pick(logits, *args, **kwargs):
            record.append(logits.clone())
            return SCRIPT[len(record) - 1]

        return pick

    pipe = rwkv_utils.PIPELINE(FixedLogits(), "rwkv_vocab_v20230424")
    pipe.sample_logits = scripted(theirs)
    args = rwkv_utils.PIPELINE_ARGS(
        alpha_presence=presence, alpha_frequency=frequency, alpha_decay=decay, token_stop=[0]
    )
    text = pipe.generate("Hi", token_count=len(SCRIPT), args=args)

    monkeypatch.setattr(generate, "sample_token", scripted(ours))
    session = Session(FixedLogits())
    session.feed([1, 2])
    ids = list(session.reply(len(SCRIPT), 1.0, 0.85, 0, None, Penalties(presence, frequency, decay)))

    assert ids == SCRIPT[: SCRIPT.index(0)] and pipe.decode(ids) == text  # token 0 ends it, unwritten
    assert len(ours) == len(theirs) == len(ids) + 1
    for k, (a, b) in enumerate(zip(ours, theirs)):
        assert torch.allclose(a, b, atol=1e-5), f"logits before token {k}"


@pytest.mark.parametrize("version", ["x070", "x060"])
def test_generation_from_the_state_equals_the_rwkv_packages_full_forward(
    make_checkpoint, rwkv_oracle, version
):
    """Greedy tokens read one at a time through the recurrent state after the prompt are the ones the
    `rwkv` package picks from full passes over prompt + the tokens so far."""
    path = make_checkpoint(2, 64, 1000, seed=2, version=version)
    prompt = [17, 402, 9, 33, 250]
    ids = list(generate_ids(load_for_inference(str(path)), prompt, 5, temperature=0))
    seq = list(prompt)
    for _ in range(5):
        seq.append(int(rwkv_oracle(path, seq, version)[-1].argmax()))
    assert ids == seq[len(prompt) :]
