"""Merging LoRA adapters into a base GGUF: W' = W + sum of scale * (alpha / r) * B @ A, as llama.cpp applies them.

The merged model is a plain GGUF that needs no adapter at inference (what llama.cpp's ``export-lora``,
PEFT's ``merge_and_unload`` and mlx-lm's ``fuse`` give). ``type="same"`` keeps every tensor's type:
tensors without a LoRA are copied byte for byte and the merged ones are re-quantized to their own type
with ggml's quantizer (as llama.cpp's, without an importance matrix). A single ggml type (``f16``,
``q8_0``, ``q4_k``, ...) stores every matrix in that type; a llama.cpp mix (``q4_k_m``, ``q5_k_m``, ...) is
made by llama.cpp's own quantizer from an F16 merge written beside the output first. Metadata is copied
verbatim (``general.file_type`` updated when the type changes); the output is written atomically.
"""

from __future__ import annotations

import math
import os
import re
import struct
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from .errors import GGUFFormatError, InvalidArgumentError, UnsupportedError

# the ggml types whose rows ggml-lora converts (glora_quantize_rows / glora_dequantize_rows)
ROW_TYPES = ("F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K",
             "IQ4_NL", "IQ4_XS")
# llama.cpp's file types of one ggml type (general.file_type, enum llama_ftype)
_PURE_FTYPES = {"F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q8_0": 7, "Q5_0": 8, "Q5_1": 9, "Q6_K": 18, "IQ4_NL": 25,
                "IQ4_XS": 30, "BF16": 32}
_CHUNK_VALUES = 8 << 20           # float32 values per converted piece of a tensor (32 MiB)
_U32 = 4                          # GGUF value type UINT32


def _types():
    import gguf

    return gguf.GGMLQuantizationType, gguf.GGML_QUANT_SIZES


def _row_bytes(type_id: int, n_per_row: int) -> int:
    qtype, sizes = _types()
    block, size = sizes[qtype(type_id)]
    return n_per_row // block * size


def _convert(kind: str, type_id: int, src: np.ndarray, n_rows: int, n_per_row: int) -> np.ndarray:
    from ._native import check, ffi, lib

    if kind == "dequantize":
        out = np.empty((n_rows, n_per_row), dtype=np.float32)
        check(lib.glora_dequantize_rows(type_id, ffi.from_buffer(src), ffi.from_buffer("float[]", out),
                                        n_rows, n_per_row), "dequantizing")
    else:
        out = np.empty(n_rows * _row_bytes(type_id, n_per_row), dtype=np.uint8)
        src = np.ascontiguousarray(src, dtype=np.float32)
        check(lib.glora_quantize_rows(type_id, ffi.from_buffer("float[]", src), ffi.from_buffer(out),
                                      n_rows, n_per_row), "quantizing")
    return out


def _adapter_list(adapters) -> list[tuple[Path, float]]:
    if isinstance(adapters, (str, os.PathLike)):
        adapters = [adapters]
    out = []
    for item in adapters:
        path, scale = (item, 1.0) if isinstance(item, (str, os.PathLike)) else item
        scale = float(scale)
        if not math.isfinite(scale):
            raise InvalidArgumentError(f"adapter {path}: scale {scale} is not finite")
        out.append((Path(path), scale))
    if not out:
        raise InvalidArgumentError("no adapters to merge")
    return out


def _deltas(header, adapters: list[tuple[Path, float]]) -> dict[str, list[tuple[float, np.ndarray, np.ndarray]]]:
    """{base weight: [(scale * alpha / r, A (r, n_in), B (n_out, r)), ...]}, every adapter checked to fit."""
    from .adapter_file import read_lora_gguf

    arch = header.get("general.architecture")
    shapes = {name: t.shape for name, t in header.tensors.items()}
    tied = "output.weight" not in shapes
    deltas: dict[str, list] = {}
    for path, scale in adapters:
        alpha, pairs, _ = read_lora_gguf(path, arch, shapes)
        for name, (a, b) in pairs.items():
            if tied and name == "output.weight":
                raise GGUFFormatError(f"{path}: LoRA on output.weight of a model that ties it to token_embd "
                                      "(llama.cpp aborts on it)")
            rank = a.shape[0]
            # llama.cpp: scale * alpha / rank when the adapter has an alpha, else the scale alone
            deltas.setdefault(name, []).append((scale * alpha / rank if alpha else scale, a, b))
    return deltas


