"""rwkv-disha: DiSHA (Bone / Bat) fine-tuning for RWKV language models."""

from rwkv_disha.errors import RWKVDishaError

__version__ = "0.1.0"


def load_model(path, **kwargs):
    """Load an official RWKV checkpoint (see :func:`rwkv_disha.model.load.load_model`)."""
    from rwkv_disha.model.load import load_model as _load

    return _load(path, **kwargs)


__all__ = ["RWKVDishaError", "load_model", "__version__"]
