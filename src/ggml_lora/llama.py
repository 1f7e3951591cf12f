"""Helpers around llama-cpp-python: the tokenizer of a GGUF (and, later, adapters on a live Llama)."""

from __future__ import annotations

import os


def load_vocab(path: str | os.PathLike[str]):
    """A vocab-only llama_cpp.Llama for tokenizing with the GGUF's own tokenizer."""
    from llama_cpp import Llama

    return Llama(model_path=str(path), vocab_only=True, verbose=False)


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