def _target_types(header, deltas, type_name: str) -> dict[str, int]:
    """The output type of every tensor; raises before anything is written when one is impossible."""
    qtype, sizes = _types()
    want = None if type_name == "SAME" else int(qtype[type_name])
    out = {}
    for name, t in header.tensors.items():
        new = t.type if want is None or len(t.shape) != 2 else want
        if (name in deltas or new != t.type) and qtype(t.type).name not in ROW_TYPES:
            raise UnsupportedError(f"{name} is stored as {t.type_name}, which ggml-lora cannot convert; "
                                   f"merge to one of {', '.join(ROW_TYPES).lower()} instead")
        if name in deltas and qtype(new).name not in ROW_TYPES:
            raise UnsupportedError(f"{name} would be stored as {qtype(new).name}, which ggml-lora cannot quantize")
        block = sizes[qtype(new)][0]
        if t.shape[0] % block:
            raise UnsupportedError(
                f"{name} has rows of {t.shape[0]} values, not a multiple of {qtype(new).name}'s block of {block}; "
                "pass a llama.cpp mix (e.g. q4_k_m), whose quantizer picks another type for such tensors")
        out[name] = new
    return out


def _kv_section(header, file_type: int | None) -> tuple[int, bytes]:
    """(number of pairs, their bytes): the base model's pairs verbatim; general.file_type kept (None), set,
    or dropped (-1: no llama.cpp file type says "all of this one type")."""
    with open(header.path, "rb") as f:
        def raw(key: str) -> bytes:
            start, end = header.field_spans[key]
            f.seek(start)
            return f.read(end - start)

        parts = [raw(key) for key in header.fields if file_type is None or key != "general.file_type"]
    if file_type is not None and file_type >= 0:
        key = b"general.file_type"
        parts.append(struct.pack("<Q", len(key)) + key + struct.pack("<II", _U32, file_type))
    return len(parts), b"".join(parts)


