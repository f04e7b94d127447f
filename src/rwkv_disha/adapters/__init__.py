"""DiSHA adapters (Bone, Bat) and the LoRA baseline: layers, the kind registry, injection, quantized base,
adapter files, merge.

See docs/ADAPTERS.md for the math, the file layout, the flags, and how to add a kind.
"""

from rwkv_disha.adapters.adapter_file import (
    AdapterFile,
    adapter_sidecar,
    adapter_state_dict,
    infer_adapter_config,
    load_adapter_file,
    open_adapter_file,
    save_adapter_file,
    write_adapter_file,
)
from rwkv_disha.adapters.base import AdapterLinear, adapter_modules
from rwkv_disha.adapters.bat import BatLinear
from rwkv_disha.adapters.bone import BoneLinear
from rwkv_disha.adapters.config import AdapterConfig
from rwkv_disha.adapters.fingerprint import base_fingerprint
from rwkv_disha.adapters.inject import adapter_parameters, inject_adapters, mark_trainable
from rwkv_disha.adapters.lora import LoRALinear
from rwkv_disha.adapters.registry import ADAPTER_KINDS, adapter_class

__all__ = [
    "ADAPTER_KINDS",
    "AdapterConfig",
    "AdapterFile",
    "AdapterLinear",
    "BatLinear",
    "BoneLinear",
    "LoRALinear",
    "adapter_class",
    "adapter_modules",
    "adapter_parameters",
    "adapter_sidecar",
    "adapter_state_dict",
    "base_fingerprint",
    "infer_adapter_config",
    "inject_adapters",
    "load_adapter_file",
    "mark_trainable",
    "open_adapter_file",
    "save_adapter_file",
    "write_adapter_file",
]
