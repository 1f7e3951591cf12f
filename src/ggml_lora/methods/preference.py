"""Preference training on a frozen GGUF base: DPO, ORPO and KTO, by TRL's definitions and option names.

Every objective here is a function of per-sequence log-probabilities (and, for ORPO, of the chosen
sequences' cross-entropy), so its gradient is the gradient of a weighted sum of the rows' cross-entropy
with one weight per sequence: the derivative of the objective by that sequence's log-probability. A step
runs two passes over its sequences:

1. a forward (no gradient) gives each sequence's log-probability under the adapter; with the reference's
   (the base model, adapter off, computed once per sample and kept), the objective, its metrics and the
   weights follow in float64;
2. a forward + backward with those weights per loss row (``glora_batch.loss_weights``) accumulates the
   exact gradient of the objective, which is then clipped and applied as in supervised training.

LoRA dropout is off, as TRL's ``disable_dropout=True`` default: with it the first pass would not see the
masks of the second.

Data (TRL's formats): DPO and ORPO take ``{"prompt", "chosen", "rejected"}`` records, KTO ``{"prompt",
"completion", "label"}``; each field a string (the completion is appended to the prompt and followed by
EOS, as supervised completion records are), or lists of messages rendered with the model's chat template
(the prompt's messages, then the completion's). Loss is on the completion's tokens only, except ORPO's
supervised term, which TRL takes over the whole chosen sequence, prompt included.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np

from .._handles import Batch
from ..adapter import Adapter
from ..chat import check_messages, kind_of, render_with_spans
from ..config import PreferenceConfig
from ..data import DataReport, Row, Sample, SampleBuilder, check_lengths, collate, hold_out, open_source, own_validation
from ..errors import CheckpointError, DatasetError, InvalidArgumentError, UnsupportedError
from ..model import BaseModel
from ..forward import row_losses
from .base import StepOutput, TrainingMethod

_FIELDS = {"dpo": ("prompt", "chosen", "rejected"), "orpo": ("prompt", "chosen", "rejected"),
           "kto": ("prompt", "completion", "label")}


@dataclass(frozen=True, eq=False)        # hashed by identity: the reference's cache keys on rows
class PreferenceRow:
    """One record: (chosen, rejected) for DPO and ORPO; (completion, KL sequence) and its label for KTO.
    A sample's mask marks its completion's tokens."""

    seqs: tuple[Sample, ...]
    label: bool | None = None

    @property
    def tokens(self) -> np.ndarray:         # every sequence's tokens, for the data fingerprint
        return np.concatenate([s.tokens for s in self.seqs])

    @property
    def mask(self) -> np.ndarray:
        return np.concatenate([s.mask for s in self.seqs])


# ---- data --------------------------------------------------------------------------------------------

def _sequence(loader: SampleBuilder, prompt, completion, where: str) -> Sample | None:
    """The tokens of prompt + completion, the completion's marked; None when it was dropped for length."""
    if isinstance(prompt, str) and isinstance(completion, str):
        loader.record("completion", {"prompt": prompt, "completion": completion}, where)
    else:
        if not isinstance(prompt, list) or not isinstance(completion, list):
            raise DatasetError(f"{where}: the prompt and the completions must all be strings or all be lists of "
                               f"messages, got {kind_of(prompt)} and {kind_of(completion)}")
        messages = check_messages(prompt + completion, where)
        if not any(m["role"] == "assistant" for m in completion):
            raise DatasetError(f"{where}: the completion has no assistant message")
        text, spans = render_with_spans(loader.template(where), messages, where)
        spans = spans[sum(m["role"] == "assistant" for m in prompt):]      # the completion's turns only
        tokens, mask = loader.tok.encode(text, spans, where)
        loader.add(tokens, mask)
    got = loader.drain()
    return got[0] if got else None