def _pieces(header, name: str, new_type: int, deltas) -> list[Callable[[], bytes]]:
    """The output bytes of one tensor as work items of at most _CHUNK_VALUES values, in file order."""
    t = header.tensors[name]
    n_per_row = t.shape[0]
    n_rows = t.n_bytes // _row_bytes(t.type, n_per_row)
    rows = max(1, _CHUNK_VALUES // n_per_row)
    in_row = _row_bytes(t.type, n_per_row)

    def piece(r0: int, r1: int) -> bytes:
        with open(header.path, "rb") as f:
            f.seek(t.offset + r0 * in_row)
            data = np.frombuffer(f.read((r1 - r0) * in_row), dtype=np.uint8)
        if name not in deltas and new_type == t.type:
            return data.tobytes()
        w = _convert("dequantize", t.type, data, r1 - r0, n_per_row)
        for s, a, b in deltas.get(name, ()):
            w += np.float32(s) * (b[r0:r1] @ a)          # rows r0:r1 of B @ A (n_out, n_in)
        return _convert("quantize", new_type, w, r1 - r0, n_per_row).tobytes()

    return [lambda r0=r0: piece(r0, min(r0 + rows, n_rows)) for r0 in range(0, n_rows, rows)]


def _write(header, deltas, types: dict[str, int], file_type: int | None, path: Path, n_threads: int,
           progress: Callable[[int, int], None] | None) -> None:
    alignment = header.get("general.alignment", 32)
    n_kv, kv = _kv_section(header, file_type)
    infos, offset = [], 0
    for name, t in header.tensors.items():
        size = t.n_bytes // _row_bytes(t.type, t.shape[0]) * _row_bytes(types[name], t.shape[0])
        key = name.encode()
        infos.append(struct.pack("<Q", len(key)) + key + struct.pack("<I", len(t.shape))
                     + struct.pack(f"<{len(t.shape)}Q", *t.shape) + struct.pack("<IQ", types[name], offset))
        offset += (size + alignment - 1) // alignment * alignment
    head = struct.pack("<4sIQQ", b"GGUF", 3, len(infos), n_kv) + kv + b"".join(infos)
    head += b"\0" * (-len(head) % alignment)
    names = list(header.tensors)
    work = [(i, p) for i, name in enumerate(names) for p in _pieces(header, name, types[name], deltas)]
    last = {i: k for k, (i, _) in enumerate(work)}                        # each tensor's last piece
    with open(path, "wb") as out, ThreadPoolExecutor(max_workers=n_threads) as pool:
        out.write(head)
        pending: deque = deque()
        written = 0
        for k, (i, fn) in enumerate(work):
            pending.append((k, i, pool.submit(fn)))
            while pending and (len(pending) > 2 * n_threads or k == len(work) - 1):
                kk, ii, fut = pending.popleft()
                data = fut.result()
                out.write(data)
                written += len(data)
                if last[ii] == kk:
                    out.write(b"\0" * (-written % alignment))
                    written += -written % alignment
                    if progress is not None:
                        progress(ii + 1, len(names))
        if out.tell() != len(head) + offset:
            raise RuntimeError(f"merge wrote {out.tell()} bytes, expected {len(head) + offset} (a bug in ggml-lora)")


def _llama_cpp_quantize(src: Path, dst: Path, type_name: str, n_threads: int) -> None:
    import ctypes

    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{type_name}")
    params.nthread = n_threads
    from llama_cpp._utils import suppress_stdout_stderr        # the quantizer prints a line per tensor

    with suppress_stdout_stderr(disable=False):
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if rc != 0:
        raise RuntimeError(f"llama.cpp's quantizer failed ({rc}) making {type_name} from {src}")


def merge_types() -> list[str]:
    """What ``merge_adapters(type=...)`` accepts: same, the ggml types, and llama.cpp's mixes."""
    import llama_cpp

    # llama.cpp's K-quant mixes (the i-quant ones need an importance matrix, which a merge does not have)
    mixes = sorted(k[19:].lower() for k in dir(llama_cpp) if re.fullmatch(r"LLAMA_FTYPE_MOSTLY_Q[2-6]_K_[SML]", k))
    return ["same", *(t.lower() for t in ROW_TYPES), *mixes]


def merge_adapters(model: str | os.PathLike[str], adapters: Sequence, out: str | os.PathLike[str], *,
                   type: str = "same", n_threads: int | None = None,
                   progress: Callable[[int, int], None] | None = None) -> Path:
    """Write ``model`` with ``adapters`` merged into its weights as the GGUF ``out``; returns ``out``.

    ``adapters``: paths, or ``(path, scale)`` pairs (scale as llama.cpp's ``--lora-scaled``). ``type``:
    ``"same"`` (each tensor keeps its type), a ggml type (``"f16"``, ``"q8_0"``, ``"q4_k"``, ...) for every
    matrix, or a llama.cpp mix (``"q4_k_m"``, ...). Every adapter is checked against the model as
    ``apply_adapters`` checks it before anything is written; ``out`` appears only once complete.
    ``progress(tensors_done, tensors_total)`` is called as tensors are written.
    """
    from .adapter_file import atomic_path
    from .gguf_header import read_header

    header = read_header(model)
    if (header.get("split.count") or 1) > 1:      # the first part alone holds only some of the tensors
        raise UnsupportedError(f"{model} is the first part of a split model, which merge does not read; join "
                               "its parts first (llama.cpp's llama-gguf-split --merge FIRST-PART OUT.gguf)")
    adapters = _adapter_list(adapters)
    out = Path(out)
    for p in (Path(model), *(a for a, _ in adapters)):
        if p.exists() and out.exists() and os.path.samefile(p, out):
            raise InvalidArgumentError(f"--out {out} is one of the inputs; write the merged model elsewhere")
    type_name = str(type).upper()
    choices = merge_types()
    if type_name.lower() not in choices:
        raise InvalidArgumentError(f"merge type {type!r} is not one of: {', '.join(choices)}")
    n_threads = max(1, n_threads or len(os.sched_getaffinity(0)))
    deltas = _deltas(header, adapters)
    mix = type_name not in ("SAME", *ROW_TYPES)
    single = "F16" if mix else type_name
    types = _target_types(header, deltas, single)
    file_type = None if single == "SAME" else _PURE_FTYPES.get(single, -1)
    with atomic_path(out) as tmp:
        if not mix:
            _write(header, deltas, types, file_type, tmp, n_threads, progress)
        else:
            f16 = tmp.with_name(tmp.name + ".f16")          # the F16 merge llama.cpp quantizes; never kept
            try:
                _write(header, deltas, types, file_type, f16, n_threads, progress)
                _llama_cpp_quantize(f16, tmp, type_name, n_threads)
            finally:
                f16.unlink(missing_ok=True)
    return out


__all__ = ["ROW_TYPES", "merge_adapters", "merge_types"]
