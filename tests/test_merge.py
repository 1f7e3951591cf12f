"""Merging adapters into a GGUF gives what llama.cpp computes applying the same adapters, within each
type's own quantization error; untargeted tensors stay byte for byte, and refusals write nothing."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from conftest import N_THREADS
from reference import llama_logits

from ggml_lora import Adapter, BaseModel, GGUFFormatError, InvalidArgumentError, LoRAConfig, UnsupportedError
from ggml_lora.gguf_header import read_header
from ggml_lora.merge import merge_adapters

ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
TOKENS = [1, 5, 9, 33, 2, 70, 14, 3, 8, 41, 19, 6]


def random_adapter(model_file, path, seed: int, rank: int = 4, targets=ALL):
    """An adapter with random A and B (B is zero at init), so merging it changes the model visibly."""
    with BaseModel.load(model_file, n_threads=N_THREADS) as model, \
            Adapter.init(model, LoRAConfig(rank=rank, alpha=2.0 * rank, target_modules=targets, seed=seed)) as ad:
        rng = np.random.default_rng(seed)
        for name in ad.targets:
            b = ad.get(name)[1]
            ad.set(name, lora_b=rng.normal(0.0, 0.05, b.shape).astype(np.float32))
        return ad.save(path)


def tensor_bytes(path, name: str) -> bytes:
    t = read_header(path).tensors[name]
    with open(path, "rb") as f:
        f.seek(t.offset)
        return f.read(t.n_bytes)


def test_f32_merge_equals_the_adapters_applied_by_llama_cpp(tiny_model_file, tmp_path):
    base = tiny_model_file("llama", "f32")
    a1 = random_adapter(base, tmp_path / "a1.gguf", 1, targets=tuple(t for t in ALL if t != "up_proj"))
    a2 = random_adapter(base, tmp_path / "a2.gguf", 2, rank=2, targets=("q_proj", "down_proj"))
    seen = []
    merged = merge_adapters(base, [(a1, 0.7), (a2, -1.3)], tmp_path / "m.gguf",
                            progress=lambda done, total: seen.append((done, total)))
    ref = llama_logits(base, TOKENS, lora=[(a1, 0.7), (a2, -1.3)], n_threads=N_THREADS)
    ours = llama_logits(merged, TOKENS, n_threads=N_THREADS)
    moved = np.abs(ref - llama_logits(base, TOKENS, n_threads=N_THREADS)).max()
    diff = np.abs(ours - ref).max()
    print(f"f32 merge: max |merged - base+adapters| {diff:.2e}, adapters moved the logits by {moved:.3f}")
    assert moved > 0.1                        # the adapters matter, so the comparison can fail
    # (W + s·BA)·x against W·x + s·B·(A·x) in float32: the same sum in another order, 1e-5-ish on logits of ~2.5
    assert diff < 1e-3
    hb, hm = read_header(base), read_header(merged)
    assert [(k, f.value) for k, f in hb.fields.items()] == [(k, f.value) for k, f in hm.fields.items()]
    assert [(t.name, t.shape, t.type) for t in hb.tensors.values()] == \
           [(t.name, t.shape, t.type) for t in hm.tensors.values()]
    for name in ("token_embd.weight", "blk.0.attn_norm.weight", "blk.1.ffn_up.weight"):   # no LoRA on these...
        assert tensor_bytes(base, name) == tensor_bytes(merged, name)
    assert tensor_bytes(base, "blk.0.attn_q.weight") != tensor_bytes(merged, "blk.0.attn_q.weight")  # ...on this one
    assert seen[-1] == (len(hb.tensors), len(hb.tensors)) and len(seen) == len(hb.tensors)


def test_up_proj_untouched_only_when_not_targeted(tiny_model_file, tmp_path):
    """Targeting up_proj changes its bytes, so the byte-equality checks above can fail."""
    base = tiny_model_file("llama", "f32")
    a1 = random_adapter(base, tmp_path / "a1.gguf", 1, targets=("up_proj",))
    merged = merge_adapters(base, [a1], tmp_path / "m.gguf")
    assert tensor_bytes(base, "blk.1.ffn_up.weight") != tensor_bytes(merged, "blk.1.ffn_up.weight")
    assert tensor_bytes(base, "blk.1.attn_q.weight") == tensor_bytes(merged, "blk.1.attn_q.weight")


K_SHAPE = dict(n_embd=256, n_ff=512, n_head=4, n_head_kv=2)          # rows of 256: K-quants apply


def type_error(base, type_name: str, tmp_path) -> float:
    """How far quantizing the F32 base alone to `type_name` moves llama.cpp's logits (max |delta|)."""
    work = tmp_path / "type_error"
    work.mkdir(exist_ok=True)
    adapter = random_adapter(base, work / "zero.gguf", 0, targets=("q_proj",))
    q_base = merge_adapters(base, [(adapter, 0.0)], work / "qbase.gguf", type=type_name)   # scale 0: no delta
    return float(np.abs(llama_logits(q_base, TOKENS, n_threads=N_THREADS)
                        - llama_logits(base, TOKENS, n_threads=N_THREADS)).max())


