"""A strict, fast reader of GGUF headers (metadata and tensor table), for untrusted files.

ggml's own parser aborts the process on some malformed inputs and gguf-py's reader decodes every
tokenizer string into numpy views (seconds for a 150k-token vocabulary). This reader checks every
count, length, type, dimension and offset against the file before anything else reads it, and skips
array contents it is not asked for.
"""

from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import GGUFFormatError

MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4

# GGUF value types (gguf.GGUFValueType)
U8, I8, U16, I16, U32, I32, F32, BOOL, STRING, ARRAY, U64, I64, F64 = range(13)
_SCALAR = {U8: "<B", I8: "<b", U16: "<H", I16: "<h", U32: "<I", I32: "<i", F32: "<f", BOOL: "<?",
           U64: "<Q", I64: "<q", F64: "<d"}
TYPE_NAMES = {U8: "UINT8", I8: "INT8", U16: "UINT16", I16: "INT16", U32: "UINT32", I32: "INT32", F32: "FLOAT32",
              BOOL: "BOOL", STRING: "STRING", ARRAY: "ARRAY", U64: "UINT64", I64: "INT64", F64: "FLOAT64"}


@dataclass(frozen=True)
class Field:
    type: int                 # GGUF value type
    value: Any                # scalar or str; for arrays, a list (strings decoded only when small)
    elem_type: int | None = None
    count: int = 0


@dataclass(frozen=True)
class Tensor:
    name: str
    shape: tuple[int, ...]    # ggml order, ne[0] first
    type: int                 # ggml type id
    type_name: str
    offset: int               # absolute file offset of the data (in Header.parts[part] for a split model)
    n_bytes: int
    part: int = 0             # which file of a split model holds it (gguf_split.read_model_header)


@dataclass(frozen=True)
class Header:
    path: Path
    version: int
    fields: dict[str, Field]
    tensors: dict[str, Tensor]
    data_offset: int
    file_size: int
    # byte range [start, end) of each key-value pair in the file, key included (to copy them verbatim)
    field_spans: dict[str, tuple[int, int]] = field(default_factory=dict)
    # a split model's files in order, path first, when `tensors` holds every part's (gguf_split.py)
    parts: tuple[Path, ...] = ()

    def get(self, key: str, default: Any = None) -> Any:
        f = self.fields.get(key)
        return default if f is None else f.value


class _Cursor:
    def __init__(self, buf, path: Path):
        self.buf, self.pos, self.path, self.size = buf, 0, path, len(buf)

    def fail(self, what: str) -> GGUFFormatError:
        return GGUFFormatError(f"{self.path}: {what} (at byte {self.pos} of {self.size}); truncated or corrupted?")

    def take(self, n: int) -> int:
        if n < 0 or self.pos + n > self.size:
            raise self.fail(f"needs {n} more bytes")
        start = self.pos
        self.pos += n
        return start

    def scalar(self, fmt: str):
        n = struct.calcsize(fmt)
        return struct.unpack_from(fmt, self.buf, self.take(n))[0]

    def string(self, what: str, decode: bool = True) -> str | None:
        n = self.scalar("<Q")
        if n > self.size - self.pos:
            raise self.fail(f"{what}: string of {n} bytes runs past the end of the file")
        start = self.take(n)
        if not decode:
            return None
        try:
            return bytes(self.buf[start:start + n]).decode("utf-8")
        except UnicodeDecodeError:
            raise self.fail(f"{what}: string is not valid UTF-8") from None


# arrays this long are skipped (their length is kept) unless they are numeric: tokenizer lists
_DECODE_STRINGS_UP_TO = 4096


_U64 = struct.Struct("<Q")


def _skip_strings(cur: _Cursor, count: int, key: str) -> None:
    # a vocabulary of 32k-150k strings: one tight loop instead of two method calls per
    # string: 2.7x faster reading a header with a 32k vocabulary (60 -> 23 ms)
    pos, size, buf, unpack = cur.pos, cur.size, cur.buf, _U64.unpack_from
    for i in range(count):
        if pos + 8 > size:
            cur.pos = pos
            raise cur.fail(f"key '{key}'[{i}]: needs 8 more bytes")
        n = unpack(buf, pos)[0]
        if n > size - pos - 8:
            cur.pos = pos + 8
            raise cur.fail(f"key '{key}'[{i}]: string of {n} bytes runs past the end of the file")
        pos += 8 + n
    cur.pos = pos


def _value(cur: _Cursor, vtype: int, key: str) -> Field:
    if vtype in _SCALAR:
        return Field(vtype, cur.scalar(_SCALAR[vtype]))
    if vtype == STRING:
        return Field(vtype, cur.string(f"key '{key}'"))
    if vtype != ARRAY:
        raise cur.fail(f"key '{key}' has unknown value type {vtype}")
    etype = cur.scalar("<I")
    count = cur.scalar("<Q")
    if etype in _SCALAR:
        item = struct.calcsize(_SCALAR[etype])
        if count > (cur.size - cur.pos) // item:
            raise cur.fail(f"key '{key}': array of {count} items runs past the end of the file")
        start = cur.take(count * item)
        values = list(struct.unpack_from(f"<{count}{_SCALAR[etype][1]}", cur.buf, start)) if count <= 1 << 20 else None
        return Field(ARRAY, values, etype, count)
    if etype == STRING:
        if count > (cur.size - cur.pos) // 8:
            raise cur.fail(f"key '{key}': array of {count} strings runs past the end of the file")
        if count <= _DECODE_STRINGS_UP_TO:
            return Field(ARRAY, [cur.string(f"key '{key}'[{i}]") for i in range(count)], etype, count)
        _skip_strings(cur, count, key)
        return Field(ARRAY, None, etype, count)
    raise cur.fail(f"key '{key}': arrays of type {etype} are not supported")


