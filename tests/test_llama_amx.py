"""llama-cpp-python never takes the AMX path that crashes the pinned llama.cpp.

On CPUs with AMX the pinned llama.cpp puts Q4_x/Q8_0 weights into its AMX extra buffer type and dies
with SIGILL on the first longer prompt. Importing ggml_lora turns llama.cpp's extra buffer types off by
default on such CPUs only. The decision is a function of the features llama.cpp reports, so it is
tested here on any CPU: with the real report of this machine, and with reports of an AMX machine.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

import ggml_lora.llama_cpp_python as gl

# llama_print_system_info() as printed by the pinned llama.cpp on each class of x86 machine this
# project runs on (feature names and format from ggml-cpu.cpp's ggml_backend_cpu_get_features)
AVX2_ONLY = ("CPU : SSE3 = 1 | SSSE3 = 1 | AVX = 1 | AVX2 = 1 | F16C = 1 | FMA = 1 | BMI2 = 1 | LLAMAFILE = 1 | "
             "OPENMP = 1 | REPACK = 1 | ")
AVX512_AMX = ("CPU : SSE3 = 1 | SSSE3 = 1 | AVX = 1 | AVX_VNNI = 1 | AVX2 = 1 | F16C = 1 | FMA = 1 | BMI2 = 1 | "
              "AVX512 = 1 | AVX512_VBMI = 1 | AVX512_VNNI = 1 | AVX512_BF16 = 1 | AMX_INT8 = 1 | LLAMAFILE = 1 | "
              "OPENMP = 1 | REPACK = 1 | ")
AVX512_NO_AMX = AVX512_AMX.replace("AMX_INT8 = 1 | ", "")


@pytest.mark.parametrize("report, crashes", [(AVX2_ONLY, False), (AVX512_NO_AMX, False), (AVX512_AMX, True),
                                             ("", False), ("CUDA : ARCHS = 900 | CPU : AMX_INT8 = 1 | ", True)])
def test_decision_from_the_reported_features(report, crashes):
    features = gl.parse_system_info(report)
    assert gl.extra_buffers_crash(features) is crashes
    if report == AVX512_AMX:
        assert features["AVX512_BF16"] == "1" and features["AMX_INT8"] == "1" and features["REPACK"] == "1"


def test_this_machine_keeps_its_defaults_unless_it_has_amx():
    import llama_cpp

    import ggml_lora  # noqa: F401  (imported by conftest already: the protection is in place)

    features = gl.llama_cpp_features()
    assert "AVX" in features or "NEON" in features, features      # the report was read and parsed
    assert llama_cpp.llama_model_default_params().use_extra_bufts is not gl.extra_buffers_crash(features)


def run_child(code: str) -> str:
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr[-4000:]}"
    return proc.stdout


def test_protected_llama_runs_a_long_prompt_with_the_same_logits(tiny_model_file):
    # an AMX report switches the default off for every Llama made afterwards, and llama.cpp without its
    # extra buffer types still computes the logits our own forward does (the parity criterion)
    path = tiny_model_file("llama", "q8_0")
    out = run_child(f"""
        import numpy as np, llama_cpp
        from llama_cpp import Llama
        import ggml_lora.llama_cpp_python as gl
        from ggml_lora import BaseModel
        assert llama_cpp.llama_model_default_params().use_extra_bufts is {not gl.extra_buffers_crash(gl.llama_cpp_features())}
        assert gl.protect_llama_cpp(gl.parse_system_info({AVX512_AMX!r}))
        assert gl.protect_llama_cpp()                                   # idempotent
        assert llama_cpp.llama_model_default_params().use_extra_bufts is False
        assert llama_cpp.llama_cpp.llama_model_default_params().use_extra_bufts is False
        tokens = list(range(1, 49))                                     # 48 tokens: crashed on AMX
        llm = Llama(model_path={str(path)!r}, logits_all=True, n_ctx=64, n_batch=64, n_ubatch=64, n_threads=2,
                    type_k=0, type_v=0, verbose=False)
        assert llm.model_params.use_extra_bufts is False
        llm.eval(tokens)
        ref = np.array(llm.scores[:48], dtype=np.float32)
        llm.close()
        with BaseModel.load({str(path)!r}, n_threads=2) as m:
            ours = m.logits(tokens)
        print("max_abs_diff", float(np.abs(ours - ref).max()))
    """)
    diff = float(out.split("max_abs_diff")[1])
    assert diff <= 0.02, out                 # reference.MAX_ABS_DIFF: same kernels, other op grouping


def test_a_llama_made_before_the_protection_is_warned_about(tiny_model_file, monkeypatch):
    from llama_cpp import Llama

    llm = Llama(model_path=str(tiny_model_file("llama", "q8_0")), n_ctx=32, verbose=False)
    try:
        llm.model_params.use_extra_bufts = True          # as a Llama made before ggml_lora was imported
        monkeypatch.setattr(gl, "llama_cpp_features", lambda: gl.parse_system_info(AVX512_AMX))
        with pytest.warns(RuntimeWarning, match="AMX"):
            gl.apply_adapters(llm, [])
        monkeypatch.setattr(gl, "llama_cpp_features", lambda: gl.parse_system_info(AVX2_ONLY))
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("error")
            gl.apply_adapters(llm, [])                    # no AMX: nothing to warn about
    finally:
        llm.close()


def test_training_and_inference_kernels_are_built_for_the_same_instruction_sets():
    """Both ggml builds come from one tree; built for different instruction sets (a llama-cpp-python wheel
    from another machine, or one build with GGML_LORA_AVX2_ONLY and the other native) their kernels sum in
    other orders, and the parity tests would compare those instead of our graphs."""
    import platform

    import ggml_lora

    ours = ggml_lora.cpu_features()
    if platform.machine().lower() in ("x86_64", "amd64"):
        assert ours.get("SSE3") == "1", ours
    enabled = lambda features: sorted(k for k, v in features.items() if v not in ("", "0"))   # noqa: E731
    assert enabled(ours) == enabled(gl.llama_cpp_features())
