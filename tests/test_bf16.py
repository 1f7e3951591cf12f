"""bfloat16 products on AMX tiles (TrainingConfig.amx_bf16, BaseModel.set_amx_bf16) give the product of the bf16 values.

Where the CPU has AMX-BF16 the products through the working copies of the frozen weights run in a kernel
of our own; the checks of that kernel run only there. Everywhere: asking for it where the CPU has no AMX
is a clear error, and the trainer's choice follows the CPU and is recorded with the adapter.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import N_THREADS
from test_frozen_memory import ALL

from ggml_lora import (Adapter, BaseModel, InvalidArgumentError, LoRAConfig, LoRATrainer, TrainingConfig,
                       UnsupportedError, cpu_has_amx_bf16)
from ggml_lora.forward import loss_batch, loss_sum
from ggml_lora.step import TrainingContext

AMX = cpu_has_amx_bf16()
needs_amx = pytest.mark.skipif(not AMX, reason="this CPU has no AMX-BF16 tiles")


def gradients(path, bf16: bool, f16_weights: bool, tokens, checkpointing: bool = False):
    """The LoRA gradients of one batch, and its loss through the working copies."""
    with BaseModel.load(path, n_threads=N_THREADS) as model:
        model.set_amx_bf16(bf16)
        adapter = Adapter.init(model, LoRAConfig(rank=4, target_modules=ALL))
        rng = np.random.default_rng(1)
        for name in adapter.targets:
            adapter.set(name, lora_b=rng.normal(0, 0.1, adapter.get(name)[1].shape))
        batch = loss_batch(model, tokens)
        with TrainingContext(adapter, f16_weights=f16_weights, gradient_checkpointing=checkpointing) as ctx:
            ctx.accumulate(batch, batch.n_loss)
            grads = ctx.gradients()
        return grads, loss_sum(model, adapter, batch, f16_weights=True) / batch.n_loss


def relative_errors(got: dict, ref: dict) -> list[float]:
    return [float(np.abs(g - r).max() / np.abs(r).max()) for name in ref for g, r in zip(got[name], ref[name])]


def to_bf16(a: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bits, rounded to nearest even (as ggml rounds)."""
    u = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32).astype(np.uint64)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def from_bf16(b: np.ndarray) -> np.ndarray:
    return (b.astype(np.uint32) << 16).view(np.float32)


@needs_amx
@pytest.mark.parametrize("K, N, M, n_mat, threads", [(64, 32, 600, 1, 2), (576, 192, 77, 1, 2), (32000, 64, 37, 1, 1),
                                                     (1536, 576, 1, 1, 2), (96, 1024, 2049, 1, 2),
                                                     (64, 256, 256, 5, 2), (256, 64, 100, 3, 2),
                                                     (56, 56, 56, 9, 2), (88, 64, 88, 4, 2), (1030, 40, 70, 1, 2),
                                                     (7, 3, 5, 2, 1), (64, 100, 9, 1, 2)])
def test_amx_product_is_the_product_of_the_bf16_values(K, N, M, n_mat, threads):
    # x rounded to BF16 times the BF16 w, summed in F32, against the same rounded values summed in float64;
    # row counts that are not whole tiles, one row, a vocabulary-long K (several K chunks), and stacks of
    # matrices as attention multiplies them (one per head and sequence)
    from ggml_lora._native import ffi, lib

    rng = np.random.default_rng(K + N + M)
    w = to_bf16(rng.normal(0, 0.05, (n_mat, N, K)).astype(np.float32))
    x = rng.normal(0, 1, (n_mat, M, K)).astype(np.float32)
    x[..., ::7] *= 1e-3                                      # magnitudes that differ, as in activations
    out = np.empty((n_mat, M, N), np.float32)
    p = ffi.cast("uint16_t *", w.ctypes.data)
    assert lib.glora_selftest_amx(p, ffi.cast("float *", x.ctypes.data), ffi.cast("float *", out.ctypes.data),
                                  K, N, M, n_mat, threads) == 0
    xr, wr = from_bf16(to_bf16(x)).astype(np.float64), from_bf16(w).astype(np.float64)
    ref = xr @ wr.transpose(0, 2, 1)
    # (the last five: K and N that are not whole tiles, as attention over rows of any length multiplies)
    # F32 sums of K products: error below K·2^-24 of the sum of magnitudes, far less in practice
    bound = 4 * np.sqrt(K) * 2.0**-24 * (np.abs(xr) @ np.abs(wr).transpose(0, 2, 1))
    assert np.all(np.abs(out - ref) <= bound + 1e-30)


@needs_amx
def test_bf16_copies_of_a_quantized_model_train_like_f16_copies(tiny_model_file):
    # Q4_1: forward copies and transposed copies are BF16 instead of F16 (3 mantissa bits fewer) and the
    # activations are rounded to BF16 instead of F16: the same gradients to about BF16's precision
    path = tiny_model_file("llama", "q4_1")
    tokens = np.random.default_rng(0).integers(0, 32000, (2, 300))
    ref, ref_loss = gradients(path, False, True, tokens)
    got, loss = gradients(path, True, True, tokens)
    errors = relative_errors(got, ref)
    # BF16 keeps 8 significant bits (relative rounding 2^-9 = 0.2%); sums over many products average it out.
    # Measured: median 0.92e-2 (max 1.5e-2) while only whole-tile attention products ran in BF16, 1.06e-2
    # (max 2.3e-2) with all of them (this model's head size and 300 rows are not whole tiles)
    assert max(errors) < 3e-2, errors
    assert float(np.median(errors)) < 1.5e-2, errors
    assert abs(loss - ref_loss) < 1e-3 * abs(ref_loss)


def test_bf16_where_the_cpu_has_no_amx_is_a_clear_error(tiny_model_file, tmp_path):
    path = tiny_model_file("llama", "q4_1")
    with BaseModel.load(path, n_threads=N_THREADS) as model:
        with pytest.raises(InvalidArgumentError) as bad:
            model.set_amx_bf16(1)                               # not a bool
        assert "amx_bf16" in str(bad.value)
        if AMX:
            model.set_amx_bf16(True)
            assert model.amx_bf16
            model.set_amx_bf16(False)
            assert not model.amx_bf16
        else:
            with pytest.raises(UnsupportedError, match="AMX"):
                model.set_amx_bf16(True)
            assert not model.amx_bf16
            trainer = LoRATrainer(model, LoRAConfig(rank=4), TrainingConfig(amx_bf16=True, max_steps=1,
                                                                             output_dir=str(tmp_path / "out")))
            with pytest.raises(UnsupportedError, match="AMX"):
                trainer.train([{"text": "hello world " * 8}])
            assert not (tmp_path / "out" / "adapter.gguf").exists()


def test_the_trainer_chooses_bf16_where_the_cpu_has_amx(tiny_model_file, tmp_path):
    path = tiny_model_file("llama", "q4_1")
    with BaseModel.load(path, n_threads=N_THREADS) as model:
        out = tmp_path / "out"
        trainer = LoRATrainer(model, LoRAConfig(rank=4), TrainingConfig(max_steps=2, batch_size=2,
                                                                         output_dir=str(out)))
        history = trainer.train([{"text": "the quick brown fox jumps over the lazy dog " * 4}] * 4)
        assert np.isfinite(history.losses).all()
        resolved = json.loads((out / "adapter_config.json").read_text())["resolved"]
        assert resolved["amx_bf16"] is AMX
        assert model.amx_bf16 is AMX
