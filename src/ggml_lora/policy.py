"""The device policy: every choice that depends on which device a model lives on is made here.

Nothing else in the package asks whether a device is the CPU. The native side has its one counterpart
(``glora_backends.cpu_kernels``): our CPU kernels and graph rewrites run only where the model's device is
ggml's CPU backend; any other device runs ggml's own ops.
"""

from __future__ import annotations

from . import hardware


def is_cpu(device: str) -> bool:
    """Whether ``device`` (a model's device name) is ggml's CPU backend."""
    found = hardware.device(device)
    return found.type == "cpu" if found is not None else device.upper() == "CPU"


def amx_bf16_applies(device: str) -> bool:
    """``bf16=None``: products on AMX tiles in bfloat16 where the model is on a CPU that has them (an order
    of magnitude faster there than ggml's F16 or BF16 kernels)."""
    return is_cpu(device) and hardware.cpu_has_amx_bf16()


def f16_copies_may_help(device: str) -> bool:
    """``f16_weights=None`` may choose F16 copies of the quantized weights only on a CPU, where ggml's F16
    products beat its quantized ones (benchmarks/README.md); a GPU backend multiplies the stored blocks
    at full speed and the copies would only cost its memory."""
    return is_cpu(device)


def available_memory(device: str) -> int | None:
    """Bytes free for a model on ``device``: the host's available memory for the CPU, the backend's free
    memory for any other device (None when unknown)."""
    if is_cpu(device):
        return hardware.host_memory_available()
    found = hardware.device(device)
    return (found.memory_free or None) if found is not None else None


def fallback_warning(device: str, device_share: float, cpu_ops: tuple[str, ...]) -> str | None:
    """The warning a run on ``device`` owes its user when ggml's scheduler ran part of its work on the CPU
    (a GPU run must never compute on the CPU silently); None when all of it ran on the device."""
    if is_cpu(device) or not cpu_ops:
        return None
    return (f"{1 - device_share:.1%} of the step's work ran on the CPU instead of {device} "
            f"(ops {device} lacks): {', '.join(cpu_ops)}")
