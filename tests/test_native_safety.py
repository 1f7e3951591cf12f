"""Nothing Python can call makes the native library abort the process.

ggml asserts and C++ exceptions escaping the C ABI kill the whole Python process, so every test that
could provoke one runs it in a child process: an abort then shows as a failed test (a negative return
code and the child's stderr), not as a dead test run.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from conftest import N_THREADS

from ggml_lora import Adapter, BaseModel, InvalidArgumentError, LoRAConfig, UnsupportedError, _native
from ggml_lora.errors import InternalError
from ggml_lora.forward import loss_batch
from ggml_lora.step import TrainingContext

NATIVE = Path(__file__).resolve().parents[1] / "native"
TESTS = Path(__file__).resolve().parent
ALL_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def run_child(code: str, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """Runs `code` in a fresh Python (same environment, tests/ on the path); an abort is its failure."""
    prelude = f"import sys; sys.path.insert(0, {str(TESTS)!r})\n"
    proc = subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(code), *args], capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, f"child exited with {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    return proc


# ---- C++ exceptions never cross the C ABI ---------------------------------------------------------

def matching(text: str, start: int, open_: str, close: str) -> int:
    """Index of the bracket closing text[start] (== open_), skipping comments and string and character
    literals."""
    depth, i = 0, start
    while i < len(text):
        c = text[i]
        if text.startswith("//", i):
            i = text.index("\n", i)
        elif text.startswith("/*", i):
            i = text.index("*/", i) + 1
        elif c in "\"'":
            j = i + 1
            while text[j] != c:
                j += 2 if text[j] == "\\" else 1
            i = j
        elif c == open_:
            depth += 1
        elif c == close:
            depth -= 1
            if depth == 0:
                return i
        i += 1
    raise AssertionError(f"unbalanced {open_}{close} from offset {start}")


def exported_bodies() -> dict[str, str]:
    """Every `extern "C" GLORA_API` function defined in native/ (its backend folders too): name -> its body."""
    bodies = {}
    for path in sorted(NATIVE.rglob("*.cpp")):
        text = path.read_text()
        for m in re.finditer(r'extern "C" GLORA_API [^(;]*?\b(glora_\w+)\s*\(', text):
            params_end = matching(text, m.end() - 1, "(", ")")
            open_brace = text.index("{", params_end)
            assert text[params_end + 1:open_brace].strip() == "", f"{path.name}: {m.group(1)} is not a definition"
            bodies[m.group(1)] = text[open_brace + 1:matching(text, open_brace, "{", "}")].strip()
    return bodies


def test_every_exported_function_runs_inside_a_guard():
    bodies = exported_bodies()
    declared = set(re.findall(r"\b(glora_\w+)\s*\(", _native.read_cdef(_native.HEADER)))
    assert set(bodies) == declared, "the header and the definitions disagree"
    for name, body in bodies.items():
        # the whole body is one guard call: `[return] glora_guard*(__func__, ...);` and nothing after it
        m = re.match(r"(return )?glora_guard(_or|_void)?\(__func__,", body)
        assert m, f"{name} does not start with a glora_guard call:\n{body[:200]}"
        call_end = matching(body, m.end() - len("__func__,") - 1, "(", ")")
        assert body[call_end + 1:].strip() == ";", f"{name} has code outside its guard:\n{body[call_end:]}"


OOM_CHILD = """
import re, resource, sys
from ggml_lora import Adapter, BaseModel, LoRAConfig, OutOfMemoryError
from ggml_lora.step import TrainingContext

model = BaseModel.load(sys.argv[1], n_threads=1)
adapter = Adapter.init(model, LoRAConfig(rank=2, target_modules=("q_proj",)))
ctx = TrainingContext(adapter, gradient_checkpointing=True)
# address space for what the process already maps plus 256 MiB: measuring 2^20 x 256 tokens first
# builds a host vector of their 2^28 token ids (1 GiB), before any ggml allocation
vm = int(re.search(r"VmSize:\\s+(\\d+) kB", open("/proc/self/status").read()).group(1)) * 1024
soft, hard = resource.getrlimit(resource.RLIMIT_AS)
resource.setrlimit(resource.RLIMIT_AS, (vm + (256 << 20), hard))
try:
    ctx.measure(1 << 20, 256)