@pytest.mark.parametrize("type_name, shape", [("q8_0", {}), ("q4_0", {}), ("q4_k_m", K_SHAPE)])
def test_requantized_merge_is_within_the_types_own_error(tiny_model_file, tmp_path, type_name, shape):
    """Merging then quantizing may cost what quantizing the base alone costs, not more: the error of the
    merged model against llama.cpp's F32 base + adapter is bounded by twice the error of the quantized
    base against the F32 base (measured 1.2-1.4x: these random models amplify rounding chaotically, so
    the two errors are comparable in size, not equal), plus 1e-3 for float32 order (the F32 test)."""
    base = tiny_model_file("llama", "f32", **shape)
    adapter = random_adapter(base, tmp_path / "a.gguf", 3)
    merged = merge_adapters(base, [adapter], tmp_path / "m.gguf", type=type_name)
    h = read_header(merged)
    matrix_types = {t.type_name for t in h.tensors.values() if len(t.shape) == 2}
    assert matrix_types <= {"q8_0": {"Q8_0"}, "q4_0": {"Q4_0"}, "q4_k_m": {"Q4_K", "Q6_K", "Q5_K"}}[type_name], \
        matrix_types
    assert h.tensors["blk.0.attn_norm.weight"].type_name == "F32"          # 1-D tensors stay as they are
    assert h.get("general.file_type") == {"q8_0": 7, "q4_0": 2, "q4_k_m": 15}[type_name]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.gguf", "m.gguf"]   # no intermediate left
    ref = llama_logits(base, TOKENS, lora=[(adapter, 1.0)], n_threads=N_THREADS)
    moved = np.abs(ref - llama_logits(base, TOKENS, n_threads=N_THREADS)).max()
    err_merge = np.abs(llama_logits(merged, TOKENS, n_threads=N_THREADS) - ref).max()
    err_type = type_error(base, type_name, tmp_path)
    print(f"{type_name}: merged vs F32+adapter {err_merge:.4f}; base quantized vs base {err_type:.4f}; "
          f"the adapter moved the logits by {moved:.3f}")
    assert err_type > 0                                                    # the type does cost something
    assert err_merge <= 2 * err_type + 1e-3


def test_same_type_keeps_quantized_tensors_and_requantizes_merged_ones(tiny_model_file, tmp_path):
    base = tiny_model_file("llama", "q8_0")
    adapter = random_adapter(base, tmp_path / "a.gguf", 4, targets=("v_proj",))
    merged = merge_adapters(base, [adapter], tmp_path / "m.gguf")
    hb, hm = read_header(base), read_header(merged)
    assert {n: t.type for n, t in hb.tensors.items()} == {n: t.type for n, t in hm.tensors.items()}
    assert hm.file_size == hb.file_size
    for name in hb.tensors:
        same = tensor_bytes(base, name) == tensor_bytes(merged, name)
        assert same == (not name.endswith("attn_v.weight")), name
    ref = llama_logits(base, TOKENS, lora=[(adapter, 1.0)], n_threads=N_THREADS)
    diff = np.abs(llama_logits(merged, TOKENS, n_threads=N_THREADS) - ref).max()
    # one more Q8_0 rounding, of v_proj only, may move the logits no more than rounding every matrix of
    # the F32 model of the same shape to Q8_0 does
    bound = type_error(tiny_model_file("llama", "f32"), "q8_0", tmp_path)
    print(f"q8_0 same-type merge vs q8_0 base + adapter: {diff:.4f} (whole-model Q8_0 error {bound:.4f})")
    assert diff <= bound


def test_refusals_write_nothing(tiny_model_file, tmp_path):
    base = tiny_model_file("llama", "f32")
    other = tiny_model_file("llama", "f32", n_embd=32, n_ff=64, n_head=2, n_head_kv=1)
    wrong = random_adapter(other, tmp_path / "wrong.gguf", 6)
    good = random_adapter(base, tmp_path / "good.gguf", 7)
    out = tmp_path / "m.gguf"
    out.write_bytes(b"previous merge")
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(GGUFFormatError, match="do not fit"):
        merge_adapters(base, [good, wrong], out)
    with pytest.raises(InvalidArgumentError, match="not one of"):
        merge_adapters(base, [good], out, type="q4_z")
    with pytest.raises(UnsupportedError, match="not a multiple of Q4_K's block"):
        merge_adapters(base, [good], out, type="q4_k")                     # n_embd 64: rows of 64
    with pytest.raises(InvalidArgumentError, match="one of the inputs"):
        merge_adapters(base, [good], base)
    with pytest.raises(InvalidArgumentError, match="no adapters"):
        merge_adapters(base, [], out)
    with pytest.raises(InvalidArgumentError, match="not finite"):
        merge_adapters(base, [(good, float("nan"))], out)
    with pytest.raises(FileNotFoundError):
        merge_adapters(base, [tmp_path / "missing.gguf"], out)
    assert out.read_bytes() == b"previous merge"
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_cli_merge(tiny_model_file, tmp_path):
    base = tiny_model_file("llama", "f32")
    adapter = random_adapter(base, tmp_path / "a.gguf", 8)
    out = tmp_path / "m.gguf"
    run = subprocess.run([sys.executable, "-m", "ggml_lora", "merge", "--model", str(base), "--adapter",
                          f"{adapter}:0.5", "--out", str(out), "--type", "f16"], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert "wrote" in run.stdout and out.is_file()
    assert read_header(out).tensors["blk.0.attn_q.weight"].type_name == "F16"
    ref = llama_logits(base, TOKENS, lora=[(adapter, 0.5)], n_threads=N_THREADS)
    assert np.abs(llama_logits(out, TOKENS, n_threads=N_THREADS) - ref).max() < 0.05    # F16 weights
    bad = subprocess.run([sys.executable, "-m", "ggml_lora", "merge", "--model", str(base), "--adapter",
                          str(tmp_path / "nope.gguf"), "--out", str(tmp_path / "x.gguf")], capture_output=True, text=True)
    assert bad.returncode == 2 and "nope.gguf" in bad.stderr and not (tmp_path / "x.gguf").exists()
