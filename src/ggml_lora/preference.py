"""PreferenceTrainer: DPO, ORPO and KTO with TRL's definitions and option names; the loop is LoRATrainer's
and the method (two passes per step: log-probabilities, then one weighted backward) is
methods.preference.Preference, whose docstring tells a step and the data formats."""

from __future__ import annotations

from .adapter import Adapter
from .config import LoRAConfig, PreferenceConfig, TrainingConfig
from .errors import InvalidArgumentError
from .methods.preference import Objective, Preference, PreferenceRow, load_preferences, objective
from .model import BaseModel
from .trainer import LoRATrainer


class PreferenceTrainer(LoRATrainer):
    """Trains a LoRA adapter with DPO, ORPO or KTO (``PreferenceConfig.method``).

    The loop, schedule, checkpoints, exact resume, progress and reporting are LoRATrainer's; the step is
    methods.preference.Preference's: ``batch_size × gradient_accumulation_steps`` records (pairs for DPO and
    ORPO). Metrics are TRL's: rewards/chosen, rewards/rejected, rewards/accuracies, rewards/margins,
    logps/chosen, logps/rejected (ORPO adds nll_loss, log_odds_ratio, log_odds_chosen; KTO kl), and on
    validation data with ``val_``.

    >>> trainer = PreferenceTrainer(model, LoRAConfig(rank=16), TrainingConfig(max_steps=100),
    ...                             PreferenceConfig(method="dpo", beta=0.1))
    >>> trainer.train("prefs/")         # train.jsonl and valid.jsonl of {"prompt", "chosen", "rejected"}
    """

    def __init__(self, model: BaseModel, lora_config: LoRAConfig | None = None,
                 training_config: TrainingConfig | None = None, preference_config: PreferenceConfig | None = None,
                 adapter: Adapter | None = None, ref_adapter: Adapter | None = None):
        """``ref_adapter``: the reference policy of DPO and KTO is the base model with this adapter
        (e.g. the supervised one a DPO run starts from; TRL's ``ref_adapter_name``), not the bare base."""
        pref = preference_config or PreferenceConfig(method="dpo")
        if not isinstance(pref, PreferenceConfig) or pref.method == "sft":
            raise InvalidArgumentError("PreferenceTrainer needs PreferenceConfig(method='dpo' | 'orpo' | 'kto'); "
                                       "supervised training is LoRATrainer's")
        super().__init__(model, lora_config, training_config, adapter,
                         method=lambda trainer: Preference(trainer, pref, ref_adapter))
        self.preference, self.ref_adapter = pref, ref_adapter


__all__ = ["Objective", "PreferenceRow", "PreferenceTrainer", "load_preferences", "objective"]