except OutOfMemoryError as e:
    print("caught:", e)
    assert e.code == 5 and "out of host memory" in str(e), e
else:
    sys.exit("no OutOfMemoryError")
resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
assert ctx.measure(1, 16)["compute"] > 0   # the library is still usable
"""


def test_host_allocation_failure_is_out_of_memory(tiny_model_file):
    """A real std::bad_alloc inside the library becomes OutOfMemoryError, and the process lives on."""
    proc = run_child(OOM_CHILD, str(tiny_model_file("llama", "q8_0")), timeout=120)
    assert "glora_trainer_measure: out of host memory" in proc.stdout, proc.stdout


# ---- graph node budgets ---------------------------------------------------------------------------

GRID_CHILD = """
import json, logging, re, sys
import numpy as np
from tinymodels import write_tiny_model
from ggml_lora import Adapter, BaseModel, LoRAConfig
from ggml_lora.forward import loss_batch, loss_sum
from ggml_lora.step import TrainingContext

graphs = []   # (nodes, leafs, budget) of every graph the library allocates or plans
class Collect(logging.Handler):
    def emit(self, record):
        m = re.match(r"graph: (\\d+) nodes, (\\d+) leafs, budget (\\d+)", record.getMessage())
        if m:
            graphs.append(tuple(int(x) for x in m.groups()))
log = logging.getLogger("ggml_lora.ggml")
log.setLevel(logging.DEBUG)
log.addHandler(Collect())

root, rows = sys.argv[1], [int(r) for r in sys.argv[2].split(",")]
targets = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head")
for n_layers in (1, 2, 3):
    path = write_tiny_model(f"{root}/grid{n_layers}.gguf", "llama", "q8_0", n_layers=n_layers, tied=False,
                            n_ctx_train=4096)
    with BaseModel.load(path, n_threads=2) as model:
        for dropout in (0.0, 0.1):
            with Adapter.init(model, LoRAConfig(rank=4, target_modules=targets, dropout=dropout)) as adapter:
                for checkpointing in (False, True):
                    with TrainingContext(adapter, gradient_checkpointing=checkpointing) as ctx:
                        for n in rows:
                            tokens = np.random.default_rng(n).integers(0, model.n_vocab, (1, n))
                            batch = loss_batch(model, tokens)
                            ctx.accumulate(batch, batch.n_loss)
                            assert np.isfinite(ctx.grad_norm())
                            ctx.zero_grad()
                        ctx.measure(2, 2 * rows[-1])                # planned only
                tokens = np.zeros((1, rows[-1]), dtype=np.int32)
                loss_sum(model, adapter, loss_batch(model, tokens))  # blocks, then the head in chunks
                model.logits(tokens, adapter)                       # llama.cpp's graph, padded keys
print(json.dumps(graphs))
"""


def test_graphs_of_every_shape_fit_their_budget(tmp_path):
    """Tiny models of 1..3 blocks, every projection and the LM head adapted, 2..2000 rows (up to 8
    attention chunks), with and without dropout and checkpointing: every graph builds and runs, and
    each graph's nodes and leafs stay under the budget it was made with."""
    proc = run_child(GRID_CHILD, str(tmp_path), "2,300,2000", timeout=900)
    graphs = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(graphs) > 100
    for nodes, leafs, budget in graphs:
        assert nodes < budget and leafs < budget, (nodes, leafs, budget)
    print("largest share of a budget used:", max(n / b for n, _, b in graphs))