def load_preferences(source, model: BaseModel, method: str, *, max_seq_length: int, truncation: str = "truncate",
                     chat_template: str | None = None, split: str = "train") -> tuple[list[PreferenceRow], DataReport]:
    """Read and tokenize preference records (see the module docstring) of ``source``'s ``split``."""
    check_lengths(max_seq_length, truncation, model)
    label, kind, items = open_source(source, split)
    if kind != "records":
        raise DatasetError(f"{label}: preference data are records ({', '.join(_FIELDS[method])}), not plain text")
    report = DataReport(label, "preference" if method != "kto" else "kto")
    loader = SampleBuilder(model, report, max_seq_length, truncation, False, chat_template)
    keys = _FIELDS[method]
    records = []
    for where, record in items:
        if record is None:
            report._skip("blank line")
            continue
        if not isinstance(record, dict):
            raise DatasetError(f"{where}: expected an object (a dict), got {kind_of(record)}")
        missing = [k for k in keys if record.get(k) is None]
        if missing:
            raise DatasetError(f"{where}: a {method} record needs {', '.join(map(repr, keys))}; "
                               f"{', '.join(map(repr, missing))} missing (keys {sorted(map(str, record))})")
        if method == "kto" and not isinstance(record["label"], bool):
            raise DatasetError(f"{where}: 'label' must be true or false, got {kind_of(record['label'])}")
        report.n_records += 1
        records.append((where, record))
    rows = []
    for i, (where, r) in enumerate(records):
        if method == "kto":
            # TRL's KL estimate: the prompt with another record's completion (the previous one, cyclically)
            other = records[i - 1][1]["completion"] if len(records) > 1 else r["completion"]
            if type(other) is not type(r["completion"]):
                raise DatasetError(f"{where}: records mix string and message completions")
            seqs = (_sequence(loader, r["prompt"], r["completion"], where),
                    _sequence(loader, r["prompt"], other, where + " (with the previous record's completion)"))
        else:
            seqs = tuple(_sequence(loader, r["prompt"], r[k], where) for k in ("chosen", "rejected"))
        if all(s is not None for s in seqs):
            rows.append(PreferenceRow(seqs, r["label"] if method == "kto" else None))
    if not rows:
        raise DatasetError(f"{label}: no usable {method} records ({report.n_records} read; dropped "
                           f"{report.n_dropped}, skipped {report.skipped})")
    return rows, _count(report, rows)


def _count(report: DataReport, rows: Sequence[PreferenceRow]) -> DataReport:
    report.n_samples = len(rows)
    report.n_tokens = int(sum(len(s.tokens) for r in rows for s in r.seqs))
    report.n_supervised = int(sum(int(s.mask.sum()) for r in rows for s in r.seqs))
    return report


# ---- objectives --------------------------------------------------------------------------------------

def _log_sigmoid(x):
    return -np.logaddexp(0.0, -x)


def _sigmoid(x):
    return np.exp(_log_sigmoid(x))


def _log1mexp(x):
    """log(1 - exp(x)) for x < 0, stable on both sides of -log 2."""
    x = np.asarray(x, dtype=np.float64)
    return np.where(x < -math.log(2.0), np.log1p(-np.exp(x)), np.log(-np.expm1(x)))


@dataclass
class Objective:
    """An objective's value on a step's sequences and its derivatives (float64).

    ``d_logp[i][k]``: d loss / d (log-probability of record i's sequence k, summed over its completion's
    tokens); ``d_nll[i][k]``: d loss / d (cross-entropy of each token of the whole sequence k), ORPO's
    supervised term."""

    loss: float
    d_logp: np.ndarray          # (n_records, n_seqs)
    d_nll: np.ndarray           # (n_records, n_seqs)
    metrics: dict


