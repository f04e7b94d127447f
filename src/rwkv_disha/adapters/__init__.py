"""DiSHA adapters (Bone, Bat) and the LoRA baseline: layers, injection, quantized base, files, merge.

See docs/ADAPTERS.md for the math, the file layout and the flags.
"""

from rwkv_disha.adapters.base import AdapterLinear, adapter_modules
from rwkv_disha.adapters.bat import BatLinear
from rwkv_disha.adapters.bone import BoneLinear
from rwkv_disha.adapters.inject import (
    AdapterConfig,
    adapter_state_dict,
    inject_adapters,
    load_adapter_file,
    mark_trainable,
    save_adapter_file,
)
from rwkv_disha.adapters.lora import LoRALinear

__all__ = [
    "AdapterConfig",
    "AdapterLinear",
    "BatLinear",
    "BoneLinear",
    "LoRALinear",
    "adapter_modules",
    "adapter_state_dict",
    "inject_adapters",
    "load_adapter_file",
    "mark_trainable",
    "save_adapter_file",
]
