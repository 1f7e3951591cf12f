"""Adapters as GGUF files: llama-cpp-python loads what we save and gives our logits, save/load/save is
byte-identical, bad or interrupted files fail cleanly, and files get the umask's permissions."""

from __future__ import annotations

import numpy as np
import pytest

import gguf
from conftest import N_THREADS
from reference import assert_parity, llama_logits

from ggml_lora import Adapter, BaseModel, GGUFFormatError, LoRAConfig
from ggml_lora.adapter_file import write_lora_gguf
from ggml_lora.llama_cpp_python import apply_adapters
from ggml_lora.forward import loss_batch
from ggml_lora.step import TrainingContext


def trained_adapter(model, seed: int, steps: int = 3) -> Adapter:
    ad = Adapter.init(model, LoRAConfig(rank=8, alpha=16, target_modules=("q_proj", "v_proj", "down_proj"), seed=seed))
    tokens = np.random.default_rng(seed).integers(0, model.n_vocab, (2, 48))
    with TrainingContext(ad) as ctx:
        for step in range(1, steps + 1):
            ctx.step([loss_batch(model, tokens)], learning_rate=5e-3, step=step)
    return ad


@pytest.mark.slow
def test_round_trip_in_llama_cpp(smollm2, smollm2_file, tmp_path):
    from llama_cpp import Llama

    tokens = smollm2.tokenize("A short text to compare the logits of both implementations, with and "
                              "without trained adapters, at several scales.", add_special=False)
    with trained_adapter(smollm2, 1) as ad1, trained_adapter(smollm2, 2) as ad2:
        p1, p2 = ad1.save(tmp_path / "a1.gguf"), ad2.save(tmp_path / "a2.gguf")
        base = smollm2.logits(tokens)
        assert np.abs(smollm2.logits(tokens, ad1) - base).max() > 0.05   # training moved the model
        for scale in (1.0, 0.5, 2.0):
            assert_parity(smollm2.logits(tokens, ad1, scale=scale),
                          llama_logits(smollm2_file, tokens, lora=[(p1, scale)], n_threads=N_THREADS), f"scale {scale}")

        llm = Llama(model_path=str(smollm2_file), logits_all=True, n_ctx=64, n_batch=64, n_ubatch=64,
                    n_threads=N_THREADS, type_k=0, type_v=0, verbose=False)

        def run() -> np.ndarray:
            llm.eval(tokens)
            return np.array(llm.scores[: len(tokens)])

        apply_adapters(llm, [(p1, 0.7), (p2, 1.3)])
        ref = run()
        # llama.cpp keeps active adapters in an unordered_map, so the order of the two LoRA terms in each
        # sum is unspecified (here: reverse insertion); float addition is not associative and quantized
        # activations amplify the last-bit difference (0.6 logits measured), so we match its order.
        ours = [smollm2.logits(tokens, order) for order in ([(ad1, 0.7), (ad2, 1.3)], [(ad2, 1.3), (ad1, 0.7)])]
        assert_parity(min(ours, key=lambda x: np.abs(x - ref).max()), ref, "two adapters")
        apply_adapters(llm, [(p2, 1.0)])                                   # swap
        assert_parity(smollm2.logits(tokens, ad2), run(), "swapped")
        apply_adapters(llm, [])                                            # clear
        np.testing.assert_array_equal(run(), base)
        llm.close()


def test_save_load_save_is_byte_identical(tiny_model_file, tmp_path):
    with BaseModel.load(tiny_model_file("qwen2", "q8_0"), n_threads=N_THREADS) as model:
        tokens = np.arange(20) * 13 % model.n_vocab
        with trained_adapter(model, 3) as ad:
            first = ad.save(tmp_path / "first.gguf", metadata={"step": 3, "train_loss": 1.25})
            logits = model.logits(tokens, ad)
        with Adapter.load(model, first) as loaded:
            assert loaded.metadata["step"] == 3 and loaded.metadata["rank"] == 8
            assert loaded.metadata["base_sha256"] == model.sha256
            second = loaded.save(tmp_path / "second.gguf")
            np.testing.assert_array_equal(model.logits(tokens, loaded), logits)
        assert first.read_bytes() == second.read_bytes()


