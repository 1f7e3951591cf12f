"""PEFT export and import (safetensors): GGUF -> PEFT -> GGUF is bitwise identical, patterns and rsLoRA fold
into B, unsupported features are refused, and real peft/transformers load the export when installed."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("safetensors")

from conftest import N_THREADS

from ggml_lora import Adapter, BaseModel, LoRAConfig, UnsupportedError
from ggml_lora.peft import export_peft, import_peft, to_gguf_rows, to_hf_rows

ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def random_adapter(model, seed=0, rank=4, targets=ALL):
    ad = Adapter.init(model, LoRAConfig(rank=rank, alpha=8, target_modules=targets, seed=seed))
    rng = np.random.default_rng(seed)
    for name in ad.targets:
        _, b = ad.get(name)
        ad.set(name, lora_b=rng.normal(0, 0.1, b.shape))
    return ad


def test_row_permutation_round_trips():
    b = np.arange(64 * 3, dtype=np.float32).reshape(64, 3)
    for heads in (1, 2, 4):
        np.testing.assert_array_equal(to_hf_rows(to_gguf_rows(b, heads), heads), b)
        assert not np.array_equal(to_gguf_rows(b, heads), b)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_gguf_peft_gguf_is_bitwise_identical(tiny_model_file, tmp_path, arch):
    with BaseModel.load(tiny_model_file(arch, "q8_0"), n_threads=N_THREADS) as model:
        with random_adapter(model, targets=ALL + (() if model.tied_embeddings else ("lm_head",))) as ad:
            first = ad.save(tmp_path / "first.gguf", metadata={"step": 5})
        with Adapter.load(model, first) as loaded:
            export_peft(loaded, tmp_path / "peft")
        cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
        assert cfg["r"] == 4 and cfg["lora_alpha"] == 8.0 and set(cfg["target_modules"]) == set(ALL)
        with import_peft(tmp_path / "peft", model) as back:
            second = back.save(tmp_path / "second.gguf")
        assert first.read_bytes() == second.read_bytes()


def test_rank_alpha_patterns_and_rslora_fold_into_b(tiny_model_file, tmp_path):
    from safetensors.numpy import save_file

    with BaseModel.load(tiny_model_file("qwen2", "f32"), n_threads=N_THREADS) as model:
        rng = np.random.default_rng(1)
        tensors, want = {}, {}
        spec = {"model.layers.0.self_attn.q_proj": (4, 8.0), "model.layers.1.mlp.down_proj": (2, 3.0)}
        for module, (r, alpha) in spec.items():
            name = {"model.layers.0.self_attn.q_proj": "blk.0.attn_q.weight",
                    "model.layers.1.mlp.down_proj": "blk.1.ffn_down.weight"}[module]
            n_in, n_out = model.weight_shape(name)
            a = rng.normal(size=(r, n_in)).astype(np.float32)
            b = rng.normal(size=(n_out, r)).astype(np.float32)
            tensors[f"base_model.model.{module}.lora_A.weight"] = a
            tensors[f"base_model.model.{module}.lora_B.weight"] = b
            want[name] = (alpha / np.sqrt(r)) * (b.astype(np.float64) @ a)          # rsLoRA scale
        save_file(tensors, str(tmp_path / "adapter_model.safetensors"))
        (tmp_path / "adapter_config.json").write_text(json.dumps({
            "peft_type": "LORA", "r": 4, "lora_alpha": 8.0, "use_rslora": True, "target_modules": ["q_proj", "down_proj"],
            "rank_pattern": {"down_proj": 2}, "alpha_pattern": {"model.layers.1.mlp.down_proj": 3.0}}))
        with import_peft(tmp_path, model) as ad:
            for name, delta in want.items():
                a, b = ad.get(name)
                got = (ad.alpha / ad.ranks[name]) * (b.astype(np.float64) @ a)    # what llama.cpp applies
                np.testing.assert_allclose(got, delta, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("key,value,reason", [
    ("use_dora", True, "DoRA"), ("modules_to_save", ["lm_head"], "modules_to_save"), ("bias", "all", "bias")])
def test_unsupported_peft_features_are_refused(tiny_model_file, tmp_path, key, value, reason):
    with BaseModel.load(tiny_model_file("llama", "f32"), n_threads=N_THREADS) as model:
        with random_adapter(model, targets=("q_proj",)) as ad:
            export_peft(ad, tmp_path)
        cfg = json.loads((tmp_path / "adapter_config.json").read_text())
        cfg[key] = value
        (tmp_path / "adapter_config.json").write_text(json.dumps(cfg))
        with pytest.raises(UnsupportedError, match=reason):
            import_peft(tmp_path, model)


def test_exported_folder_loads_in_real_peft(tiny_model_file, tmp_path):
    """The exported folder loads in peft/transformers and gives the same ΔW, module by module."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("peft")
    from peft import PeftModel
    from transformers import LlamaConfig, LlamaForCausalLM

    from ggml_lora.peft import hf_module

    with BaseModel.load(tiny_model_file("llama", "f32", tied=False), n_threads=N_THREADS) as model:
        hp = model.hparams
        with random_adapter(model, seed=3, targets=ALL + ("lm_head",)) as ad:
            export_peft(ad, tmp_path)
            ours = {}
            for name in ad.targets:
                a, b = ad.get(name)
                heads = {"attn_q": hp.n_head, "attn_k": hp.n_head_kv}.get(name.split(".")[-2])
                if heads:
                    b = to_hf_rows(b, heads)
                ours[hf_module(name)] = (ad.alpha / ad.ranks[name]) * (b.astype(np.float64) @ a)
    config = LlamaConfig(vocab_size=hp.n_vocab, hidden_size=hp.n_embd, intermediate_size=hp.n_ff,
                         num_hidden_layers=hp.n_layers, num_attention_heads=hp.n_head,
                         num_key_value_heads=hp.n_head_kv, tie_word_embeddings=False)
    torch.manual_seed(0)
    peft_model = PeftModel.from_pretrained(LlamaForCausalLM(config), str(tmp_path))
    seen = 0
    for module_name, module in peft_model.named_modules():
        if hasattr(module, "get_delta_weight") and "default" in getattr(module, "lora_A", {}):
            key = module_name.removeprefix("base_model.model.")
            delta = module.get_delta_weight("default").detach().double().numpy()
            np.testing.assert_allclose(delta, ours[key], rtol=1e-5, atol=1e-6)
            seen += 1
    assert seen == len(ours) == model.hparams.n_layers * 7 + 1


