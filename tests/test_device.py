"""Training on a ggml device other than the CPU (Vulkan, CUDA, Metal): the same logits, gradients, losses,
adapter files and resumes as the CPU, every step's work placed on the device, clear refusals.

Runs on every non-CPU device of the build (``-m device``); a CPU-only build skips it. CI runs it on Mesa's
lavapipe, a Vulkan device on the CPU (``GGML_VK_VISIBLE_DEVICES=0``; see scripts/test_vulkan.sh).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import N_THREADS
from reference import assert_parity, llama_logits

from tinymodels import quantize_with_llama_cpp, write_tiny_model

from ggml_lora import (Adapter, BaseModel, InvalidArgumentError, LoRAConfig, LoRATrainer, OutOfMemoryError,
                       TrainingConfig, devices, merge_adapters)
from ggml_lora.forward import evaluate, loss_batch
from ggml_lora.step import TrainingContext

DEVICES = [d.name for d in devices() if d.type != "cpu"]
pytestmark = [
    pytest.mark.device,
    pytest.mark.skipif(not DEVICES, reason="this build has no device besides the CPU (build with -DGGML_VULKAN=ON "
                                           "or -DGGML_CUDA=ON; lavapipe also needs GGML_VK_VISIBLE_DEVICES=0)"),
]
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# Ops whose place tells whether a step trained on the device: the products, attention, loss and optimizer.
STEP_OPS = ("MUL_MAT", "OUT_PROD", "SOFT_MAX", "SOFT_MAX_BACK", "CROSS_ENTROPY_LOSS", "CROSS_ENTROPY_LOSS_BACK",
            "OPT_STEP_ADAMW", "OPT_STEP_SGD", "ROPE", "ROPE_BACK", "RMS_NORM", "RMS_NORM_BACK", "GET_ROWS")


@pytest.fixture(scope="module", params=DEVICES)
def device(request) -> str:
    return request.param


def on(path, device: str) -> BaseModel:
    return BaseModel.load(path, device=device, n_threads=N_THREADS)


def randomize(adapter: Adapter, seed: int) -> None:
    rng = np.random.default_rng(seed)
    for name in adapter.targets:
        a, b = adapter.get(name)
        adapter.set(name, lora_a=rng.normal(0, 0.2, a.shape), lora_b=rng.normal(0, 0.1, b.shape))


def copy_adapter(src: Adapter, model: BaseModel, lora: LoRAConfig) -> Adapter:
    dst = Adapter.init(model, lora)
    for name in src.targets:
        a, b = src.get(name)
        dst.set(name, lora_a=a, lora_b=b)
    return dst


def test_device_is_listed_and_a_wrong_name_lists_what_exists(device, tiny_model_file):
    assert next(d for d in devices() if d.name == device).memory_total > 0
    with pytest.raises(InvalidArgumentError, match=f"unknown device 'NoSuchGPU7'.*{device}"):
        BaseModel.load(tiny_model_file("llama", "f32"), device="NoSuchGPU7")
    with on(tiny_model_file("llama", "f32"), device) as model:
        assert model.device == device


def kquant_model(tmp_path, ftype: str):
    """A tiny llama in a K-quant mix (rows of 256 values, QK_K), quantized by llama.cpp."""
    src = write_tiny_model(tmp_path / "f32.gguf", "llama", "f32", n_embd=256, n_ff=256, n_head=4, n_head_kv=2)
    return quantize_with_llama_cpp(src, tmp_path / f"{ftype}.gguf", ftype)


# The reference is the stored model's own function: the CPU's float32 logits of the model with the adapter
# merged as float32 (merge_adapters(type="f32") dequantizes every matrix exactly and adds the LoRA delta).
# The device may round the operands of its products to F16 (Vulkan where the device has fp16); the CPU's
# quantized products round the activations to 8-bit blocks instead, which moves its logits further
# (measured on lavapipe, logits spanning +-12 to +-15: the device 0.03 (F32) to 0.08 (Q8_0) from the
# reference on the 64-wide models and 0.17-0.20 on the 256-wide K-quant ones, where the CPU's own paths
# are 0.3-0.7 off). So: the device within 2.5% of the logits' span of the reference, and for quantized
# bases at least twice as close to it as the CPU.
@pytest.mark.parametrize("weight_type", ["f32", "f16", "q8_0", "q4_0", "Q4_K_M", "Q6_K"])
def test_logits_are_the_stored_models_function(device, tiny_model_file, weight_type, tmp_path):
    path = kquant_model(tmp_path, weight_type) if weight_type.isupper() else tiny_model_file("llama", weight_type)
    lora = LoRAConfig(rank=4, target_modules=TARGETS, seed=2)
    tokens = np.random.default_rng(1).integers(0, 1000, 40)
    with BaseModel.load(path, device="CPU", n_threads=N_THREADS) as cpu, on(path, device) as dev:
        with Adapter.init(cpu, lora) as ad_cpu:
            randomize(ad_cpu, 3)
            with copy_adapter(ad_cpu, dev, lora) as ad_dev:
                got = dev.logits(tokens, ad_dev)
                placed = dev.placement()
            cpu_logits = cpu.logits(tokens, ad_cpu)
            file = ad_cpu.save(tmp_path / "a.gguf")
    merged = merge_adapters(path, [file], tmp_path / "merged-f32.gguf", type="f32")
    with BaseModel.load(merged, device="CPU", n_threads=N_THREADS) as exact_model:
        exact = exact_model.logits(tokens)
    span = np.abs(exact).max()
    dev_err, cpu_err = np.abs(got - exact).max(), np.abs(cpu_logits - exact).max()
    print(f"{weight_type}: device {dev_err:.4f}, CPU {cpu_err:.4f} from the float32 reference (span {span:.1f})")
    assert dev_err <= 2.5e-2 * span
    if weight_type not in ("f32", "f16"):
        assert dev_err <= 0.5 * cpu_err
    assert placed.cpu_nodes == 0, placed.line()


def test_gradients_match_the_cpu_and_finite_differences(device, tiny_model_file):
    """The device's gradient equals the CPU's, and its slope along the gradient equals a central difference of
    the device's own loss (h = 2e-2, as the CPU tests). Tolerance 1e-2 of each tensor's largest entry: a GPU
    backend may round the operands of F32 products to F16 (Vulkan does where the device has fp16; measured
    on lavapipe 3.7e-3, and 1.3e-5 with GGML_VK_DISABLE_F16=1, the F32 sum-order difference alone)."""
    path = tiny_model_file("llama", "f32")
    lora = LoRAConfig(rank=4, target_modules=TARGETS, seed=4)
    tokens = np.random.default_rng(5).integers(0, 1000, (2, 24))
    mask = np.random.default_rng(6).random(tokens.shape) < 0.6
    grads = {}
    for where in ("CPU", device):
        with BaseModel.load(path, device=where, n_threads=N_THREADS) as model, Adapter.init(model, lora) as ad:
            randomize(ad, 7)
            with TrainingContext(ad, optimizer="sgd") as ctx:
                batch = loss_batch(model, tokens, mask)
                ctx.accumulate(batch, batch.n_loss)
                grads[where] = ctx.gradients()
            if where == device:
                name = "blk.1.attn_v.weight"
                a0, b0 = ad.get(name)
                g = grads[where][name][1].astype(np.float64)
                d = g / np.linalg.norm(g)

                def loss_at(t: float) -> float:
                    ad.set(name, lora_b=(b0 + t * d).astype(np.float32))
                    return evaluate(model, ad, tokens, mask)[0]

                h = 2e-2
                fd = (loss_at(h) - loss_at(-h)) / (2 * h)
                an = float((g * d).sum())
                assert abs(fd - an) <= 1e-2 * max(abs(fd), abs(an)), (fd, an)
    for name, (ga, gb) in grads["CPU"].items():
        da, db = grads[device][name]
        for want, got in ((ga, da), (gb, db)):
            assert np.abs(got - want).max() <= 1e-2 * max(np.abs(want).max(), 1e-6), name


def texts(n: int, seed: int = 0) -> list[str]:
    words = ["river", "town", "stone", "bridge", "market", "north", "old", "new", "the", "of", "and", "lies"]
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(words, size=20)) + "." for _ in range(n)]


def train(model, tmp_path, name, **kw):
    cfg = dict(max_steps=4, batch_size=2, learning_rate=1e-2, max_seq_length=32, eval_every=0, save_every=2,
               packing=False, progress=False, output_dir=str(tmp_path / name), seed=3)
    cfg.update(kw)
    lora = LoRAConfig(rank=4, target_modules=("q_proj", "v_proj", "down_proj"), seed=1)
    return LoRATrainer(model, lora, TrainingConfig(**cfg)).train(texts(8), valid=texts(2, seed=9))


# Per-step losses of the same run on the CPU and the device. The CPU rounds activations to 8-bit blocks in
# its Q8_0 products, the device to F16 (Vulkan where the device has fp16): the first step's losses differ
# by ~5e-4 relative, and AdamW carries that on (measured on lavapipe: at most 1.2e-3 over 4 steps).
@pytest.mark.parametrize("gc", [False, True], ids=["one-graph", "checkpointed"])
def test_training_matches_the_cpu_and_stays_on_the_device(device, tiny_model_file, tmp_path, gc):
    path = tiny_model_file("llama", "q8_0")
    with BaseModel.load(path, device="CPU", n_threads=N_THREADS) as cpu:
        want = train(cpu, tmp_path, "cpu", gradient_checkpointing=gc, f16_weights=False, amx_bf16=False)
    with on(path, device) as model:
        got = train(model, tmp_path, "dev", gradient_checkpointing=gc)
    np.testing.assert_allclose(got.losses, want.losses, rtol=5e-3)
    assert got.losses[-1] < got.losses[0]
    placed = got.placement
    assert placed is not None and placed.device == device
    on_cpu = {op.split(" x")[0] for op in placed.cpu_ops}
    assert not on_cpu & set(STEP_OPS), placed.line()
    assert placed.device_share >= 0.99, placed.line()
    rec = json.loads((tmp_path / "dev" / "metrics.jsonl").read_text().splitlines()[0])
    assert rec["device_share"] >= 0.99


def method_run(model, tmp_path, name: str, method: str):
    """A short run of one method; the trainer and data as the CPU tests use them."""
    from ggml_lora import PreferenceConfig, PreferenceTrainer

    rng = np.random.default_rng(0)
    words = ["north", "river", "stone", "the", "of", "town", "bell", "mill", "green", "road", "lies", "near"]

    def phrase(n: int) -> str:
        return " ".join(rng.choice(words, n))

    cfg = TrainingConfig(max_steps=4, batch_size=4, learning_rate=1e-2, lr_scheduler="constant", max_seq_length=64,
                         eval_every=0, save_every=0, progress=False, output_dir=str(tmp_path / name), seed=0)
    lora = LoRAConfig(rank=4, target_modules=("q_proj", "v_proj", "down_proj"), seed=5)
    if method in ("dpo", "orpo", "kto"):
        pairs = [{"prompt": f"{phrase(4)}:", "chosen": f" ahoy {phrase(3)}", "rejected": f" {phrase(3)}"}
                 for _ in range(16)]
        data = pairs if method != "kto" else [{"prompt": p["prompt"], "completion": p["chosen"] if i % 3 else
                                               p["rejected"], "label": bool(i % 3)} for i, p in enumerate(pairs)]
        with PreferenceTrainer(model, lora, cfg, PreferenceConfig(method=method, beta=0.5)) as trainer:
            return trainer.train(data)
    if method == "grpo":
        return grpo_run(model, lora, cfg, [{"prompt": f"{phrase(4)}:"} for _ in range(8)])
    if method == "adalora":
        lora = LoRAConfig(peft_type="adalora", init_r=6, target_r=3, alpha=8.0, target_modules=lora.target_modules,
                          tinit=1, tfinal=1, deltaT=1, seed=4)
    # prompt/completion rows, packed end to end in one sequence per micro-batch (segments, per-row attention)
    data = [{"prompt": f"{phrase(5)}:", "completion": f" {phrase(6)}."} for _ in range(16)]
    with LoRATrainer(model, lora, cfg) as trainer:
        return trainer.train(data)


def grpo_run(model, lora, cfg, prompts):
    """GRPO with llama.cpp's sampling replaced by fixed completions (a generator keyed by the step and the
    prompt's place), so that both runs score and train on the same rollouts; beta > 0 and two iterations
    per batch make the loss depend on the device's forward (reference and old-policy log-probabilities)."""
    from ggml_lora import GRPOConfig, GRPOTrainer

    def even(prompts, completions, completion_ids, **kw):
        return [float(sum(t % 2 == 0 for t in c)) for c in completion_ids]

    g = GRPOConfig(num_generations=4, max_completion_length=6, beta=0.04, num_iterations=2)
    with GRPOTrainer(model, even, lora, cfg, g) as trainer:
        def sample(rows, seed_key, adapter_scale=1.0, first_index=0):
            ids = [np.random.default_rng([*seed_key, first_index + i, j]).integers(3, 900, 6).tolist()
                   for i in range(len(rows)) for j in range(g.num_generations)]
            return ids, [[0.0] * len(c) for c in ids], [True] * len(ids), [[0.0] * len(c) for c in ids]
        trainer.method.sample = sample
        return trainer.train(prompts)


