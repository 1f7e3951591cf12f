"""Deprecated name (until the next release): the llama-cpp-python glue is ggml_lora.llama_cpp_python."""

from ._deprecated import forwarding

__getattr__ = forwarding("llama", "llama_cpp_python")
