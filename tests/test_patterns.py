"""PEFT's rank_pattern / alpha_pattern (and rsLoRA with mixed ranks) at training time: the pattern
lookup is PEFT's, each pair trains with PEFT's scale, the llama.cpp file folds it into B (logit parity
in llama-cpp-python), exports round-trip through PEFT, and resume stays exact."""

from __future__ import annotations

import json
import math
import os
import signal

import numpy as np
import pytest
from conftest import N_THREADS
from reference import assert_parity, llama_logits
from test_trainer import texts

from ggml_lora import Adapter, BaseModel, LoRAConfig, LoRATrainer, TrainingConfig
from ggml_lora.arch import hf_module
from ggml_lora.config import pattern_value
from ggml_lora.errors import InvalidArgumentError

TARGETS = ("q_proj", "v_proj", "down_proj")
PATTERNS = dict(rank_pattern={"v_proj": 2, r"layers\.1\.mlp\.down_proj": 6},
                alpha_pattern={"q_proj": 3.0, r"layers\.0\..*": 20.0})
MODULES = [f"model.layers.{i}.{part}" for i in (0, 1, 10, 11)
           for part in ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj")] + ["lm_head"]


@pytest.fixture(scope="module")
def tiny(tiny_model_file):
    with BaseModel.load(tiny_model_file("llama", "f32"), n_threads=N_THREADS) as model:
        yield model


def test_lookup_is_peft_s():
    """First matching key, matched against the end of the module name: the same key PEFT picks."""
    other = pytest.importorskip("peft.utils.other")
    patterns = {"q_proj": 1, r"layers\.1\..*": 2, "1.mlp.down_proj": 3, "proj": 4, r"^model.layers.0.mlp.down_proj": 5}
    for module in MODULES:
        key = other.get_pattern_key(list(patterns), module)
        assert pattern_value(patterns, module, None) == patterns.get(key), module


def test_ranks_and_scales(tiny):
    cfg = LoRAConfig(rank=4, alpha=8, target_modules=TARGETS, **PATTERNS)
    with Adapter.init(tiny, cfg) as ad:
        for name in ad.targets:
            module = hf_module(name)
            r = 2 if "v_proj" in module else 6 if module == "model.layers.1.mlp.down_proj" else 4
            alpha = 3.0 if "q_proj" in module else 20.0 if ".layers.0." in module else 8.0
            assert ad.ranks[name] == r and ad.get(name)[0].shape[0] == r
            assert ad.fold(name) * ad.alpha / r == pytest.approx(alpha / r, rel=1e-12), name
            assert (name in ad.pair_scales) == (alpha != 8.0)       # a default-alpha pair needs no scale
    rs = LoRAConfig(rank=4, alpha=8, target_modules=TARGETS, use_rslora=True, rank_pattern={"v_proj": 16})
    with Adapter.init(tiny, rs) as ad:
        v = next(t for t in ad.targets if "attn_v" in t)
        assert ad.fold(v) * ad.alpha / 16 == pytest.approx(8 / math.sqrt(16))
        assert all(ad.fold(t) == 1.0 for t in ad.targets if "attn_v" not in t)


@pytest.mark.parametrize("bad, words", [
    (dict(rank_pattern={"q_proj": 0}), "must be a positive integer"),
    (dict(rank_pattern={"q_proj": 2.5}), "must be a positive integer"),
    (dict(alpha_pattern={"q_proj": float("nan")}), "must be a positive finite number"),
    (dict(rank_pattern={"(": 2}), "not a valid regular expression"),
    (dict(rank_pattern=["q_proj"]), "must be a mapping"),
    (dict(rank_pattern={"q_proj": 2}, init="pissa"), "cannot be combined"),
])
def test_bad_patterns(bad, words):
    with pytest.raises(InvalidArgumentError, match=words):
        LoRAConfig(**bad)


def trained(tiny, tmp_path, cfg: LoRAConfig, name="run", **kw):
    base = dict(max_steps=4, batch_size=2, learning_rate=2e-2, max_seq_length=32, eval_every=0, save_every=2,
                progress=False, output_dir=str(tmp_path / name), seed=1)
    tcfg = TrainingConfig(**{**base, **kw})
    return LoRATrainer(tiny, cfg, tcfg)


def test_training_scale_is_peft_s_and_the_file_matches(tiny, tiny_model_file, tmp_path):
    """The forward of a patterned pair is scale·B·A·x with PEFT's scale; the saved file, read by
    llama-cpp-python with its one alpha, gives the same logits."""
    cfg = LoRAConfig(rank=4, alpha=8, target_modules=TARGETS, **PATTERNS)
    trainer = trained(tiny, tmp_path, cfg)
    history = trainer.train(texts(8))
    ad = trainer.adapter
    tokens = np.array(tiny.tokenize("the old mill lies by the river near the green tower"), dtype=np.int32)
    ours = tiny.logits(tokens, ad)
    # the same function written with ordinary pairs: B scaled by fold, one alpha
    with Adapter.from_tensors(tiny, {t: (a, b * np.float32(ad.fold(t))) for t, (a, b) in ad.tensors().items()},
                              ad.alpha) as plain:
        np.testing.assert_allclose(tiny.logits(tokens, plain), ours, rtol=0, atol=1e-4)
    # scaled differently from the default, the patterns change the function: the check is not vacuous
    with Adapter.from_tensors(tiny, ad.tensors(), ad.alpha) as unscaled:
        assert np.abs(tiny.logits(tokens, unscaled) - ours).max() > 1e-3
    assert_parity(ours, llama_logits(tiny_model_file("llama", "f32"), tokens, lora=history.adapter_path,
                                     n_threads=N_THREADS), "patterns")


def test_peft_round_trip(tiny, tmp_path):
    """export_peft writes rank_pattern and alpha_pattern; import_peft (PEFT's lookup) gives the file's pairs."""
    from ggml_lora.peft import export_peft, import_peft

    pytest.importorskip("safetensors")
    cfg = LoRAConfig(rank=4, alpha=8, target_modules=TARGETS, **PATTERNS)
    with Adapter.init(tiny, cfg) as ad:
        rng = np.random.default_rng(0)
        for t in ad.targets:
            ad.set(t, lora_b=rng.normal(0, 0.1, ad.get(t)[1].shape))
        export_peft(ad, tmp_path / "peft")
        doc = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
        assert doc["alpha_pattern"]["model.layers.0.self_attn.q_proj"] == pytest.approx(3.0)
        assert doc["alpha_pattern"]["model.layers.0.mlp.down_proj"] == pytest.approx(20.0)
        assert doc["rank_pattern"]["model.layers.1.mlp.down_proj"] == 6
        with import_peft(tmp_path / "peft", tiny) as back:
            want = ad.file_tensors()
            assert back.alpha == ad.alpha and back.ranks == ad.ranks
            for t, (a, b) in back.tensors().items():
                np.testing.assert_array_equal(a, want[t][0])
                np.testing.assert_allclose(b, want[t][1], rtol=1e-6)


@pytest.mark.parametrize("extra", [{}, dict(use_rslora=True, layers=(1,)), dict(use_rslora=True, rank_pattern=None,
                                                                             alpha_pattern=None)],
                         ids=["patterns", "rslora+layers+patterns", "rslora"])
def test_exported_patterns_load_in_real_peft(tiny_model_file, tmp_path, extra):
    """PEFT's own LoRA layers built from the exported config give our ΔW = scale·B·A per module; the
    exported folder imports back to the file's pairs, which llama-cpp-python runs as we do."""
    pytest.importorskip("torch")
    pytest.importorskip("peft")
    from peft import PeftModel
    from transformers import LlamaConfig, LlamaForCausalLM

    from ggml_lora.peft import export_peft, import_peft, to_hf_rows

    with BaseModel.load(tiny_model_file("llama", "f32", tied=False), n_threads=N_THREADS) as model:
        hp = model.hparams
        cfg = LoRAConfig(rank=4, alpha=8, target_modules=TARGETS, **{**PATTERNS, **extra})
        with Adapter.init(model, cfg) as ad:
            rng = np.random.default_rng(1)
            ours = {}
            for t in ad.targets:
                ad.set(t, lora_b=rng.normal(0, 0.1, ad.get(t)[1].shape))
                a, b = ad.get(t)
                if "attn_q" in t:
                    b = to_hf_rows(b, hp.n_head)
                ours[hf_module(t)] = cfg.scale_for(hf_module(t)) * (b.astype(np.float64) @ a)
            export_peft(ad, tmp_path)
            tokens = np.array(model.tokenize("the old mill lies by the river"), dtype=np.int32)
            ours_logits = model.logits(tokens, ad)
            with import_peft(tmp_path, model) as back:
                saved = back.save(tmp_path / "back.gguf")
                np.testing.assert_allclose(model.logits(tokens, back), ours_logits, rtol=0, atol=1e-4)
            assert_parity(ours_logits, llama_logits(model.path, tokens, lora=saved, n_threads=N_THREADS), "peft-back")
    config = LlamaConfig(vocab_size=hp.n_vocab, hidden_size=hp.n_embd, intermediate_size=hp.n_ff,
                         num_hidden_layers=hp.n_layers, num_attention_heads=hp.n_head,
                         num_key_value_heads=hp.n_head_kv, tie_word_embeddings=False)
    peft_model = PeftModel.from_pretrained(LlamaForCausalLM(config), str(tmp_path))
    seen = 0
    for name, module in peft_model.named_modules():
        if hasattr(module, "get_delta_weight") and "default" in getattr(module, "lora_A", {}):
            delta = module.get_delta_weight("default").detach().double().numpy()
            np.testing.assert_allclose(delta, ours[name.removeprefix("base_model.model.")], rtol=1e-5, atol=1e-6)
            seen += 1
    assert seen == len(ours)


def test_resume_is_exact_with_patterns(tiny, tmp_path):
    cfg = LoRAConfig(rank=4, alpha=8, target_modules=TARGETS, dropout=0.1, use_rslora=True, **PATTERNS)
    data = texts(12)
    straight = trained(tiny, tmp_path, cfg, "straight").train(data)

    class InterruptAt:
        def on_step(self, trainer, rec):
            if rec["step"] == 2:
                os.kill(os.getpid(), signal.SIGINT)

    first = trained(tiny, tmp_path, cfg, "resumed").train(data, callbacks=[InterruptAt()])
    assert first.global_step == 2
    second = trained(tiny, tmp_path, cfg, "resumed").train(data, resume_from=True)
    assert first.losses + second.losses == straight.losses
    assert straight.adapter_path.read_bytes() == second.adapter_path.read_bytes()


def test_resume_refuses_other_patterns(tiny, tmp_path):
    from ggml_lora.errors import CheckpointError

    cfg = LoRAConfig(rank=4, alpha=8, target_modules=TARGETS, **PATTERNS)
    trained(tiny, tmp_path, cfg, max_steps=2).train(texts(8))
    other = LoRAConfig(rank=4, alpha=8, target_modules=TARGETS, rank_pattern=PATTERNS["rank_pattern"],
                       alpha_pattern={"q_proj": 5.0})
    with pytest.raises(CheckpointError, match=r"other LoRA settings: alpha_pattern=.*now \{'q_proj': 5.0\}"):
        trained(tiny, tmp_path, other, max_steps=4).train(texts(8), resume_from=True)
