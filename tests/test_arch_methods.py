"""Every method beyond SFT works on gemma2, gemma3 and phi3, one small test each on tiny models: merge
(fused phi3 matrices and gemma's), DPO/ORPO/KTO, AdaLoRA, packing with sliding-window masks."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import N_THREADS
from reference import assert_parity, llama_logits
from test_archs import MODELS
from test_preference import config as pref_config
from test_preference import kto_records, pairs

from ggml_lora import Adapter, BaseModel, LoRAConfig, LoRATrainer, TrainingConfig
from ggml_lora.data import collate, load_dataset, make_rows
from ggml_lora.merge import merge_adapters
from ggml_lora.preference import PreferenceConfig, PreferenceTrainer
from ggml_lora.forward import loss_sum

TOKENS = [1, 5, 9, 33, 2, 70, 14, 3, 8, 41, 19, 6, 120, 77, 4, 300, 12, 9, 9, 2]


@pytest.mark.parametrize("arch", ["phi3", "gemma2"])
def test_merged_model_is_the_base_with_its_adapter_in_llama_cpp(tiny_model_file, tmp_path, arch):
    """A LoRA on every target (phi3: the fused attn_qkv and [gate; up] ffn_up) merged into an F32 base:
    llama.cpp's logits of the merged file equal its logits of the base with the adapter (float32 sums in
    another order: 1e-3 on logits of ~2.5, as tests/test_merge.py)."""
    base = tiny_model_file(arch, "f32", **MODELS[arch])
    with BaseModel.load(base, n_threads=N_THREADS) as model, \
            Adapter.init(model, LoRAConfig(rank=4, alpha=8, target_modules=model.target_modules, seed=1)) as ad:
        rng = np.random.default_rng(1)
        for name in ad.targets:
            ad.set(name, lora_b=rng.normal(0.0, 0.05, ad.get(name)[1].shape).astype(np.float32))
        lora = ad.save(tmp_path / "a.gguf")
    merged = merge_adapters(base, [(lora, 1.0)], tmp_path / "merged.gguf")
    ref = llama_logits(base, TOKENS, lora=lora, n_threads=N_THREADS)
    moved = np.abs(ref - llama_logits(base, TOKENS, n_threads=N_THREADS)).max()
    diff = np.abs(llama_logits(merged, TOKENS, n_threads=N_THREADS) - ref).max()
    print(f"{arch} merge: max |merged - base+adapter| {diff:.2e}, the adapter moved the logits by {moved:.3f}")
    assert moved > 0.1 and diff < 1e-3


@pytest.mark.parametrize("method", ["dpo", "orpo", "kto"])
def test_preference_methods_train_gemma3(tiny_model_file, tmp_path, method):
    with BaseModel.load(tiny_model_file("gemma3", "f32", **(MODELS["gemma3"] | {"n_layers": 2})),
                        n_threads=N_THREADS) as model:
        data = kto_records(16) if method == "kto" else pairs(16)
        trainer = PreferenceTrainer(model, LoRAConfig(rank=4, target_modules=model.target_modules, seed=5),
                                    pref_config(tmp_path / method, max_steps=6), PreferenceConfig(method=method, beta=0.5))
        history = trainer.train(data)
        trainer.close()
        assert history.losses[-1] < history.losses[0], history.losses


def test_adalora_on_fused_phi3_matrices_and_llama_cpp_agrees(tiny_model_file, tmp_path):
    """AdaLoRA's ranks per tensor on qkv_proj / gate_up_proj; the saved adapter is what llama.cpp applies."""
    path = tiny_model_file("phi3", "f32", **MODELS["phi3"])
    words = ["north", "river", "stone", "the", "of", "town", "bell", "mill", "green", "road"]
    rng = np.random.default_rng(2)
    (tmp_path / "train.txt").write_text(" ".join(rng.choice(words, 200)))
    lora = LoRAConfig(peft_type="adalora", init_r=6, target_r=2, alpha=8.0,
                      target_modules=("qkv_proj", "gate_up_proj", "down_proj"), tinit=2, tfinal=2, deltaT=1,
                      total_step=10)
    cfg = TrainingConfig(max_steps=10, learning_rate=2e-2, lr_scheduler="constant", max_seq_length=24, eval_every=0,
                         save_every=0, progress=False, output_dir=str(tmp_path / "out"), seed=0, max_grad_norm=1.0,
                         batch_size=4)
    with BaseModel.load(path, n_threads=N_THREADS) as model:
        trainer = LoRATrainer(model, lora, cfg)
        history = trainer.train(tmp_path / "train.txt")
        ranks = trainer.method.adalora.ranks()
        assert any(".attn_qkv." in t for t in ranks) and sum(ranks.values()) == 2 * len(ranks)
        tokens = np.array(TOKENS, dtype=np.int32)
        with Adapter.load(model, history.adapter_path) as saved:
            ours = model.logits(tokens, saved)
        assert np.abs(ours - model.logits(tokens)).max() > 1e-3
        assert_parity(ours, llama_logits(path, tokens, lora=history.adapter_path, n_threads=N_THREADS), "phi3 adalora")
        trainer.close()


def test_packed_rows_keep_samples_apart_under_the_sliding_window(tiny_model_file):
    """Packed samples on gemma2 (window 8, alternating layers): positions restart per sample and both
    masks stay inside it, so a packed row's loss is the sum of its samples' losses alone."""
    with BaseModel.load(tiny_model_file("gemma2", "f32", **MODELS["gemma2"]), n_threads=N_THREADS) as model:
        rng = np.random.default_rng(3)
        texts = [" ".join(rng.choice(["bell", "mill", "green", "road", "lies", "near"], int(n))) for n in (9, 20, 5, 14)]
        samples = load_dataset(texts, model, max_seq_length=128)[0]
        rows = make_rows(samples, max_seq_length=128, packing=True, seed=1)
        assert len(rows) == 1 and rows[0].segments.max() >= 3
        packed = loss_sum(model, None, collate(rows, model))
        alone = sum(loss_sum(model, None, collate(make_rows([s], max_seq_length=128, packing=False), model))
                    for s in samples)
        assert packed == pytest.approx(alone, rel=1e-4)    # float32 sums in another order