def write_adapter(path, arch, pairs, alpha=8.0, alpha_f64=False, drop=None, extra=None):
    w = gguf.GGUFWriter(str(path), arch=arch)
    w.add_type(gguf.GGUFType.ADAPTER)
    w.add_string(gguf.Keys.Adapter.TYPE, "lora")
    (w.add_float64 if alpha_f64 else w.add_float32)(gguf.Keys.Adapter.LORA_ALPHA, alpha)
    for name, (a, b) in pairs.items():
        if drop != name + ".lora_a":
            w.add_tensor(name + ".lora_a", a)
        if drop != name + ".lora_b":
            w.add_tensor(name + ".lora_b", b)
    for name, arr in (extra or {}).items():
        w.add_tensor(name, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def good_pairs(model, rank=4):
    rng = np.random.default_rng(0)
    out = {}
    for name in ("blk.0.attn_q.weight", "blk.1.ffn_down.weight"):
        n_in, n_out = model.weight_shape(name)
        out[name] = (rng.normal(size=(rank, n_in)).astype(np.float32), rng.normal(size=(n_out, rank)).astype(np.float32))
    return out


BAD_FILES = {
    "wrong architecture": (lambda m, p: write_adapter(p, "qwen2", good_pairs(m)), "architecture 'qwen2'"),
    "wrong shapes": (lambda m, p: write_adapter(p, "llama", {"blk.0.attn_q.weight": (
        np.zeros((4, 32), np.float32), np.zeros((64, 4), np.float32))}), "do not fit the base weight"),
    "missing half": (lambda m, p: write_adapter(p, "llama", good_pairs(m), drop="blk.1.ffn_down.weight.lora_b"),
                     "missing blk.1.ffn_down.weight.lora_b"),
    "alpha float64": (lambda m, p: write_adapter(p, "llama", good_pairs(m), alpha_f64=True), "FLOAT64"),
    "unknown tensor": (lambda m, p: write_adapter(p, "llama", good_pairs(m), extra={"blk.0.attn_q.scale": np.ones(4, np.float32)}),
                       "unexpected suffix"),
    "not in base": (lambda m, p: write_adapter(p, "llama", {"blk.9.attn_q.weight": good_pairs(m)["blk.0.attn_q.weight"]}),
                    "does not exist in the base model"),
    "not gguf": (lambda m, p: (p.write_bytes(b"PK\x03\x04 zip, not gguf" * 10), p)[1], "not a GGUF file"),
    "truncated": (lambda m, p: (p.write_bytes(write_adapter(p, "llama", good_pairs(m)).read_bytes()[:-100]), p)[1],
                  "outside the file"),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_bad_adapter_files(tiny_model_file, tmp_path, case):
    from llama_cpp import Llama

    path = tiny_model_file("llama", "f32")
    make, message = BAD_FILES[case]
    with BaseModel.load(path, n_threads=N_THREADS) as model:
        bad = make(model, tmp_path / "bad.gguf")
        with pytest.raises(GGUFFormatError, match=message):
            Adapter.load(model, bad)
    llm = Llama(model_path=str(path), n_ctx=32, verbose=False)
    with pytest.raises(GGUFFormatError, match=message):
        apply_adapters(llm, [(bad, 1.0)])
    llm.eval([1, 2, 3])            # llama.cpp never saw the file: the process and the context live on
    llm.close()


def test_interrupted_save_keeps_previous_file(tiny_model_file, tmp_path, monkeypatch):
    with BaseModel.load(tiny_model_file("llama", "f32"), n_threads=N_THREADS) as model:
        with Adapter.init(model, LoRAConfig(rank=2)) as ad:
            path = ad.save(tmp_path / "adapter.gguf")
            before = path.read_bytes()

            def boom(self, *a, **k):
                raise KeyboardInterrupt("simulated kill during the tensor write")

            monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", boom)
            with pytest.raises(KeyboardInterrupt):
                ad.save(path)
        assert path.read_bytes() == before
        assert [p.name for p in tmp_path.iterdir()] == ["adapter.gguf"]    # no temporary file left behind


def test_tied_model_refuses_embedding_lora(tiny_model_file, tmp_path):
    with BaseModel.load(tiny_model_file("llama", "f32"), n_threads=N_THREADS) as model:
        assert model.tied_embeddings
        with pytest.raises(Exception, match="tie"):
            write_lora_gguf(tmp_path / "x.gguf", "llama", 1.0, {"token_embd.weight": (np.zeros((2, 2)), np.zeros((2, 2)))},
                            tied_embeddings=True)
        assert not (tmp_path / "x.gguf").exists()


def test_cli_info(tiny_model_file, tmp_path):
    import json
    import subprocess
    import sys

    with BaseModel.load(tiny_model_file("llama", "f32"), n_threads=N_THREADS) as model:
        with Adapter.init(model, LoRAConfig(rank=4, target_modules=("q_proj", "v_proj"))) as ad:
            path = ad.save(tmp_path / "a.gguf", metadata={"step": 7})
    out = subprocess.run([sys.executable, "-m", "ggml_lora", "info", str(path), "--json"], capture_output=True,
                         text=True, check=True).stdout
    info = json.loads(out)
    assert info["architecture"] == "llama" and info["rank"] == 4 and info["pairs"] == 2 * 2
    assert info["alpha"] == 8.0 and info["metadata"]["step"] == 7 and info["tensor_types"] == ["F32"]
    bad = subprocess.run([sys.executable, "-m", "ggml_lora", "info", str(tmp_path / "missing.gguf")],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "missing.gguf" in bad.stderr


def test_written_files_get_the_umasks_permissions(tiny_model_file, tmp_path):
    """Files written through a temporary name (adapters, merges, PEFT folders) and checkpoint folders get
    the mode a plain open()/mkdir() would give them, not tempfile's owner-only 0o600/0o700."""
    import os
    import stat

    from ggml_lora.checkpoint import write_checkpoint
    from ggml_lora.merge import merge_adapters

    old = os.umask(0o022)
    try:
        path = tiny_model_file("llama", "f32")
        with BaseModel.load(path, n_threads=N_THREADS) as model, \
                Adapter.init(model, LoRAConfig(rank=2, target_modules=("q_proj",))) as ad:
            saved = ad.save(tmp_path / "a.gguf")
            merged = merge_adapters(path, [saved], tmp_path / "m.gguf")
            with TrainingContext(ad) as ctx:
                ckpt = write_checkpoint(tmp_path / "ckpt", 1, ad, ctx, {"step": 1})
        for p, want in ((saved, 0o644), (merged, 0o644), (ckpt, 0o755)):
            assert stat.S_IMODE(p.stat().st_mode) == want, (p, oct(p.stat().st_mode))
    finally:
        os.umask(old)
