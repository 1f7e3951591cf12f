"""GRPO against TRL's own GRPOTrainer on PEFT (benchmarks/grpo_trl.py): the same prompts, completions and
rewards with generation bypassed, the same initial adapter; per-step loss, TRL's metrics and the LoRA
weights after the last step must agree for every loss_type, beta = 0 and > 0, num_iterations 1 and 2."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import N_THREADS

TARGETS = ("q_proj", "v_proj")


def _rollouts(seed: int, vocab: int, eos: int, n_prompts=2, G=4, prompt_len=5):
    """Random prompts of one length (see grpo_trl.py) with G completions of 2-7 tokens, some ending in EOS,
    and two reward functions, one of which says None for one completion."""
    rng = np.random.default_rng(seed)
    out = []
    for p in range(n_prompts):
        prompt = [1] + rng.integers(100, vocab, prompt_len - 1).tolist()
        comps, rewards = [], []
        for g in range(G):
            c = rng.integers(100, vocab, int(rng.integers(2, 8))).tolist()
            if g % 2 == 0:
                c[-1] = eos
            comps.append(c)
            rewards.append([float(rng.normal()), None if (p, g) == (0, 1) else float(rng.integers(0, 2))])
        out.append({"prompt_ids": prompt, "completions": comps, "rewards": rewards})
    return out


CASES = [
    *[dict(loss_type=lt) for lt in ("dapo", "grpo", "bnpo", "dr_grpo", "cispo", "sapo")],
    dict(loss_type="luspo", importance_sampling_level="sequence"),
    dict(loss_type="dapo", beta=0.1),
    dict(loss_type="grpo", beta=0.1, importance_sampling_level="sequence"),      # GSPO with KL
    dict(loss_type="dapo", num_iterations=2, epsilon_high=0.28),
    dict(loss_type="grpo", num_iterations=2, beta=0.1),
    dict(loss_type="bnpo", num_iterations=2, importance_sampling_level="sequence"),
    dict(loss_type="cispo", num_iterations=2, epsilon_high=1.05),
    dict(loss_type="sapo", num_iterations=2),
    dict(loss_type="dr_grpo", num_iterations=2, scale_rewards="batch", mask_truncated_completions=True),
    dict(loss_type="dapo", multi_objective_aggregation="normalize_then_sum", reward_weights=[1.0, 0.5]),
    dict(loss_type="dapo", temperature=0.7),                 # log-probabilities, ratio and entropy of logits / 0.7
    dict(loss_type="grpo", temperature=0.7, beta=0.1, num_iterations=2),
]


@pytest.mark.parametrize("grpo", CASES, ids=lambda kw: "-".join(f"{k}={v}" for k, v in kw.items()))
def test_matches_trl(tiny_model_file, grpo):
    pytest.importorskip("trl")
    pytest.importorskip("peft")
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    from grpo_trl import compare

    torch.set_num_threads(N_THREADS)
    path = tiny_model_file("llama", "f32", n_layers=2)
    rollouts = _rollouts(3, vocab=32000, eos=2)
    steps = 2 * grpo.get("num_iterations", 1) + 1
    result = compare(path, rollouts, steps=steps, learning_rate=3e-2, rank=4, alpha=8.0, target_modules=TARGETS,
                     grpo={"max_completion_length": 8, **grpo}, n_threads=N_THREADS)
    # float32 on both sides with different summation orders: per-token log-probabilities differ by ~1e-6, and
    # after a few AdamW steps at lr 3e-2 the losses by ~1e-5 of their scale; 1e-3 of the scale leaves room
    # while a wrong normaliser, sign or ratio path changes the loss by tens of percent from step 2 on
    losses = np.array([s["loss"] for s in result["steps"]], dtype=np.float64)
    scale = max(np.abs(losses[:, 1]).max(), 1e-3)
    assert np.abs(losses[:, 0] - losses[:, 1]).max() <= 1e-3 * scale, result["steps"]
    for s in result["steps"]:
        for name, pair in s.items():
            if name in ("step", "loss") or pair[1] is None:
                continue
            ours, theirs = pair
            assert ours is not None, (name, s)
            assert ours == pytest.approx(theirs, rel=1e-3, abs=1e-4), (name, s)
    # the update itself: AdamW normalises the gradient, so A moves by ~lr per step in every element whatever
    # the gradient's size; agreeing to 2% of the movement means each step's gradient had TRL's direction
    for name, d in result["weights"].items():
        assert d["A_moved"] > 1e-3, (name, d)
        assert d["A_max_abs"] <= 0.02 * d["A_moved"], (name, d)
        if "B_max_abs" in d:
            assert d["B_max_abs"] <= 0.02 * d["B_max"], (name, d)
