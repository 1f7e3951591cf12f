"""What ggml-lora knows about each model architecture.

Adding an architecture is a local change: one :class:`ArchSpec` entry here, and in
``native/glora_graph.cpp`` whatever its block does differently (the llama skeleton already covers
optional q/k/v/o biases, per-head q/k RMS norms and rope frequency factors).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

ROPE_NORM = 0  # rotate adjacent pairs; llama's converter permutes Q/K rows to match
ROPE_NEOX = 2  # rotate halves


@dataclass(frozen=True)
class ArchSpec:
    name: str
    rope_type: int
    rope_freq_base: float          # default when the GGUF has no rope.freq_base
    qk_norm: bool = False          # blocks carry attn_q_norm / attn_k_norm (qwen3)


ARCHITECTURES: dict[str, ArchSpec] = {
    # Llama 2/3 (rope_freqs for 3.x), Mistral, SmolLM/SmolLM2
    "llama": ArchSpec("llama", ROPE_NORM, 10000.0),
    # q/k/v biases are optional tensors, found in the file
    "qwen2": ArchSpec("qwen2", ROPE_NEOX, 10000.0),
    # per-head RMS norm of q and k before rope; head_dim may differ from n_embd / n_head
    "qwen3": ArchSpec("qwen3", ROPE_NEOX, 10000.0, qk_norm=True),
}

# PEFT module name -> GGUF tensor stem (blk.N.<stem>.weight), the order PEFT users list them in
TARGET_MODULES: dict[str, str] = {
    "q_proj": "attn_q",
    "k_proj": "attn_k",
    "v_proj": "attn_v",
    "o_proj": "attn_output",
    "gate_proj": "ffn_gate",
    "up_proj": "ffn_up",
    "down_proj": "ffn_down",
}
LM_HEAD = "lm_head"  # output.weight; only when the model has its own (untied) output matrix
GGUF_TO_PEFT: dict[str, str] = {v: k for k, v in TARGET_MODULES.items()} | {"output": LM_HEAD}


def hf_module(gguf_name: str) -> str:
    """'blk.3.attn_q.weight' -> 'model.layers.3.self_attn.q_proj'; 'output.weight' -> 'lm_head'."""
    if gguf_name == "output.weight":
        return LM_HEAD
    _, layer, stem, _ = gguf_name.split(".")
    peft = GGUF_TO_PEFT[stem]
    return f"model.layers.{layer}.{'self_attn' if peft in ('q_proj', 'k_proj', 'v_proj', 'o_proj') else 'mlp'}.{peft}"


@dataclass(frozen=True)
class HParams:
    """The hyperparameters of a base model, from its GGUF metadata and tensor shapes."""

    arch: str
    n_layers: int
    n_embd: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_rot: int
    n_ff: int
    n_vocab: int
    n_ctx_train: int
    rms_eps: float
    rope_freq_base: float
    rope_freq_scale: float
    rope_type: int

    @property
    def kq_scale(self) -> float:
        return 1.0 / math.sqrt(self.head_dim)


def supported_list() -> str:
    return ", ".join(sorted(ARCHITECTURES))
