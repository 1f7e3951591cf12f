"""ggml-lora's GRPO against TRL's GRPOTrainer on PEFT, step by step, from the same prompts, completions,
rewards and initial adapter, with generation bypassed on both sides.

TRL 1.16's own trainer runs (trl/trainer/grpo_trainer.py, "tr:"): its ``rollout_func`` hook (tr:2200-2218)
returns the fixed token ids instead of generating, and one reward function looks the fixed rewards up by
(prompt, completion ids). Everything after generation is TRL's: rewards, advantages (tr:2756-2830),
old/reference log-probabilities (tr:2642-2737), the loss (tr:3020-3288), AdamW. Our side is GRPOTrainer
with its ``sample`` replaced by the same table. Both start from the same lora_A (ours, seeded) and B = 0.

Conventions that make the two comparable:
- every prompt has the same number of tokens: TRL left-pads prompts and transformers' llama derives
  positions from the cache position, not the mask, so padding would shift the real tokens' positions;
- one micro-batch per step (per_device_train_batch_size = all completions, no accumulation), so TRL's
  shuffle of the generation batch (tr:1545) cannot change any normaliser;
- float32 on the CPU, constant learning rate, no clipping, no weight decay, dropout 0.

``compare`` returns per-step losses and metrics from both, and the largest differences of the LoRA
weights after the last step: lora_A of every module, lora_B of v_proj (lora_B of q/k is stored with its
rows permuted by llama's HF -> GGUF conversion, so it is compared through A's agreement instead).
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")       # rollout_func is marked experimental

METRICS = ("reward", "reward_std", "frac_reward_zero_std", "completions/mean_length", "completions/clipped_ratio",
           "clip_ratio/region_mean", "clip_ratio/low_mean", "clip_ratio/high_mean", "kl", "entropy")


def _table(rollouts):
    """{(prompt text, completion ids): rewards} and {prompt text: (prompt ids, [completion ids])}."""
    rewards, by_prompt = {}, {}
    for i, r in enumerate(rollouts):
        key = f"p{i}"
        by_prompt[key] = (list(r["prompt_ids"]), [list(c) for c in r["completions"]])
        for c, v in zip(r["completions"], r["rewards"]):
            rewards[(key, tuple(c))] = v
    return rewards, by_prompt


def _reward_funcs(rewards, n_funcs):
    funcs = []
    for j in range(n_funcs):
        def f(prompts, completions, completion_ids, _j=j, **kw):
            return [rewards[(p, tuple(c))][_j] for p, c in zip(prompts, completion_ids)]
        f.__name__ = f"table{j}"
        funcs.append(f)
    return funcs


def trl_grpo(gguf_path, rollouts, *, steps: int, learning_rate: float, rank: int, alpha: float,
             target_modules, lora_a: dict, grpo: dict) -> tuple[list[dict], dict]:
    """(per-step records: loss and TRL's metrics, {PEFT module: (lora_A, lora_B)} after the last step)."""
    import datasets
    import peft
    import torch
    from transformers import AutoTokenizer, PrinterCallback
    from trl import GRPOConfig, GRPOTrainer

    from trl_reference import _load_float32, _set_lora_a

    path = Path(gguf_path)
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = _load_float32(path)
    rewards, by_prompt = _table(rollouts)
    G = len(rollouts[0]["completions"])
    n_funcs = len(rollouts[0]["rewards"][0])

    def rollout_func(prompts, trainer):
        seen: dict[str, int] = {}
        pids, cids = [], []
        for p in prompts:
            k = seen.get(p, 0)
            seen[p] = k + 1
            pids.append(by_prompt[p][0])
            cids.append(by_prompt[p][1][k])
        return {"prompt_ids": pids, "completion_ids": cids, "logprobs": [[0.0] * len(c) for c in cids]}

    records: list[dict] = []

    class Exact(GRPOTrainer):
        """Records each step's loss and metrics as floats: transformers hands callbacks its logs formatted
        to 4 significant digits, too coarse for this comparison."""

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            if self.model.training:
                self._last_loss = float(loss.detach())
            return loss

        def log(self, logs, start_time=None):
            if "loss" in logs:       # GRPOTrainer.log averages what it stored since the last log (tr:3302-3317)
                records.append({"step": self.state.global_step, "loss": self._last_loss,
                                **{k: float(np.mean(v)) for k, v in self._metrics["train"].items()}})
            return super().log(logs, start_time)

    lora = peft.LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(target_modules), lora_dropout=0.0,
                           bias="none", task_type="CAUSAL_LM")
    with tempfile.TemporaryDirectory(prefix="grpo_trl.") as out:
        args = GRPOConfig(output_dir=out, per_device_train_batch_size=G * len(rollouts), gradient_accumulation_steps=1,
                          num_generations=G, max_steps=steps, learning_rate=learning_rate, lr_scheduler_type="constant",
                          warmup_steps=0, optim="adamw_torch", adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8,
                          weight_decay=0.0, max_grad_norm=0.0, logging_steps=1, save_strategy="no", report_to="none",
                          seed=0, data_seed=0, bf16=False, fp16=False, use_cpu=True, disable_dropout=True,
                          dataloader_num_workers=0, **{"temperature": 1.0, **grpo})
        dataset = datasets.Dataset.from_list([{"prompt": k} for k in by_prompt])
        trainer = Exact(model=model, reward_funcs=_reward_funcs(rewards, n_funcs), args=args, train_dataset=dataset,
                        processing_class=tokenizer, peft_config=lora, rollout_func=rollout_func)
        trainer.remove_callback(PrinterCallback)
        _set_lora_a(trainer.model, lora_a)
        trainer.train()
    weights = {}
    for name, m in trainer.model.base_model.model.named_modules():
        if hasattr(m, "lora_A") and "default" in getattr(m, "lora_A", {}):
            weights[name] = (m.lora_A["default"].weight.detach().numpy().copy(),
                             m.lora_B["default"].weight.detach().numpy().copy())
    return records, weights


