"""`"load"` in --disha_config continues from an adapter file; --epoch_begin shifts names and schedule."""

import json

import torch

from rwkv_disha.cli import main
from rwkv_disha.model.load import load_state_dict


def test_load_continues_from_an_adapter_file(tmp_path, base_path, count_data, train_args):
    assert main(train_args(base_path, count_data, tmp_path / "a", epochs=1, steps=6)) == 0
    first = load_state_dict(tmp_path / "a" / "rwkv-0.pth")
    cont = json.dumps({"mode": "bone", "load": str(tmp_path / "a" / "rwkv-0.pth"), "r": 16})
    argv = train_args(base_path, count_data, tmp_path / "b", epochs=1, steps=2, lr="1e-12")
    argv[argv.index("--disha_config") + 1] = cont
    assert main([*argv, "--epoch_begin", "1"]) == 0
    assert not (tmp_path / "b" / "rwkv-0.pth").exists()
    second = load_state_dict(tmp_path / "b" / "rwkv-1.pth")  # named by epoch_begin + epoch
    assert second.keys() == first.keys()
    for k in first:  # lr 1e-12: what was saved is what was loaded (every tensor, train_parts included)
        torch.testing.assert_close(second[k], first[k], atol=1e-8, rtol=0)
    assert first["blocks.0.att.key.disha"].abs().sum() > 0
