"""The kind registry: every kind describes itself, so a new kind is one class + one table entry.

A toy kind registered only here goes through configuration, injection, saving, reading back (with and
without sidecar), strict loading and `merge` with no other change to the package.
"""

from __future__ import annotations

from collections.abc import Mapping

import pytest
import torch
import torch.nn.functional as F
from adapter_helpers import logits, randomise, rel_err, tokens

from rwkv_disha import load_model
from rwkv_disha.adapters import (
    ADAPTER_KINDS,
    AdapterConfig,
    AdapterLinear,
    BatLinear,
    BoneLinear,
    LoRALinear,
    adapter_class,
    adapter_state_dict,
    infer_adapter_config,
    inject_adapters,
    load_adapter_file,
    mark_trainable,
    open_adapter_file,
    save_adapter_file,
)
from rwkv_disha.adapters.base import DISHA_FLAG, DISHA_KEYS
from rwkv_disha.adapters.merge import merge_adapter_file
from rwkv_disha.adapters.quant import dense_weight
from rwkv_disha.choices import DISHA_MODES, PEFT_KINDS
from rwkv_disha.errors import RWKVDishaError


def test_registry_agrees_with_the_flag_choices():
    from rwkv_disha.adapters.registry import MODEL_KINDS

    pefts = {cls.peft for cls in (*ADAPTER_KINDS.values(), *MODEL_KINDS.values())}
    assert pefts | {"none"} == set(PEFT_KINDS)
    assert tuple(k for k, cls in ADAPTER_KINDS.items() if cls.peft == "disha") == DISHA_MODES
    assert all(name == cls.kind for name, cls in ADAPTER_KINDS.items())


@pytest.mark.parametrize(
    "peft,mode,expected",
    [
        ("disha", "bone", BoneLinear),
        ("disha", "bat", BatLinear),
        ("lora", None, LoRALinear),
        ("lora", "bat", LoRALinear),
    ],
)
def test_adapter_class(peft, mode, expected):
    assert adapter_class(peft, mode) is expected


def test_adapter_class_refuses_unknown_names():
    with pytest.raises(
        RWKVDishaError,
        match=r"unknown --peft 'bat': use disha, lora, miss, pissa, state or none \(Bat is --peft disha",
    ):
        adapter_class("bat")
    with pytest.raises(RWKVDishaError, match='--disha_config mode \'pissa\' is unknown: use "bone" or "bat"'):
        adapter_class("disha", "pissa")


@pytest.mark.parametrize(
    "cls,shape,r",
    [(BoneLinear, (64, 96), 64), (BatLinear, (96 // 16, 16, 16), 16), (BoneLinear, (5, 7), 5)],
)
def test_each_kind_reads_its_rank_back(cls, shape, r):
    assert cls.rank_from_tensors({"disha": torch.zeros(shape)}) == r
    other = BatLinear if cls is BoneLinear else BoneLinear
    assert other.rank_from_tensors({"disha": torch.zeros(shape)}) is None
    assert LoRALinear.rank_from_tensors({"lora_A": torch.zeros(8, 96), "lora_B": torch.zeros(64, 8)}) == 8
    assert LoRALinear.rank_from_tensors({"lora_A": torch.zeros(8, 96), "lora_B": torch.zeros(64, 4)}) is None


class HalfBoneLinear(AdapterLinear):
    """A toy kind: ΔW[o, i] = toy[i mod r, o] / 2, trained as ``--peft disha`` with ``"mode":"half"``."""

    kind, title, peft = "half", "HalfBone", "disha"
    adapter_names = ("toy",)
    tensor_layout = "HalfBone tensors are (r, out)"
    cli_flag, cli_keys = DISHA_FLAG, {**DISHA_KEYS, "mode": ("mode", str, "half")}
    cli_example = '{"mode":"half","load":"","r":8}'

    def __init__(self, weight, r):
        super().__init__(weight, r)
        self.toy = self._param_like(r, self.out_features)

    @classmethod
    def shape_problem(cls, r, out_f, in_f, name):
        return f"exceeds {in_f} in {name}" if r > in_f else super().shape_problem(r, out_f, in_f, name)

    @classmethod
    def rank_from_tensors(cls, tensors: Mapping[str, torch.Tensor]):
        return int(tensors["toy"].shape[0]) if tensors["toy"].dim() == 2 else None

    def reset_adapter(self):
        with torch.no_grad():
            self.toy.zero_()

    def delta_weight(self):
        r, in_f = self.r, self.in_features
        return 0.5 * self.toy.detach().float().t().repeat(1, -(-in_f // r))[:, :in_f]

    def forward(self, x):
        r, in_f = self.r, self.in_features
        delta = 0.5 * self.toy.t().repeat(1, -(-in_f // r))[:, :in_f]
        return F.linear(x, dense_weight(self.weight, x.dtype) + delta.to(x.dtype))


def test_a_new_kind_is_one_class_and_one_table_entry(make_checkpoint, tmp_path, monkeypatch):
    monkeypatch.setitem(ADAPTER_KINDS, "half", HalfBoneLinear)
    base = make_checkpoint(2, 128, 300)
    cfg = AdapterConfig.from_cli("disha", '{"mode":"half","load":"","r":16}')
    assert (cfg.layer_class, cfg.describe()) == (HalfBoneLinear, "HalfBone r=16")
    model = load_model(base, op="torch")
    names = inject_adapters(model, cfg)
    assert len(names) == 12 and all(isinstance(model.get_submodule(n), HalfBoneLinear) for n in names)
    mark_trainable(model, cfg)
    randomise(model, seed=5)
    model.eval()
    path = save_adapter_file(model, cfg, tmp_path / "rwkv-0.pth")
    assert open_adapter_file(path).cfg.layer_class is HalfBoneLinear
    inferred = infer_adapter_config(adapter_state_dict(model, cfg))  # no sidecar: the shapes say "half"
    assert (inferred.layer_class, inferred.r, inferred.mode) == (HalfBoneLinear, 16, "half")

    fresh = load_model(base, op="torch")
    inject_adapters(fresh, cfg)
    load_adapter_file(fresh, path, cfg)
    idx = tokens(300)
    assert rel_err(logits(fresh.eval(), idx), logits(model, idx)) == 0
    merge_adapter_file(base, path, tmp_path / "m.pth")
    assert rel_err(logits(load_model(tmp_path / "m.pth", op="torch"), idx), logits(model, idx)) <= 1e-5
    with pytest.raises(RWKVDishaError, match="HalfBone r=200 exceeds 128 in blocks.0.att.receptance"):
        inject_adapters(
            load_model(base, op="torch"), AdapterConfig.from_cli("disha", '{"mode":"half","r":200}')
        )