# Each method's per-step losses on the device against the same run on the CPU (F32 base: only the
# device's F16 rounding of product operands differs; 1e-2 relative, as the gradients above).
@pytest.mark.parametrize("method", ["prompt-completion", "adalora", "dpo", "orpo", "kto", "grpo"])
def test_each_method_trains_on_the_device_as_on_the_cpu(device, tiny_model_file, tmp_path, method):
    path = tiny_model_file("llama", "f32")
    with BaseModel.load(path, device="CPU", n_threads=N_THREADS) as cpu:
        want = method_run(cpu, tmp_path, "cpu", method)
    with on(path, device) as model:
        got = method_run(model, tmp_path, "dev", method)
    np.testing.assert_allclose(got.losses, want.losses, rtol=1e-2)
    assert got.placement.device_share >= 0.99, got.placement.line()


def test_adapter_trained_on_the_device_loads_in_llama_cpp(device, tiny_model_file, tmp_path):
    """The adapter file written from device memory is the adapter: llama.cpp applies it exactly as our CPU
    forward does (the parity tests' tolerance), and the device scores held-out text with it as the CPU does
    (5e-3 relative: the CPU's 8-bit activations against the device's F16, as in the training test)."""
    path = tiny_model_file("llama", "q8_0")
    tokens = np.random.default_rng(11).integers(0, 1000, 32)
    with on(path, device) as model:
        hist = train(model, tmp_path, "dev")
        with Adapter.load(model, hist.adapter_path) as ad:
            dev_loss = evaluate(model, ad, tokens[None, :])[0]
    with BaseModel.load(path, device="CPU", n_threads=N_THREADS) as cpu, Adapter.load(cpu, hist.adapter_path) as ad:
        ours = cpu.logits(tokens, ad)
        cpu_loss = evaluate(cpu, ad, tokens[None, :])[0]
    assert_parity(ours, llama_logits(path, tokens, lora=[(hist.adapter_path, 1.0)], n_threads=N_THREADS), device)
    assert abs(dev_loss - cpu_loss) <= 5e-3 * cpu_loss, (dev_loss, cpu_loss)


