"""The exceptions ggml-lora raises. Each native status code maps to one class here."""

from __future__ import annotations


class GGMLLoRAError(Exception):
    """Base class. ``code`` is the native status code (0 when raised from Python)."""

    code: int = 0

    def __init__(self, message: str, code: int | None = None):
        super().__init__(message)
        if code is not None:
            self.code = code


class InvalidArgumentError(GGMLLoRAError, ValueError):
    """A value passed in is out of range or inconsistent with the model."""

    code = 1


class NativeIOError(GGMLLoRAError, OSError):
    """A file could not be opened or read by the native library."""

    code = 2


class GGUFFormatError(GGMLLoRAError, ValueError):
    """A file is not a valid GGUF of the expected kind (bad header, missing or misshapen tensor, ...)."""

    code = 3


class UnsupportedError(GGMLLoRAError, NotImplementedError):
    """Valid input that this build cannot handle (an architecture, a tensor type, a device)."""

    code = 4


class UnsupportedArchitectureError(UnsupportedError):
    """The GGUF's ``general.architecture`` is not one ggml-lora knows how to run."""


class OutOfMemoryError(GGMLLoRAError, MemoryError):
    """A backend buffer could not be allocated."""

    code = 5


class BackendError(GGMLLoRAError, RuntimeError):
    """A ggml backend failed while computing."""

    code = 6


class InternalError(GGMLLoRAError, RuntimeError):
    """A bug in ggml-lora; please report it with the message."""

    code = 7


class ContextLengthError(InvalidArgumentError):
    """A sequence is longer than the context the caller asked for."""


BY_CODE: dict[int, type[GGMLLoRAError]] = {
    cls.code: cls
    for cls in (InvalidArgumentError, NativeIOError, GGUFFormatError, UnsupportedError, OutOfMemoryError,
                BackendError, InternalError)
}


class TrainingDivergedError(GGMLLoRAError, FloatingPointError):
    """The loss or the gradient norm became NaN or Inf; ``step`` is the optimizer step where it happened."""

    def __init__(self, message: str, step: int):
        super().__init__(message)
        self.step = step


class CheckpointError(GGMLLoRAError, OSError):
    """A checkpoint or output file could not be written or read; the in-memory adapter is intact."""


class DatasetError(GGMLLoRAError, ValueError):
    """A training data file or record is malformed; the message names the file and line (or list index)."""


class DistributedError(GGMLLoRAError, RuntimeError):
    """The processes of a distributed run disagree (data, base model, settings, or their adapters)."""


class RewardFunctionError(GGMLLoRAError, ValueError):
    """A GRPO reward function raised or returned something other than one float or None per completion; the
    message names the function and the sample. Training stops before that step's update."""


class MissingPartError(GGMLLoRAError, FileNotFoundError):
    """A part of a multi-part GGUF (``name-0000i-of-0000N.gguf``) is not beside its first part."""


class HubError(GGMLLoRAError, OSError):
    """A Hugging Face reference (``owner/repo[:QUANT]``, ``owner/repo/file.gguf``) names no GGUF that can be had:
    no such repository or file, or no file of that quantization (the message lists the repository's GGUFs)."""


class HubNotCachedError(HubError):
    """The Hub cannot be asked (``HF_HUB_OFFLINE=1``, or unreachable) and the file is not in the local cache."""


class HubNotInstalledError(GGMLLoRAError, ImportError):
    """A Hugging Face reference was given and huggingface_hub is not installed (``pip install 'ggml-lora[hf]'``)."""
