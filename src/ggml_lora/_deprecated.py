"""Old module names kept for one release: each forwards its attributes to the modules that now hold them,
with a DeprecationWarning naming the new home."""

from __future__ import annotations

import importlib
import warnings
from types import ModuleType


def forwarding(old: str, *new: str):
    """A module ``__getattr__`` for ``ggml_lora.<old>``: attributes come from ``ggml_lora.<new>``s in order."""
    def __getattr__(name: str):
        for target in new:
            module: ModuleType = importlib.import_module(f"ggml_lora.{target}")
            if hasattr(module, name):
                warnings.warn(f"ggml_lora.{old} is deprecated: import {name} from ggml_lora.{target}",
                              DeprecationWarning, stacklevel=2)
                return getattr(module, name)
        raise AttributeError(f"module 'ggml_lora.{old}' has no attribute {name!r}")
    return __getattr__
