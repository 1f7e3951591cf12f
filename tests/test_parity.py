"""Our forward pass gives llama.cpp's logits, with and without LoRA, on SmolLM2 and every tiny architecture
and weight type; B = 0 gives the base logits exactly; a batch equals its rows alone."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import N_THREADS
from reference import assert_adapter_parity, assert_parity, llama_logits

from ggml_lora import Adapter, BaseModel
from ggml_lora.adapter_file import write_lora_gguf

TEXTS = [
    "The history of the printing press begins in the fifteenth century, when Johannes Gutenberg combined "
    "movable metal type, oil-based ink and a wooden screw press into a system that could produce books far "
    "faster than scribes. Within fifty years presses were operating in more than two hundred European cities, "
    "and the price of books fell sharply, which helped spread literacy, scientific ideas and religious debate "
    "across the continent and changed how knowledge was stored and shared. "
    "Printers became publishers, editors and booksellers at once; they standardised spelling, introduced title "
    "pages and page numbers, and built networks of agents that carried pamphlets from city to city. Governments "
    "and churches responded with licensing and censorship, yet cheap print kept finding new readers.",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number using iteration.\"\"\"\n    a, b = 0, 1\n"
    "    for _ in range(n):\n        a, b = b, a + b\n    return a\n\n\nfor i in range(20):\n"
    "    print(i, fibonacci(i))\n\n# The loop above prints the first twenty numbers of the sequence, "
    "one per line, each preceded by its index. Iteration avoids the exponential cost of naive recursion.\n"
    "class Stack:\n    def __init__(self):\n        self.items = []\n\n    def push(self, x):\n"
    "        self.items.append(x)\n\n    def pop(self):\n        return self.items.pop()\n",
    "Recipe for a simple loaf: mix 500 g of flour, 10 g of salt, 7 g of dried yeast and 320 ml of warm water. "
    "Knead for ten minutes until smooth, cover and leave to rise for one hour, then shape, rise again for "
    "forty minutes and bake at 220 degrees Celsius for thirty minutes. Tap the base: a hollow sound means it is "
    "done. Let it cool on a rack for at least an hour before slicing, or the crumb will be gummy. "
    "For a darker crust, place a tray of boiling water on the lowest shelf during the first ten minutes; the "
    "steam keeps the surface soft so the loaf can expand before the crust sets. Store the bread in paper, not "
    "plastic, and freeze any slices you will not eat within two days.",
]


def random_adapter_tensors(model: BaseModel, names, rank, seed, b_scale=0.05):
    rng = np.random.default_rng(seed)
    out = {}
    for name in names:
        n_in, n_out = model.weight_shape(name)
        a = rng.normal(0, 1 / np.sqrt(n_in), (rank, n_in)).astype(np.float32)
        b = rng.normal(0, b_scale, (n_out, rank)).astype(np.float32)
        out[name] = (a, b)
    return out


@pytest.mark.slow
def test_smollm2_matches_llama_cpp(smollm2, smollm2_file):
    worst = 0.0
    for text in TEXTS:
        tokens = smollm2.tokenize(text, add_special=False)
        assert len(tokens) >= 128, len(tokens)
        rep = assert_parity(smollm2.logits(tokens), llama_logits(smollm2_file, tokens, n_threads=N_THREADS),
                            f"smollm2 {len(tokens)} tokens")
        worst = max(worst, rep["max_abs_diff"])
    print(f"smollm2 worst max|Δ| = {worst:.5f}")


@pytest.mark.slow
def test_smollm2_with_adapter_matches_llama_cpp(smollm2, smollm2_file, tmp_path):
    names = [f"blk.{i}.{m}.weight" for i in range(smollm2.n_layers)
             for m in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")]
    tensors = random_adapter_tensors(smollm2, names, rank=8, seed=1, b_scale=0.02)
    tokens = smollm2.tokenize(TEXTS[0], add_special=False)
    assert_adapter_parity(smollm2, smollm2_file, tokens, tensors, tmp_path, 16.0, 0.5, "smollm2+lora", N_THREADS)


TINY_CASES = [(arch, wt) for arch in ("llama", "qwen2", "qwen3") for wt in ("f32", "q8_0")] + [
    ("llama", "q4_1"), ("llama", "f16"), ("qwen2", "q4_0"), ("qwen3", "q5_1"), ("qwen3", "bf16")]


def tiny_kwargs(arch):
    # qwen3 with head_dim != n_embd / n_head, as real qwen3 models have
    return {"head_dim": 32} if arch == "qwen3" else {}


@pytest.mark.parametrize("arch,weight_type", TINY_CASES)
def test_tiny_models_match_llama_cpp(tiny_model_file, arch, weight_type, tmp_path):
    path = tiny_model_file(arch, weight_type, **tiny_kwargs(arch))
    with BaseModel.load(path, n_threads=N_THREADS) as model:
        rng = np.random.default_rng(0)
        tokens = rng.integers(0, model.n_vocab, 48)
        assert_parity(model.logits(tokens), llama_logits(path, tokens, n_threads=N_THREADS), f"{arch}/{weight_type}")

        names = [f"blk.{i}.{stem}.weight" for i in range(model.n_layers)
                 for stem in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")]
        tensors = random_adapter_tensors(model, names, rank=4, seed=2, b_scale=0.2)
        assert_adapter_parity(model, path, tokens, tensors, tmp_path, 8.0, 0.1, f"{arch}/{weight_type}+lora", N_THREADS)


def test_untied_lm_head_and_rope_freqs(tiny_model_file, tmp_path):
    path = tiny_model_file("llama", "f32", tied=False, rope_freqs=True)
    with BaseModel.load(path, n_threads=N_THREADS) as model:
        assert not model.tied_embeddings and "lm_head" in model.target_modules
        tokens = np.arange(40) * 7 % model.n_vocab
        assert_parity(model.logits(tokens), llama_logits(path, tokens, n_threads=N_THREADS), "llama untied+rope_freqs")
        tensors = random_adapter_tensors(model, ["output.weight", "blk.1.attn_q.weight"], rank=4, seed=3, b_scale=0.2)
        lora = write_lora_gguf(tmp_path / "head.gguf", model.arch, 4.0, tensors)
        with Adapter.from_tensors(model, tensors, alpha=4.0) as adapter:
            assert_parity(model.logits(tokens, adapter), llama_logits(path, tokens, lora=lora, n_threads=N_THREADS),
                          "lm_head lora")


def test_zero_b_gives_base_logits_exactly(tiny_model_file):
    from ggml_lora import LoRAConfig

    with BaseModel.load(tiny_model_file("qwen2", "q8_0"), n_threads=N_THREADS) as model:
        tokens = np.arange(30) * 11 % model.n_vocab
        cfg = LoRAConfig(rank=4, target_modules=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                 "down_proj"))
        with Adapter.init(model, cfg) as adapter:
            assert np.abs(adapter.get("blk.0.attn_q.weight")[0]).max() > 0  # A is random, B is zero
            np.testing.assert_array_equal(model.logits(tokens, adapter), model.logits(tokens))


def test_batched_equals_single(tiny_model_file):
    with BaseModel.load(tiny_model_file("qwen3", "q8_0", head_dim=32), n_threads=N_THREADS) as model:
        rng = np.random.default_rng(5)
        seqs = rng.integers(0, model.n_vocab, (3, 24))
        batched = model.logits(seqs)
        assert batched.shape == (3, 24, model.n_vocab)
        for i in range(3):
            # 1e-4: the same kernels on the same rows; only thread chunking of the products may differ
            np.testing.assert_allclose(batched[i], model.logits(seqs[i]), atol=1e-4, rtol=0)
