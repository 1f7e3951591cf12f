"""ggml-lora: train LoRA adapters for GGUF models on ggml and save them as llama.cpp GGUF LoRA adapters."""

from __future__ import annotations

from dataclasses import dataclass

__version__ = "0.1.0"

from ._native import ffi, lib
from . import llama as _llama  # noqa: F401  (keeps llama-cpp-python off its AMX crash; see ggml_lora.llama)
from .adapter import Adapter
from .arch import ARCHITECTURES
from .config import GRPOConfig, LoRAConfig, PreferenceConfig, TrainingConfig
from .errors import (
    BackendError,
    ContextLengthError,
    DistributedError,
    GGMLLoRAError,
    GGUFFormatError,
    InvalidArgumentError,
    OutOfMemoryError,
    RewardFunctionError,
    UnsupportedArchitectureError,
    UnsupportedError,
)
from .merge import merge_adapters
from .model import BaseModel
from .trainer import LoRATrainer, TrainingHistory
from .preference import PreferenceTrainer
from .grpo import GRPOTrainer


@dataclass(frozen=True)
class Device:
    name: str            # pass this as device=
    description: str
    type: str            # "cpu", "gpu", "igpu" or "accel"
    memory_free: int     # bytes
    memory_total: int    # bytes


_DEVICE_TYPES = {0: "cpu", 1: "gpu", 2: "igpu", 3: "accel"}


def devices() -> list[Device]:
    """The ggml devices this build of ggml-lora has."""
    from ._native import check

    out = []
    info = ffi.new("glora_device_info *")
    for i in range(lib.glora_device_count()):
        check(lib.glora_device_get(i, info))
        out.append(Device(ffi.string(info.name).decode(), ffi.string(info.description).decode(),
                          _DEVICE_TYPES.get(info.type, "cpu"), int(info.memory_free), int(info.memory_total)))
    return out


def cpu_has_amx_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 on AMX tiles (Intel Sapphire Rapids and later) and Linux let this
    process use them: where ``bf16`` products (``TrainingConfig.bf16``, ``BaseModel.set_bf16``) run."""
    return bool(lib.glora_cpu_has_amx_bf16())


def cpu_features() -> dict[str, str]:
    """The instruction sets ggml-lora's own ggml was built for (ggml's CPU feature list, as llama.cpp's system
    info prints it), e.g. ``{"AVX2": "1", "FMA": "1", "AVX512": "1", "AMX_INT8": "1", ...}``: with
    ``GGML_NATIVE``, what this machine has; with ``GGML_LORA_AVX2_ONLY``, AVX2, FMA and F16C whatever it has."""
    n = lib.glora_cpu_features(ffi.NULL, 0)
    buf = ffi.new("char[]", n + 1)
    lib.glora_cpu_features(buf, n + 1)
    text = ffi.string(buf).decode("ascii", "replace")
    return dict(item.split("=", 1) for item in text.split(";") if "=" in item)


__all__ = [
    "ARCHITECTURES",
    "Adapter",
    "BackendError",
    "BaseModel",
    "ContextLengthError",
    "Device",
    "DistributedError",
    "GGMLLoRAError",
    "GGUFFormatError",
    "GRPOConfig",
    "GRPOTrainer",
    "InvalidArgumentError",
    "LoRAConfig",
    "LoRATrainer",
    "OutOfMemoryError",
    "PreferenceConfig",
    "PreferenceTrainer",
    "RewardFunctionError",
    "TrainingConfig",
    "TrainingHistory",
    "UnsupportedArchitectureError",
    "UnsupportedError",
    "__version__",
    "cpu_features",
    "cpu_has_amx_bf16",
    "devices",
    "merge_adapters",
]
