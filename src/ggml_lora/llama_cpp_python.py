"""Helpers around llama-cpp-python: the tokenizer of a GGUF, adapters on a live Llama, and keeping the
pinned llama.cpp off the code path that crashes on CPUs with AMX.

**AMX.** llama-cpp-python built with ``GGML_NATIVE`` on a CPU with AMX (Intel Sapphire Rapids and
later) puts Q4_x/Q8_0 weights into ggml's AMX "extra buffer type", whose tile configuration is broken
in the pinned llama.cpp: the first AMX instruction in a worker thread raises SIGILL, so any prompt of
more than a few tokens kills the process. Loading models with the model parameter
``use_extra_bufts = false`` avoids that path (the weights stay in ordinary CPU buffers; llama.cpp's
other kernels are unchanged). Importing ``ggml_lora`` calls :func:`protect_llama_cpp`, which makes
that the default of every ``llama_cpp.Llama`` created afterwards in this process, on CPUs whose
llama.cpp reports AMX only; elsewhere nothing changes (the extra buffer types also hold the
repacked Q4_0 layouts that make llama.cpp faster on AVX2). Our own ggml never uses extra buffer types.
"""

from __future__ import annotations

import atexit
import os
import weakref
import warnings
from collections.abc import Mapping


def parse_system_info(text: str) -> dict[str, str]:
    """llama.cpp's ``llama_print_system_info()`` as {feature: value}, e.g. {"AVX2": "1", "AMX_INT8": "1"}."""
    features = {}
    for part in text.replace("\n", "|").split("|"):
        key, sep, value = part.partition("=")
        if sep:
            features[key.split(":")[-1].strip()] = value.strip()
    return features


def extra_buffers_crash(features: Mapping[str, str]) -> bool:
    """Whether the pinned llama.cpp's extra buffer types crash on a CPU with these ggml features: they
    do where its ggml has AMX kernels (AMX_INT8), and nowhere else."""
    return features.get("AMX_INT8", "0") not in ("", "0")


def llama_cpp_features() -> dict[str, str]:
    """The CPU features of llama-cpp-python's own ggml build (what its kernels will use)."""
    import llama_cpp

    return parse_system_info(llama_cpp.llama_print_system_info().decode("utf-8", "replace"))


def protect_llama_cpp(features: Mapping[str, str] | None = None) -> bool:
    """Make ``use_extra_bufts = false`` the default model parameter of llama-cpp-python in this process
    when ``features`` (default: what its ggml reports) say the extra buffer types crash; idempotent.

    Returns whether the default is now off. A ``Llama`` created before this call keeps its parameters.
    """
    from llama_cpp import llama_cpp as api

    if getattr(api.llama_model_default_params, "_ggml_lora_safe", False):
        return True
    if not extra_buffers_crash(llama_cpp_features() if features is None else features):
        return False
    original = api.llama_model_default_params

    def llama_model_default_params():
        params = original()
        params.use_extra_bufts = False
        return params

    llama_model_default_params._ggml_lora_safe = True
    llama_model_default_params.__doc__ = original.__doc__
    # Llama and LlamaModel call it through the module llama_cpp.llama_cpp; the package re-exports it
    import llama_cpp

    api.llama_model_default_params = llama_model_default_params
    llama_cpp.llama_model_default_params = llama_model_default_params
    return True


def llama_uses_extra_buffers() -> bool:
    """Whether a Llama created now in this process gets llama.cpp's extra buffer types (its default
    model parameters, as protect_llama_cpp may have changed them); False when llama-cpp-python is absent."""
    try:
        from llama_cpp import llama_cpp as api
    except ImportError:
        return False
    return bool(api.llama_model_default_params().use_extra_bufts)


