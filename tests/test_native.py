"""The C ABI: every declared function resolves, the version handshake, coexistence with llama-cpp-python."""

from __future__ import annotations

import ctypes
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import ggml_lora
from ggml_lora import _native


def declared_functions() -> list[str]:
    return re.findall(r"\b(glora_\w+)\s*\(", _native.read_cdef(_native.HEADER))


def test_every_declared_function_resolves():
    names = declared_functions()
    assert len(names) >= 20, names
    for name in names:
        assert callable(getattr(_native.lib, name)), name


def test_ggml_symbols_are_not_exported():
    # llama-cpp-python loads its own libggml with RTLD_GLOBAL; ours must stay private.
    lib = ctypes.CDLL(str(_native.LIBRARY))
    for sym in ("ggml_init", "ggml_mul_mat", "gguf_init_from_file", "ggml_backend_sched_new"):
        with pytest.raises(AttributeError):
            getattr(lib, sym)
    assert lib.glora_abi_version() == _native.ABI_VERSION


def test_cpu_features_fill_any_buffer_and_say_how_long_the_list_is():
    lib, ffi = _native.lib, _native.ffi
    n = lib.glora_cpu_features(ffi.NULL, 0)
    full = ffi.new("char[]", n + 1)
    assert lib.glora_cpu_features(full, n + 1) == n and len(ffi.string(full)) == n > 0
    short = ffi.new("char[]", b"x" * 7 + b"\0")
    assert lib.glora_cpu_features(short, 5) == n                 # truncated to 4 characters and a NUL
    assert ffi.string(short) == ffi.string(full)[:4] and short[6] == b"x"
    assert ggml_lora.cpu_features() == dict(kv.split("=") for kv in ffi.string(full).decode().split(";"))


def test_version_handshake_refuses_other_abi(tmp_path):
    pkg = Path(ggml_lora.__file__).resolve().parent
    copy = tmp_path / "ggml_lora"
    shutil.copytree(pkg, copy, ignore=shutil.ignore_patterns("*.so", "*.dylib", "*.dll", "__pycache__"))
    src = (copy / "_native.py").read_text()
    (copy / "_native.py").write_text(src.replace(f"ABI_VERSION = {_native.ABI_VERSION}", "ABI_VERSION = 999"))
    env = dict(os.environ, GGML_LORA_LIBRARY=str(_native.LIBRARY), GGML_LORA_HEADER=str(_native.HEADER),
               PYTHONPATH=str(tmp_path))
    proc = subprocess.run([sys.executable, "-c", "import ggml_lora"], env=env, capture_output=True, text=True)
    assert proc.returncode != 0
    assert "ABI version" in proc.stderr and "999" in proc.stderr, proc.stderr


def test_native_error_becomes_python_exception():
    # a status code plus the thread's message, turned into the mapped exception class in one place
    info = _native.ffi.new("glora_device_info *")
    with pytest.raises(ggml_lora.InvalidArgumentError, match="device index 999 out of range") as exc:
        _native.check(_native.lib.glora_device_get(999, info), "devices")
    assert exc.value.code == 1 and str(exc.value).startswith("devices: ")


def test_devices_and_device_choice(tiny_model_file):
    devs = ggml_lora.devices()
    assert any(d.type == "cpu" for d in devs)
    assert all(d.name and d.memory_total >= 0 for d in devs)
    path = tiny_model_file("llama", "f32")
    with ggml_lora.BaseModel.load(path, device="CPU") as model:
        assert model.device == "CPU"
    with pytest.raises(ggml_lora.InvalidArgumentError, match="unknown device 'nope'.*CPU"):
        ggml_lora.BaseModel.load(path, device="nope")


def test_coexists_with_llama_cpp_in_one_process(tiny_model_file):
    """llama_cpp's libggml (RTLD_GLOBAL) and our static ggml both work, interleaved, in one process."""
    from llama_cpp import Llama

    from reference import assert_parity

    path = tiny_model_file("llama", "q8_0")
    llm = Llama(model_path=str(path), logits_all=True, n_ctx=64, n_batch=64, n_ubatch=64, n_threads=2,
                type_k=0, type_v=0, verbose=False)
    tokens = list(range(10, 42))
    with ggml_lora.BaseModel.load(path, n_threads=2) as model:
        ours_before = model.logits(tokens)
        llm.reset()
        llm.eval(tokens)
        ref = np.array(llm.scores[: len(tokens)])
        ours_after = model.logits(tokens)
    llm.close()
    np.testing.assert_array_equal(ours_before, ours_after)
    assert_parity(ours_after, ref, "interleaved")
