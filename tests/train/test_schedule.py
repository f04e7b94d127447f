"""Learning-rate schedules (pure functions)."""

import math

import pytest

from rwkv_disha.errors import RWKVDishaError
from rwkv_disha.train.schedule import lr_at


def test_cos_decay_with_warmup():
    lrs = [lr_at(s, 110, 1e-3, 1e-5, warmup_steps=10) for s in range(111)]
    assert lrs[0] == pytest.approx(1e-5)  # warmup starts at 1 % of lr_init
    assert lrs[5] == pytest.approx(1e-3 * (0.01 + 0.99 * 0.5))
    assert lrs[10] == pytest.approx(1e-3)  # end of warmup: the peak
    assert lrs[60] == pytest.approx(1e-5 + 0.5 * (1e-3 - 1e-5))  # half way through the cosine
    assert lrs[110] == pytest.approx(1e-5)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))  # monotone after warmup


def test_constant_when_init_equals_final():
    assert {lr_at(s, 50, 2e-5, 2e-5) for s in range(50)} == {2e-5}


def test_wsd_is_flat_then_decays_over_the_last_fraction():
    lrs = [lr_at(s, 100, 1e-3, 1e-4, warmup_steps=5, schedule="wsd", decay_frac=0.2) for s in range(101)]
    assert lrs[5] == lrs[50] == lrs[80] == pytest.approx(1e-3)
    assert lrs[90] == pytest.approx(1e-4 + 0.5 * 9e-4 * (1 + math.cos(math.pi * 0.5)))
    assert lrs[100] == pytest.approx(1e-4)


def test_unknown_schedule():
    with pytest.raises(RWKVDishaError, match="unknown --lr_schedule 'linear'; choose one of cos_decay, wsd"):
        lr_at(0, 10, 1e-3, 1e-4, schedule="linear")
