"""GRPO's loss core (grpo_loss.py) on its own: derivatives against finite differences, advantages and
normalisations against hand values. The comparison with TRL itself is in test_grpo_trl.py."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from ggml_lora.config import GRPO_LOSS_TYPES, GRPOConfig
from ggml_lora.errors import InvalidArgumentError
from ggml_lora.grpo_loss import advantages, grpo_loss, nanstd


def _case(seed=0, n=6, t=5):
    rng = np.random.default_rng(seed)
    logp = -rng.uniform(0.1, 3.0, (n, t))
    mask = np.ones((n, t))
    mask[1, 3:] = 0
    mask[4, 1:] = 0
    old = logp + rng.normal(0, 0.3, (n, t))          # ratios well inside and outside [1-ε, 1+ε]
    ref = logp + rng.normal(0, 0.5, (n, t))
    adv = rng.normal(0, 1, n)
    return logp, mask, old, ref, adv


CASES = [dict(loss_type=lt, importance_sampling_level=lvl, beta=beta, use_bias_correction_kl=bc)
         for lt, lvl, beta, bc in itertools.product(GRPO_LOSS_TYPES, ("token", "sequence"), (0.0, 0.04), (True, False))
         if not (beta == 0.0 and not bc)]


@pytest.mark.parametrize("kw", CASES, ids=lambda kw: "-".join(str(v) for v in kw.values()))
@pytest.mark.parametrize("on_policy", [True, False])
def test_derivative_matches_finite_differences(kw, on_policy):
    """d loss / d logp of every token against central differences. Off-policy ratios are drawn away from the
    clip bounds, where the loss is smooth; on-policy (old = logp itself, TRL's detach) every ratio is 1."""
    cfg = GRPOConfig(max_completion_length=5, epsilon_high=0.28, delta=1.5 if kw["loss_type"] == "dapo" else None,
                     **kw)
    logp, mask, old, ref, adv = _case()
    micro = [np.arange(0, 3), np.arange(3, 6)]

    def f(x):
        return grpo_loss(cfg, x, mask, adv, old=x if on_policy else old, ref=ref, micro=micro).loss

    got = grpo_loss(cfg, logp, mask, adv, old=None if on_policy else old, ref=ref, micro=micro).d_logp
    h = 1e-6
    want = np.zeros_like(logp)
    for i, j in itertools.product(*map(range, logp.shape)):
        e = np.zeros_like(logp)
        e[i, j] = h
        if on_policy:       # old follows x in f, so differentiate with old held at logp: TRL's detach
            want[i, j] = (grpo_loss(cfg, logp + e, mask, adv, old=logp, ref=ref, micro=micro).loss
                          - grpo_loss(cfg, logp - e, mask, adv, old=logp, ref=ref, micro=micro).loss) / (2 * h)
        else:
            want[i, j] = (f(logp + e) - f(logp - e)) / (2 * h)
    # float64 central differences of a smooth function: error ~h² x third derivative plus 1e-16/h rounding,
    # far below 1e-7; a wrong factor (a normaliser, a sign, a missed path through the ratio) is ~1e-2 or more.
    # On-policy, r = 1 sits on the tie of the clipped and unclipped branch: torch's min sends half the
    # gradient to each and both carry A r there, so the one-sided derivatives agree with it.
    np.testing.assert_allclose(got, want, atol=1e-7, rtol=1e-6)
    assert np.all(got[mask == 0] == 0)


def test_on_policy_dapo_weights_are_advantages_over_tokens():
    """Ratio 1, beta 0: d loss / d logp_t = -A_i / (active tokens of the step), TRL's default."""
    logp, mask, _, _, adv = _case()
    out = grpo_loss(GRPOConfig(), logp, mask, adv)
    np.testing.assert_allclose(out.d_logp, -adv[:, None] * mask / mask.sum(), rtol=1e-12)
    assert out.loss == pytest.approx(-(adv[:, None] * mask).sum() / mask.sum())
    assert out.metrics["clip_ratio/region_mean"] == 0.0


@pytest.mark.parametrize("loss_type, norm", [
    ("grpo", lambda m, B: m.sum(1, keepdims=True) * B),
    ("bnpo", lambda m, B: m.sum()),
    ("dr_grpo", lambda m, B: B * 7),
    ("luspo", lambda m, B: B),
])
def test_normalisations(loss_type, norm):
    logp, mask, _, _, adv = _case()
    out = grpo_loss(GRPOConfig(loss_type=loss_type, max_completion_length=7), logp, mask, adv)
    np.testing.assert_allclose(out.d_logp, -adv[:, None] * mask / norm(mask, len(adv)), rtol=1e-12)


def test_advantages_by_hand():
    cfg = GRPOConfig(num_generations=3)
    r = np.array([[1.0], [0.0], [0.0], [2.0], [2.0], [2.0]])
    adv, m = advantages(cfg, r, np.ones(1), ["f"])
    g = np.array([1.0, 0.0, 0.0])
    want = (g - g.mean()) / (g.std(ddof=1) + 1e-4)
    np.testing.assert_allclose(adv, np.concatenate([want, np.zeros(3)]))
    assert m["frac_reward_zero_std"] == 0.5
    assert m["reward"] == pytest.approx(7 / 6) and m["rewards/f/mean"] == pytest.approx(7 / 6)
    # None from every function: out of the baseline, advantage 0; one function's None is skipped
    r = np.array([[1.0, np.nan], [np.nan, np.nan], [0.0, 1.0]])
    adv, m = advantages(cfg, r, np.array([1.0, 0.5]), ["a", "b"])
    assert adv[1] == 0.0
    summed = np.array([1.0, 0.5])
    np.testing.assert_allclose(adv[[0, 2]], (summed - summed.mean()) / (nanstd(summed) + 1e-4))
    assert m["rewards/b/mean"] == 1.0 and np.isnan(m["rewards/b/std"])


def test_scale_rewards_and_gdpo():
    r = np.array([[1.0, 0.0], [0.0, 1.0], [3.0, 1.0], [0.0, 0.0]])
    w = np.array([1.0, 2.0])
    s = r @ w
    adv, _ = advantages(GRPOConfig(num_generations=2, scale_rewards="none"), r, w, ["a", "b"])
    np.testing.assert_allclose(adv, s - np.repeat(s.reshape(2, 2).mean(1), 2))
    adv, _ = advantages(GRPOConfig(num_generations=2, scale_rewards="batch"), r, w, ["a", "b"])
    np.testing.assert_allclose(adv, (s - np.repeat(s.reshape(2, 2).mean(1), 2)) / (s.std(ddof=1) + 1e-4))
    gdpo = GRPOConfig(num_generations=2, multi_objective_aggregation="normalize_then_sum")
    adv, _ = advantages(gdpo, r, w, ["a", "b"])
    g = r.reshape(2, 2, 2)
    z = ((g - g.mean(1, keepdims=True)) / (g.std(1, ddof=1, keepdims=True) + 1e-4)).reshape(4, 2) @ w
    np.testing.assert_allclose(adv, (z - z.mean()) / (z.std(ddof=1) + 1e-4))


@pytest.mark.parametrize("kw, message", [
    (dict(num_generations=1), "at least 2"),
    (dict(loss_type="vespo"), "vespo is not implemented"),
    (dict(loss_type="gspo"), "must be one of"),
    (dict(temperature=0.0), "temperature"),
    (dict(scale_rewards="sometimes"), "scale_rewards"),
    (dict(top_p=0.0), "top_p"),
    (dict(delta=1.1), "must exceed"),
])
def test_config_errors(kw, message):
    with pytest.raises(InvalidArgumentError, match=message):
        GRPOConfig(**kw)


def test_trl_defaults():
    cfg = GRPOConfig()
    assert (cfg.num_generations, cfg.max_completion_length, cfg.beta, cfg.epsilon, cfg.eps_high, cfg.loss_type,
            cfg.scale_rewards, cfg.num_iterations) == (8, 512, 0.0, 0.2, 0.2, "dapo", "group", 1)
    assert GRPOConfig(scale_rewards=False).scale_rewards == "none"
