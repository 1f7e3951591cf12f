"""gemma2, gemma3 and phi3 on tiny random models: parity with llama.cpp with and without LoRA,
gradients against finite differences, adapters that llama.cpp loads, and the errors for what an
architecture does not have."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import N_THREADS
from reference import assert_adapter_parity, assert_parity, llama_logits
from test_parity import random_adapter_tensors
from test_training import directional_check, randomize, sample_tokens

from ggml_lora import Adapter, BaseModel, InvalidArgumentError, LoRAConfig, UnsupportedError
from ggml_lora.forward import evaluate, loss_batch
from ggml_lora.step import TrainingContext

# Each with what makes it differ from llama switched on where a short test can see it: a sliding window
# of 8 (gemma2's period 2 makes layer 1 global, gemma3's period 6 layer 5), softcaps that bite on the
# tiny models' logits of std ~2.5 (gemma2's defaults 50/30 would be the identity there), a linear rope scale
# (gemma2: every layer's; gemma3: the global layers' only),
# phi3's partial rotary (8 of 16 dims) and untied LM head.
MODELS = {
    "gemma2": {"attn_softcap": 2.0, "final_softcap": 4.0, "rope_scale": 2.0},
    "gemma3": {"n_layers": 6, "head_dim": 32, "rope_scale": 2.0, "final_softcap": 5.0},
    "phi3": {"n_rot": 8, "tied": False},
}
CASES = [("gemma2", "f32"), ("gemma2", "q8_0"), ("gemma3", "f32"), ("gemma3", "q4_0"), ("phi3", "f32"),
         ("phi3", "q5_0")]


@pytest.mark.parametrize("arch,weight_type", CASES)
def test_tiny_models_match_llama_cpp(tiny_model_file, arch, weight_type, tmp_path):
    path = tiny_model_file(arch, weight_type, **MODELS[arch])
    with BaseModel.load(path, n_threads=N_THREADS) as model:
        tokens = np.random.default_rng(0).integers(0, model.n_vocab, 48)
        assert_parity(model.logits(tokens), llama_logits(path, tokens, n_threads=N_THREADS), f"{arch}/{weight_type}")
        names = [n for n in sorted(model.tensors) if n.startswith("blk.") and n.endswith(".weight")
                 and n.split(".")[2] in model.hparams.spec.modules.values()]
        if not model.tied_embeddings:
            names.append("output.weight")
        tensors = random_adapter_tensors(model, names, rank=4, seed=2, b_scale=0.2)
        assert_adapter_parity(model, path, tokens, tensors, tmp_path, 8.0, 0.1, f"{arch}/{weight_type}+lora", N_THREADS)


def test_sliding_window_and_softcaps_are_used(tiny_model_file):
    """The window hides keys (logits change past position n_swa only), and a softcap bounds the logits."""
    wide = tiny_model_file("gemma3", "f32", **(MODELS["gemma3"] | {"n_swa": 1000}))
    narrow = tiny_model_file("gemma3", "f32", **MODELS["gemma3"])
    tokens = np.random.default_rng(1).integers(0, 32000, 40)
    with BaseModel.load(wide, n_threads=N_THREADS) as a, BaseModel.load(narrow, n_threads=N_THREADS) as b:
        assert b.hparams.n_swa == 8 and b.hparams.swa_layers == (True,) * 5 + (False,)
        diff = np.abs(a.logits(tokens) - b.logits(tokens)).max(axis=-1)
        assert diff[:8].max() == 0.0 and diff[8:].min() > 1e-3, diff
        assert np.abs(b.logits(tokens)).max() < 5.0      # final_logit_softcapping = 5


@pytest.mark.parametrize("arch", ["gemma2", "gemma3", "phi3"])
def test_gradient_matches_finite_differences(tiny_model_file, arch):
    kw = MODELS[arch] | {"n_layers": 2}
    with BaseModel.load(tiny_model_file(arch, "f32", **kw), n_threads=N_THREADS) as model:
        with Adapter.init(model, LoRAConfig(rank=4, target_modules=model.target_modules)) as ad:
            randomize(ad, seed=1)
            tokens = sample_tokens(model, (2, 24), seed=2)     # 24 > the window of 8
            mask = np.random.default_rng(3).random(tokens.shape) < 0.6
            # gemma's GELU is ggml's F16 lookup table (ggml-cpu/vec.h, GGML_GELU_FP16): the loss is a staircase
            # whose steps, in a central difference of step 2e-2, gave errors up to 1.4e-2 that fell as the step
            # grew. A cubic through 9 points in [-0.1, 0.1] averages over the steps (measured worst: gemma2
            # 3.0e-3, gemma3 4.5e-3, phi3 9.7e-4) while its truncation error stays far below the tolerance 1e-2.
            errors = directional_check(model, ad, tokens, mask, quantized=False, seed=4, fit=np.linspace(-0.1, 0.1, 9))
            worst = max(errors, key=errors.get)
            print(f"{arch}: worst relative error {errors[worst]:.2e} at {worst} over {len(errors)} tensors")
            stems = {n.split(".")[2] for n in errors if n.startswith("blk.")}
            assert stems == set(model.hparams.spec.modules.values())
            assert ("output.weight.lora_a" in errors) == (not model.tied_embeddings)
            assert errors[worst] <= 1e-2, errors


@pytest.mark.parametrize("arch", ["gemma3", "phi3"])
def test_trained_adapter_round_trips_through_llama_cpp(tiny_model_file, arch, tmp_path):
    """A few AdamW steps on every target, saved, loaded by llama.cpp: the same logits as our forward."""
    path = tiny_model_file(arch, "q8_0", **MODELS[arch])
    with BaseModel.load(path, n_threads=N_THREADS) as model:
        cfg = LoRAConfig(rank=8, alpha=16, target_modules=model.target_modules, seed=3)
        tokens = np.random.default_rng(4).integers(0, model.n_vocab, (2, 40))
        with Adapter.init(model, cfg) as ad, TrainingContext(ad) as ctx:
            for step in range(1, 4):
                ctx.step([loss_batch(model, tokens)], learning_rate=1e-2, step=step)
            saved = ad.save(tmp_path / "trained.gguf")
            probe = tokens[0]
            ours = model.logits(probe, ad)
            assert np.abs(ours - model.logits(probe)).max() > 0.05       # training moved the model
            assert_parity(ours, llama_logits(path, probe, lora=saved, n_threads=N_THREADS), f"{arch} trained")


@pytest.mark.parametrize("arch,missing,has", [
    ("phi3", ["gate_proj"], "qkv_proj, o_proj, gate_up_proj, down_proj, lm_head"),
    ("phi3", ["q_proj", "up_proj"], "qkv_proj"),
    ("gemma3", ["qkv_proj"], "q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj"),
])
def test_target_modules_the_architecture_lacks_are_named(tiny_model_file, arch, missing, has):
    with BaseModel.load(tiny_model_file(arch, "f32", **MODELS[arch]), n_threads=N_THREADS) as model:
        with pytest.raises(InvalidArgumentError) as e:
            Adapter.init(model, LoRAConfig(rank=4, target_modules=tuple(missing)))
        message = str(e.value)
        assert all(m in message for m in missing) and arch in message and has in message, message


def test_unsupported_architecture_lists_the_supported_ones(tmp_path):
    import gguf

    path = tmp_path / "falcon.gguf"
    w = gguf.GGUFWriter(str(path), arch="falcon")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((8, 4), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(UnsupportedError) as e:
        BaseModel.load(path)
    assert "'falcon' is not supported" in str(e.value)
    assert "gemma2, gemma3, llama, phi3, qwen2, qwen3" in str(e.value)


def test_longrope_factors_are_refused_by_name(tiny_model_file):
    """Phi-3.5 / Phi-4-mini carry LongRoPE factors, which this forward does not apply: a clear error."""
    with pytest.raises(UnsupportedError, match="LongRoPE"):
        BaseModel.load(tiny_model_file("phi3", "f32", n_rot=8, longrope=True))


@pytest.mark.parametrize("arch", ["gemma2", "gemma3", "phi3"])
def test_graphs_fit_their_node_budget(tiny_model_file, arch):
    """As test_native_safety's grid for llama: every projection (and the untied head) adapted, with and
    without dropout and checkpointing, 2 to 700 rows (three attention chunks, sliding-window masks of
    their own): each graph stays under the node budget glora_graph_budget gave it."""
    import logging
    import re

    graphs = []

    class Collect(logging.Handler):
        def emit(self, record):
            m = re.match(r"graph: (\d+) nodes, (\d+) leafs, budget (\d+)", record.getMessage())
            if m:
                graphs.append(tuple(int(x) for x in m.groups()))

    log = logging.getLogger("ggml_lora.ggml")
    handler, level = Collect(), log.level
    log.addHandler(handler)
    log.setLevel(logging.DEBUG)
    try:
        path = tiny_model_file(arch, "q8_0", **(MODELS[arch] | {"n_layers": 2, "n_ctx_train": 4096}))
        with BaseModel.load(path, n_threads=N_THREADS) as model:
            for dropout in (0.0, 0.1):
                with Adapter.init(model, LoRAConfig(rank=4, target_modules=model.target_modules, dropout=dropout)) as ad:
                    for checkpointing in (False, True):
                        with TrainingContext(ad, gradient_checkpointing=checkpointing) as ctx:
                            for n in (2, 300, 700):
                                tokens = np.random.default_rng(n).integers(0, model.n_vocab, (1, n))
                                batch = loss_batch(model, tokens)
                                ctx.accumulate(batch, batch.n_loss)
                                assert np.isfinite(ctx.grad_norm())
                                ctx.zero_grad()
                    model.logits(np.zeros(700, dtype=np.int32), ad)
    finally:
        log.removeHandler(handler)
        log.setLevel(level)
    assert len(graphs) > 20
    for nodes, leafs, budget in graphs:
        assert nodes < budget and leafs < budget, (nodes, leafs, budget)
    print(f"{arch}: largest share of a budget used: {max(n / b for n, _, b in graphs):.2f}")


def test_loss_in_attention_chunks_is_the_loss_of_the_logits(tiny_model_file):
    """Training graphs attend in chunks of 256 queries with sliding-window masks of their own; over 600 rows
    their loss equals the cross-entropy of llama.cpp's unchunked forward (float32 sums in another order:
    1e-5 relative)."""
    path = tiny_model_file("gemma3", "f32", **MODELS["gemma3"])
    with BaseModel.load(path, n_threads=N_THREADS, n_ctx=1024) as model:
        tokens = np.random.default_rng(7).integers(0, model.n_vocab, 600)
        loss = evaluate(model, None, tokens[None, :])[0]
        z = model.logits(tokens).astype(np.float64)[:-1]
        z -= z.max(axis=-1, keepdims=True)
        ref = float(-(z[np.arange(599), tokens[1:]] - np.log(np.exp(z).sum(axis=-1))).mean())
        assert loss == pytest.approx(ref, rel=1e-5)


def test_chat_data_needs_a_template_or_a_builtin(tiny_model_file):
    """The tiny models have no tokenizer.chat_template, like Gemma 3 270M: chat data is refused with the
    ways out named; a built-in by name (--chat-template gemma) renders Gemma's turns and supervises only
    the model's."""
    from ggml_lora.data import load_dataset
    from ggml_lora.errors import DatasetError
    from ggml_lora.chat import resolve_chat_template

    chat = [{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of Vastrell?"},
                          {"role": "assistant", "content": "Quennick."}]}]
    with BaseModel.load(tiny_model_file("gemma3", "f32", **MODELS["gemma3"]), n_threads=N_THREADS) as model:
        with pytest.raises(DatasetError, match="chat data needs a chat template.*built-in: chatml, gemma, llama3"):
            load_dataset(chat, model, max_seq_length=64)
        samples, _ = load_dataset(chat, model, max_seq_length=64, chat_template=resolve_chat_template("gemma"))
        tokens, mask = samples[0].tokens, samples[0].mask
        assert "<start_of_turn>user\nBe brief.\n\nCapital of Vastrell?<end_of_turn>" in model.detokenize(tokens)
        assert model.detokenize(tokens[mask]).strip() == "Quennick.<end_of_turn>"
    with pytest.raises(InvalidArgumentError, match="built-in"):
        resolve_chat_template("no-such-template")