def ours_grpo(model, rollouts, *, steps: int, learning_rate: float, rank: int, alpha: float, target_modules,
              grpo: dict, seed: int = 0) -> tuple[list[dict], dict, dict]:
    """(per-step records, {PEFT module: (lora_A, lora_B)} after the last step, the initial lora_A)."""
    from ggml_lora import Adapter, GRPOConfig, GRPOTrainer, LoRAConfig, TrainingConfig
    from ggml_lora.arch import hf_module
    from ggml_lora.grpo import PromptRow

    rewards, by_prompt = _table(rollouts)
    n_funcs = len(rollouts[0]["rewards"][0])
    rows = [PromptRow(np.asarray(ids, np.int32), key) for key, (ids, _) in by_prompt.items()]
    G = len(rollouts[0]["completions"])
    lora = LoRAConfig(rank=rank, alpha=alpha, target_modules=tuple(target_modules), seed=seed)
    adapter = Adapter.init(model, lora)
    lora_a = {hf_module(t): adapter.get(t)[0].copy() for t in adapter.targets}
    longest = max(len(ids) + max(map(len, cs)) for ids, cs in by_prompt.values())
    with tempfile.TemporaryDirectory() as out:
        cfg = TrainingConfig(max_steps=steps, batch_size=G * len(rollouts), learning_rate=learning_rate,
                             lr_scheduler="constant", max_grad_norm=0.0, weight_decay=0.0, eval_every=0, save_every=0,
                             progress=False, output_dir=out, f16_weights=False,
                             max_seq_length=max(longest, grpo.get("max_completion_length", 512)) + 1)
        with GRPOTrainer(model, _reward_funcs(rewards, n_funcs), lora, cfg, GRPOConfig(num_generations=G, **grpo),
                         adapter=adapter) as trainer:
            def sample(prompts, seed_key, adapter_scale=1.0, first_index=0):
                ids = [c for p in prompts for c in by_prompt[p.prompt][1]]
                trunc = [not trainer.method._is_eog(c[-1]) for c in ids]
                return ids, [[0.0] * len(c) for c in ids], trunc, [_entropies(model, trainer, p, c) for p, c in
                                                                  zip([p for p in prompts for _ in range(G)], ids)]
            trainer.method.sample = sample
            history = trainer.train(rows)
        weights = {hf_module(t): adapter.get(t) for t in adapter.targets}
    adapter.close()
    return history.steps, weights, lora_a


def _entropies(model, trainer, prompt, ids) -> list[float]:
    """What the sampler reports for a completion: the entropy of the current policy's logits / temperature at
    each completion token, here from our logits forward (the sampler's are llama.cpp's)."""
    from ggml_lora.rollout import _log_softmax

    toks = np.asarray(prompt.tokens.tolist() + list(ids))
    logits = np.asarray(model.logits(toks, trainer.adapter)).reshape(len(toks), -1)
    rows = logits[len(prompt.tokens) - 1:len(toks) - 1].astype(np.float64) / trainer.grpo.temperature
    return [float(-(np.exp(lp) * lp).sum()) for lp in map(_log_softmax, rows)]


def compare(model_path, rollouts, *, n_threads: int | None = None, **kw) -> dict:
    from ggml_lora import BaseModel

    with BaseModel.load(model_path, n_threads=n_threads) as model:
        mine, w_ours, lora_a = ours_grpo(model, rollouts, **kw)
    kw.pop("seed", None)
    theirs, w_trl = trl_grpo(model_path, rollouts, lora_a=lora_a, **kw)
    if len(theirs) != len(mine):
        raise AssertionError(f"TRL logged {len(theirs)} steps, ours {len(mine)}")
    # TRL logs the generation batch's metrics only on the step that generated it, as we do
    # entropy: ours is of the policy that sampled, logged on the step that generated (TRL logs it every step)
    steps = [{"step": a["step"], **{n: [a.get(n), b[n]] for n in ("loss",) + METRICS
                                    if n in b and (n != "entropy" or n in a)}}
             for a, b in zip(mine, theirs)]
    diff = {}
    for name, (a, b) in w_trl.items():
        oa, ob = w_ours[name]
        scale_a = float(np.abs(a - lora_a[name]).max())           # how far TRL's A moved
        diff[name] = {"A_max_abs": float(np.abs(oa - a).max()), "A_moved": scale_a}
        if name.endswith("v_proj"):
            diff[name].update(B_max_abs=float(np.abs(ob - b).max()), B_max=float(np.abs(b).max()))
    return {"steps": steps, "weights": diff}
