"""Multi-part GGUF models (llama.cpp's gguf-split format): finding the parts, reading their headers as one.

The first part, ``<prefix>-00001-of-0000N.gguf``, holds every metadata key and ``split.count``; part i
(from 0) is ``<prefix>-<i+1:05d>-of-<N:05d>.gguf`` and says ``split.no = i``; together the parts hold
``split.tensors.count`` tensors, each in exactly one part. That is how llama.cpp's loader finds and checks
them (src/llama-model-loader.cpp:595-671; the names from llama_split_path, src/llama.cpp:545-566), and
how gguf-py's writer and tools/gguf-split write them.
"""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path

from .errors import GGUFFormatError, InvalidArgumentError, MissingPartError
from .gguf_header import I32, TYPE_NAMES, U16, Header, read_header

# a part's file name, as llama.cpp's downloader reads it (common/download.cpp:482-499)
PART_NAME = re.compile(r"^(.+)-(\d{5})-of-(\d{5})\.gguf$", re.IGNORECASE)


def _split_key(h: Header, key: str, vtype: int) -> int | None:
    f = h.fields.get(key)
    if f is None:
        return None
    if f.type != vtype:
        raise GGUFFormatError(f"{h.path}: metadata key '{key}' is {TYPE_NAMES.get(f.type, f.type)}, expected "
                              f"{TYPE_NAMES[vtype]} (as gguf-split writes it)")
    return f.value


def part_paths(first: Path, count: int) -> list[Path]:
    """The paths of the ``count`` parts of the split model whose first part is ``first``."""
    suffix = f"-00001-of-{count:05d}.gguf"
    if not first.name.endswith(suffix):
        raise GGUFFormatError(f"{first}: split.count={count} but the name does not end in '{suffix}', so its other "
                              "parts cannot be found")
    prefix = first.name[: -len(suffix)]
    return [first.with_name(f"{prefix}-{i + 1:05d}-of-{count:05d}.gguf") for i in range(count)]


def read_model_header(path: str | os.PathLike[str]) -> Header:
    """The checked header of a GGUF model; for the first part of a split model, with every part's tensors
    (``Header.parts`` lists the files, ``Tensor.part`` says which holds a tensor)."""
    first = read_header(path)
    count = _split_key(first, "split.count", U16)
    if count is None or count <= 1:
        return first
    no = _split_key(first, "split.no", U16)
    if no != 0:
        raise InvalidArgumentError(f"{first.path} is part {(no or 0) + 1} of {count} of a split model; load the "
                                   f"first part, ...-00001-of-{count:05d}.gguf")
    paths = part_paths(first.path, count)
    tensors = dict(first.tensors)
    for i, p in enumerate(paths[1:], start=1):
        if not p.exists():
            raise MissingPartError(f"{p}: part {i + 1} of {count} of {first.path.name} is missing; every part must "
                                   "lie beside the first")
        h = read_header(p)
        if _split_key(h, "split.no", U16) != i or _split_key(h, "split.count", U16) != count:
            raise GGUFFormatError(f"{p}: split.no={h.get('split.no')}, split.count={h.get('split.count')}; "
                                  f"expected {i} and {count} (parts of different models mixed up?)")
        for name, t in h.tensors.items():
            if name in tensors:
                raise GGUFFormatError(f"{p}: tensor '{name}' is also in an earlier part")
            tensors[name] = dataclasses.replace(t, part=i)
    want = _split_key(first, "split.tensors.count", I32)
    if want is not None and want != len(tensors):
        raise GGUFFormatError(f"{first.path}: split.tensors.count={want} but its {count} parts hold "
                              f"{len(tensors)} tensors")
    return dataclasses.replace(first, tensors=tensors, parts=tuple(paths))


class EachPart:
    """``check()`` and ``close()`` over one object per part of a model (each part's mapped-file watch)."""

    def __init__(self, items):
        self.items = list(items)

    def check(self) -> None:
        for item in self.items:
            item.check()

    def close(self) -> None:
        for item in self.items:
            item.close()
