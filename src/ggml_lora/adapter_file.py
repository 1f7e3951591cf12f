"""Writing adapters as llama.cpp GGUF LoRA files (docs/llama-cpp-facts.md §1), atomically."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from .errors import InvalidArgumentError

KEY_PREFIX = "ggml_lora."


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yields a temporary path beside ``path``; renamed over ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_lora_gguf(path: str | os.PathLike[str], arch: str, alpha: float,
                    pairs: Mapping[str, tuple[np.ndarray, np.ndarray]], metadata: Mapping[str, Any] | None = None,
                    tied_embeddings: bool = False) -> Path:
    """Write ``{base weight name: (lora_a (r, n_in), lora_b (n_out, r))}`` as a GGUF LoRA adapter.

    ``metadata`` values (str, int, float, bool) go under the ``ggml_lora.`` key prefix.
    """
    import gguf

    for name in pairs:
        if tied_embeddings and name in ("token_embd.weight", "output.weight"):
            raise InvalidArgumentError(
                f"refusing to write a LoRA on '{name}': this model ties its LM head to token_embd.weight, and "
                "llama.cpp aborts when it applies such an adapter (docs/llama-cpp-facts.md §1.3)")
    path = Path(path)
    with atomic_path(path) as tmp:
        w = gguf.GGUFWriter(str(tmp), arch=arch)
        w.add_type(gguf.GGUFType.ADAPTER)
        w.add_string(gguf.Keys.Adapter.TYPE, "lora")
        w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(alpha))
        for key, value in (metadata or {}).items():
            full = KEY_PREFIX + key
            if isinstance(value, bool):
                w.add_bool(full, value)
            elif isinstance(value, int):
                w.add_int64(full, value)
            elif isinstance(value, float):
                w.add_float64(full, value)
            elif isinstance(value, str):
                if value:
                    w.add_string(full, value)
            else:
                raise InvalidArgumentError(f"metadata '{key}': unsupported type {type(value).__name__}")
        for name, (a, b) in pairs.items():
            w.add_tensor(f"{name}.lora_a", np.ascontiguousarray(a, dtype=np.float32))
            w.add_tensor(f"{name}.lora_b", np.ascontiguousarray(b, dtype=np.float32))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    return path