def test_length_past_the_node_limit_is_refused_before_any_graph(tiny_model_file):
    with BaseModel.load(tiny_model_file("llama", "q8_0"), n_threads=N_THREADS) as model:
        with Adapter.init(model, LoRAConfig(rank=2, target_modules=ALL_TARGETS)) as adapter, \
                TrainingContext(adapter) as ctx:
            out = _native.ffi.new("glora_memory *")
            # ~40000 attention chunks per block: past GLORA_MAX_GRAPH_NODES with the backward
            status = _native.lib.glora_trainer_measure(ctx._handle(), 1, 10_000_000, 1, out)
            assert status == InvalidArgumentError.code
            message = _native.last_error()
            assert "sequences of 10000000 tokens" in message and "at most" in message, message
            fits = int(re.search(r"at most (\d+) tokens", message).group(1))
            assert 100_000 < fits < 10_000_000
            # ... and the longest that fits is accepted (planned, nothing runs)
            assert _native.lib.glora_trainer_measure(ctx._handle(), 1, 4096, 1, out) == 0


SMOLLM2_CHILD = """
import json, sys
from reference import smollm2_path
from ggml_lora import BaseModel, LoRAConfig, UnsupportedError
from ggml_lora.step import estimate_memory

lora = LoRAConfig(rank=8, target_modules=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"))
with BaseModel.load(smollm2_path(), n_threads=2) as model:
    assert model.n_ctx == 8192
    out = {"checkpointed": estimate_memory(model, lora, 1, 8192, gradient_checkpointing=True),
           "one_graph_2048": estimate_memory(model, lora, 1, 2048)}
    try:
        estimate_memory(model, lora, 1, 8192)
    except UnsupportedError as e:
        out["refused"] = str(e)
print(json.dumps(out))
"""


@pytest.mark.slow
def test_smollm2_full_context_with_every_projection_is_estimated():
    """Reproduced crash: GGML_ASSERT(cgraph->n_nodes < cgraph->size) at 8192 tokens with 7 targets.

    With gradient checkpointing the step's graphs are planned. In one graph, 8192 tokens are 32
    attention chunks in each of 30 blocks, which overruns ggml's allocator (its 256 free blocks:
    GGML_ASSERT "out of free blocks" in ggml-alloc.c, measured at 960 block-chunks), so that is refused
    before any graph is built, naming the length and what fits."""
    proc = run_child(SMOLLM2_CHILD, timeout=900)
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    checkpointed, one_graph = out["checkpointed"], out["one_graph_2048"]
    for mem in (checkpointed, one_graph):
        assert mem["compute"] > 0 and mem["total"] >= mem["weights"] + mem["compute"]
    # activations of 30 blocks over 2048 tokens are GiBs; checkpointing keeps the block inputs and one
    # block's activations (measured: 5.9 GiB compute in one graph at 2048, 1.6 GiB checkpointed at 8192)
    assert one_graph["compute"] > 4 << 30, one_graph
    assert checkpointed["checkpoints"] > 0 and checkpointed["total"] > 2 << 30, checkpointed
    assert "8192 tokens" in out["refused"] and "gradient checkpointing" in out["refused"], out["refused"]
    assert "at most 2048 tokens" in out["refused"], out["refused"]


def test_one_graph_of_too_many_attention_chunks_is_refused(tiny_model_file):
    with BaseModel.load(tiny_model_file("llama", "q8_0", n_layers=4, n_ctx_train=65536), n_threads=N_THREADS) as model:
        with Adapter.init(model, LoRAConfig(rank=2, target_modules=("q_proj",))) as adapter:
            with TrainingContext(adapter) as ctx, pytest.raises(UnsupportedError, match="use gradient checkpointing"):
                ctx.measure(1, 64 * 256)     # 4 blocks x 64 chunks: failed in ggml's allocator from ~300
            with TrainingContext(adapter, gradient_checkpointing=True) as ctx:
                assert ctx.measure(1, 64 * 256)["compute"] > 0


# ---- rewrites of the backward fail loudly ---------------------------------------------------------

