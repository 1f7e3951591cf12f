"""GRPO's advantages and loss in NumPy (float64), with the loss's derivative by each token's log-probability.

The trainer needs no autograd: every GRPO loss is a function of the completion tokens' log-probabilities
under the adapter, so its gradient with respect to the LoRA weights is that of Σ_t w_t·CE_t with
w_t = ∂loss/∂CE_t = −∂loss/∂logπ_t, which one native accumulation with per-row loss weights gives
exactly (``glora_batch.loss_weights``). This file computes the loss, TRL's metrics and those weights.

Everything follows TRL 1.16.0's GRPOTrainer (trl/trainer/grpo_trainer.py, "tr:" below) line by line:
advantages tr:2756-2830, ratio and KL tr:3083-3105, per-token losses tr:3109-3124, normalisation
tr:3153-3184, metrics tr:3254-3288. Arrays are (sequences, completion tokens) padded on the right; the
mask M marks the tokens that carry loss.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .config import GRPOConfig


# ---- advantages --------------------------------------------------------------------------------------

def _nanmean(x, axis=None, keepdims=False):
    with np.errstate(invalid="ignore", divide="ignore"):
        n = np.sum(~np.isnan(x), axis=axis, keepdims=keepdims)
        return np.nansum(x, axis=axis, keepdims=keepdims) / n


def nanstd(x, axis=None, keepdims=False):
    """TRL's nanstd (trl/trainer/utils.py:1021-1043): NaN-aware, with Bessel's correction."""
    mean = _nanmean(x, axis=axis, keepdims=True)
    var = _nanmean((x - mean) ** 2, axis=axis, keepdims=True)
    count = np.sum(~np.isnan(x), axis=axis, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = np.sqrt(var * count / (count - 1))
    return out if keepdims else (np.squeeze(out, axis=axis) if axis is not None else out.reshape(()))


def advantages(cfg: GRPOConfig, rewards_per_func: np.ndarray, weights: np.ndarray,
               names: list[str]) -> tuple[np.ndarray, dict]:
    """(one advantage per completion, TRL's reward metrics) from ``rewards_per_func`` (completions × reward
    functions, NaN where a function returned None), completions grouped ``num_generations`` at a time."""
    r = np.asarray(rewards_per_func, np.float64)
    w = np.asarray(weights, np.float64)
    G = cfg.num_generations
    unscorable = np.isnan(r).all(axis=1)                   # every function said None: no baseline, advantage 0
    with np.errstate(invalid="ignore"):
        if cfg.multi_objective_aggregation == "sum_then_normalize":          # tr:2761-2788
            rewards = np.nansum(r * w[None, :], axis=1)
            rewards[unscorable] = np.nan
            mean = np.repeat(_nanmean(rewards.reshape(-1, G), axis=1), G)
            if cfg.scale_rewards in ("group", "none"):
                std = np.repeat(nanstd(rewards.reshape(-1, G), axis=1), G)
            else:
                std = np.full_like(rewards, nanstd(rewards) if rewards.size > 1 else 0.0)
            adv = rewards - mean
            if cfg.scale_rewards != "none":
                adv = adv / (std + 1e-4)
        else:                                                                # normalize_then_sum, tr:2790-2800
            grouped = r.reshape(-1, G, r.shape[1])
            k = (grouped - _nanmean(grouped, axis=1, keepdims=True)) / (nanstd(grouped, axis=1, keepdims=True) + 1e-4)
            rewards = np.nansum(k.reshape(-1, r.shape[1]) * w[None, :], axis=1)
            rewards[unscorable] = np.nan
            std = np.full_like(rewards, nanstd(rewards) if rewards.size > 1 else 0.0)
            adv = (rewards - _nanmean(rewards)) / (std + 1e-4)
    adv = np.nan_to_num(adv, nan=0.0)
    # torch.isclose(std, 0): |std| <= 1e-8 (atol; rtol times 0 adds nothing); NaN std is not close
    zero_std = np.abs(std) <= 1e-8
    metrics = {}
    for i, name in enumerate(names):                                         # tr:2821-2830
        metrics[f"rewards/{name}/mean"] = float(_nanmean(r[:, i]))
        metrics[f"rewards/{name}/std"] = float(nanstd(r[:, i]))
    logged = np.nansum(r * w[None, :], axis=1)
    logged[unscorable] = np.nan
    metrics["reward"] = float(_nanmean(logged))
    metrics["reward_std"] = float(nanstd(logged))
    metrics["frac_reward_zero_std"] = float(zero_std.mean())
    return adv, metrics


# ---- the loss ----------------------------------------------------------------------------------------

@dataclass
class Loss:
    """The loss of one optimizer step (the sum of its micro-batches' TRL losses), d loss / d logπ of every
    token (zero where the mask is), and TRL's loss metrics averaged over the micro-batches."""

    loss: float
    d_logp: np.ndarray          # (N, T)
    metrics: dict


def _sigmoid(x):
    return 0.5 * (1.0 + np.tanh(0.5 * x))


def _coefficients(cfg: GRPOConfig, mask: np.ndarray, micro: list[np.ndarray], n_items: float,
                  n_accum: int) -> np.ndarray:
    """c[i] such that the step's loss is Σ_i c[i] Σ_t M[i,t] ℓ[i,t]: each loss_type's normalisation
    (tr:3153-3184), the micro-batch ones divided by the accumulation steps as TRL's training loss is."""
    n_seq = np.maximum(mask.sum(1), 1.0)
    c = np.zeros(mask.shape[0])
    for idx in micro:
        B = len(idx)
        if cfg.loss_type in ("grpo", "sapo"):              # mean over sequences of per-sequence means
            c[idx] = 1.0 / (n_seq[idx] * B * n_accum)
        elif cfg.loss_type == "bnpo":                      # tokens of the micro-batch
            c[idx] = 1.0 / (max(mask[idx].sum(), 1.0) * n_accum)
        elif cfg.loss_type == "dr_grpo":                   # a constant: B x max_completion_length
            c[idx] = 1.0 / (B * cfg.max_completion_length * n_accum)
        elif cfg.loss_type == "luspo":                     # per-sequence sums, averaged
            c[idx] = 1.0 / (B * n_accum)
        else:                                              # dapo, cispo: tokens of the whole generation batch
            # normaliser = num_items_in_batch / processes * accumulation / steps_per_generation, and TRL's
            # steps_per_generation defaults to the accumulation steps (grpo_config.py:1098-1100)
            c[idx] = 1.0 / max(n_items, 1.0)
    return c


def grpo_loss(cfg: GRPOConfig, logp: np.ndarray, mask: np.ndarray, adv: np.ndarray, *,
              old: np.ndarray | None = None, ref: np.ndarray | None = None,
              micro: list[np.ndarray] | None = None, entropy: np.ndarray | None = None) -> Loss:
    """TRL's GRPO loss of one optimizer step and its derivative by ``logp``.

    ``logp`` (N, T): logπθ of each completion token; ``mask`` (N, T) the tokens in the loss; ``adv`` (N,);
    ``old``: logπ_old (None: the step is on-policy and TRL uses logp.detach(), tr:3066: ratio 1, but its
    gradient is not zero); ``ref``: the reference's log-probabilities (needed when beta > 0); ``micro``:
    the completions of each micro-batch (default: one micro-batch of all); ``entropy`` (N, T): each token's
    entropy of the policy, for TRL's ``entropy`` metric."""
    logp = np.asarray(logp, np.float64)
    M = np.asarray(mask, np.float64)
    N = logp.shape[0]
    micro = [np.arange(N)] if micro is None else [np.asarray(m) for m in micro]
    A = np.asarray(adv, np.float64)[:, None]
    lr = np.zeros_like(logp) if old is None else (logp - np.asarray(old, np.float64)) * (M > 0)
    n_seq = np.maximum(M.sum(1, keepdims=True), 1.0)
    seq_level = cfg.importance_sampling_level == "sequence"
    if seq_level:                                           # tr:3087-3089: the masked mean of the log-ratio
        lw = (lr * M).sum(1, keepdims=True) / n_seq
        dlw = M / n_seq                                     # d lw_i / d logp_it
    else:
        lw, dlw = lr, np.ones_like(lr)
    r = np.exp(lw)                                          # coef_1, (N, T) or (N, 1)
    lo, hi = 1.0 - cfg.epsilon, 1.0 + cfg.eps_high
    # per-token loss ℓ and its derivative: by r (through the ratio) and directly by logp (cispo)
    d_direct = np.zeros_like(logp)
    if cfg.loss_type == "cispo":                            # tr:3109-3111: -sg(min(r, ε_high)) A logp
        cap = np.minimum(r, cfg.eps_high)
        ell = -cap * A * logp
        d_r = np.zeros_like(r)
        d_direct = -cap * A * np.ones_like(logp)
        coef_1 = r
    elif cfg.loss_type == "sapo":                           # tr:3121-3124: a soft gate instead of a clip
        tau = np.where(A > 0, cfg.sapo_temperature_pos, cfg.sapo_temperature_neg)
        s = _sigmoid(tau * (r - 1.0))
        ell = -s * 4.0 / tau * A
        d_r = -4.0 * s * (1.0 - s) * A
        coef_1 = r
    else:                                                   # tr:3112-3120: PPO's clipped surrogate
        coef_2 = np.clip(r, lo, hi)
        coef_1 = r if cfg.delta is None else np.minimum(r, cfg.delta)
        l1, l2 = coef_1 * A, coef_2 * A
        ell = -np.minimum(l1, l2)
        # torch.min(a, b) sends the gradient to the smaller, half to each on a tie; clamp passes it
        # where lo <= r <= hi (bounds included), and the delta cap where r <= delta
        g1 = np.where(l1 < l2, 1.0, np.where(l1 == l2, 0.5, 0.0))
        pass1 = 1.0 if cfg.delta is None else (r <= cfg.delta).astype(np.float64)
        pass2 = ((r >= lo) & (r <= hi)).astype(np.float64)
        d_r = -(g1 * A * pass1 + (1.0 - g1) * A * pass2)
    kl = None
    if cfg.beta != 0.0:                                     # tr:3100-3105: k3, times the ratio by default
        diff = np.asarray(ref, np.float64) - logp
        kl0 = np.exp(diff) - diff - 1.0
        dkl0 = 1.0 - np.exp(diff)
        rho = r if cfg.use_bias_correction_kl else np.ones_like(r)
        kl = kl0 * rho
    c = _coefficients(cfg, M, micro, float(M.sum()), len(micro))[:, None]
    G = c * M                                               # the weight of each token's per-token loss
    # loss = Σ G (ℓ broadcast + β kl); per-sequence ℓ (sequence level) counts once per masked token
    total = ell + (cfg.beta * kl if kl is not None else 0.0)
    loss = float((G * total).sum())
    # ∂loss/∂r summed over the tokens that share r (one per token, or one per sequence), then through r
    dr_tokens = G * d_r                                     # (N, T) after broadcasting
    if kl is not None and cfg.use_bias_correction_kl:
        dr_tokens = dr_tokens + G * cfg.beta * kl0
    if seq_level:
        d_lw = dr_tokens.sum(1, keepdims=True) * r          # (N, 1)
        d_logp = d_lw * dlw
    else:
        d_logp = dr_tokens * r
    d_logp = d_logp + G * d_direct
    if kl is not None:
        d_logp = d_logp + G * cfg.beta * dkl0 * rho
    d_logp = d_logp * (M > 0)
    return Loss(loss, d_logp, _loss_metrics(cfg, coef_1, A, M, kl, micro, entropy))


def _loss_metrics(cfg: GRPOConfig, coef_1, A, M, kl, micro, entropy=None) -> dict:
    """TRL's per-micro-batch metrics (tr:3254-3288), each averaged over the micro-batches as TRL's log does."""
    per: dict[str, list] = {}

    def masked_mean(x, idx):                                # global_masked_mean of one process
        if x.shape[1] == 1:
            return float(x[idx].sum() / max(len(idx), 1))
        return float((x[idx] * M[idx]).sum() / max(M[idx].sum(), 1.0))

    def seq_mean(x, idx):
        if x.shape[1] == 1:
            return x[idx, 0]
        with np.errstate(invalid="ignore"):
            return (x[idx] * M[idx]).sum(1) / M[idx].sum(1)

    for idx in micro:
        if kl is not None:
            per.setdefault("kl", []).append(masked_mean(kl, idx))
        if entropy is not None:                             # tr:3270, over the completion mask
            per.setdefault("entropy", []).append(masked_mean(np.asarray(entropy, np.float64), idx))
        if cfg.loss_type in ("grpo", "bnpo", "dr_grpo", "dapo", "luspo"):
            low = ((coef_1 < 1 - cfg.epsilon) & (A < 0)).astype(np.float64)
            high = ((coef_1 > 1 + cfg.eps_high) & (A > 0)).astype(np.float64)
            region = np.maximum(low, high)
            per.setdefault("clip_ratio/low_mean", []).append(masked_mean(low, idx))
            per.setdefault("clip_ratio/high_mean", []).append(masked_mean(high, idx))
            per.setdefault("clip_ratio/region_mean", []).append(masked_mean(region, idx))
            per.setdefault("clip_ratio/low_min", []).append(float(np.nanmin(seq_mean(low, idx))))
            per.setdefault("clip_ratio/high_max", []).append(float(np.nanmax(seq_mean(high, idx))))
        elif cfg.loss_type == "cispo":
            hit = ((coef_1 > cfg.eps_high) & (A > 0)).astype(np.float64)
            per.setdefault("cispo_clip_ratio", []).append(masked_mean(hit, idx))
    return {k: float(np.mean(v)) for k, v in per.items()}


__all__ = ["Loss", "advantages", "grpo_loss", "nanstd"]