def objective(cfg: PreferenceConfig, logp: np.ndarray, n_comp: np.ndarray, *, ref: np.ndarray | None = None,
              nll_sum: np.ndarray | None = None, n_all: np.ndarray | None = None,
              labels: np.ndarray | None = None, kl: float | None = None) -> Objective:
    """TRL's loss of ``cfg.method`` on a batch: ``logp`` (n, 2) summed completion log-probabilities (KTO:
    column 1 is the KL sequence), ``n_comp`` their completion token counts, ``ref`` the reference's
    log-probabilities, ``nll_sum``/``n_all`` (ORPO) each sequence's cross-entropy over all of its tokens
    and their count, ``labels`` (KTO) desirable or not, ``kl`` (KTO) a fixed KL estimate."""
    logp = np.asarray(logp, np.float64)
    n = logp.shape[0]
    beta = float(cfg.beta)
    d_logp, d_nll = np.zeros_like(logp), np.zeros_like(logp)
    if cfg.method == "dpo":
        ratio = logp - ref                                          # log pi/pi_ref, chosen and rejected
        delta = ratio[:, 0] - ratio[:, 1]
        if cfg.loss_type == "sigmoid":
            losses = -_log_sigmoid(beta * delta)
            dd = -beta * _sigmoid(-beta * delta)
        elif cfg.loss_type == "hinge":
            losses = np.maximum(0.0, 1.0 - beta * delta)
            dd = np.where(1.0 - beta * delta > 0, -beta, 0.0)
        elif cfg.loss_type == "robust":
            eps = float(cfg.label_smoothing)
            losses = (-(1 - eps) * _log_sigmoid(beta * delta) + eps * _log_sigmoid(-beta * delta)) / (1 - 2 * eps)
            dd = (-(1 - eps) * beta * _sigmoid(-beta * delta) - eps * beta * _sigmoid(beta * delta)) / (1 - 2 * eps)
        else:                                                       # ipo: scores averaged over tokens
            counts = np.maximum(n_comp.astype(np.float64), 1.0)
            gap = ratio[:, 0] / counts[:, 0] - ratio[:, 1] / counts[:, 1] - 1.0 / (2.0 * beta)
            losses = gap ** 2
            d_logp[:, 0], d_logp[:, 1] = 2 * gap / counts[:, 0] / n, -2 * gap / counts[:, 1] / n
        if cfg.loss_type != "ipo":
            d_logp[:, 0], d_logp[:, 1] = dd / n, -dd / n
        rewards = beta * ratio
        metrics = _reward_metrics(rewards, logp)
        return Objective(float(losses.mean()), d_logp, d_nll, metrics)
    if cfg.method == "orpo":
        counts = np.maximum(n_comp.astype(np.float64), 1.0)
        mean_logp = logp / counts                                   # TRL: average log-probabilities
        log_odds = (mean_logp[:, 0] - mean_logp[:, 1]) - (_log1mexp(mean_logp[:, 0]) - _log1mexp(mean_logp[:, 1]))
        ratio = _log_sigmoid(log_odds)
        total = float(n_all[:, 0].sum())
        nll = float(nll_sum[:, 0].sum()) / total                    # mean CE over all chosen tokens
        loss = nll - beta * float(ratio.mean())
        g = -beta * _sigmoid(-log_odds) / n                          # d loss / d log_odds
        d_logp[:, 0] = g / (1.0 - np.exp(mean_logp[:, 0])) / counts[:, 0]
        d_logp[:, 1] = -g / (1.0 - np.exp(mean_logp[:, 1])) / counts[:, 1]
        d_nll[:, 0] = 1.0 / total
        metrics = _reward_metrics(beta * mean_logp, mean_logp)
        metrics.update({"nll_loss": nll, "log_odds_ratio": float(ratio.mean()), "log_odds_chosen": float(log_odds.mean())})
        return Objective(loss, d_logp, d_nll, metrics)
    # kto: column 0 the completion, column 1 the KL sequence (no gradient)
    labels = np.asarray(labels, bool)
    if kl is None:       # TRL's estimate, without a gradient; given, it is taken as it is (tests)
        kl = max(0.0, float((logp[:, 1] - ref[:, 1]).mean()))
    ratio = logp[:, 0] - ref[:, 0]
    x = np.where(labels, beta * (ratio - kl), beta * (kl - ratio))
    weight = np.where(labels, float(cfg.desirable_weight), float(cfg.undesirable_weight))
    losses = weight * (1.0 - _sigmoid(x))
    s = _sigmoid(x)
    d_logp[:, 0] = np.where(labels, -1.0, 1.0) * weight * beta * s * (1.0 - s) / n
    rewards = beta * ratio
    metrics = {"kl": kl}
    for name, sel in (("chosen", labels), ("rejected", ~labels)):    # TRL logs only the kinds the batch has
        if sel.any():
            metrics[f"logps/{name}"] = float(logp[sel, 0].mean())
            metrics[f"rewards/{name}"] = float(rewards[sel].mean())
    if labels.any() and (~labels).any():
        metrics["rewards/margins"] = metrics["rewards/chosen"] - metrics["rewards/rejected"]
    return Objective(float(losses.mean()), d_logp, d_nll, metrics)


