"""Training methods: one file each, every one a methods.base.TrainingMethod the loop (trainer.py) runs.

A new method is a new file here plus a line in METHODS; its public trainer (as PreferenceTrainer,
GRPOTrainer) is a LoRATrainer built with ``method=``.
"""

from __future__ import annotations

from .adalora import AdaLoRA
from .base import StepOutput, TrainingMethod
from .grpo import GRPO
from .preference import Preference
from .sft import SFT

# the name a config or the CLI gives (--method, peft_type) -> the method's class
METHODS: dict[str, type[TrainingMethod]] = {"sft": SFT, "adalora": AdaLoRA, "dpo": Preference, "orpo": Preference,
                                            "kto": Preference, "grpo": GRPO}


def default_method(lora_config) -> type[TrainingMethod]:
    """LoRATrainer's method when none is given: supervised training, AdaLoRA's for peft_type='adalora'."""
    return METHODS["adalora" if lora_config.peft_type == "adalora" else "sft"]


__all__ = ["METHODS", "StepOutput", "TrainingMethod", "default_method"]
