"""The LoRA backward pass agrees with finite differences (also through quantized weights), AdamW and
clipping match NumPy, accumulation equals one big batch, only A and B change, and bad input is refused."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import N_THREADS

from ggml_lora import Adapter, BaseModel, InvalidArgumentError, LoRAConfig
from ggml_lora.forward import evaluate, loss_batch, loss_sum, row_losses
from ggml_lora.step import TrainingContext

ALL_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def randomize(adapter: Adapter, seed: int, b_scale: float = 0.1) -> None:
    """Non-zero A and B, so both halves of every pair get a gradient."""
    rng = np.random.default_rng(seed)
    for name in adapter.targets:
        a, b = adapter.get(name)
        adapter.set(name, lora_a=rng.normal(0, 0.2, a.shape), lora_b=rng.normal(0, b_scale, b.shape))


def sample_tokens(model: BaseModel, shape, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, model.n_vocab, shape)


def directional_check(model, adapter, tokens, mask, quantized: bool, seed: int,
                      fit: np.ndarray | None = None) -> dict[str, float]:
    """Relative error of <grad, d> against differences of our own forward's mean loss, per tensor.

    F32 bases: d is a random unit vector plus the unit gradient, normalised. A purely random direction
    in a tensor of n elements sees only |g|/sqrt(n) of the gradient (1/180 of it for an lm_head B of
    32000 x 4), which float32 rounding of the loss (~1e-6) swamps; the gradient component keeps the
    signal while the random part still probes every other direction. Central difference, h = 2e-2:
    rounding noise ~5e-5, O(h^2) truncation ~1e-4 (measured on these models).

    Quantized bases: the forward rounds activations to 8 bits per block (Q8_0/Q8_1) before each
    quantized product, so the loss is a fine staircase. We take d along the gradient and fit a cubic
    through 17 points in [-0.4, 0.4] to average over the steps. ``fit``: the points of a cubic fit to use
    instead (of a central difference on F32 bases), the direction unchanged.
    """
    ctx = TrainingContext(adapter, optimizer="sgd")
    batch = loss_batch(model, tokens, mask)
    ctx.accumulate(batch, batch.n_loss)           # gradient of the mean loss
    grads = ctx.gradients()
    ctx.close()
    rng = np.random.default_rng(seed)
    errors = {}
    for name in adapter.targets:
        a0, b0 = adapter.get(name)
        for which, (p0, g) in enumerate(zip((a0, b0), grads[name])):
            half = ("lora_a", "lora_b")[which]
            g = g.astype(np.float64)
            d = g / np.linalg.norm(g)
            if not quantized:
                r = rng.normal(size=p0.shape)
                d = d + r / np.linalg.norm(r)
                d = d / np.linalg.norm(d)

            def loss_at(t: float) -> float:
                adapter.set(name, **{half: (p0.astype(np.float64) + t * d).astype(np.float32)})
                return evaluate(model, adapter, tokens, mask)[0]

            ts = np.linspace(-0.4, 0.4, 17) if quantized and fit is None else fit
            if ts is not None:
                fd = float(np.polyfit(ts, [loss_at(t) for t in ts], 3)[2])
            else:
                h = 2e-2
                fd = (loss_at(h) - loss_at(-h)) / (2 * h)
            adapter.set(name, lora_a=a0, lora_b=b0)
            an = float((g * d).sum())
            errors[f"{name}.{half}"] = abs(fd - an) / max(abs(fd), abs(an))
    return errors


# gpt-2's vocabulary (50257 tokens) is not a whole number of the cross-entropy kernels' 16-float vectors
GRAD_CASES = [("llama", {}), ("llama", {"tied": False}), ("qwen2", {}), ("qwen3", {"head_dim": 32}),
              ("llama", {"vocab": "gpt-2"})]


@pytest.mark.parametrize("arch,kw", GRAD_CASES)
def test_gradient_matches_finite_differences(tiny_model_file, arch, kw):
    with BaseModel.load(tiny_model_file(arch, "f32", **kw), n_threads=N_THREADS) as model:
        targets = model.target_modules
        with Adapter.init(model, LoRAConfig(rank=4, target_modules=targets, layers=(1,) if arch != "llama" else None)) as ad:
            randomize(ad, seed=1)
            tokens = sample_tokens(model, (2, 24), seed=2)
            mask = np.random.default_rng(3).random(tokens.shape) < 0.6
            errors = directional_check(model, ad, tokens, mask, quantized=False, seed=4)
            worst = max(errors, key=errors.get)
            print(f"{arch}{kw}: worst relative error {errors[worst]:.2e} at {worst} over {len(errors)} tensors")
            assert {n.split(".")[2] for n in errors} >= {"attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate",
                                                          "ffn_up", "ffn_down"} - set()
            if "lm_head" in targets:
                assert "output.weight.lora_a" in errors
            assert errors[worst] <= 1e-2, errors


@pytest.mark.parametrize("weight_type", ["q8_0", "q4_1"])
def test_gradient_through_quantized_base(tiny_model_file, weight_type):
    # Tolerance 0.1, not 1e-2: the backward differentiates the unrounded product while the forward
    # rounds activations to 8 bits; measured, the gradient through Q8_0 and through its dequantized F32
    # copy differ by 1.7-2.2% in norm, and slopes fitted to the staircase scatter by up to ~5.4%.
    with BaseModel.load(tiny_model_file("llama", weight_type), n_threads=N_THREADS) as model:
        with Adapter.init(model, LoRAConfig(rank=4, target_modules=ALL_TARGETS, layers=(0,))) as ad:
            randomize(ad, seed=5)
            tokens = sample_tokens(model, (2, 24), seed=6)
            errors = directional_check(model, ad, tokens, None, quantized=True, seed=7)
            worst = max(errors, key=errors.get)
            print(f"{weight_type}: worst relative error {errors[worst]:.2e} at {worst} over {len(errors)} tensors")
            assert errors[worst] <= 0.1, errors


def test_zero_b_loss_is_base_loss_and_only_lora_changes(tiny_model_file):
    with BaseModel.load(tiny_model_file("qwen2", "q8_0"), n_threads=N_THREADS) as model:
        cfg = LoRAConfig(rank=4, target_modules=ALL_TARGETS)
        tokens = sample_tokens(model, (2, 32), seed=8)
        base_loss = evaluate(model, None, tokens)
        before = {name: model.read_tensor(name) for name in model.tensors}
        with Adapter.init(model, cfg) as ad:
            assert evaluate(model, ad, tokens) == base_loss
            n_expected = sum(cfg.rank * sum(model.weight_shape(t)) for t in ad.targets)
            assert ad.n_parameters == n_expected == sum(a.size + b.size for a, b in ad.tensors().values())
            old = ad.tensors()
            with TrainingContext(ad) as ctx:
                res = ctx.step([loss_batch(model, tokens)], learning_rate=1e-2, step=1)
            assert abs(res.loss - base_loss[0]) < 1e-5 and res.n_tokens == base_loss[1]
            new = ad.tensors()
            assert all(not np.array_equal(old[t][0], new[t][0]) or not np.array_equal(old[t][1], new[t][1])
                       for t in ad.targets)
            assert all(np.abs(new[t][1]).max() > 0 for t in ad.targets)   # B moved off zero
        after = {name: model.read_tensor(name) for name in model.tensors}
        assert before == after


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_accumulation_equals_big_batch(tiny_model_file, optimizer):
    with BaseModel.load(tiny_model_file("llama", "f32"), n_threads=N_THREADS) as model:
        tokens = sample_tokens(model, (4, 20), seed=9)
        rng = np.random.default_rng(10)
        mask = rng.random(tokens.shape) < np.array([0.2, 0.5, 0.8, 1.0])[:, None]   # unequal token counts
        results = []
        for split in (False, True):
            with Adapter.init(model, LoRAConfig(rank=4, target_modules=ALL_TARGETS, seed=3)) as ad:
                randomize(ad, seed=11)
                with TrainingContext(ad, optimizer=optimizer) as ctx:
                    batches = ([loss_batch(model, tokens[i:i + 1], mask[i:i + 1]) for i in range(4)] if split
                               else [loss_batch(model, tokens, mask)])
                    res = ctx.step(batches, learning_rate=1e-2, step=1)
                results.append((res, ad.tensors()))
        (r1, t1), (r4, t4) = results
        assert r1.n_tokens == r4.n_tokens
        assert abs(r1.loss - r4.loss) <= 1e-5 * abs(r1.loss)
        worst = 0.0
        for name in t1:
            for x, y in zip(t1[name], t4[name]):
                worst = max(worst, float(np.abs(x - y).max() / np.abs(x).max()))
        print(f"{optimizer}: max relative difference of updated A/B {worst:.2e}")
        assert worst <= 1e-5


def adamw_reference(p, g, m, v, lr, b1, b2, eps, wd, t):
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    mh = m / (1 - b1 ** t)
    vh = v / (1 - b2 ** t)
    return p * (1 - lr * wd) - lr * mh / (np.sqrt(vh) + eps), m, v


def test_adamw_matches_numpy_and_clipping(tiny_model_file):
    with BaseModel.load(tiny_model_file("llama", "f32"), n_threads=N_THREADS) as model:
        with Adapter.init(model, LoRAConfig(rank=2, target_modules=("q_proj",), layers=(0,))) as ad:
            randomize(ad, seed=12)
            name = ad.targets[0]
            tokens = sample_tokens(model, (1, 16), seed=13)
            hyper = dict(lr=3e-3, b1=0.9, b2=0.99, eps=1e-8, wd=0.1)
            with TrainingContext(ad) as ctx:
                p = [x.astype(np.float64) for x in ad.get(name)]
                m = [np.zeros_like(x) for x in p]
                v = [np.zeros_like(x) for x in p]
                for t in (1, 2, 3):
                    b = loss_batch(model, tokens)
                    ctx.accumulate(b, b.n_loss)
                    g = [x.astype(np.float64) for x in ctx.gradients()[name]]
                    norm = np.sqrt(sum((x ** 2).sum() for x in g))
                    assert abs(ctx.grad_norm() - norm) <= 1e-6 * norm
                    clip = 0.5 if t == 3 else 1.0          # clipping: the gradient scaled by max_norm/norm
                    ctx.apply(hyper["lr"], t, betas=(hyper["b1"], hyper["b2"]), eps=hyper["eps"],
                              weight_decay=hyper["wd"], grad_scale=clip)
                    for i in range(2):
                        p[i], m[i], v[i] = adamw_reference(p[i], clip * g[i], m[i], v[i], hyper["lr"], hyper["b1"],
                                                           hyper["b2"], hyper["eps"], hyper["wd"], t)
                    got = ad.get(name)
                    for i in range(2):
                        np.testing.assert_allclose(got[i], p[i], rtol=0, atol=1e-6)
                    assert not ctx.grad_norm()   # zeroed after the update
                # step() clips by global norm: with max_grad_norm tiny, clip_scale = max_norm / norm
                res = ctx.step([loss_batch(model, tokens)], learning_rate=1e-3, step=4, max_grad_norm=1e-3)
                assert res.grad_norm > 1e-3 and abs(res.clip_scale - 1e-3 / (res.grad_norm + 1e-6)) < 1e-12


def test_same_seed_same_losses(tiny_model_file):
    with BaseModel.load(tiny_model_file("qwen3", "q8_0", head_dim=32), n_threads=N_THREADS) as model:
        tokens = sample_tokens(model, (2, 24), seed=14)
        runs = []
        for _ in range(2):
            with Adapter.init(model, LoRAConfig(rank=4, dropout=0.1, seed=7)) as ad, TrainingContext(ad) as ctx:
                runs.append([ctx.step([loss_batch(model, tokens)], 5e-3, t, dropout_seed=t).loss for t in range(1, 6)])
        assert runs[0] == runs[1]
        assert runs[0][-1] < runs[0][0]


def test_dropout_is_training_only(tiny_model_file):
    with BaseModel.load(tiny_model_file("llama", "f32"), n_threads=N_THREADS) as model:
        tokens = sample_tokens(model, (1, 16), seed=15)
        with Adapter.init(model, LoRAConfig(rank=4, dropout=0.5)) as ad:
            randomize(ad, seed=16)
            b = loss_batch(model, tokens)
            with TrainingContext(ad, optimizer="sgd") as ctx:
                seeds = [ctx.accumulate(b, b.n_loss, dropout_seed=s) for s in (1, 1, 2)]
            assert seeds[0] == seeds[1] != seeds[2]                       # masks follow the seed
            with TrainingContext(ad, optimizer="sgd", dropout=0.0) as ctx:
                assert abs(ctx.accumulate(b, b.n_loss) / b.n_loss - evaluate(model, ad, tokens)[0]) < 1e-5


@pytest.mark.parametrize("kwargs,field", [
    ({"rank": 0}, "rank"), ({"rank": -2}, "rank"), ({"alpha": 0}, "alpha"), ({"alpha": -1.0}, "alpha"),
    ({"dropout": 1.0}, "dropout"), ({"dropout": -0.1}, "dropout"), ({"init": "xavier"}, "init"),
])
def test_bad_lora_config(kwargs, field):
    with pytest.raises(InvalidArgumentError, match=f"LoRAConfig.{field}="):
        LoRAConfig(**kwargs)


def test_bad_training_input(tiny_model_file):
    with BaseModel.load(tiny_model_file("llama", "f32"), n_threads=N_THREADS) as model:
        with pytest.raises(InvalidArgumentError, match="rank 65 .*min\\(n_in=64"):
            Adapter.init(model, LoRAConfig(rank=65))
        with pytest.raises(InvalidArgumentError, match="layers.*\\[7\\]"):
            Adapter.init(model, LoRAConfig(layers=(0, 7)))
        with Adapter.init(model, LoRAConfig(rank=2)) as ad, TrainingContext(ad) as ctx:
            tokens = sample_tokens(model, (1, 8), seed=17)
            with pytest.raises(InvalidArgumentError, match="loss positions are empty"):
                loss_batch(model, tokens, np.zeros((1, 8), bool))
            b = loss_batch(model, tokens)
            ctx.accumulate(b, b.n_loss)
            for lr in (0.0, -1e-3, float("nan")):
                with pytest.raises(InvalidArgumentError, match="learning_rate"):
                    ctx.apply(lr, 1)
            with pytest.raises(InvalidArgumentError, match="optimizer='adam'"):
                TrainingContext(ad, optimizer="adam")


def test_pissa_starts_at_base_and_exports_a_plain_lora(tiny_model_file, tmp_path):
    from reference import assert_parity, llama_logits

    path = tiny_model_file("llama", "f16")
    with BaseModel.load(path, n_threads=N_THREADS) as model:
        tokens = sample_tokens(model, (1, 32), seed=18)
        cfg = LoRAConfig(rank=4, init="pissa", target_modules=("q_proj", "v_proj", "down_proj"))
        with Adapter.init(model, cfg) as ad:
            assert set(ad.ranks.values()) == {8} and ad.alpha == cfg.scale * 8
            name = "blk.0.attn_q.weight"
            from ggml_lora.adapter import read_weight_f32
            a, b = ad.get(name)
            # the trainable half holds the top-4 singular directions of W: scale·B0·A0 = U_4 S_4 V_4ᵀ
            w = read_weight_f32(model, name).astype(np.float64)
            u, s, vt = np.linalg.svd(w, full_matrices=False)
            np.testing.assert_allclose(cfg.scale * b[:, :4] @ a[:4], (u[:, :4] * s[:4]) @ vt[:4], atol=1e-4)
            # starts as the base model: B0·A0 - B0·A0 cancels up to float32 rounding
            np.testing.assert_allclose(model.logits(tokens, ad), model.logits(tokens), atol=1e-3)
            frozen_before = [x.copy() for x in (a[4:], b[:, 4:])]
            with TrainingContext(ad) as ctx:
                for t in (1, 2):
                    ctx.step([loss_batch(model, tokens)], 1e-2, t, weight_decay=0.1)
            a2, b2 = ad.get(name)
            np.testing.assert_array_equal(a2[4:], frozen_before[0])
            np.testing.assert_array_equal(b2[:, 4:], frozen_before[1])
            assert not np.array_equal(a2[:4], a[:4])
            saved = ad.save(tmp_path / "pissa.gguf")
            assert_parity(model.logits(tokens[0], ad), llama_logits(path, tokens[0], lora=saved, n_threads=N_THREADS),
                          "pissa adapter in llama.cpp")
    with BaseModel.load(tiny_model_file("llama", "q8_0"), n_threads=N_THREADS) as qmodel:
        with pytest.raises(InvalidArgumentError, match="pissa.*Q8_0"):
            Adapter.init(qmodel, LoRAConfig(rank=4, init="pissa"))


def test_long_rows_attend_in_chunks_without_changing_the_result(tiny_model_file):
    """Rows longer than 256 tokens attend in query chunks in the loss and training graphs (each chunk
    against the keys up to its last query). The loss must equal the one computed from the full-square
    forward that matches llama.cpp (model.logits), and the gradient must match finite differences as on
    short rows. Rows of 600 tokens give chunks of 256, 256 and 88 (segments inside chunks: the packing
    test in test_data.py). Tolerance 1e-5 relative on the loss: float32 summation order only (the
    masked keys contribute exact zeros)."""
    with BaseModel.load(tiny_model_file("llama", "f32", tied=False), n_threads=N_THREADS, n_ctx=1024) as model:
        tokens = sample_tokens(model, (2, 600), seed=8)
        with Adapter.init(model, LoRAConfig(rank=4, target_modules=("q_proj", "k_proj", "v_proj", "o_proj"),
                                            layers=(1,))) as ad:
            randomize(ad, seed=9)
            logits = model.logits(tokens, ad).astype(np.float64)
            logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
                - logits.max(-1, keepdims=True)
            nll = -np.take_along_axis(logp[:, :-1], tokens[:, 1:, None], -1)
            loss, n = evaluate(model, ad, tokens)
            assert n == 2 * 599
            assert loss == pytest.approx(float(nll.mean()), rel=1e-5)

            errors = directional_check(model, ad, tokens, None, quantized=False, seed=10)
            worst = max(errors, key=errors.get)
            assert errors[worst] <= 1e-2, errors


def test_loss_of_many_rows_runs_the_head_in_chunks(tiny_model_file):
    """With more loss rows than one LM-head chunk (64 MiB of logits: 524 rows of this 32000-token
    vocabulary), evaluation runs the blocks once and the head and loss chunk by chunk. The sum must
    equal the sum over two halves of the rows that each fit one chunk (one graph each), and the
    training graph's loss (one graph, no chunks), LoRA on the LM head included. Tolerance 1e-5
    relative: float32 summation order only."""
    with BaseModel.load(tiny_model_file("llama", "f32", tied=False), n_threads=N_THREADS, n_ctx=1024) as model:
        tokens = sample_tokens(model, (2, 400), seed=12)
        with Adapter.init(model, LoRAConfig(rank=4, target_modules=("v_proj", "lm_head"))) as ad:
            randomize(ad, seed=13)
            loss, n = evaluate(model, ad, tokens)
            assert n == 2 * 399 > 524
            first = np.zeros(tokens.shape, bool)
            first[0] = True
            halves = [evaluate(model, ad, tokens, mask) for mask in (first, ~first)]
            assert [h[1] for h in halves] == [399, 399]
            assert loss * n == pytest.approx(sum(h[0] * h[1] for h in halves), rel=1e-5)
            with TrainingContext(ad) as ctx:
                b = loss_batch(model, tokens)
                assert ctx.accumulate(b, b.n_loss) == pytest.approx(loss * n, rel=1e-5)


@pytest.mark.parametrize("vocab", ["llama-spm", "gpt-2"])
def test_the_loss_kernel_is_the_cross_entropy_of_the_logits(tiny_model_file, vocab):
    # the loss graph's cross-entropy runs in a kernel of our own (vectorized exp, float partial sums);
    # row_losses takes the same forward's logits to the host and sums in double with the C library's exp.
    # A vocabulary of 32000 (whole vectors) and of 50257 (a tail of one).
    with BaseModel.load(tiny_model_file("llama", "f32", vocab=vocab), n_threads=N_THREADS) as model:
        with Adapter.init(model, LoRAConfig(rank=4, target_modules=ALL_TARGETS)) as ad:
            randomize(ad, seed=9)
            tokens = sample_tokens(model, (3, 40), seed=10)
            batch = loss_batch(model, tokens)
            rows = row_losses(model, ad, batch).astype(np.float64)
            assert np.all(rows > 0)
            # float32 per-row values of a 1-ulp exp; leaving out one logit of the 50257 moves the sum by ~2e-6
            assert loss_sum(model, ad, batch) == pytest.approx(rows.sum(), rel=3e-7)
