"""Small misuses (batches native code would read past, thread counts out of range, adapters on weights
llama.cpp does not adapt, a non-finite step) raise or say so instead of reaching native code."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from conftest import N_THREADS

from ggml_lora import Adapter, BaseModel, InvalidArgumentError, LoRAConfig
from ggml_lora._handles import Batch
from ggml_lora.forward import loss_batch
from ggml_lora.step import TrainingContext

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model(tiny_model_file):
    with BaseModel.load(tiny_model_file("llama", "q8_0"), n_threads=N_THREADS) as m:
        yield m


TOK = np.arange(1, 9)[None, :]          # (1, 8)


@pytest.mark.parametrize("kwargs, message", [
    (dict(loss_rows=[0, 1, 2], labels=[5, 6]), "2 labels for 3 loss rows"),
    (dict(loss_rows=[0, 1]), "go together"),
    (dict(labels=[1]), "go together"),
    (dict(loss_rows=[0, 8], labels=[1, 2]), r"\[0, n_seq\*n_tokens=8\)"),
    (dict(loss_rows=[-1], labels=[1]), r"\[0, n_seq\*n_tokens=8\)"),
    (dict(loss_rows=[3, 2], labels=[1, 2]), "ascending"),
    (dict(loss_rows=[[1, 2]], labels=[[1, 2]]), "1-D"),
    (dict(loss_rows=[0.5], labels=[1]), "integers"),
    (dict(segments=np.zeros((1, 7), dtype=int)), "segments has shape"),
    (dict(segments=np.zeros((1, 8))), "segments must be a 2-D array of integers"),
])
def test_batch_refuses_what_native_code_would_read_past(kwargs, message):
    with pytest.raises(InvalidArgumentError, match=message):
        Batch(TOK, **kwargs)


@pytest.mark.parametrize("tokens", [np.zeros((0, 4)), np.arange(4), np.zeros((2, 2, 2))])
def test_batch_refuses_bad_token_shapes(tokens):
    with pytest.raises(InvalidArgumentError, match="tokens"):
        Batch(tokens)


@pytest.mark.parametrize("n_threads", [0, -1, 513, 10**9, True, 2.0])
def test_n_threads_out_of_ggml_range(tiny_model_file, n_threads):
    with pytest.raises(InvalidArgumentError, match=r"n_threads=.*\[1, 512\]"):
        BaseModel.load(tiny_model_file("llama", "q8_0"), n_threads=n_threads)


@pytest.mark.parametrize("name, message", [
    ("token_embd.weight", "cannot carry a LoRA"),
    ("output_norm.weight", "cannot carry a LoRA"),
    ("blk.0.attn_norm.weight", "cannot carry a LoRA"),
    ("output.weight", "not a tensor"),                        # tied in this model: no output.weight
    ("blk.7.attn_q.weight", "not a tensor"),
])
def test_from_tensors_accepts_only_what_llama_cpp_adapts(model, name, message):
    pair = (np.zeros((2, 64), np.float32), np.zeros((64, 2), np.float32))
    with pytest.raises(InvalidArgumentError, match=message):
        Adapter.from_tensors(model, {name: pair}, alpha=2.0)


def test_a_non_finite_step_says_it_was_skipped(model):
    adapter = Adapter.init(model, LoRAConfig(rank=2, target_modules=("q_proj",)))
    name = adapter.targets[0]
    a, b = adapter.get(name)
    with TrainingContext(adapter) as ctx:
        batch = loss_batch(model, TOK[0])
        ok = ctx.step([batch], 1e-3, 1)
        assert not ok.skipped and ok.clip_scale == 1.0
        before = adapter.get(name)
        # an infinite lora_b cannot be set through Adapter.set (it refuses non-finite values), but a
        # huge one overflows the forward to inf/nan: the step must then change nothing
        adapter.set(name, lora_b=np.full_like(b, 3e38))
        huge = adapter.get(name)
        res = ctx.step([batch], 1e-3, 2)
        assert res.skipped and res.clip_scale == 0.0 and not np.isfinite(res.loss)
        after = adapter.get(name)
        np.testing.assert_array_equal(after[0], huge[0])
        np.testing.assert_array_equal(after[1], huge[1])
        assert not any(g.any() for pair in ctx.gradients().values() for g in pair)   # dropped, not kept
        assert before[0].shape == after[0].shape
    adapter.close()


def test_gpu_check_fails_when_its_tests_fail():
    # the GPU check ran pytest as `pytest ... | grep ... || true`, so failures on the GPU exited 0
    script = (ROOT / "scripts" / "gpu_check.sh").read_text()
    assert "set -euo pipefail" in script
    for line in script.splitlines():
        if "pytest" in line and not line.lstrip().startswith("#"):
            assert not re.search(r"\|\|\s*true", line), line


def test_python_status_codes_are_the_headers():
    # errors.py cannot read the header (the binding imports it), so its codes are checked against it here
    from ggml_lora import _native
    from ggml_lora.errors import BY_CODE

    names = {"INVALID_ARGUMENT", "IO", "FORMAT", "UNSUPPORTED", "OUT_OF_MEMORY", "BACKEND", "INTERNAL"}
    codes = {getattr(_native.lib, f"GLORA_ERR_{n}") for n in names}
    assert codes == set(BY_CODE)
    assert BY_CODE[_native.lib.GLORA_ERR_OUT_OF_MEMORY].__name__ == "OutOfMemoryError"
    assert BY_CODE[_native.lib.GLORA_ERR_INTERNAL].__name__ == "InternalError"
