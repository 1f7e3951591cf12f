"""AdaLoRA as a method: supervised training whose step runs the AdaLoRA update and rank allocator
(adalora.AdaLoRA, PEFT's AdaLoraModel) and whose saved adapter holds a rank of its own per tensor."""

from __future__ import annotations

import json
from pathlib import Path

from ..adapter import Adapter
from ..adalora import AdaLoRA as AdaLoRAState
from ..errors import InvalidArgumentError
from .sft import SFT


class AdaLoRA(SFT):
    name = "adalora"
    display_name = "AdaLoRA"
    distributable = False       # the allocator's importance scores are not yet reduced over ranks

    def __init__(self, trainer):
        if not trainer._own_adapter:
            raise InvalidArgumentError("AdaLoRA trains its own adapter: pass LoRAConfig(peft_type='adalora'), "
                                       "not adapter=")
        super().__init__(trainer)
        self.adalora: AdaLoRAState | None = None      # created when training starts (it needs total_step)

    def start(self, total_steps: int) -> None:
        """The AdaLoRA state for a run of ``total_steps`` (kept when a second train() has the same)."""
        if self.adalora is None or self.adalora.total_step != (self.lora_config.total_step or total_steps):
            self.adalora = AdaLoRAState(self.adapter, self.lora_config, total_steps)

    def _run_step(self, batches, learning_rate: float, step: int, **kw):
        return self.adalora.step(self.ctx, batches, learning_rate, step, **kw)

    def step(self, batches, learning_rate, step, n_step_tokens=None):
        out = super().step(batches, learning_rate, step, n_step_tokens)
        out.metrics = {"orth_loss": self.adalora.orth_loss,
                       "budget": int(sum(self.adalora.ranks().values()))}
        return out

    def state_arrays(self):
        return self.adalora.state_arrays()

    def load_state_arrays(self, arrays, where: str) -> None:
        self.adalora.load_state_arrays(arrays, where)

    def save_adapter(self, path: Path, metadata: dict) -> Path:
        """The kept triplets as an ordinary llama.cpp LoRA, a rank per tensor (see adalora.py)."""
        if self.adalora is None:
            return super().save_adapter(path, metadata)
        tensors, alpha = self.adalora.file_tensors()
        if not tensors:
            raise InvalidArgumentError("AdaLoRA kept no triplet in any module: nothing to save")
        meta = {**metadata, "adalora_ranks": json.dumps(self.adalora.ranks(), sort_keys=True)}
        with Adapter.from_tensors(self.model, tensors, alpha) as final:
            final.config = self.lora_config
            return final.save(path, metadata=meta)
