"""AdaLoRA (Zhang et al. 2023) as PEFT's AdaLoraModel and RankAllocator compute it, on the native pairs.

Each target carries ``init_r`` triplets in SVD form: ``lora_A`` (r, n_in) = Q, ``lora_E`` (r,) = Λ,
``lora_B`` (n_out, r) = P, and adds ``scale · B·diag(E)·A·dropout(x)`` with PEFT's
``scale = lora_alpha / (init_r + 1e-5)`` (its ``ranknum`` stays ``init_r`` while triplets are masked).
PEFT's initialisation: E = 0, A and B ~ N(0, 0.02²).

The native pair holds ``(diag(E)·A, B)`` with that scale as its own pair scale, so a forward and its
backward are the ordinary LoRA ones; with G the native gradient of diag(E)·A, the chain rule gives
``dA = E ⊙ G`` (row-wise), ``dE = Σ_j G ⊙ A`` and ``dB`` unchanged. The loss gains PEFT's orthogonal
regulariser, ``orth_reg_weight · mean over every A and B of ‖AAᵀ − I‖_F and ‖BᵀB − I‖_F``, whose
gradient ``2·(AAᵀ − I)·A / ‖AAᵀ − I‖_F`` (and ``2·B·(BᵀB − I) / ‖·‖``) is added here. Clipping and
AdamW then follow torch (``clip_grad_norm_``, ``torch.optim.AdamW``) on A, E and B in float32.

After each update the allocator runs as PEFT's ``update_and_allocate(step)``: the importance of every
entry, ``|p · grad|``, is smoothed by two EMAs (sensitivity, ``beta1``; uncertainty, ``beta2``); a
triplet's score is its E entry's ``ipt·unc`` plus the means of its A row's and B column's; the budget
follows the cubic schedule from ``init_r`` to ``target_r`` triplets per target between ``tinit`` and
``total_step − tfinal``, and every ``deltaT`` steps the lowest-scoring triplets beyond the budget get
E = 0. From ``total_step − tfinal`` on the mask is final.

Saved, the adapter is an ordinary llama.cpp LoRA with a rank of its own per tensor: the kept triplets,
``A' = A[k]``, ``B' = B[:, k]·diag(E[k])``, and B' multiplied so that llama.cpp's ``alpha / rank``
gives PEFT's scale; a target with no kept triplet is left out.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from ._handles import Batch
from .config import LoRAConfig
from .errors import InvalidArgumentError

RANKNUM_EPS = 1e-5      # PEFT divides by ranknum + 1e-5
PARTS = ("A", "E", "B")


def budget_schedule(step: int, *, init_bgt: int, target_bgt: int, tinit: int, tfinal: int, total_step: int,
                    deltaT: int) -> tuple[int, bool]:
    """(budget in triplets, whether to mask at this step): PEFT's RankAllocator.budget_schedule."""
    if step <= tinit:
        return init_bgt, False
    if step > total_step - tfinal:
        return target_bgt, True
    mul_coeff = 1 - (step - tinit) / (total_step - tfinal - tinit)
    return int((init_bgt - target_bgt) * (mul_coeff ** 3) + target_bgt), step % deltaT == 0


def adalora_scale(config: LoRAConfig) -> float:
    return config.alpha / (config.init_r + RANKNUM_EPS)


