"""benchmarks/synthetic.py writes models of real shape that llama.cpp and ggml-lora both load."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import textwrap
from pathlib import Path

from conftest import N_THREADS

from ggml_lora import BaseModel
from reference import MAX_ABS_DIFF

ROOT = Path(__file__).resolve().parents[1]


def synthetic():
    spec = importlib.util.spec_from_file_location("synthetic", ROOT / "benchmarks" / "synthetic.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["synthetic"] = mod                     # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def test_smollm2_shape_through_llama_cpps_quantizer(tmp_path):
    syn = synthetic()
    info = syn.make("smollm2-135m", "q4_0", tmp_path / "s.gguf", seed=1)      # Q8_0 written, then requantized
    assert info["parameters"] == 134_515_008                                 # SmolLM2-135M's count
    assert not list(tmp_path.glob("*.tmp"))                                   # the intermediate is gone
    shape = syn.SHAPES["smollm2-135m"]
    with BaseModel.load(info["path"], n_threads=N_THREADS) as model:
        assert (model.n_layers, model.n_embd, model.n_vocab) == (shape.n_layers, shape.n_embd, shape.n_vocab)
        assert model.tensors["blk.0.ffn_down.weight"].type_name == "Q4_0"
    # llama.cpp with its extra buffer types off (as on AMX CPUs) runs the same ggml kernels as we do; with
    # them on, on AVX2 it repacks Q4_0 into interleaved blocks whose kernels round differently (measured:
    # 0.0 off, 0.18 max on), so the comparison runs in a child process with them off
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(f"""
        import sys, numpy as np
        sys.path.insert(0, {str(ROOT / "tests")!r})
        import ggml_lora.llama_cpp_python as gl
        from llama_cpp import Llama
        from ggml_lora import BaseModel
        from reference import parity_report
        gl.protect_llama_cpp({{"AMX_INT8": "1"}})
        llm = Llama({info["path"]!r}, n_ctx=64, logits_all=True, n_threads=2, type_k=0, type_v=0, verbose=False)
        tokens = llm.tokenize(b"A model of real shape with random weights.")
        llm.eval(tokens)
        ref = np.array(llm.scores[:len(tokens)], dtype=np.float32)
        llm.close()
        with BaseModel.load({info["path"]!r}, n_threads=2) as m:
            ours = m.logits(tokens)
        print("REPORT", float(ref.std()), parity_report(ours, ref))""")], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    line = out.stdout.split("REPORT")[1]
    print("synthetic parity:", line.strip())
    std, rep = line.split(" ", 2)[1], eval(line.split(" ", 2)[2])
    # activations stay O(1) through all 30 blocks: logits are finite, with the intended spread (~2.5)
    assert 1.0 < float(std) < 6.0
    assert rep["max_abs_diff"] <= MAX_ABS_DIFF and rep["bad_flips"] == 0, rep


def test_q8_0_weights_have_the_intended_spread(tmp_path):
    """Q8_0 is written as blocks of uniform int8 quants under one scale: the dequantized weights must
    still have std 1/sqrt(n_in) (projections) and 0.5 (embeddings), the scaling that keeps activations
    O(1) through every block. 1%: the sampling error of a std over >= 300k draws is ~0.2%, the scale's
    F16 rounding <= 0.05%."""
    import gguf
    import numpy as np

    syn = synthetic()
    info = syn.make("smollm2-135m", "q8_0", tmp_path / "s.gguf", seed=2)
    reader = gguf.GGUFReader(info["path"])
    by_name = {t.name: t for t in reader.tensors}
    for name, want in (("blk.3.attn_q.weight", 576 ** -0.5), ("blk.3.ffn_down.weight", 1536 ** -0.5),
                       ("token_embd.weight", 0.5)):
        t = by_name[name]
        assert t.tensor_type == gguf.GGMLQuantizationType.Q8_0
        w = gguf.quants.dequantize(t.data, t.tensor_type)
        assert abs(float(w.std()) / want - 1.0) < 0.01, (name, float(w.std()), want)
        assert abs(float(w.mean())) < 0.01 * want