def check_llama(llm) -> None:
    """Warn when ``llm`` was loaded with extra buffer types on a CPU where they crash (it was created
    before ggml_lora was imported): its first evaluation of a longer prompt will kill the process."""
    params = getattr(llm, "model_params", None)
    if params is not None and params.use_extra_bufts and extra_buffers_crash(llama_cpp_features()):
        warnings.warn("this Llama was loaded with llama.cpp's extra buffer types on a CPU with AMX, where the "
                      "pinned llama.cpp crashes (SIGILL) on the first longer prompt; import ggml_lora (or call "
                      "ggml_lora.llama.protect_llama_cpp()) before creating the Llama", RuntimeWarning, stacklevel=3)


_vocabs: weakref.WeakSet = weakref.WeakSet()


@atexit.register
def _close_vocabs() -> None:
    """Free the vocab-only Llamas still open while llama_cpp can: left to the interpreter's teardown,
    their __del__ runs after llama_cpp's functions are gone and prints a TypeError traceback."""
    for llm in list(_vocabs):
        try:
            llm.close()
        except Exception:
            pass


def load_vocab(path: str | os.PathLike[str]):
    """A vocab-only llama_cpp.Llama for tokenizing with the GGUF's own tokenizer."""
    from llama_cpp import Llama

    llm = Llama(model_path=str(path), vocab_only=True, verbose=False)
    _vocabs.add(llm)
    return llm


def check_adapters(model_path, adapter_paths) -> None:
    """Check GGUF LoRA files against a base GGUF as llama.cpp will, raising GGUFFormatError/FileNotFoundError.

    llama-cpp-python crashes the process on an adapter llama.cpp rejects (a NULL handle is used anyway),
    so nothing reaches llama.cpp before this passes.
    """
    from . import gguf_file
    from .adapter_file import read_lora_gguf

    header = gguf_file.open_reader(model_path)
    arch = header.get("general.architecture")
    shapes = {name: t.shape for name, t in header.tensors.items()}
    tied = "output.weight" not in shapes
    for path in adapter_paths:
        _, pairs, _ = read_lora_gguf(path, arch, shapes)
        if tied and ("token_embd.weight" in pairs or "output.weight" in pairs):
            from .errors import GGUFFormatError

            raise GGUFFormatError(f"{path}: LoRA on the tied token_embd/output of {model_path} aborts llama.cpp")


def apply_adapters(llm, adapters) -> list:
    """Set several GGUF LoRA adapters, each with its scale, on a live ``llama_cpp.Llama`` at once.

    ``adapters`` is a list of ``(path, scale)``. The previous set is replaced (an empty list clears it)
    and the KV cache is reset so the next evaluation uses the new set. Adapters set by an earlier call
    are freed once replaced. Returns the native handles of the new set.
    """
    import ctypes

    import llama_cpp

    adapters = [(path, float(scale)) for path, scale in adapters]
    check_llama(llm)
    check_adapters(llm.model_path, [path for path, _ in adapters])
    model = llm._model.model
    ctx = llm._ctx.ctx
    handles = []
    for path, _scale in adapters:
        h = llama_cpp.llama_adapter_lora_init(model, str(path).encode())
        if not h:  # a NULL LP_c_void_p is falsy but not None
            raise RuntimeError(f"llama.cpp could not load the adapter {path}")
        handles.append(h)
    n = len(handles)
    arr = (llama_cpp.llama_adapter_lora_p_ctypes * max(n, 1))(*handles)
    scales = (ctypes.c_float * max(n, 1))(*[float(s) for _, s in adapters])
    if n:
        llama_cpp.llama_set_adapters_lora(ctx, arr, n, scales)
    else:
        llama_cpp.llama_set_adapters_lora(ctx, None, 0, None)
    # the replaced set is no longer referenced by the context: free it (llama.cpp would only at model free)
    for old in getattr(llm, "_ggml_lora_adapters", []):
        llama_cpp.llama_adapter_lora_free(old)
    llm._ggml_lora_adapters = handles
    llm.reset()
    return handles


protect_llama_cpp()