class AdaLoRA:
    """The AdaLoRA state of one adapter during training: parameters, AdamW moments, importance EMAs,
    the triplet mask. ``adapter`` is the native training adapter, ``init_r`` triplets per target."""

    def __init__(self, adapter, config: LoRAConfig, total_step: int):
        if config.peft_type != "adalora":
            raise InvalidArgumentError("AdaLoRA needs LoRAConfig(peft_type='adalora')")
        total = config.total_step or total_step
        if config.tinit >= total - config.tfinal:
            raise InvalidArgumentError(f"AdaLoRA: tinit={config.tinit} and tfinal={config.tfinal} leave no budgeting "
                                       f"phase in total_step={total}; lower them or train longer")
        self.adapter, self.config, self.total_step = adapter, config, total
        self.targets = list(adapter.targets)
        r = config.init_r
        self.init_bgt = r * len(self.targets)
        self.target_bgt = config.target_r * len(self.targets)
        rng = np.random.default_rng(config.seed)
        self.params: dict[str, dict[str, np.ndarray]] = {}
        for t in self.targets:
            n_in, n_out = adapter.model.weight_shape(t)
            # PEFT's reset_lora_parameters: E zeros, A and B normal(0, 0.02)
            self.params[t] = {"A": rng.normal(0.0, 0.02, (r, n_in)).astype(np.float32),
                              "E": np.zeros(r, np.float32),
                              "B": rng.normal(0.0, 0.02, (n_out, r)).astype(np.float32)}
        zeros = lambda: {t: {k: np.zeros_like(v) for k, v in p.items()} for t, p in self.params.items()}
        self.m, self.v = zeros(), zeros()
        self.ipt_avg, self.ipt_unc = zeros(), zeros()
        self.mask = {t: np.ones(r, bool) for t in self.targets}     # PEFT's rank_pattern
        self.final = False                                         # the mask of total_step - tfinal is set
        self.grads: dict[str, dict[str, np.ndarray]] = {}
        self.push()

    # ---- native pairs -------------------------------------------------------------------------------

    def push(self) -> None:
        """Write (diag(E)·A, B) into the native pairs."""
        for t, p in self.params.items():
            self.adapter.set(t, lora_a=p["E"][:, None] * p["A"], lora_b=p["B"])

    # ---- one optimizer step -------------------------------------------------------------------------

    def orth_reg(self) -> tuple[float, dict[str, dict[str, np.ndarray]]]:
        """PEFT's orthogonal regulariser (weighted) and its gradient for every A and B."""
        w = self.config.orth_reg_weight
        total, grads = 0.0, {}
        n = 2 * len(self.targets)
        for t, p in self.params.items():
            a, b = p["A"].astype(np.float64), p["B"].astype(np.float64)
            ma = a @ a.T - np.eye(a.shape[0])
            mb = b.T @ b - np.eye(b.shape[1])
            na, nb = np.linalg.norm(ma), np.linalg.norm(mb)
            total += na + nb
            grads[t] = {"A": (w / n) * 2.0 * (ma @ a) / max(na, 1e-30),
                        "B": (w / n) * 2.0 * (b @ mb) / max(nb, 1e-30)}
        return w * total / n, grads

    def step(self, ctx, micro_batches: Sequence[Batch], learning_rate: float, step: int, *,
             betas: tuple[float, float], eps: float, weight_decay: float, max_grad_norm: float | None,
             dropout_seed: int):
        """Forward + backward (native), the chain rule to A, E, B, the regulariser, clipping, AdamW,
        then the allocator. Returns the StepResult of the cross-entropy (``orth_loss`` on the side)."""
        from .step import StepResult

        with ctx._lock:
            loss_sum, n_tokens = ctx.accumulate_all(micro_batches, dropout_seed)
            native = ctx.gradients()
            ctx.zero_grad()
        loss = loss_sum / n_tokens
        orth, reg = self.orth_reg()
        self.orth_loss = float(orth)
        grads: dict[str, dict[str, np.ndarray]] = {}
        sq = 0.0
        for t, p in self.params.items():
            g_an, g_b = native[t]
            g = {"A": p["E"][:, None] * g_an + reg[t]["A"],
                 "E": (g_an.astype(np.float64) * p["A"]).sum(axis=1),
                 "B": g_b + reg[t]["B"]}
            grads[t] = {k: np.asarray(v, np.float32) for k, v in g.items()}
            sq += sum(float(np.square(v, dtype=np.float64).sum()) for v in grads[t].values())
        norm = math.sqrt(sq)
        if not (math.isfinite(loss) and math.isfinite(norm)):
            return StepResult(loss, n_tokens, norm, 0.0, skipped=True)
        clip = 1.0
        if max_grad_norm is not None and max_grad_norm > 0:
            clip = min(1.0, max_grad_norm / (norm + 1e-6))       # torch.nn.utils.clip_grad_norm_
        b1, b2 = betas
        bc1, bc2 = 1.0 - b1 ** step, 1.0 - b2 ** step
        for t, p in self.params.items():
            for k in PARTS:
                g = grads[t][k] * np.float32(clip) if clip != 1.0 else grads[t][k]
                grads[t][k] = g
                m, v = self.m[t][k], self.v[t][k]
                if weight_decay:
                    p[k] *= np.float32(1.0 - learning_rate * weight_decay)
                m += np.float32(1.0 - b1) * (g - m)                            # torch: m.lerp_(g, 1 - b1)
                v *= np.float32(b2)
                v += np.float32(1.0 - b2) * g * g
                denom = np.sqrt(v) / np.float32(math.sqrt(bc2)) + np.float32(eps)
                p[k] -= np.float32(learning_rate / bc1) * m / denom
        self.grads = grads
        self.update_and_allocate(step)
        self.push()
        return StepResult(loss, n_tokens, norm, clip)

    # ---- the allocator ------------------------------------------------------------------------------

    def update_and_allocate(self, step: int) -> None:
        """PEFT's AdaLoraModel.update_and_allocate(step), after the update, with this step's gradients."""
        c = self.config
        end = self.total_step - c.tfinal
        if step < end:
            self._update_ipt()
            budget, mask_ind = self.schedule(step)
            if mask_ind:
                self._mask_to_budget(budget)
        elif step == end:
            self._mask_to_budget(self.schedule(step)[0])
            self.final = True
            for t in self.targets:                       # PEFT's reset_ipt
                for k in PARTS:
                    self.ipt_avg[t][k][...] = 0.0
                    self.ipt_unc[t][k][...] = 0.0
        else:
            for t, p in self.params.items():
                p["E"][~self.mask[t]] = 0.0

    def schedule(self, step: int) -> tuple[int, bool]:
        c = self.config
        return budget_schedule(step, init_bgt=self.init_bgt, target_bgt=self.target_bgt, tinit=c.tinit,
                               tfinal=c.tfinal, total_step=self.total_step, deltaT=c.deltaT)

    def _update_ipt(self) -> None:
        b1, b2 = np.float32(self.config.beta1), np.float32(self.config.beta2)
        for t, p in self.params.items():
            for k in PARTS:
                ipt = np.abs(p[k] * self.grads[t][k])
                avg = self.ipt_avg[t][k]
                avg *= b1
                avg += (1 - b1) * ipt
                unc = self.ipt_unc[t][k]
                unc *= b2
                unc += (1 - b2) * np.abs(ipt - avg)

    def scores(self) -> dict[str, np.ndarray]:
        """Each triplet's importance: E's ipt·unc plus the means of its A row's and B column's."""
        out = {}
        for t in self.targets:
            s = {k: self.ipt_avg[t][k] * self.ipt_unc[t][k] for k in PARTS}
            out[t] = s["E"] + (s["A"].mean(axis=1) + s["B"].mean(axis=0))
        return out

    def _mask_to_budget(self, budget: int) -> None:
        scores = self.scores()
        k = self.init_bgt - budget
        if k <= 0:
            return
        threshold = np.partition(np.concatenate([scores[t] for t in self.targets]), k - 1)[k - 1]   # kthvalue
        for t, p in self.params.items():
            masked = scores[t] <= threshold
            p["E"][masked] = 0.0
            self.mask[t] = ~masked

    # ---- results ------------------------------------------------------------------------------------

    def ranks(self) -> dict[str, int]:
        """Kept triplets per target."""
        return {t: int(m.sum()) for t, m in self.mask.items()}

    def file_tensors(self) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], float]:
        """({target: (A', B')} for a llama.cpp adapter, its alpha): kept triplets only, E folded into
        B and B scaled so that alpha / rank is PEFT's alpha / (init_r + 1e-5)."""
        alpha = self.config.alpha
        scale = adalora_scale(self.config)
        out = {}
        for t, p in self.params.items():
            keep = self.mask[t]
            r = int(keep.sum())
            if r == 0:
                continue
            fold = scale / (alpha / r)
            b = p["B"][:, keep].astype(np.float64) * p["E"][keep].astype(np.float64) * fold
            out[t] = (p["A"][keep].copy(), b.astype(np.float32))
        return out, alpha

    # ---- checkpoints --------------------------------------------------------------------------------

    def state_arrays(self) -> dict[str, np.ndarray]:
        out = {}
        for t in self.targets:
            for k in PARTS:
                for field, store in (("p", self.params), ("m", self.m), ("v", self.v), ("ipt", self.ipt_avg),
                                     ("unc", self.ipt_unc)):
                    out[f"adalora/{t}/{field}_{k}"] = store[t][k]
            out[f"adalora/{t}/mask"] = self.mask[t]
        out["adalora/final"] = np.array(self.final)
        return out

    def load_state_arrays(self, arrays: dict[str, np.ndarray], where: str) -> None:
        from .errors import CheckpointError

        try:
            for t in self.targets:
                for k in PARTS:
                    for field, store in (("p", self.params), ("m", self.m), ("v", self.v), ("ipt", self.ipt_avg),
                                         ("unc", self.ipt_unc)):
                        value = arrays[f"adalora/{t}/{field}_{k}"]
                        if value.shape != store[t][k].shape:
                            raise KeyError(f"{t}/{field}_{k} has shape {value.shape}")
                        store[t][k] = value.astype(np.float32).copy()
                self.mask[t] = arrays[f"adalora/{t}/mask"].astype(bool).copy()
            self.final = bool(arrays["adalora/final"])
        except KeyError as e:
            raise CheckpointError(f"{where}: no AdaLoRA state for this configuration ({e})") from None
        self.push()


__all__ = ["AdaLoRA", "budget_schedule"]