def test_resume_on_the_device_is_exact(device, tiny_model_file, tmp_path):
    import os
    import signal

    path = tiny_model_file("llama", "f32")
    with on(path, device) as model:
        straight = train(model, tmp_path, "straight")

        class InterruptAt:
            def on_step(self, trainer, rec):
                if rec["step"] == 2:
                    os.kill(os.getpid(), signal.SIGINT)

        cfg = dict(output_dir=str(tmp_path / "resumed"))
        lora = LoRAConfig(rank=4, target_modules=("q_proj", "v_proj", "down_proj"), seed=1)
        base = dict(max_steps=4, batch_size=2, learning_rate=1e-2, max_seq_length=32, eval_every=0, save_every=2,
                    packing=False, progress=False, seed=3, **cfg)
        first = LoRATrainer(model, lora, TrainingConfig(**base)).train(texts(8), valid=texts(2, seed=9),
                                                                       callbacks=[InterruptAt()])
        assert first.interrupted == "SIGINT" and first.global_step == 2
        second = LoRATrainer(model, lora, TrainingConfig(**base)).train(texts(8), valid=texts(2, seed=9),
                                                                        resume_from=True)
    assert first.losses + second.losses == straight.losses
    assert second.adapter_path.read_bytes() == straight.adapter_path.read_bytes()