def test_cli_export_and_import(tiny_model_file, tmp_path):
    import subprocess
    import sys

    path = tiny_model_file("llama", "f32")
    with BaseModel.load(path, n_threads=N_THREADS) as model:
        with random_adapter(model, targets=("q_proj", "k_proj")) as ad:
            src = ad.save(tmp_path / "a.gguf")
    run = lambda *a: subprocess.run([sys.executable, "-m", "ggml_lora", *map(str, a)], capture_output=True, text=True)
    assert run("export-peft", src, "--model", path, "--out", tmp_path / "peft").returncode == 0
    done = run("import-peft", tmp_path / "peft", "--model", path, "--out", tmp_path / "b.gguf")
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "b.gguf").read_bytes() == src.read_bytes()


def test_llama_cpp_converter_output_loads_and_matches(tiny_model_file, tmp_path):
    """convert_lora_to_gguf.py (llama.cpp's own) on a PEFT adapter made here from known A/B."""
    import subprocess
    import sys
    from pathlib import Path

    pytest.importorskip("torch")
    from safetensors.numpy import save_file

    from reference import assert_parity, llama_logits

    converter = Path(__file__).resolve().parents[1] / "vendor" / "llama.cpp" / "convert_lora_to_gguf.py"
    path = tiny_model_file("llama", "f32")
    with BaseModel.load(path, n_threads=N_THREADS) as model:
        hp = model.hparams
        (tmp_path / "hf").mkdir()
        (tmp_path / "hf" / "config.json").write_text(json.dumps({
            "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": hp.n_vocab,
            "hidden_size": hp.n_embd, "intermediate_size": hp.n_ff, "num_hidden_layers": hp.n_layers,
            "num_attention_heads": hp.n_head, "num_key_value_heads": hp.n_head_kv, "rms_norm_eps": hp.rms_eps,
            "max_position_embeddings": hp.n_ctx_train, "rope_theta": hp.rope_freq_base, "tie_word_embeddings": True}))
        rng = np.random.default_rng(7)
        known, tensors = {}, {}
        for layer in range(hp.n_layers):
            for proj, name in (("q_proj", "attn_q"), ("k_proj", "attn_k"), ("o_proj", "attn_output")):
                gguf_name = f"blk.{layer}.{name}.weight"
                n_in, n_out = model.weight_shape(gguf_name)
                a = rng.normal(0, 0.2, (4, n_in)).astype(np.float32)
                b = rng.normal(0, 0.2, (n_out, 4)).astype(np.float32)
                module = f"base_model.model.model.layers.{layer}.self_attn.{proj}"
                tensors[module + ".lora_A.weight"], tensors[module + ".lora_B.weight"] = a, b
                known[gguf_name] = (a, b)
        (tmp_path / "peft").mkdir()
        save_file(tensors, str(tmp_path / "peft" / "adapter_model.safetensors"))
        (tmp_path / "peft" / "adapter_config.json").write_text(json.dumps(
            {"peft_type": "LORA", "r": 4, "lora_alpha": 6.0, "target_modules": ["q_proj", "k_proj", "o_proj"]}))
        out = tmp_path / "converted.gguf"
        done = subprocess.run([sys.executable, str(converter), "--base", str(tmp_path / "hf"), "--outtype", "f32",
                               "--outfile", str(out), str(tmp_path / "peft")], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-2000:]
        tokens = np.arange(40) * 17 % model.n_vocab
        with Adapter.load(model, out) as ad, import_peft(tmp_path / "peft", model) as ours:
            assert ad.alpha == 6.0
            for name, (a, b) in known.items():
                got_a, got_b = ad.get(name)
                np.testing.assert_array_equal(got_a, a)
                heads = {"attn_q": hp.n_head, "attn_k": hp.n_head_kv}.get(name.split(".")[2])
                np.testing.assert_array_equal(got_b, to_gguf_rows(b, heads) if heads else b)
                np.testing.assert_array_equal(ours.get(name)[1], got_b)     # our importer agrees with theirs
            assert_parity(model.logits(tokens, ad), llama_logits(path, tokens, lora=out, n_threads=N_THREADS),
                          "convert_lora_to_gguf adapter")
