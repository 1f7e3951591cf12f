"""The tiny random GGUF models load in llama.cpp and give non-trivial logits."""

from __future__ import annotations

import pathlib
import sys

import gguf
import numpy as np
import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import tinymodels  # noqa: E402

llama_cpp = pytest.importorskip("llama_cpp")

TEXT = b"The quick brown fox jumps over the lazy dog while seven wizards quietly judge boxing matches"


def eval_logits(path: pathlib.Path, n_tokens: int = 16) -> tuple[np.ndarray, "llama_cpp.Llama"]:
    """Logits (T, n_vocab) for the first n_tokens of TEXT, with an F32 KV cache."""
    llm = llama_cpp.Llama(model_path=str(path), logits_all=True, n_ctx=128, n_threads=2,
                          verbose=False, type_k=0, type_v=0)
    toks = llm.tokenize(TEXT)[:n_tokens]
    assert len(toks) == n_tokens
    llm.reset()
    llm.eval(toks)
    return np.array(llm.scores[:n_tokens], dtype=np.float32), llm


def assert_nontrivial(logits: np.ndarray) -> None:
    assert np.isfinite(logits).all()
    std = logits.std(axis=1)
    assert (std > 0.5).all(), std
    assert len(set(logits.argmax(axis=1).tolist())) > 1, "argmax constant over positions"


CASES = [(arch, wt, {}) for arch in tinymodels.ARCHS for wt in ("f32", "q8_0", "q4_1")]
CASES += [("gemma3", "f32", {"n_layers": 6, "head_dim": 32, "rope_scale": 2.0, "final_softcap": 5.0}),
          ("phi3", "f16", {"n_rot": 8, "tied": False})]
CASES += [
    ("llama", "f16", {"rope_freqs": True, "tied": False}),
    ("qwen3", "bf16", {"head_dim": 32}),  # head_dim != n_embd / n_head
    ("llama", "q5_0", {"head_dim": 32, "vocab": "llama-bpe"}),
]


@pytest.mark.parametrize("arch,weight_type,kw", CASES, ids=[f"{a}-{w}-{'-'.join(k) or 'default'}" for a, w, k in CASES])
def test_loads_and_logits(tmp_path: pathlib.Path, arch: str, weight_type: str, kw: dict) -> None:
    path = tinymodels.write_tiny_model(tmp_path / "m.gguf", arch, weight_type, **kw)
    logits, llm = eval_logits(path)
    vocab = kw.get("vocab") or tinymodels._ARCH_DEFAULTS[arch]["vocab"]
    assert logits.shape[1] == llm.n_vocab() == tinymodels.vocab_size(vocab)
    assert llm.metadata["general.architecture"] == arch
    assert_nontrivial(logits)


def test_kquant_via_llama_cpp(tmp_path: pathlib.Path) -> None:
    src = tinymodels.write_tiny_model(tmp_path / "f32.gguf", "llama", "f32", n_embd=256, n_ff=512)
    dst = tinymodels.quantize_with_llama_cpp(src, tmp_path / "q4k.gguf", "Q4_K_M")
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(dst).tensors}
    assert types["blk.0.attn_q.weight"] == gguf.GGMLQuantizationType.Q4_K
    assert types["blk.0.attn_norm.weight"] == gguf.GGMLQuantizationType.F32
    assert_nontrivial(eval_logits(dst)[0])


@pytest.mark.parametrize("arch", ("llama", "qwen2", "qwen3"))
def test_metadata(tmp_path: pathlib.Path, arch: str) -> None:
    # GGUFReader is slow on the 151k-entry qwen2 vocab (~10 s), so read a llama-spm-vocab file.
    kw = {"head_dim": 32} if arch == "qwen3" else {}
    path = tinymodels.write_tiny_model(tmp_path / "m.gguf", arch, "q8_0", vocab="llama-spm", **kw)
    r = gguf.GGUFReader(path)
    f = {k: v.contents() for k, v in r.fields.items() if not k.startswith("tokenizer.ggml.")}
    assert f["general.architecture"] == arch
    assert f["general.file_type"] == gguf.LlamaFileType.MOSTLY_Q8_0
    assert f[f"{arch}.vocab_size"] == len(r.fields["tokenizer.ggml.tokens"].data) == 32000
    assert f[f"{arch}.rope.dimension_count"] == (32 if arch == "qwen3" else 16)
    assert (f"{arch}.attention.key_length" in f) == (arch == "qwen3")
    tensors = {t.name: t for t in r.tensors}
    # ggml order: ne = [n_in, n_out]
    assert list(tensors["token_embd.weight"].shape) == [64, 32000]
    assert list(tensors["blk.1.attn_k.weight"].shape) == [64, 2 * (32 if arch == "qwen3" else 16)]
    assert tensors["blk.0.ffn_down.weight"].tensor_type == gguf.GGMLQuantizationType.Q8_0
    assert "output.weight" not in tensors
    assert ("blk.0.attn_q.bias" in tensors) == (arch == "qwen2")
    assert ("blk.0.attn_q_norm.weight" in tensors) == (arch == "qwen3")


def test_context_dependence(tmp_path: pathlib.Path) -> None:
    # Changing only the first token must change the logits at the last position.
    path = tinymodels.write_tiny_model(tmp_path / "m.gguf", "llama")
    llm = llama_cpp.Llama(model_path=str(path), logits_all=True, n_ctx=64, n_threads=2, verbose=False,
                          type_k=0, type_v=0)
    toks = llm.tokenize(TEXT)[:12]
    rows = []
    for first in (toks[1], 500):
        llm.reset()
        llm.eval([first] + toks[2:])
        rows.append(np.array(llm.scores[len(toks) - 2]))
    assert np.abs(rows[0] - rows[1]).max() > 0.1


def test_kquant_needs_256(tmp_path: pathlib.Path) -> None:
    src = tinymodels.write_tiny_model(tmp_path / "f32.gguf", "llama", "f32")  # n_embd=64
    with pytest.raises(ValueError):
        tinymodels.quantize_with_llama_cpp(src, tmp_path / "q.gguf", "Q4_K_M")


def test_rope_freqs_is_used(tmp_path: pathlib.Path) -> None:
    # Same seed => same weights; only the RoPE frequency factors differ. RoPE is the
    # identity at position 0, so only later positions may change.
    base, _ = eval_logits(tinymodels.write_tiny_model(tmp_path / "a.gguf", "llama"))
    freqs, _ = eval_logits(tinymodels.write_tiny_model(tmp_path / "b.gguf", "llama", rope_freqs=True))
    diff = np.abs(base - freqs).max(axis=1)
    assert diff[0] < 1e-4 and diff[1:].max() > 0.1, diff


def test_bad_dims() -> None:
    with pytest.raises(ValueError):
        tinymodels.write_tiny_model("/nonexistent/x.gguf", "llama", "q4_0", n_ff=100)
    with pytest.raises(ValueError):
        tinymodels.write_tiny_model("/nonexistent/x.gguf", "qwen2", head_dim=32)
