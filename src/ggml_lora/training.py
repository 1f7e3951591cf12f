"""Deprecated name (until the next release): the optimizer step is ggml_lora.step (TrainingContext,
estimate_memory), the forward losses ggml_lora.forward (loss_batch, evaluate, loss_sum, row_losses)."""

from ._deprecated import forwarding

__getattr__ = forwarding("training", "step", "forward")