def refused(model, tmp_path, batch_size: int, error, match: str) -> None:
    words = ["river", "town", "stone", "bridge", "market", "north", "old", "new", "the", "of", "and", "lies"]
    rng = np.random.default_rng(0)
    long_texts = [" ".join(rng.choice(words, size=200)) + "." for _ in range(400)]
    out = tmp_path / "refused"
    cfg = TrainingConfig(max_steps=1, batch_size=batch_size, max_seq_length=2048, packing=True, progress=False,
                         output_dir=str(out), eval_every=0)
    with pytest.raises(error, match=match):
        LoRATrainer(model, LoRAConfig(rank=4, target_modules=("q_proj",)), cfg).train(long_texts)
    assert not (out / "adapter.gguf").exists() and not (out / "checkpoints").exists()


def test_a_step_larger_than_the_device_is_refused_before_anything_is_written(device, tiny_model_file, tmp_path):
    """The memory plan compares the step's estimate with the device's free memory before the first graph
    runs: 30 packed rows of 2048 tokens need ~2 GiB even with gradient checkpointing (Mesa 22's lavapipe
    has 2 GiB)."""
    free = next(d for d in devices() if d.name == device).memory_free
    if free > 4 * 2**30:
        pytest.skip(f"{device} has {free / 2**30:.0f} GiB free: this tiny model's step cannot exceed it")
    with BaseModel.load(tiny_model_file("llama", "f32"), device=device, n_threads=N_THREADS, n_ctx=4096) as model:
        refused(model, tmp_path, 30, OutOfMemoryError, f"available on {device}")


