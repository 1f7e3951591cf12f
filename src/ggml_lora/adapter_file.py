"""Writing adapters as llama.cpp GGUF LoRA files (docs/llama-cpp-facts.md §1), atomically."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from .errors import GGUFFormatError, InvalidArgumentError

KEY_PREFIX = "ggml_lora."


def new_file_mode(directory: bool = False) -> int:
    """The mode open() (mkdir) would give a new file: 0o666 (0o777) less the umask; mkstemp's files are
    0o600 and mkdtemp's folders 0o700, which would hide what we write from every other user."""
    try:
        with open("/proc/self/status") as f:
            umask = next(int(line.split()[1], 8) for line in f if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError):
        umask = os.umask(0o022)
        os.umask(umask)
    return (0o777 if directory else 0o666) & ~umask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yields a temporary path beside ``path``; renamed over ``path`` only if the block succeeds. The
    file gets the permissions a plain open() would give it, not mkstemp's owner-only ones."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.fchmod(fd, new_file_mode())
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


def _adapter_error(path, what: str) -> GGUFFormatError:
    return GGUFFormatError(f"{path}: {what}")


def read_lora_gguf(path: str | os.PathLike[str], base_arch: str,
                   base_shapes: Mapping[str, tuple[int, ...]]) -> tuple[float, dict[str, tuple[np.ndarray, np.ndarray]],
                                                                       dict[str, Any]]:
    """Read and check a GGUF LoRA adapter against a base model's architecture and weight shapes.

    Returns (alpha, {base weight: (lora_a (r, n_in), lora_b (n_out, r)) float32}, ggml_lora metadata).
    Every check llama.cpp makes (docs/llama-cpp-facts.md §1) fails here first, as a GGUFFormatError
    naming the file and the key or tensor, instead of a crash in llama.cpp.
    """
    from .gguf_header import F32, STRING, TYPE_NAMES, read_header

    h = read_header(path)

    def string_key(key: str, want: str | None = None) -> str:
        f = h.fields.get(key)
        if f is None:
            raise _adapter_error(path, f"metadata key '{key}' is missing; not a LoRA adapter")
        if f.type != STRING:
            raise _adapter_error(path, f"metadata key '{key}' is {TYPE_NAMES.get(f.type)}, must be STRING")
        if want is not None and f.value != want:
            raise _adapter_error(path, f"'{key}' is {f.value!r}, expected {want!r}; not a LoRA adapter")
        return f.value

    string_key("general.type", "adapter")
    string_key("adapter.type", "lora")
    arch = string_key("general.architecture")
    if arch != base_arch:
        raise _adapter_error(path, f"adapter architecture '{arch}' does not match the base model's '{base_arch}'")
    alpha = 0.0
    fa = h.fields.get("adapter.lora.alpha")
    if fa is not None:
        if fa.type != F32:
            raise _adapter_error(path, f"adapter.lora.alpha is stored as {TYPE_NAMES.get(fa.type)}; llama.cpp requires "
                                 "FLOAT32 (and aborts the process otherwise)")
        alpha = float(fa.value)
        if not np.isfinite(alpha):
            raise _adapter_error(path, f"adapter.lora.alpha is {alpha}")

    halves: dict[str, dict[str, Any]] = {}
    for name, t in h.tensors.items():
        if name.endswith(".lora_a") or name.endswith(".lora_b"):
            base, half = name[:-7], name[-6:]
            halves.setdefault(base, {})[half] = t
        elif name.endswith("_norm.weight"):
            continue                        # llama.cpp skips these silently; so do we
        else:
            raise _adapter_error(path, f"tensor '{name}' has an unexpected suffix (expected .lora_a or .lora_b)")

    pairs: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    with open(h.path, "rb") as f:
        for base, parts in halves.items():
            if set(parts) != {"lora_a", "lora_b"}:
                missing = ({"lora_a", "lora_b"} - set(parts)).pop()
                raise _adapter_error(path, f"tensor pair for '{base}' is missing {base}.{missing}")
            if base not in base_shapes:
                raise _adapter_error(path, f"LoRA tensor '{base}' does not exist in the base model (wrong base model?)")
            if base == "token_embd.weight":
                raise _adapter_error(path, "a LoRA on token_embd.weight is not supported by ggml-lora yet")
            w = base_shapes[base]
            a, b = parts["lora_a"], parts["lora_b"]
            if len(w) != 2 or len(a.shape) != 2 or len(b.shape) != 2:
                raise _adapter_error(path, f"'{base}': only 2-D weights and 2-D LoRA tensors are supported")
            n_in, n_out = w
            r = b.shape[0]
            if a.shape != (n_in, r) or b.shape != (r, n_out):
                raise _adapter_error(path, f"'{base}': lora_a ne={list(a.shape)} and lora_b ne={list(b.shape)} do not fit "
                                     f"the base weight ne=[{n_in}, {n_out}] (expected [{n_in}, r] and [r, {n_out}]; "
                                     "wrong base model?)")
            pairs[base] = (_read_f32(f, a, (r, n_in), path), _read_f32(f, b, (n_out, r), path))
    if not pairs:
        raise _adapter_error(path, "the adapter has no LoRA tensors")
    meta = {k[len(KEY_PREFIX):]: v.value for k, v in h.fields.items() if k.startswith(KEY_PREFIX)}
    return alpha, pairs, meta


def _read_f32(f, t, shape: tuple[int, int], path) -> np.ndarray:
    dtypes = {"F32": np.float32, "F16": np.float16}
    if t.type_name not in dtypes:
        raise _adapter_error(path, f"tensor '{t.name}' is {t.type_name}; ggml-lora reads F32 or F16 adapters")
    f.seek(t.offset)
    data = np.frombuffer(f.read(t.n_bytes), dtype=dtypes[t.type_name]).reshape(shape).astype(np.float32)
    if not np.isfinite(data).all():
        raise _adapter_error(path, f"tensor '{t.name}' has non-finite values")
    return data
