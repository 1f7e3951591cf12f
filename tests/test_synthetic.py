"""Issue 15: benchmarks/synthetic.py writes models of real shape that llama.cpp and ggml-lora both load."""

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
        import ggml_lora.llama as gl
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