def test_the_memory_budget_of_a_device_run_is_the_devices(device):
    """What the trainer's memory plan is held against on a GPU: the device's free memory as its backend
    reports it, not the host's (Mesa 25's lavapipe reports the host's RAM as its heap, so the refusal test
    above only runs where the device is small)."""
    from ggml_lora import planning as policy

    assert not policy.is_cpu(device)
    assert policy.available_memory(device) == next(d for d in devices() if d.name == device).memory_free
    assert policy.fallback_warning(device, 0.9, ("SOFT_MAX_BACK x2",)).startswith("10.0% of the step's work ran on the CPU")
    assert policy.fallback_warning(device, 1.0, ()) is None


def test_more_rows_than_a_vulkan_dispatch_takes_are_refused(device, tiny_model_file, tmp_path):
    """ggml-vulkan aborts the process on a row-wise op of more rows than maxComputeWorkGroupCount (Vulkan
    guarantees 65535); such a batch is refused with the device's limit and what to lower instead."""
    if not device.startswith("Vulkan"):
        pytest.skip("the 65535-row limit is Vulkan's")
    with BaseModel.load(tiny_model_file("llama", "f32"), device=device, n_threads=N_THREADS, n_ctx=4096) as model:
        refused(model, tmp_path, 40, InvalidArgumentError, f"more than {device} takes in one graph")


def next_token_loss(logits: np.ndarray, tokens: np.ndarray) -> float:
    """Mean next-token cross-entropy of one sequence from its logits [T, n_vocab], in float64."""
    z = logits[:-1].astype(np.float64)
    z -= z.max(axis=1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return float(-logp[np.arange(len(tokens) - 1), tokens[1:]].mean())


@pytest.mark.slow
def test_smollm2_trains_on_the_device_as_on_the_cpu(device, smollm2_file, tmp_path):
    """The real SmolLM2-135M (Q4_1): 6 steps on the made-up facts, on the CPU (stored blocks, llama.cpp's
    arithmetic) and on the device. The per-step losses agree within 2% (the CPU's 8-bit activations
    against the device's F16 operands, through 30 layers; measured on lavapipe: see the closing print),
    every step's work ran on the device, and the adapter written from device memory scores held-out text
    in llama-cpp-python as our forward scores it."""
    small = dict(max_steps=6, batch_size=2, learning_rate=1e-3, max_seq_length=96, eval_every=0, save_every=0,
                 progress=False, seed=0)
    lora = LoRAConfig(rank=8, target_modules=("q_proj", "v_proj"), seed=1)
    data = "examples/data/facts/train.jsonl"
    runs = {}
    for where in ("CPU", device):
        extra = dict(f16_weights=False, amx_bf16=False) if where == "CPU" else {}
        with BaseModel.load(smollm2_file, device=where, n_threads=N_THREADS) as model:
            runs[where] = LoRATrainer(model, lora, TrainingConfig(output_dir=str(tmp_path / where), **small,
                                                                   **extra)).train(data)
    cpu, dev = runs["CPU"], runs[device]
    print(f"SmolLM2 per-step losses: CPU {np.round(cpu.losses, 4)}, {device} {np.round(dev.losses, 4)}; "
          f"{dev.placement.line()}")
    np.testing.assert_allclose(dev.losses, cpu.losses, rtol=2e-2)
    assert dev.placement.device_share >= 0.99, dev.placement.line()
    with BaseModel.load(smollm2_file, device="CPU", n_threads=N_THREADS) as model:
        tokens = np.array(model.tokenize("The capital of Vastrell is Quennick, and Zephyra has five moons.",
                                         add_special=True))
        with Adapter.load(model, dev.adapter_path) as ad:
            ours = model.logits(tokens, ad)
    ref = llama_logits(smollm2_file, tokens, lora=[(dev.adapter_path, 1.0)], n_threads=N_THREADS)
    assert_parity(ours, ref, "SmolLM2 with the device-trained adapter")
    assert abs(next_token_loss(ours, tokens) - next_token_loss(ref, tokens)) <= 1e-3
