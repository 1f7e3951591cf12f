"""ggml-lora: train LoRA adapters for GGUF models on ggml and save them as llama.cpp GGUF LoRA adapters."""

from __future__ import annotations

__version__ = "0.1.0"

from ._native import ffi, lib
from . import llama_cpp_python as _llama_cpp_python  # noqa: F401  (keeps llama-cpp-python off its AMX crash; see ggml_lora.llama_cpp_python)
from .adapter import Adapter
from .arch import ARCHITECTURES
from .config import GRPOConfig, LoRAConfig, PreferenceConfig, TrainingConfig
from .hardware import Device, cpu_features, cpu_has_amx_bf16, devices
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
from .model import BaseModel, Placement
from .trainer import LoRATrainer, TrainingHistory
from .preference import PreferenceTrainer
from .grpo import GRPOTrainer


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
    "Placement",
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