def read_header(path: str | os.PathLike[str]) -> Header:
    """Parse and check the header of a GGUF file. FileNotFoundError or GGUFFormatError otherwise."""
    import gguf

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(2, "no such GGUF file", str(path))
    if not path.is_file():
        raise GGUFFormatError(f"{path}: not a regular file")
    size = path.stat().st_size
    if size < 24:
        raise GGUFFormatError(f"{path}: {size} bytes is too short for a GGUF header")
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        buf = memoryview(mm)
        try:
            return _parse(buf, path, size, gguf)
        finally:
            buf.release()


def _parse(buf, path: Path, size: int, gguf) -> Header:
    cur = _Cursor(buf, path)
    magic = bytes(buf[:4])
    if magic != MAGIC:
        raise GGUFFormatError(f"{path}: not a GGUF file (starts with {magic!r}, expected {MAGIC!r})")
    cur.take(4)
    version = cur.scalar("<I")
    if version not in (2, 3):
        raise GGUFFormatError(f"{path}: GGUF version {version} is not supported (2 or 3)")
    n_tensors = cur.scalar("<Q")
    n_kv = cur.scalar("<Q")
    # every key-value pair and tensor entry takes at least 12 bytes
    if n_kv > size // 12 or n_tensors > size // 12:
        raise GGUFFormatError(f"{path}: header claims {n_kv} keys and {n_tensors} tensors, impossible in {size} bytes")

    fields: dict[str, Field] = {}
    spans: dict[str, tuple[int, int]] = {}
    for _ in range(n_kv):
        start = cur.pos
        key = cur.string("metadata key")
        # a corrupt length can make a "key" megabytes long: messages show its start only
        shown = key if len(key) <= 96 else f"{key[:96]}... ({len(key)} characters)"
        if key in fields:
            raise cur.fail(f"duplicate metadata key '{shown}'")
        fields[key] = _value(cur, cur.scalar("<I"), shown)
        spans[key] = (start, cur.pos)

    alignment = DEFAULT_ALIGNMENT
    if "general.alignment" in fields:
        fa = fields["general.alignment"]
        if fa.type != U32 or fa.value == 0 or fa.value & (fa.value - 1):
            raise GGUFFormatError(f"{path}: general.alignment must be a UINT32 power of two, got "
                                  f"{TYPE_NAMES.get(fa.type)} {fa.value!r}")
        alignment = fa.value

    entries = []
    names = set()
    for _ in range(n_tensors):
        name = cur.string("tensor name")
        if name in names:
            raise cur.fail(f"duplicate tensor name '{name}'")
        names.add(name)
        n_dims = cur.scalar("<I")
        if not 1 <= n_dims <= MAX_DIMS:
            raise cur.fail(f"tensor '{name}' has {n_dims} dimensions (1 to {MAX_DIMS} allowed)")
        shape = tuple(cur.scalar("<Q") for _ in range(n_dims))
        ttype = cur.scalar("<I")
        offset = cur.scalar("<Q")
        entries.append((name, shape, ttype, offset))

    data_offset = (cur.pos + alignment - 1) // alignment * alignment
    tensors: dict[str, Tensor] = {}
    for name, shape, ttype, offset in entries:
        try:
            qtype = gguf.GGMLQuantizationType(ttype)
            block, type_size = gguf.GGML_QUANT_SIZES[qtype]
        except (ValueError, KeyError):
            raise GGUFFormatError(f"{path}: tensor '{name}' has unknown type {ttype}") from None
        if any(d <= 0 or d >= 1 << 40 for d in shape):
            raise GGUFFormatError(f"{path}: tensor '{name}' has invalid shape {list(shape)}")
        if shape[0] % block:
            raise GGUFFormatError(f"{path}: tensor '{name}' of type {qtype.name} has ne[0]={shape[0]}, not a "
                                  f"multiple of its block size {block}")
        n_elements = 1
        for d in shape:
            n_elements *= d
        n_bytes = n_elements // block * type_size
        if offset % alignment:
            raise GGUFFormatError(f"{path}: tensor '{name}' data offset {offset} is not aligned to {alignment}")
        start = data_offset + offset
        if n_elements >= 1 << 50 or start + n_bytes > size:
            raise GGUFFormatError(f"{path}: data of tensor '{name}' ({list(shape)} {qtype.name}, {n_bytes} bytes at "
                                  f"{start}) lies outside the file ({size} bytes); truncated?")
        tensors[name] = Tensor(name, shape, ttype, qtype.name, start, n_bytes)
    return Header(path, version, fields, tensors, data_offset, size, spans)
