"""GRPOTrainer: online RL with TRL's GRPOTrainer's options, rewards and metrics; the loop is LoRATrainer's
and the method (rollouts by llama.cpp through the live adapter, rewards, TRL's losses) is
methods.grpo.GRPO, whose docstring tells a step."""

from __future__ import annotations

import inspect
from collections.abc import Sequence

import numpy as np

from .adapter import Adapter
from .config import GRPOConfig, LoRAConfig, TrainingConfig
from .errors import InvalidArgumentError, UnsupportedError
from .methods.grpo import GRPO, PromptRow, Rollouts, load_prompts
from .model import BaseModel
from .trainer import LoRATrainer


class GRPOTrainer(LoRATrainer):
    """Trains a LoRA adapter with GRPO (TRL's GRPOTrainer: option names, losses, rewards and metrics).

    ``reward_funcs``: a callable or a list of them with TRL's signature ``f(prompts, completions,
    completion_ids, **columns) -> list[float | None]`` (None: this function does not score that
    completion). Completions are strings for string prompts and ``[{"role": "assistant", "content": text}]``
    for message prompts, as in TRL.

    >>> trainer = GRPOTrainer(model, [format_reward, answer_reward], LoRAConfig(rank=16),
    ...                       TrainingConfig(max_steps=50, batch_size=8), GRPOConfig(num_generations=8))
    >>> trainer.train("prompts.jsonl")
    """

    def __init__(self, model: BaseModel, reward_funcs, lora_config: LoRAConfig | None = None,
                 training_config: TrainingConfig | None = None, grpo_config: GRPOConfig | None = None,
                 adapter: Adapter | None = None):
        funcs = list(reward_funcs) if isinstance(reward_funcs, (list, tuple)) else [reward_funcs]
        cfg = grpo_config or GRPOConfig()
        if not isinstance(cfg, GRPOConfig):
            raise InvalidArgumentError("GRPOTrainer needs a GRPOConfig")
        if not funcs or not all(callable(f) for f in funcs):
            raise InvalidArgumentError("reward_funcs: one callable or a list of callables f(prompts, completions, "
                                       "completion_ids, **columns) -> list[float | None]")
        if any(inspect.iscoroutinefunction(f) for f in funcs):
            raise UnsupportedError("async reward functions are not supported yet: pass plain functions")
        if cfg.reward_weights is not None and len(cfg.reward_weights) != len(funcs):
            raise InvalidArgumentError(f"GRPOConfig.reward_weights has {len(cfg.reward_weights)} weights for "
                                       f"{len(funcs)} reward functions")
        super().__init__(model, lora_config, training_config, adapter,
                         method=lambda trainer: GRPO(trainer, funcs, cfg))
        self.grpo, self.reward_funcs = cfg, funcs

    @property
    def prompts_per_step(self) -> int:
        return self.method.prompts_per_step

    @property
    def last_rollouts(self) -> Rollouts | None:
        """The newest generation batch (prompts, completions, rewards' advantages, metrics)."""
        return self.method.last_rollouts

    def sample(self, prompts: Sequence[PromptRow], seed_key: Sequence[int],
               adapter_scale: float = 1.0) -> tuple[list, list, list, list | None]:
        """(completion ids, llama.cpp log-probabilities, truncated, entropies per token or None) of
        num_generations completions per prompt, sampled through the adapter as it is now (``adapter_scale``
        0: the base model); log-probabilities and entropies are of logits / temperature, unfiltered."""
        return self.method.sample(prompts, seed_key, adapter_scale)

    def score(self, prompts: Sequence[PromptRow], completions: list[list[int]]) -> np.ndarray:
        """(completions × reward functions) rewards, NaN for None (TRL's call)."""
        return self.method.score(prompts, completions)

    def logps(self, ro: Rollouts, adapter: Adapter | None, f16_weights: bool = False) -> np.ndarray:
        """(N, T) log-probabilities of the completion tokens under ``adapter`` (None: the base model)."""
        return self.method.logps(ro, adapter, f16_weights)


__all__ = ["GRPOTrainer", "PromptRow", "Rollouts", "load_prompts"]