def test_backward_rewrites_refuse_graphs_without_their_pattern(tiny_model_file):
    with BaseModel.load(tiny_model_file("llama", "q8_0"), n_threads=N_THREADS) as model:
        with Adapter.init(model, LoRAConfig(rank=2, target_modules=("q_proj",))) as adapter, \
                TrainingContext(adapter) as ctx:
            lib = _native.lib
            assert lib.glora_selftest(ctx._handle(), b"transposed_weights") == InternalError.code
            assert "blk.0.attn_q.weight" in _native.last_error(), _native.last_error()
            assert lib.glora_selftest(ctx._handle(), b"param_grads") == InternalError.code
            assert "grad.blk.0.attn_q.weight.lora_a" in _native.last_error(), _native.last_error()
            assert lib.glora_selftest(ctx._handle(), b"nope") == InvalidArgumentError.code
            # the real graphs still pass both checks
            batch = loss_batch(model, np.arange(1, 17)[None, :])
            ctx.accumulate(batch, batch.n_loss)
            assert ctx.grad_norm() > 0


@pytest.mark.parametrize("n0, n1, K, b_transposed", [(1536, 200, 8, 1), (576, 8, 301, 0), (70, 13, 5, 1),
                                                      (64, 8, 1, 0), (3, 1, 40, 0)])
@pytest.mark.parametrize("threads", [1, 2])
def test_our_out_prod_is_ggmls(n0, n1, K, b_transposed, threads):
    # the backward's F32 out_prods run in a kernel of our own (glora_cpu_kernels.cpp): the two shapes a LoRA
    # backward has (d(A·x): K = rank, the right side a transposed view; dA: K = rows), block tails in both
    # dimensions, K = 1; against float64 and against ggml's own kernel on the same inputs
    from ggml_lora._native import ffi, lib

    rng = np.random.default_rng(n0 + K)
    a = rng.normal(0, 1, (K, n0)).astype(np.float32)
    b = rng.normal(0, 1, (n1, K) if b_transposed else (K, n1)).astype(np.float32)
    ref = (b if b_transposed else b.T).astype(np.float64) @ a.astype(np.float64)      # [n1, n0]
    outs = []
    for ours in (0, 1):
        out = np.full((n1, n0), np.nan, np.float32)
        assert lib.glora_selftest_out_prod(ffi.cast("float *", a.ctypes.data), ffi.cast("float *", b.ctypes.data),
                                           ffi.cast("float *", out.ctypes.data), n0, n1, K, b_transposed, ours,
                                           threads, 2) == 0
        outs.append(out)
    # F32 sums of K products in ggml's order (k ascending), with or without fused multiply-adds
    bound = 2 * K * 2.0**-24 * (np.abs(b if b_transposed else b.T) @ np.abs(a))
    for out in outs:
        assert np.all(np.abs(out - ref) <= bound + 1e-30)
    assert np.all(np.abs(outs[1] - outs[0]) <= 2 * bound + 1e-30)


@pytest.mark.parametrize("K, N, M", [(576, 1536, 100), (1536, 576, 64), (300, 37, 17), (257, 100, 23),
                                     (8, 5, 16), (600, 40, 200)])
