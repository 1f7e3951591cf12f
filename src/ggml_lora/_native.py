"""The cffi (ABI mode) binding of libggml_lora.

The declarations come from ``ggml_lora.h`` itself (the part between the cffi markers), so there is no
hand-kept mirror of the C API. Every call that returns a status goes through :func:`check`, the one
place where native errors become Python exceptions.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from pathlib import Path

import cffi

from .errors import BY_CODE, GGMLLoRAError, InternalError

ABI_VERSION = 16

_HERE = Path(__file__).resolve().parent
_LIB_NAMES = {"linux": "libggml_lora.so", "darwin": "libggml_lora.dylib", "win32": "ggml_lora.dll"}

log = logging.getLogger("ggml_lora.ggml")


def _find(env: str, candidates: list[Path], what: str) -> Path:
    override = os.environ.get(env)
    if override:
        path = Path(override)
        if not path.exists():
            raise ImportError(f"{env}={override} does not exist")
        return path
    for path in candidates:
        if path.exists():
            return path
    tried = ", ".join(str(p) for p in candidates)
    raise ImportError(f"ggml-lora's {what} was not found (tried {tried}); reinstall the package or set {env}")


def read_cdef(header: Path) -> str:
    """The cffi-clean declarations of ``header``: the text between the markers, without preprocessor lines."""
    text = header.read_text()
    match = re.search(r"/\* cffi-begin \*/(.*)/\* cffi-end \*/", text, re.DOTALL)
    if not match:
        raise ImportError(f"{header} has no cffi markers")
    body = re.sub(r"/\*.*?\*/", "", match.group(1), flags=re.DOTALL)
    lines = [line for line in body.splitlines() if not line.lstrip().startswith("#")]
    return "\n".join(lines).replace("GLORA_API ", "")


HEADER = _find("GGML_LORA_HEADER", [_HERE / "ggml_lora.h", _HERE.parents[1] / "native" / "ggml_lora.h"], "header")
LIBRARY = _find("GGML_LORA_LIBRARY", [_HERE / _LIB_NAMES.get(sys.platform, "libggml_lora.so")], "native library")

ffi = cffi.FFI()
ffi.cdef(read_cdef(HEADER))
lib = ffi.dlopen(str(LIBRARY))

if lib.glora_abi_version() != ABI_VERSION:
    raise ImportError(
        f"{LIBRARY} implements ABI version {lib.glora_abi_version()}, but this ggml_lora package expects "
        f"{ABI_VERSION}; the package and its native library come from different builds, reinstall ggml-lora")


def last_error() -> str:
    return ffi.string(lib.glora_last_error()).decode("utf-8", "replace")


def check(status: int, what: str = "") -> None:
    """Raise the exception for a non-zero native status, with the native message."""
    if status == 0:
        return
    message = last_error() or f"native call failed with status {status}"
    if what:
        message = f"{what}: {message}"
    cls = BY_CODE.get(status, InternalError)
    raise cls(message, code=status)


# ggml's log levels (ggml.h, enum ggml_log_level): 5 continues the previous line
_LEVELS = {1: logging.DEBUG, 2: logging.INFO, 3: logging.WARNING, 4: logging.ERROR}
_last_level = [logging.DEBUG]


@ffi.callback("void(int32_t, const char *, void *)")
def _on_log(level: int, text, _user) -> None:
    try:
        py_level = _LEVELS.get(level, _last_level[0])
        _last_level[0] = py_level
        if log.isEnabledFor(py_level):
            msg = ffi.string(text).decode("utf-8", "replace").rstrip("\n")
            if msg:
                log.log(py_level, "%s", msg)
    except Exception:  # a callback must never raise into C
        pass


lib.glora_set_log_callback(_on_log, ffi.NULL)

__all__ = ["HEADER", "LIBRARY", "GGMLLoRAError", "check", "ffi", "last_error", "lib", "read_cdef"]
