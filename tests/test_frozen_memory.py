"""The frozen base costs its stored size. The backward's transposed copies of the frozen
matrices are made inside each step's compute buffer by default (keep_transposed_weights=False) instead
of being kept for the model's lifetime, and the gradients are bit-identical either way: the transient
copy holds the same values (the weight dequantized to F32, rounded to F16, or BF16/F32 for those types).
"""

from __future__ import annotations

import numpy as np
import pytest

from conftest import N_THREADS

from ggml_lora import Adapter, BaseModel, LoRAConfig
from ggml_lora.forward import loss_batch
from ggml_lora.step import TrainingContext, estimate_memory

ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def gradients(path, keep: bool, checkpointing: bool, f16_weights: bool, tokens) -> dict:
    # a model of its own per run: copies one context kept would otherwise be used by the next
    with BaseModel.load(path, n_threads=N_THREADS) as model:
        adapter = Adapter.init(model, LoRAConfig(rank=4, target_modules=ALL))
        rng = np.random.default_rng(1)
        for name in adapter.targets:
            adapter.set(name, lora_b=rng.normal(0, 0.1, adapter.get(name)[1].shape))
        with TrainingContext(adapter, keep_transposed_weights=keep, gradient_checkpointing=checkpointing,
                             f16_weights=f16_weights) as ctx:
            batch = loss_batch(model, tokens)
            ctx.accumulate(batch, batch.n_loss)
            return ctx.gradients()


@pytest.mark.parametrize("weight_type", ["q8_0", "q4_1", "bf16", "f32"])
@pytest.mark.parametrize("checkpointing, f16_weights", [(False, False), (True, False), (False, True)])
def test_transient_copies_give_the_same_gradients(tiny_model_file, weight_type, checkpointing, f16_weights):
    path = tiny_model_file("llama", weight_type)
    tokens = np.random.default_rng(0).integers(0, 32000, (2, 300))          # two attention chunks
    kept = gradients(path, True, checkpointing, f16_weights, tokens)
    transient = gradients(path, False, checkpointing, f16_weights, tokens)
    assert any(np.abs(g).max() > 0 for pair in kept.values() for g in pair)
    for name in kept:
        for k, t in zip(kept[name], transient[name]):
            np.testing.assert_array_equal(k, t)            # same values, same products: bit-identical


def test_memory_plan_counts_the_copies_where_they_live(tiny_model_file):
    path = tiny_model_file("llama", "q8_0", n_layers=4)
    cfg = LoRAConfig(rank=4, target_modules=("q_proj", "v_proj"))
    with BaseModel.load(path, n_threads=N_THREADS) as model:
        transient = estimate_memory(model, cfg, 2, 64)
        assert transient["transposed"] == 0
    with BaseModel.load(path, n_threads=N_THREADS) as model:
        kept = estimate_memory(model, cfg, 2, 64, keep_transposed_weights=True)
        # an F16 copy of every projection and of the (tied) LM head: 2 bytes per weight
        n = sum(model.weight_shape(w)[0] * model.weight_shape(w)[1] for w in model.tensors
                if w.startswith("blk.") and w.endswith(".weight") and len(model.tensors[w].shape) == 2)
        n += model.n_embd * model.n_vocab
        assert kept["transposed"] >= 2 * n
    # the step holds one block's copies at a time, not the model's
    assert transient["compute"] - kept["compute"] < kept["transposed"] / 2
    assert transient["total"] < kept["total"]


MMAP_CHILD = """
import sys
import numpy as np
from ggml_lora import BaseModel

def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024

before = rss()
with BaseModel.load(sys.argv[1], n_threads=2, use_mmap=sys.argv[2] == "1") as m:
    logits = m.logits([1, 5, 9, 33, 2, 70])
    print(rss() - before)
    np.save(sys.argv[3], logits)
"""


def test_mapped_weights_cost_the_pages_read(tiny_model_file, tmp_path):
    """On the CPU the weights are the mapped file: the same logits bit for bit as reading it, and an
    untied model's embedding table costs only the rows of the tokens seen. Each load runs in a process of
    its own so its RSS growth is its own; the bounds are halves of the 32.8 MB table, far from both."""
    import subprocess
    import sys

    path = tiny_model_file("llama", "f32", n_embd=256, n_ff=512, tied=False)
    embd = 32000 * 256 * 4
    size = path.stat().st_size
    growth = {}
    for mmap in ("1", "0"):
        out = subprocess.run([sys.executable, "-c", MMAP_CHILD, str(path), mmap, str(tmp_path / f"{mmap}.npy")],
                             capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
        growth[mmap] = int(out.stdout.split()[-1])
    print(f"file {size / 1e6:.1f} MB, token_embd {embd / 1e6:.1f} MB; RSS growth mapped "
          f"{growth['1'] / 1e6:.1f} MB, read {growth['0'] / 1e6:.1f} MB")
    np.testing.assert_array_equal(np.load(tmp_path / "1.npy"), np.load(tmp_path / "0.npy"))
    assert growth["0"] > size - embd / 2                     # read: every byte of the file is resident
    assert growth["1"] < size - embd / 2                     # mapped: the table's untouched rows are not


def test_rewriting_the_mapped_file_in_place_raises_instead_of_sigbus(tiny_model_file, tmp_path):
    """Truncating a mapped file and reading a weight kills the process (SIGBUS): every call checks the
    file first. A rename over the path is safe (the mapping keeps the old file) and keeps working."""
    import os
    import shutil

    from ggml_lora import GGMLLoRAError

    src = tiny_model_file("llama", "q8_0")
    path = tmp_path / "m.gguf"
    shutil.copy(src, path)
    tokens = [1, 5, 9, 33]
    with BaseModel.load(path, n_threads=N_THREADS) as model:
        adapter = Adapter.init(model, LoRAConfig(rank=2, target_modules=("q_proj",)))
        before = model.logits(tokens)
        shutil.copy(tiny_model_file("llama", "f32"), tmp_path / "new.gguf")
        os.replace(tmp_path / "new.gguf", path)                       # atomic replace: still the old weights
        np.testing.assert_array_equal(model.logits(tokens), before)
    with BaseModel.load(path, n_threads=N_THREADS) as model:
        adapter = Adapter.init(model, LoRAConfig(rank=2, target_modules=("q_proj",)))
        with open(path, "r+b") as f:                                   # in place: truncated to the header
            f.truncate(4096)
        for call in (lambda: model.logits(tokens), lambda: model.logits(tokens, adapter),
                     lambda: TrainingContext(adapter)):
            with pytest.raises(GGMLLoRAError, match="modified in place"):
                call()
    with BaseModel.load(src, n_threads=N_THREADS, use_mmap=False) as model:   # read: nothing to check
        assert model._source is None