def _reward_metrics(rewards: np.ndarray, logps: np.ndarray) -> dict:
    return {"rewards/chosen": float(rewards[:, 0].mean()), "rewards/rejected": float(rewards[:, 1].mean()),
            "rewards/accuracies": float((rewards[:, 0] > rewards[:, 1]).mean()),
            "rewards/margins": float((rewards[:, 0] - rewards[:, 1]).mean()),
            "logps/chosen": float(logps[:, 0].mean()), "logps/rejected": float(logps[:, 1].mean())}


# ---- the method --------------------------------------------------------------------------------------

class _Pass:
    """The step's sequences collated ``batch_size`` at a time, with which loss row belongs to which sequence
    and whether its target is in the completion."""

    def __init__(self, model: BaseModel, seqs: list[Sample], full: list[bool], batch_size: int):
        self.parts = []
        for i in range(0, len(seqs), batch_size):
            chunk = seqs[i:i + batch_size]
            rows = [Row(s.tokens, _all_targets(s) if f else s.mask, None) for s, f in zip(chunk, full[i:i + batch_size])]
            b = collate(rows, model)
            T = b.tokens.shape[1]
            seq, pos = np.divmod(b.loss_rows, T)
            comp = np.array([chunk[q].mask[p + 1] for q, p in zip(seq, pos)], dtype=bool)
            self.parts.append((b, i + seq, comp))

    def sums(self, model: BaseModel, adapter: Adapter | None, f16_weights: bool, n: int):
        """(completion log-probability, completion tokens, CE over all loss rows, loss rows) per sequence."""
        logp, n_comp, ce_all, n_all = (np.zeros(n) for _ in range(4))
        for b, seq, comp in self.parts:
            ce = row_losses(model, adapter, b, f16_weights=f16_weights).astype(np.float64)
            np.add.at(logp, seq[comp], -ce[comp])
            np.add.at(n_comp, seq[comp], 1)
            np.add.at(ce_all, seq, ce)
            np.add.at(n_all, seq, 1)
        return logp, n_comp, ce_all, n_all


def is_rows(data) -> bool:
    """``data`` is already tokenized: PreferenceRows (load_preferences' output)."""
    return isinstance(data, (list, tuple)) and bool(data) and all(isinstance(r, PreferenceRow) for r in data)


def _all_targets(s: Sample) -> np.ndarray:
    mask = np.ones(len(s.tokens), dtype=bool)
    mask[0] = False
    return mask


