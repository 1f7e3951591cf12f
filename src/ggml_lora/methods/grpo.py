"""GRPO on a frozen GGUF base: online RL whose rollouts llama.cpp samples through the live adapter.

A generation batch is ``batch_size × gradient_accumulation_steps`` completions: that many / num_generations
prompts, each sampled ``num_generations`` times by llama.cpp from the base GGUF plus the adapter as it stands
after the last optimizer step (rollout.py). It serves ``num_iterations`` optimizer steps (TRL's μ). A step:

1. (first step of a generation batch) refresh the adapter in llama.cpp, sample, score with the reward
   functions, advantages (grpo_loss.advantages); with μ > 1 the old policy's log-probabilities and with
   beta > 0 the reference's (adapter off) come from our forward (forward.row_losses);
2. the current log-probabilities, by the same forward — skipped when the step is on-policy with beta = 0
   and the loss is not cispo: the ratio is then exactly 1 and TRL's gradient does not depend on them;
3. one weighted accumulation (``glora_batch.loss_weights``): w_t = −∂loss/∂logπ_t from grpo_loss, the
   exact gradient of TRL's loss; then clipping and the AdamW update as in supervised training.

Every log-probability, sampled or computed, is of logits / temperature (TRL, grpo_trainer.py:1068-1077): the
native forward takes the scale as ``glora_batch.logit_scale``. TRL's ``entropy`` is that of the distribution
each completion token was sampled from, which llama.cpp's logits give for free.

Over MPI (``mpiexec -n N``; batch_size per process, as in supervised training) each rank samples, scores and
back-propagates its contiguous share of the generation batch's prompts, keying each prompt's generator by its
place in the whole batch; the rollouts are gathered so that every rank computes the same advantages, loss and
row weights, and the gradients are summed before clipping and AdamW.

Data: records with a ``prompt`` (a string, or a list of messages rendered with the chat template and its
generation prompt) and any other columns, which reach the reward functions as keyword arguments (TRL's
convention, grpo_trainer.py:1584-1598). LoRA dropout must be 0 (TRL's disable_dropout): the weights come
from a forward without it.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from .._handles import Batch
from ..adapter import Adapter
from ..config import GRPOConfig
from ..data import DataReport, Row, collate, hold_out, open_source, own_validation
from ..errors import CheckpointError, DatasetError, InvalidArgumentError, RewardFunctionError, UnsupportedError
from ..grpo_loss import advantages, grpo_loss
from ..model import BaseModel
from ..forward import row_losses
from .base import StepOutput, TrainingMethod


@dataclass(frozen=True, eq=False)
class PromptRow:
    """One prompt record: its tokens, the prompt as given (for the reward functions) and its other columns."""

    tokens: np.ndarray
    prompt: object
    columns: dict = field(default_factory=dict)

    @property
    def mask(self) -> np.ndarray:           # for the data fingerprint: prompts carry no loss
        return np.zeros(len(self.tokens), dtype=bool)


# ---- data --------------------------------------------------------------------------------------------

def load_prompts(source, model: BaseModel, *, max_prompt_tokens: int, chat_template: str | None = None,
                 split: str = "train") -> tuple[list[PromptRow], DataReport]:
    """Prompt records of ``source``'s ``split``. A prompt longer than ``max_prompt_tokens`` (the context less
    max_completion_length) is an error naming the record: a rollout could not run, so it fails before any."""
    from ..chat import ChatTemplate, Tokenizer, check_messages, kind_of
    from ..gguf_header import read_header

    label, kind, items = open_source(source, split)
    if kind != "records":
        raise DatasetError(f"{label}: GRPO data are records with a 'prompt', not plain text")
    report = DataReport(label, "prompt")
    tok = Tokenizer(model)
    template = None
    rows = []
    for where, record in items:
        if record is None:
            report._skip("blank line")
            continue
        if not isinstance(record, dict) or record.get("prompt") is None:
            raise DatasetError(f"{where}: a GRPO record is an object with a 'prompt', got {kind_of(record)}"
                               + (f" with keys {sorted(map(str, record))}" if isinstance(record, dict) else ""))
        report.n_records += 1
        prompt = record["prompt"]
        if isinstance(prompt, str):
            ids, _ = tok.encode(prompt, None, where)
        elif isinstance(prompt, list):
            # the same checks as chat data, less "an assistant turn": a prompt awaits the assistant's answer
            messages = check_messages(prompt + [{"role": "assistant", "content": ""}], where)[:-1]
            if template is None:
                src = chat_template or read_header(model.path).get("tokenizer.chat_template")
                if not isinstance(src, str) or not src:
                    raise DatasetError(f"{where}: message prompts need a chat template and {model.path} has none; "
                                       "pass chat_template=")
                template = ChatTemplate(src, tok.bos_text, tok.eos_text)
            ids, _ = tok.encode(template.render(messages, add_generation_prompt=True), None, where)
        else:
            raise DatasetError(f"{where}: 'prompt' must be a string or a list of messages, got {kind_of(prompt)}")
        if not ids:
            raise DatasetError(f"{where}: the prompt has no tokens")
        if len(ids) > max_prompt_tokens:
            raise DatasetError(f"{where}: the prompt has {len(ids)} tokens; with max_completion_length it does not "
                               f"fit max_seq_length (room for {max_prompt_tokens} prompt tokens). Shorten it, raise "
                               "max_seq_length or lower max_completion_length")
        columns = {k: v for k, v in record.items() if k not in ("prompt", "completion", "completion_ids")}
        rows.append(PromptRow(np.asarray(ids, np.int32), prompt, columns))
    if not rows:
        raise DatasetError(f"{label}: no prompts ({report.n_records} records read, skipped {report.skipped})")
    return rows, _count(report, rows)


def _count(report: DataReport, rows) -> DataReport:
    report.n_samples = len(rows)
    report.n_tokens = int(sum(len(r.tokens) for r in rows))
    return report


def _name(func) -> str:
    return getattr(func, "__name__", None) or type(func).__name__


# ---- rollouts ----------------------------------------------------------------------------------------

@dataclass
class Rollouts:
    """One generation batch: N = prompts × num_generations completions, grouped by prompt."""

    prompts: list[PromptRow]
    completions: list[list[int]]
    sampled_logprobs: list[list[float]]     # llama.cpp's log-probability of each sampled token
    truncated: np.ndarray                   # (N,) stopped at max_completion_length
    mask: np.ndarray                        # (N, T) completion tokens in the loss
    adv: np.ndarray                         # (N,)
    metrics: dict
    old: np.ndarray | None = None           # (N, T) μ > 1: the old policy's log-probabilities
    ref: np.ndarray | None = None           # (N, T) beta > 0: the reference's
    entropy: np.ndarray | None = None       # (N, T) entropy of the distribution each token was drawn from


class GRPO(TrainingMethod):
    """GRPO's data (prompt records), rollouts (llama.cpp through the live adapter), rewards, loss and step
    (see the module docstring); its trainer is grpo.GRPOTrainer."""

    name = "grpo"
    weights_loss_rows = True
    # over MPI each rank generates, scores and back-propagates its share of a step's prompts (a contiguous
    # run); the rollouts are then gathered so that every rank computes the same advantages, loss and weights
    distributable = True

    def __init__(self, trainer, reward_funcs, grpo: GRPOConfig):
        super().__init__(trainer)
        self.grpo, self.reward_funcs = grpo, reward_funcs
        self.reward_names = [_name(f) for f in reward_funcs]
        self.reward_weights = np.asarray(grpo.reward_weights or [1.0] * len(reward_funcs), np.float64)
        self._sampler = None
        self._rollouts: tuple[int, Rollouts] | None = None      # (generation cycle, its batch)
        self._num_tokens = 0                                     # TRL's num_tokens: prompt + completion, cumulative
        self.last_rollouts: Rollouts | None = None
        self._check()

    def _check(self) -> None:
        cfg, g, lora = self.config, self.grpo, self.lora_config
        if lora.peft_type != "lora":
            raise UnsupportedError(f"GRPO trains plain LoRA, not {lora.peft_type}")
        if lora.dropout:
            raise InvalidArgumentError(f"LoRAConfig.dropout={lora.dropout}: GRPO runs without dropout (TRL's "
                                       "disable_dropout=True): the loss weights come from a forward without it")
        if cfg.streaming or cfg.packing:
            raise UnsupportedError("GRPO prompts are neither streamed nor packed: set streaming=False, packing=None")
        if cfg.rows_per_step % g.num_generations:
            raise InvalidArgumentError(
                f"batch_size x gradient_accumulation_steps = {cfg.rows_per_step} completions per step is not a "
                f"multiple of num_generations={g.num_generations} (TRL: grpo_config.py:1131-1141)")
        if g.max_completion_length >= cfg.max_seq_length:
            raise InvalidArgumentError(f"max_completion_length={g.max_completion_length} leaves no room for a prompt "
                                       f"in max_seq_length={cfg.max_seq_length}")
        if cfg.max_seq_length > self.model.n_ctx:
            raise InvalidArgumentError(f"max_seq_length={cfg.max_seq_length} exceeds the model's n_ctx="
                                       f"{self.model.n_ctx}")

    def close(self) -> None:
        if self._sampler is not None:
            self._sampler.close()
            self._sampler = None

    @property
    def prompts_per_step(self) -> int:
        """Prompts of a generation batch: batch_size x gradient_accumulation_steps completions per process
        (batch_size is per process, as in supervised training), num_generations per prompt."""
        return self.config.rows_per_step * self.trainer.comm.size // self.grpo.num_generations

    # ---- data ----------------------------------------------------------------------------------------

    def load(self, dataset, valid=None):
        cfg = self.config
        kw = dict(max_prompt_tokens=cfg.max_seq_length - self.grpo.max_completion_length,
                  chat_template=self.trainer.chat_template())
        if isinstance(dataset, (list, tuple)) and dataset and all(isinstance(r, PromptRow) for r in dataset):
            train, report = list(dataset), _count(DataReport(f"<{len(dataset)} PromptRows>", "prompt"), dataset)
        else:
            train, report = load_prompts(dataset, self.model, **kw)
        reports, valid_rows = {"train": report}, []
        if own_validation(dataset, valid, cfg.valid_fraction):
            valid_rows, reports["valid"] = load_prompts(dataset, self.model, split="valid", **kw)
        elif valid is not None:
            valid_rows, reports["valid"] = load_prompts(valid, self.model, **kw)
        elif cfg.valid_fraction > 0:
            train, valid_rows = hold_out(train, cfg.valid_fraction, cfg.seed, report.source)
            reports = {"train": _count(report, train), "valid": _count(DataReport(report.source, "prompt"), valid_rows)}
        return train, valid_rows, reports

    def longest(self, rows) -> int:
        return min(max(len(r.tokens) for r in rows) + self.grpo.max_completion_length, self.config.max_seq_length)

    def steps_per_epoch(self, n_rows: int) -> int:
        return math.ceil(n_rows / self.prompts_per_step) * self.grpo.num_iterations

    def step_rows(self, rows, step: int, steps_per_epoch: int):
        """The prompts of ``step``'s generation batch: each serves num_iterations consecutive steps."""
        mu = self.grpo.num_iterations
        cycle = (step - 1) // mu
        cycles_per_epoch = steps_per_epoch // mu
        epoch, j = divmod(cycle, cycles_per_epoch)
        order = np.random.default_rng([self.config.seed, epoch]).permutation(len(rows))
        n = self.prompts_per_step
        chosen = [rows[i] for i in order[j * n:(j + 1) * n]]
        return (cycle, chosen), sum(len(r.tokens) for r in chosen), None, (step - 1) / steps_per_epoch

    # ---- rollouts ------------------------------------------------------------------------------------

    def _sampler_for(self):
        if self._sampler is None:
            from ..rollout import Sampler

            g = self.grpo
            # a whole generation batch at once: its prompts x num_generations sequences (llama.cpp allows 256)
            n_prompts = max(1, min(self.config.rows_per_step // g.num_generations, 256 // g.num_generations))
            cells = n_prompts * (self.config.max_seq_length + (g.num_generations - 1) * g.max_completion_length)
            self._sampler = Sampler(self.model.path, n_seq=n_prompts * g.num_generations, n_ctx=cells,
                                    n_threads=self.config.n_threads or self.model.n_threads, seed=self.config.seed)
        return self._sampler

    def sample(self, prompts: Sequence[PromptRow], seed_key: Sequence[int],
               adapter_scale: float = 1.0, first_index: int = 0) -> tuple[list, list, list, list | None]:
        """(completion ids, llama.cpp log-probabilities, truncated, entropies per token or None) of
        num_generations completions per prompt, sampled through the adapter as it is now (``adapter_scale``
        0: the base model); log-probabilities and entropies are of logits / temperature, unfiltered.
        Prompt i draws from the generator keyed (seed_key, first_index + i): a rank sampling its share of
        a batch from ``first_index`` on draws as one process sampling the whole batch would."""
        g = self.grpo
        sampler = self._sampler_for()
        sampler.set_adapter(self.adapter, adapter_scale)
        ids, lps, trunc, ent = [], [], [], []
        per_call = sampler.n_seq // g.num_generations
        for at in range(0, len(prompts), per_call):
            chunk = prompts[at:at + per_call]
            rngs = [np.random.default_rng([*seed_key, first_index + at + i]) for i in range(len(chunk))]
            for group in sampler.sample_many([p.tokens.tolist() for p in chunk], g.num_generations,
                                             g.max_completion_length, rngs, temperature=g.temperature,
                                             top_k=g.top_k, top_p=g.top_p, min_p=g.min_p):
                for c in group:
                    ids.append(c.ids)
                    lps.append(c.logprobs)
                    trunc.append(c.truncated)
                    ent.append(c.entropies)
        return ids, lps, trunc, ent

    def _share(self, n: int) -> tuple[int, int]:
        """[first, last) of this rank's contiguous share of ``n`` prompts (all of them in one process)."""
        comm = self.trainer.comm
        return n * comm.rank // comm.size, n * (comm.rank + 1) // comm.size

    def _sample_all(self, prompts: Sequence[PromptRow], seed_key: Sequence[int], adapter_scale: float = 1.0):
        """``sample`` of every prompt, each rank sampling its share, then gathered in prompt order; with the
        rewards of every completion (each rank scores what it sampled)."""
        comm = self.trainer.comm
        if comm.size == 1:
            ids, lps, trunc, ent = self.sample(prompts, seed_key, adapter_scale)
            rep = [p for p in prompts for _ in range(self.grpo.num_generations)]
            return ids, lps, trunc, ent, self.score(rep, ids)
        first, last = self._share(len(prompts))
        mine = list(prompts[first:last])
        ids, lps, trunc, ent = self.sample(mine, seed_key, adapter_scale, first_index=first) if mine else ([],) * 4
        rewards = self.score([p for p in mine for _ in range(self.grpo.num_generations)], ids) if mine else \
            np.zeros((0, len(self.reward_funcs)))
        parts = comm.allgather((ids, lps, trunc, ent, rewards))
        return ([x for part in parts for x in part[0]], [x for part in parts for x in part[1]],
                [x for part in parts for x in part[2]], [x for part in parts for x in part[3]],
                np.concatenate([part[4] for part in parts]))

    def _mine(self, ro: Rollouts) -> np.ndarray:
        """(N,) which completions of ``ro`` this rank computes: those of its share of the prompts."""
        first, last = self._share(len(ro.prompts))
        g = self.grpo.num_generations
        mine = np.zeros(len(ro.completions), dtype=bool)
        mine[first * g:last * g] = True
        return mine

    def _is_eog(self, token: int) -> bool:
        """An end-of-generation token of the model's vocabulary (EOS, EOT, ...)."""
        import llama_cpp

        return bool(llama_cpp.llama_vocab_is_eog(self.model._llama_vocab()._model.vocab, int(token)))

    def _texts(self, prompts: Sequence[PromptRow], completions: list[list[int]]) -> list:
        eog = self._is_eog
        out = []
        for p, ids in zip(prompts, completions):
            text = self.model.detokenize([t for t in ids if not eog(t)])     # TRL: skip_special_tokens=True
            out.append([{"role": "assistant", "content": text}] if isinstance(p.prompt, list) else text)
        return out

    def score(self, prompts: Sequence[PromptRow], completions: list[list[int]]) -> np.ndarray:
        """(completions × reward functions) rewards, NaN for None; TRL's call (grpo_trainer.py:1579-1662)."""
        texts = self._texts(prompts, completions)
        keys = sorted({k for p in prompts for k in p.columns})
        columns = {k: [p.columns.get(k) for p in prompts] for k in keys}
        out = np.full((len(prompts), len(self.reward_funcs)), np.nan)
        for j, (f, name) in enumerate(zip(self.reward_funcs, self.reward_names)):
            def call(sel):
                return f(prompts=[prompts[i].prompt for i in sel], completions=[texts[i] for i in sel],
                         completion_ids=[completions[i] for i in sel],
                         **{k: [v[i] for i in sel] for k, v in columns.items()})
            try:
                values = call(range(len(prompts)))
            except Exception as e:
                bad = _first_failing(call, len(prompts))
                where = (f" on sample {bad} (prompt {prompts[bad].prompt!r:.120}, completion {texts[bad]!r:.120})"
                         if bad is not None else f" on a batch of {len(prompts)} samples")
                raise RewardFunctionError(f"reward function {name!r} raised {type(e).__name__}: {e}{where}") from e
            if isinstance(values, np.ndarray):
                values = values.tolist()
            if not isinstance(values, (list, tuple)) or len(values) != len(prompts):
                got = f"{len(values)} values" if isinstance(values, (list, tuple)) else type(values).__name__
                raise RewardFunctionError(f"reward function {name!r} returned {got} for {len(prompts)} completions; "
                                          "it must return one float or None per completion (TRL: grpo_trainer.py:"
                                          "1631-1636)")
            for i, v in enumerate(values):
                if v is None:
                    continue
                number = isinstance(v, (int, float, np.floating, np.integer)) and not isinstance(v, bool)
                if not number or not math.isfinite(v):
                    raise RewardFunctionError(f"reward function {name!r} returned {v!r} for sample {i} (prompt "
                                              f"{prompts[i].prompt!r:.120}, completion {texts[i]!r:.120}); expected "
                                              "a finite float or None")
                out[i, j] = float(v)
        return out

    def _generate(self, cycle: int, prompts: list[PromptRow]) -> Rollouts:
        g, cfg = self.grpo, self.config
        t0 = time.perf_counter()
        ids, lps, trunc, ent, rewards = self._sample_all(prompts, (cfg.seed, cycle))
        t_gen = time.perf_counter() - t0
        rep = [p for p in prompts for _ in range(g.num_generations)]
        adv, metrics = advantages(g, rewards, self.reward_weights, self.reward_names)
        trunc = np.array(trunc, dtype=bool)
        T = max(len(c) for c in ids)
        mask = np.zeros((len(ids), T))
        for i, c in enumerate(ids):
            mask[i, :len(c)] = 0.0 if (g.mask_truncated_completions and trunc[i]) else 1.0
        lengths = np.array([len(c) for c in ids], np.float64)
        term = lengths[~trunc] if (~trunc).any() else np.zeros(1)
        self._num_tokens += int(sum(len(p.tokens) for p in rep) + lengths.sum())
        metrics.update({"num_tokens": self._num_tokens, "completions/mean_length": float(lengths.mean()),
                        "completions/min_length": float(lengths.min()), "completions/max_length": float(lengths.max()),
                        "completions/clipped_ratio": float(trunc.mean()),
                        "completions/mean_terminated_length": float(term.mean()),
                        "completions/min_terminated_length": float(term.min()),
                        "completions/max_terminated_length": float(term.max()),
                        "time/generation_s": t_gen,
                        "time/adapter_refresh_s": self._sampler.refresh_s if self._sampler else 0.0,
                        "generation_tokens_per_s": float(lengths.sum() / t_gen) if t_gen > 0 else 0.0})
        ro = Rollouts(prompts, ids, lps, trunc, mask, adv, metrics)
        if ent is not None:
            ro.entropy = np.zeros(mask.shape)
            for i, e in enumerate(ent):
                ro.entropy[i, :len(e)] = e
        t1 = time.perf_counter()
        # through the forward the gradient is taken of (F16 copies when training uses them), so that an
        # unchanged policy has ratio 1 and KL 0 exactly
        f16 = self.ctx.f16_weights
        if g.num_iterations > 1:              # TRL computes them when generation and steps misalign (tr:2642-2657)
            ro.old = self.logps(ro, self.adapter, f16)
        if g.beta != 0.0:                     # the base model: a PEFT adapter switched off (tr:2723-2737)
            ro.ref = self.logps(ro, None, f16)
        ro.metrics["time/old_ref_logps_s"] = time.perf_counter() - t1
        return ro

    # ---- forward and step ----------------------------------------------------------------------------

    def _passes(self, ro: Rollouts, need: np.ndarray | None = None):
        """(Batch, completion indices, token indices) per micro-batch of batch_size completions; loss rows are
        the completion tokens in the mask, in (completion, token) order as collate emits them."""
        out = []
        bs = self.config.batch_size
        keep = [i for i in range(len(ro.completions)) if ro.mask[i].any() and (need is None or need[i])]
        for at in range(0, len(keep), bs):
            idx = keep[at:at + bs]
            rows, seq, tok = [], [], []
            for i in idx:
                p = ro.prompts[i // self.grpo.num_generations].tokens
                c = np.asarray(ro.completions[i], np.int32)
                m = np.concatenate([np.zeros(len(p), bool), ro.mask[i, :len(c)] > 0])
                rows.append(Row(np.concatenate([p, c]), m, None))
                t = np.flatnonzero(ro.mask[i, :len(c)] > 0)
                seq.append(np.full(len(t), i))
                tok.append(t)
            # padded, not packed: a packed micro-batch of 16 completions (16 segments) aborted ggml's allocator
            # in the backward ("out of free blocks", ggml-alloc.c:136) on SmolLM2
            b = collate(rows, self.model)
            # TRL scores the sampled tokens with logits / temperature (grpo_trainer.py:1068-1077)
            b = Batch(b.tokens, b.segments, b.loss_rows, b.labels, logit_scale=1.0 / self.grpo.temperature)
            out.append((b, np.concatenate(seq), np.concatenate(tok)))
        return out

    def logps(self, ro: Rollouts, adapter: Adapter | None, f16_weights: bool = False) -> np.ndarray:
        """(N, T) log-probabilities of the completion tokens under ``adapter`` (None: the base model); over
        MPI each rank computes its share's and the ranks sum their (disjoint) parts."""
        comm = self.trainer.comm
        out = np.zeros(ro.mask.shape)
        for b, seq, tok in self._passes(ro, self._mine(ro) if comm.size > 1 else None):
            out[seq, tok] = -row_losses(self.model, adapter, b, f16_weights=f16_weights).astype(np.float64)
        if comm.size > 1:
            comm.allreduce(out)
        return out

    def step(self, batches, lr: float, step: int, n_step_tokens=None) -> StepOutput:
        cfg, g, ctx = self.config, self.grpo, self.ctx
        cycle, prompts = batches
        t0 = time.perf_counter()
        with ctx._lock:
            if self._rollouts is None or self._rollouts[0] != cycle:     # also after a resume: TRL regenerates
                self._rollouts = (cycle, self._generate(cycle, prompts))
            ro = self.last_rollouts = self._rollouts[1]
            first = (step - 1) % g.num_iterations == 0
            on_policy = ro.old is None        # TRL: old = logp.detach() (tr:3066), the ratio exactly 1
            t1 = time.perf_counter()
            need_logp = not on_policy or g.beta != 0.0 or g.loss_type == "cispo"
            logp = self.logps(ro, self.adapter, ctx.f16_weights) if need_logp else np.zeros(ro.mask.shape)
            t_logp = time.perf_counter() - t1
            bs = cfg.batch_size
            micro = [np.arange(i, min(i + bs, len(ro.completions))) for i in range(0, len(ro.completions), bs)]
            out = grpo_loss(g, logp, ro.mask, ro.adv, old=None if on_policy else ro.old, ref=ro.ref, micro=micro,
                            entropy=ro.entropy if first else None)
            t2 = time.perf_counter()
            need = (out.d_logp != 0).any(axis=1)           # zero-advantage groups need no backward
            if self.trainer.comm.size > 1:
                need &= self._mine(ro)                      # this rank's share of the gradient
            for b, seq, tok in self._passes(ro, need):
                w = -out.d_logp[seq, tok]                   # CE = -logp
                ctx.accumulate(Batch(b.tokens, b.segments, b.loss_rows, b.labels, loss_weights=w.astype(np.float32),
                                     logit_scale=b.logit_scale), 1)
            n_tokens = int(ro.mask.sum())
            if self.trainer.comm.size > 1:
                self.trainer.reduce(0.0)                    # the ranks' gradients summed (the loss is everyone's)
            res = ctx.finish_step(out.loss, n_tokens, lr, step, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                  eps=cfg.adam_epsilon, weight_decay=cfg.weight_decay,
                                  max_grad_norm=cfg.max_grad_norm or None)
            t3 = time.perf_counter()
        # the generation batch's metrics (rewards, lengths, generation time) belong to the step that made it,
        # as in TRL, which stores them only when it generates (tr:2293-2320, 2821-2830). So does entropy, which
        # comes from the logits that sampled: the policy TRL's step evaluates then; on a batch's later
        # iterations (num_iterations > 1) TRL's would be of the updated policy, which we do not compute
        metrics = {**(ro.metrics if first else {}), **out.metrics, "time/logps_s": t_logp,
                   "time/train_s": t3 - t2, "step_time": t3 - t0}
        return StepOutput(res.loss, res.n_tokens, res.grad_norm, not res.skipped, metrics)

    # ---- evaluation ----------------------------------------------------------------------------------

    def evaluate_rows(self, rows, batch_size: int, use_adapter: bool = True, f16_weights: bool = False) -> dict:
        """Mean reward of num_generations completions per held-out prompt, sampled with a fixed seed (the same
        draws for the same policy), through the adapter or, with use_adapter=False, the base model."""
        ids, _, trunc, _, rewards = self._sample_all(rows, (self.config.seed, 2**31 - 1), 1.0 if use_adapter else 0.0)
        _, m = advantages(self.grpo, rewards, self.reward_weights, self.reward_names)
        out = {f"val_{k}": v for k, v in m.items()}
        out["val_completions/mean_length"] = float(np.mean([len(c) for c in ids]))
        out["val_completions/clipped_ratio"] = float(np.mean(trunc))
        out["val_prompts"] = len(rows)
        return out

    def eval_rows(self, data) -> list:
        return list(data) if data and all(isinstance(r, PromptRow) for r in data) else self.load(data)[0]

    def eval_message(self, rec: dict) -> str:
        return f"step {rec['step']}: held-out reward {rec['val_reward']:.4f} (std {rec['val_reward_std']:.4f})"

    # ---- checkpoints ---------------------------------------------------------------------------------

    def trajectory(self) -> dict:
        return {"grpo": self.grpo.to_dict(), "reward_funcs": self.reward_names}

    def state(self) -> dict:
        return {"grpo_config": self.grpo.to_dict(), "reward_funcs": self.reward_names, "num_tokens": self._num_tokens}

    def resume(self, state: dict, where: str) -> None:
        saved = state.get("grpo_config")
        if saved != json.loads(json.dumps(self.grpo.to_dict())):        # as stored: reward_weights a list
            raise CheckpointError(f"{where} was trained with GRPO settings {saved}, not "
                                  f"{self.grpo.to_dict()}; resuming would not continue the same run")
        self._num_tokens = int(state.get("num_tokens", 0))

    def config_extra(self) -> dict:
        return {"grpo": self.grpo.to_dict(), "reward_funcs": self.reward_names}


def _first_failing(call: Callable, n: int) -> int | None:
    """The first sample on which ``call`` raises when given alone."""
    for i in range(n):
        try:
            call([i])
        except Exception:
            return i
    return None


__all__ = ["GRPO", "PromptRow", "Rollouts", "load_prompts"]