@pytest.mark.parametrize("arch", ["gemma3", "phi3"])
def test_peft_export_uses_the_architectures_module_names_and_round_trips(tiny_model_file, tmp_path, arch):
    """phi3's fused pairs are PEFT's qkv_proj and gate_up_proj (one lora_A/lora_B each, rows in the fused
    [q; k; v] and [gate; up] order both sides use); gemma keeps HF's row order (NEOX rope, no permutation).
    GGUF -> PEFT -> GGUF is byte for byte the same file."""
    pytest.importorskip("safetensors")
    import json

    from safetensors import safe_open

    from ggml_lora.peft import export_peft, import_peft

    with BaseModel.load(tiny_model_file(arch, "q8_0", **MODELS[arch]), n_threads=N_THREADS) as model:
        with Adapter.init(model, LoRAConfig(rank=4, alpha=8, target_modules=model.target_modules, seed=1)) as ad:
            randomize(ad, seed=2)
            first = ad.save(tmp_path / "first.gguf")
        with Adapter.load(model, first) as loaded:
            export_peft(loaded, tmp_path / "peft")
        cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
        assert set(cfg["target_modules"]) == set(model.target_modules)
        with safe_open(str(tmp_path / "peft" / "adapter_model.safetensors"), framework="numpy") as f:
            keys = set(f.keys())
        if arch == "phi3":
            assert "base_model.model.model.layers.0.self_attn.qkv_proj.lora_B.weight" in keys
            assert "base_model.model.model.layers.1.mlp.gate_up_proj.lora_A.weight" in keys
        else:
            assert "base_model.model.model.layers.0.mlp.gate_proj.lora_A.weight" in keys
        with import_peft(tmp_path / "peft", model) as back:
            second = back.save(tmp_path / "second.gguf")
        assert first.read_bytes() == second.read_bytes()