@pytest.mark.parametrize("threads", [1, 2, 7])
@pytest.mark.parametrize("w_f16", [1, 0])
def test_our_fma_product_is_the_product_of_the_copy(K, N, M, threads, w_f16):
    # products through F16 copies on CPUs without AVX-512 run in a kernel of our own (fma_mul_mat): panel
    # and register-block tails, K across several runs of 256, more threads than panels (x's rows split
    # instead); against float64 of the same F16 values, and x must not be rounded as ggml's F16 path does
    from ggml_lora._native import ffi, lib

    rng = np.random.default_rng(K + N + M)
    w = rng.normal(0, 1, (N, K)).astype(np.float16 if w_f16 else np.float32)
    x = rng.normal(0, 1, (M, K)).astype(np.float32)
    ref = x.astype(np.float64) @ w.astype(np.float64).T                                 # [M, N]
    outs = []
    for ours in (1, 0):
        out = np.full((M, N), np.nan, np.float32)
        assert lib.glora_selftest_fma(ffi.cast("void *", w.ctypes.data), w_f16, ffi.cast("float *", x.ctypes.data),
                                      ffi.cast("float *", out.ctypes.data), K, N, M, ours, threads) == 0
        outs.append(out)
    # F32 sums of K products, in runs of 256 added to the result: at most K roundings of partial sums
    bound = 2 * K * 2.0**-24 * (np.abs(x) @ np.abs(w.astype(np.float64)).T)
    assert np.all(np.abs(outs[0] - ref) <= bound + 1e-30)
    if w_f16:   # ggml rounds x to F16 (11 bits): hundreds of times further off than the F32 sums
        assert np.abs(outs[1] - ref).max() > 30 * np.abs(outs[0] - ref).max()


def test_gradient_checks_pass_through_the_fma_kernel_on_any_cpu():
    # CPUs without AVX-512 train through fma_mul_mat (the backward's transposed copies, the F16 forward
    # copies); GGML_LORA_FMA=1 takes it on any CPU with AVX2 + FMA, so the finite-difference and
    # same-gradient checks rerun through it here, in a process of their own, on every class CI runs on
    import os

    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    if not (re.search(r"\bavx2\b", flags) and re.search(r"\bfma\b", flags)):
        pytest.skip("the FMA kernel needs AVX2 + FMA")
    env = {k: v for k, v in os.environ.items() if k != "GGML_LORA_NO_FMA"} | {"GGML_LORA_FMA": "1",
                                                                               "GGML_LORA_PROFILE": "1"}
    tests = ["tests/test_training.py::test_gradient_matches_finite_differences",
             "tests/test_training.py::test_gradient_through_quantized_base",
             "tests/test_checkpointing.py::test_f16_weights_train_the_dequantized_model",
             "tests/test_frozen_memory.py::test_transient_copies_give_the_same_gradients"]
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests],
                          cwd=Path(__file__).resolve().parent.parent, env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:]
    # the profile at exit: products through F16 copies ran as a custom op (ours), none as ggml's mul_mat
    assert re.search(r"CUSTOM \[f16 x f32", proc.stderr), proc.stderr[-3000:]
    assert not re.search(r"MUL_MAT \[f16 x f32", proc.stderr), proc.stderr[-3000:]


# ---- BF16 weights keep BF16 working copies --------------------------------------------------------

def set_bf16_values(path: Path, name: str, rows: slice, value: float) -> None:
    """Overwrites rows of a BF16 matrix in a GGUF file in place."""
    import gguf

    reader = gguf.GGUFReader(path, "r+")
    tensor = next(t for t in reader.tensors if t.name == name)
    assert tensor.tensor_type == gguf.GGMLQuantizationType.BF16
    data = tensor.data.view(np.uint16)                             # (n_out, n_in) BF16 bit patterns
    data[rows] = np.array([value], dtype=np.float32).view(np.uint32)[0] >> 16   # exact in BF16
    reader.data.flush()


def test_bf16_weights_above_f16_range_give_finite_gradients(tmp_path):
    """F16 working copies turned BF16 values above 65504 into inf, and the backward through them
    into inf/nan gradients; BF16 copies hold the same values."""
    from tinymodels import write_tiny_model

    path = write_tiny_model(tmp_path / "bf16.gguf", "llama", "bf16", n_layers=1)
    # a few rows of ffn_down at 1e5: the gradient of gate/up's LoRA flows back through them
    set_bf16_values(path, "blk.0.ffn_down.weight", slice(0, 4), 1e5)
    with BaseModel.load(path, n_threads=N_THREADS) as model:
        with Adapter.init(model, LoRAConfig(rank=2, target_modules=ALL_TARGETS)) as adapter, \
                TrainingContext(adapter, optimizer="sgd") as ctx:
            for name in adapter.targets:
                a, b = adapter.get(name)
                adapter.set(name, lora_b=np.random.default_rng(0).normal(0, 0.1, b.shape))
            batch = loss_batch(model, np.arange(1, 25)[None, :])
            ctx.accumulate(batch, batch.n_loss)
            grads = ctx.gradients()
    for name, (ga, gb) in grads.items():
        assert np.isfinite(ga).all() and np.isfinite(gb).all(), name
    assert np.abs(grads["blk.0.ffn_up.weight"][0]).max() > 0


