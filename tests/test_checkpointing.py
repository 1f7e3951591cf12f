"""Gradient checkpointing gives the gradients of the one-graph backward, F16 working copies train and
evaluate the dequantized model, and estimate_memory predicts what a step really takes."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from conftest import N_THREADS
from gguf import GGUFReader

from ggml_lora import Adapter, BaseModel, InvalidArgumentError, LoRAConfig
from ggml_lora.forward import loss_batch
from ggml_lora.step import TrainingContext, estimate_memory

ALL_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

# (arch, weight type, model kwargs, targets, batch shape, dropout, packed segments)
CASES = [
    pytest.param("llama", "f32", {"tied": False}, ALL_TARGETS + ("lm_head",), (2, 300), 0.2, True,
                 id="llama-f32-untied-all-dropout-packed"),   # 598 loss rows: the head runs in 2 chunks
    pytest.param("qwen2", "q8_0", {}, ("q_proj", "v_proj"), (3, 40), 0.0, False, id="qwen2-q8_0-qv"),
    pytest.param("qwen3", "f16", {}, ("k_proj", "o_proj", "down_proj"), (1, 64), 0.1, False, id="qwen3-f16"),
    # issue 33: sliding-window masks per attention chunk (300 rows: two chunks, window 8), packed samples,
    # GEGLU's and the softcap's stand-in derivatives in every block's recomputed graph
    pytest.param("gemma3", "q8_0", {"final_softcap": 5.0}, ALL_TARGETS, (1, 300), 0.1, True,
                 id="gemma3-q8_0-all-dropout-packed"),
    pytest.param("gemma2", "f32", {"attn_softcap": 2.0, "final_softcap": 4.0}, ("q_proj", "gate_proj", "down_proj"),
                 (2, 40), 0.0, False, id="gemma2-f32-softcaps"),
    pytest.param("phi3", "f16", {"n_rot": 8, "tied": False}, ("qkv_proj", "o_proj", "gate_up_proj", "down_proj",
                 "lm_head"), (2, 60), 0.0, False, id="phi3-f16-fused-untied"),
]


def grads_and_loss(model, targets, tokens, dropout, segments, checkpointing):
    adapter = Adapter.init(model, LoRAConfig(rank=4, target_modules=targets, dropout=dropout))
    rng = np.random.default_rng(3)
    for name in adapter.targets:      # non-zero A and B, so both halves get a gradient
        a, b = adapter.get(name)
        adapter.set(name, lora_a=rng.normal(0, 0.2, a.shape), lora_b=rng.normal(0, 0.1, b.shape))
    with adapter, TrainingContext(adapter, gradient_checkpointing=checkpointing) as ctx:
        batch = loss_batch(model, tokens)
        if segments is not None:
            batch = type(batch)(batch.tokens, segments=segments, loss_rows=batch.loss_rows, labels=batch.labels)
        loss = ctx.accumulate(batch, batch.n_loss, dropout_seed=11)
        return loss, ctx.gradients()


@pytest.mark.parametrize("arch,weight_type,kw,targets,shape,dropout,packed", CASES)
def test_checkpointed_gradients_match_one_graph(tiny_model_file, arch, weight_type, kw, targets, shape, dropout,
                                                packed):
    """Same loss and gradients with and without checkpointing, dropout masks included.

    The recomputed forward runs the same ops on the same shapes, so activations are bit-identical; what
    differs is only the order of float32 sums where the head's chunks and the per-block gradient
    accumulators add partial results (measured worst: 5e-7 of the tensor's largest entry). The
    tolerance, 1e-5 of the largest entry, is 20 times that and far below the 1e-2 to 1 that a wrong
    dropout mask or a missing block produces.
    """
    with BaseModel.load(tiny_model_file(arch, weight_type, **kw), n_threads=N_THREADS) as model:
        tokens = np.random.default_rng(1).integers(0, model.n_vocab, shape)
        segments = None
        if packed:
            segments = np.repeat(np.arange(shape[1] // 50 + 1), 50)[: shape[1]][None, :].repeat(shape[0], 0)
        loss0, g0 = grads_and_loss(model, targets, tokens, dropout, segments, False)
        loss1, g1 = grads_and_loss(model, targets, tokens, dropout, segments, True)
    assert loss1 == pytest.approx(loss0, rel=1e-6)
    for name in g0:
        for half, x, y in zip(("lora_a", "lora_b"), g0[name], g1[name]):
            scale = np.abs(x).max()
            assert scale > 0, f"{name}.{half}: no gradient"
            assert np.abs(x - y).max() <= 1e-5 * scale, f"{name}.{half}"


def test_checkpointing_flag_is_validated(tiny_model_file):
    with BaseModel.load(tiny_model_file(), n_threads=N_THREADS) as model:
        with Adapter.init(model, LoRAConfig(rank=2)) as adapter:
            with pytest.raises(InvalidArgumentError, match="gradient_checkpointing"):
                TrainingContext(adapter, gradient_checkpointing=1)


def test_checkpointing_needs_less_compute_memory(tiny_model_file):
    with BaseModel.load(tiny_model_file(n_layers=4), n_threads=N_THREADS) as model:
        full = estimate_memory(model, LoRAConfig(rank=4, target_modules=ALL_TARGETS), 2, 256)
        ckpt = estimate_memory(model, LoRAConfig(rank=4, target_modules=ALL_TARGETS), 2, 256,
                               gradient_checkpointing=True)
    assert full["checkpoints"] == 0
    assert ckpt["checkpoints"] == (4 + 1 + 2) * 64 * 512 * 4      # x_0..x_4 and two gradients, F32
    assert ckpt["compute"] < full["compute"]
    assert full["total"] == sum(v for k, v in full.items() if k != "total")


_RSS_SCRIPT = textwrap.dedent("""
    import json, resource, sys
    import numpy as np
    from ggml_lora import Adapter, BaseModel, LoRAConfig
    from ggml_lora.forward import loss_batch
    from ggml_lora.step import TrainingContext, estimate_memory

    def status(key):
        with open("/proc/self/status") as f:
            return next(int(l.split()[1]) * 1024 for l in f if l.startswith(key + ":"))

    path, gc = sys.argv[1], sys.argv[2] == "1"
    model = BaseModel.load(path, n_threads=2, n_ctx=512)
    cfg = LoRAConfig(rank=8, target_modules=("q_proj", "v_proj"))
    tokens = np.random.default_rng(0).integers(0, model.n_vocab, (2, 128))
    batch = loss_batch(model, tokens)
    model.logits(tokens[0, :16])    # reads every weight once: the mapped file's pages are resident, as loaded
    before = status("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:   # resets the peak (VmHWM) to the current RSS
        f.write("5")
    # the first training context of a model makes its transposed weight copies, counted in both
    est = estimate_memory(model, cfg, 2, 128, gradient_checkpointing=gc)
    with Adapter.init(model, cfg) as ad, TrainingContext(ad, gradient_checkpointing=gc) as ctx:
        ctx.step([batch], learning_rate=1e-4, step=1)
        peak = status("VmHWM")
    print(json.dumps({"estimate": est, "delta": peak - before}))
""")


@pytest.mark.parametrize("gc", [False, True], ids=["one-graph", "checkpointed"])
def test_estimate_matches_measured_peak_rss(smollm2_file, gc):
    """The estimate of what a step adds (everything but the base weights, which are loaded already)
    is within 25% of the peak RSS growth of a real step, in a fresh process so no earlier test's
    high-water mark hides it."""
    # the child imports ggml_lora as this process does (installed package, or PYTHONPATH + GGML_LORA_LIBRARY)
    out = subprocess.run([sys.executable, "-c", _RSS_SCRIPT, str(smollm2_file), "1" if gc else "0"],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    res = json.loads(out.stdout.strip().splitlines()[-1])
    est = res["estimate"]
    predicted = est["total"] - est["weights"]
    assert predicted == pytest.approx(res["delta"], rel=0.25), res


def test_f16_weights_train_the_dequantized_model(tiny_model_file):
    """f16_weights runs the training forward through F16 copies of the quantized weights, so loss and
    gradients are those of the model whose weights are the dequantized values rounded to F16, written as
    a file of its own (untied, so the embedding lookup stays exact on both sides).

    Both sides run the same kernels on the same F16 values (the reference with f16_weights too: on a CPU
    without AVX-512 that option multiplies F16 matrices with ggml-lora's FMA kernel, x unrounded, where
    ggml rounds x to F16); what may differ is the dequantization's last
    float32 bit (ggml may fuse d*q + m, numpy does not), which can move an F16 weight by one ulp. The
    tolerances (1e-5 relative for the loss, 1e-4 of the largest gradient entry) allow for that; training
    through the stored Q4_1 blocks instead (activations rounded to 8 bits) misses them by far, which
    the test checks too, so that it cannot pass by training the stored weights.
    """
    quant = tiny_model_file("llama", "q4_1", tied=False)
    deq = tiny_model_file("llama", "q4_1", tied=False, dequantized=True)

    def run(path, f16):
        with BaseModel.load(path, n_threads=N_THREADS) as model:
            tokens = np.random.default_rng(1).integers(0, model.n_vocab, (2, 48))
            adapter = Adapter.init(model, LoRAConfig(rank=4, target_modules=ALL_TARGETS + ("lm_head",)))
            rng = np.random.default_rng(3)
            for name in adapter.targets:
                a, b = adapter.get(name)
                adapter.set(name, lora_a=rng.normal(0, 0.2, a.shape), lora_b=rng.normal(0, 0.1, b.shape))
            with adapter, TrainingContext(adapter, f16_weights=f16) as ctx:
                batch = loss_batch(model, tokens)
                return ctx.accumulate(batch, batch.n_loss), ctx.gradients()

    loss_f16, g_f16 = run(quant, True)
    loss_ref, g_ref = run(deq, True)
    loss_q, g_q = run(quant, False)
    assert loss_f16 == pytest.approx(loss_ref, rel=1e-5)
    worst_ref = worst_q = 0.0
    for name in g_ref:
        for x, y, z in zip(g_ref[name], g_f16[name], g_q[name]):
            scale = np.abs(x).max()
            assert scale > 0, name
            worst_ref = max(worst_ref, np.abs(x - y).max() / scale)
            worst_q = max(worst_q, np.abs(x - z).max() / scale)
    assert worst_ref <= 1e-4
    assert worst_q > 1e-3, "the stored Q4_1 path should differ; the test would not tell the two apart"


def test_f16_weights_evaluate_the_dequantized_model(tiny_model_file):
    """evaluate(f16_weights=True) is the loss of the dequantized model (same F16 values and kernels, the
    reference with f16_weights too, as above; the 1e-5 tolerance is the dequantization's last bit); by
    default evaluation stays on the
    stored blocks, whose loss differs by far more, so the test tells the two paths apart."""
    quant = tiny_model_file("llama", "q4_1", tied=False)
    deq = tiny_model_file("llama", "q4_1", tied=False, dequantized=True)
    tokens = np.random.default_rng(1).integers(0, 256, (2, 40))

    def run(path, f16):
        with BaseModel.load(path, n_threads=N_THREADS) as model:
            adapter = Adapter.init(model, LoRAConfig(rank=4, target_modules=ALL_TARGETS))
            rng = np.random.default_rng(3)
            for name in adapter.targets:
                a, b = adapter.get(name)
                adapter.set(name, lora_a=rng.normal(0, 0.2, a.shape), lora_b=rng.normal(0, 0.1, b.shape))
            with adapter:
                first = model.evaluate(tokens, adapter, f16_weights=f16)
                assert model.evaluate(tokens, adapter, f16_weights=f16) == first    # copies made once, reused
                return first

    (loss_f16, n_f16), (loss_ref, n_ref), (loss_q, _) = run(quant, True), run(deq, True), run(quant, False)
    assert n_f16 == n_ref == 2 * 39
    assert loss_f16 == pytest.approx(loss_ref, rel=1e-5)
    assert abs(loss_q - loss_ref) > 1e-4 * loss_ref, "the stored Q4_1 path should differ"
    with BaseModel.load(quant, n_threads=N_THREADS) as model:
        with pytest.raises(InvalidArgumentError, match="f16_weights"):
            model.evaluate(tokens, f16_weights=1)


def test_f16_weights_are_counted_and_validated(tiny_model_file):
    with BaseModel.load(tiny_model_file("llama", "q8_0"), n_threads=N_THREADS) as model:
        cfg = LoRAConfig(rank=4, target_modules=("q_proj",))
        plain = estimate_memory(model, cfg, 1, 32)
        f16 = estimate_memory(model, cfg, 1, 32, f16_weights=True)
        with Adapter.init(model, cfg) as adapter:
            with pytest.raises(InvalidArgumentError, match="f16_weights"):
                TrainingContext(adapter, f16_weights="yes")
    # every matrix (tied: the LM head is token_embd), 2 bytes per weight, each tensor's start aligned
    matrices = [t for t in GGUFReader(tiny_model_file("llama", "q8_0")).tensors if len(t.shape) == 2]
    n = sum(int(t.n_elements) for t in matrices)
    assert plain["f16_weights"] == 0
    assert 2 * n <= f16["f16_weights"] <= 2 * n + 256 * len(matrices)
    assert f16["total"] - plain["total"] == f16["f16_weights"]