class Preference(TrainingMethod):
    """DPO, ORPO or KTO (``PreferenceConfig.method``); a step is ``batch_size × gradient_accumulation_steps``
    records (pairs for DPO and ORPO)."""

    name = "preference"
    weights_loss_rows = True
    distributable = False      # one process: the objective of a step's records is not yet split over ranks

    def __init__(self, trainer, preference: PreferenceConfig, ref_adapter: Adapter | None = None):
        super().__init__(trainer)
        self.preference = preference
        self.ref_adapter = ref_adapter
        self._ref: dict[tuple, np.ndarray] = {}    # (row, f16_weights) -> the reference's log-probabilities
        self.check()

    def check(self) -> None:
        cfg, lora, pref, ref_adapter = self.config, self.lora_config, self.preference, self.ref_adapter
        if lora.peft_type != "lora":
            raise UnsupportedError(f"preference training trains plain LoRA, not {lora.peft_type}")
        if lora.dropout:
            raise InvalidArgumentError(f"LoRAConfig.dropout={lora.dropout}: preference training runs without "
                                       "dropout (TRL's disable_dropout=True), so that the loss weights of a step come "
                                       "from the same forward as its gradient; set dropout=0")
        if cfg.streaming or cfg.packing:
            raise UnsupportedError("preference data are neither streamed nor packed: set streaming=False, packing=None")
        if ref_adapter is not None and ref_adapter.model is not self.model:
            raise InvalidArgumentError("ref_adapter was made for another BaseModel")
        if pref.method == "orpo" and ref_adapter is not None:
            raise InvalidArgumentError("ORPO has no reference model: ref_adapter is not used")

    # ---- data ----------------------------------------------------------------------------------------

    def load(self, dataset, valid=None):
        cfg, method = self.config, self.preference.method
        kw = dict(max_seq_length=cfg.max_seq_length, truncation=cfg.truncation,
                  chat_template=self.trainer.chat_template())
        own = own_validation(dataset, valid, cfg.valid_fraction)
        if is_rows(dataset):
            train, report = self.given_rows(dataset)
        else:
            train, report = load_preferences(dataset, self.model, method, **kw)
        reports, valid_rows = {"train": report}, []
        if own:
            valid_rows, reports["valid"] = load_preferences(dataset, self.model, method, split="valid", **kw)
        elif valid is not None and is_rows(valid):
            valid_rows, reports["valid"] = self.given_rows(valid)
        elif valid is not None:
            valid_rows, reports["valid"] = load_preferences(valid, self.model, method, **kw)
        elif cfg.valid_fraction > 0:
            train, valid_rows = hold_out(train, cfg.valid_fraction, cfg.seed, report.source)
            reports = {"train": _count(report, train),
                       "valid": _count(replace(report, skipped=dict(report.skipped)), valid_rows)}
        return train, valid_rows, reports

    def eval_rows(self, data):
        return list(data) if is_rows(data) else self.load(data)[0]

    def given_rows(self, rows) -> tuple[list[PreferenceRow], DataReport]:
        kto = self.preference.method == "kto"
        for i, r in enumerate(rows):
            if len(r.seqs) != 2 or kto != isinstance(r.label, bool):
                raise InvalidArgumentError(f"rows[{i}]: a {self.preference.method} PreferenceRow holds two sequences"
                                           + (" and a bool label" if kto else " and no label"))
        return list(rows), _count(DataReport(f"<{len(rows)} PreferenceRows>", "preference", len(rows)), rows)

    def longest(self, rows) -> int:
        return max(len(s.tokens) for r in rows for s in r.seqs)

    def micro_batches(self, chosen, first_key: int = 0):
        return chosen, int(sum(len(s.tokens) for r in chosen for s in r.seqs))

    # ---- the objective -------------------------------------------------------------------------------

    def forward(self, rows: Sequence[PreferenceRow], f16_weights: bool):
        """(the pass, the Objective, supervised tokens) of ``rows`` under the adapter; the reference's
        log-probabilities are computed once per row and kept."""
        method = self.preference.method
        k = len(rows[0].seqs)
        seqs = [s for r in rows for s in r.seqs]
        full = [method == "orpo" and j % k == 0 for j in range(len(seqs))]        # ORPO's chosen: every token
        passes = _Pass(self.model, seqs, full, self.config.batch_size)
        logp, n_comp, ce_all, n_all = (v.reshape(-1, k) for v in
                                       passes.sums(self.model, self.adapter, f16_weights, len(seqs)))
        ref = None
        if method != "orpo":
            todo = [r for r in rows if (r, f16_weights) not in self._ref]
            if todo:
                sub = [s for r in todo for s in r.seqs]
                ref_pass = _Pass(self.model, sub, [False] * len(sub), self.config.batch_size)
                values = ref_pass.sums(self.model, self.ref_adapter, f16_weights, len(sub))[0].reshape(-1, k)
                self._ref.update({(r, f16_weights): v for r, v in zip(todo, values)})
            ref = np.stack([self._ref[(r, f16_weights)] for r in rows])
        labels = np.array([bool(r.label) for r in rows]) if method == "kto" else None
        obj = objective(self.preference, logp, n_comp, ref=ref, nll_sum=ce_all, n_all=n_all, labels=labels)
        supervised = n_comp[:, 0] if method == "kto" else n_comp     # KTO's KL sequences are not trained
        return passes, seqs, full, obj, int(supervised.sum())

    def accumulate(self, rows: Sequence[PreferenceRow]) -> tuple[Objective, int]:
        """The objective of ``rows`` and its gradient, added to the accumulators. Callers hold ``_lock``."""
        cfg, ctx = self.config, self.ctx
        passes, seqs, full, obj, n_tokens = self.forward(rows, ctx.f16_weights)
        d_logp, d_nll = obj.d_logp.reshape(-1), obj.d_nll.reshape(-1)
        need = np.flatnonzero((d_logp != 0) | (d_nll != 0))
        if len(need) < len(seqs):          # KTO's KL sequences, or rows whose loss is flat: no backward
            passes = _Pass(self.model, [seqs[i] for i in need], [full[i] for i in need], cfg.batch_size)
            d_logp, d_nll = d_logp[need], d_nll[need]
        for b, seq, comp in passes.parts:
            # d loss / d CE of a loss row: minus d loss / d log-probability where the target is in the
            # completion, plus ORPO's supervised term on every row of the chosen sequence
            w = d_nll[seq] - np.where(comp, d_logp[seq], 0.0)
            ctx.accumulate(Batch(b.tokens, b.segments, b.loss_rows, b.labels, loss_weights=w.astype(np.float32)), 1)
        return obj, n_tokens

    def step(self, batches, learning_rate: float, step: int, n_step_tokens=None) -> StepOutput:
        cfg, ctx = self.config, self.ctx
        with ctx._lock:
            obj, n_tokens = self.accumulate(batches)
            res = ctx.finish_step(obj.loss, n_tokens, learning_rate, step, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                  eps=cfg.adam_epsilon, weight_decay=cfg.weight_decay,
                                  max_grad_norm=cfg.max_grad_norm or None)
        return StepOutput(res.loss, res.n_tokens, res.grad_norm, not res.skipped, obj.metrics)

    def evaluate_rows(self, rows, batch_size: int, use_adapter: bool = True, f16_weights: bool = False) -> dict:
        if not use_adapter:
            raise InvalidArgumentError("a preference evaluation compares the adapter with its reference; "
                                       "adapter=False has nothing to compare")
        _, _, _, obj, _ = self.forward(rows, f16_weights)
        return {"val_loss": obj.loss, **{f"val_{k}": v for k, v in obj.metrics.items()}, "val_records": len(rows)}

    # ---- checkpoints ---------------------------------------------------------------------------------

    def trajectory(self) -> dict:
        return {"preference": self.preference.to_dict()}

    def state(self) -> dict:
        return {"preference_config": self.preference.to_dict()}

    def resume(self, state: dict, where: str) -> None:
        saved = state.get("preference_config")
        if saved != self.preference.to_dict():
            raise CheckpointError(f"{where} was trained with preference settings {saved}, not "
                                  f"{self.preference.to_dict()}; resuming would not continue the same run")

    def config_extra(self) -> dict:
        return {"preference": self.preference.to_dict()}


__all__ = ["Objective", "Preference", "PreferenceRow", "load_preferences", "objective"]