# ---- n_threads ------------------------------------------------------------------------------------

def test_model_load_refuses_more_threads_than_ggml_supports(tiny_model_file):
    path = tiny_model_file("llama", "f32")
    with BaseModel.load(path, n_threads=N_THREADS) as model:
        hp = model.hparams
    params = _native.ffi.new("glora_model_params *")
    device = _native.ffi.new("char[]", b"CPU")
    params.device = device
    params.n_layer, params.n_head, params.n_head_kv = hp.n_layers, hp.n_head, hp.n_head_kv
    params.head_dim, params.n_rot, params.rope_type = hp.head_dim, hp.n_rot, hp.rope_type
    params.n_ctx_orig, params.rope_freq_base, params.rope_freq_scale = hp.n_ctx_train, hp.rope_freq_base, 1.0
    params.rms_eps, params.kq_scale = hp.rms_eps, hp.kq_scale
    out = _native.ffi.new("glora_model **")
    params.n_threads = 513
    assert _native.lib.glora_model_load(str(path).encode(), params, out) == InvalidArgumentError.code
    assert "n_threads=513" in _native.last_error() and "512" in _native.last_error(), _native.last_error()
    assert out[0] == _native.ffi.NULL
    params.n_threads = N_THREADS
    assert _native.lib.glora_model_load(str(path).encode(), params, out) == 0
    _native.lib.glora_model_free(out[0])


# ---- the loss weight is applied in F32, after the backward (commit 1dadafd) -----------------------

def test_loss_weight_scales_gradients_exactly(tiny_model_file):
    """The gradients of accumulate(batch, n) are those of n = 1 divided by n, even for n = 1e6.

    Weighting the loss itself (the old backward) made the activation gradients 1e6 times smaller, and
    the backward products, which round them to F16 against the F16 copies of the Q8_0 weights, lost
    them to underflow (F16's smallest subnormal is 6e-8). Tolerance rel 1e-5: the two runs differ only
    in the last F32 multiplication by the loss weight (1e-6 is not exact in F32) and in numpy's
    multiplication by 1e6, each within 6e-8 relative.
    """
    with BaseModel.load(tiny_model_file("llama", "q8_0"), n_threads=N_THREADS) as model:
        with Adapter.init(model, LoRAConfig(rank=4, target_modules=ALL_TARGETS)) as adapter, \
                TrainingContext(adapter, optimizer="sgd") as ctx:
            rng = np.random.default_rng(1)
            for name in adapter.targets:
                a, b = adapter.get(name)
                adapter.set(name, lora_b=rng.normal(0, 0.1, b.shape))
            batch = loss_batch(model, rng.integers(0, model.n_vocab, (2, 32)))
            ctx.accumulate(batch, n_step_tokens=1)
            unit = ctx.gradients()
            ctx.zero_grad()
            ctx.accumulate(batch, n_step_tokens=1_000_000)
            small = ctx.gradients()
    for name in unit:
        for half, g1, g2 in zip(("lora_a", "lora_b"), unit[name], small[name]):
            assert np.abs(g1).max() > 0, (name, half)
            np.testing.assert_allclose(g2.astype(np.float64) * 1e6, g1, rtol=1e-5, atol=0, err_msg=f"{name}.{half}")
