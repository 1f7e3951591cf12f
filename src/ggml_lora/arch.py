"""What ggml-lora knows about each model architecture.

Adding an architecture is a local change: one :class:`ArchSpec` entry here, and in
``native/glora_graph.cpp`` whatever its block does differently (the llama skeleton already covers
optional q/k/v/o biases, per-head q/k RMS norms, rope frequency factors, gemma's embedding scale,
post-norms, GEGLU, softcaps and sliding window, and phi3's fused matrices).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

ROPE_NORM = 0  # rotate adjacent pairs; llama's converter permutes Q/K rows to match
ROPE_NEOX = 2  # rotate halves

FFN_SWIGLU = 0  # silu(gate) * up
FFN_GEGLU = 1   # gelu(gate) * up, ggml's tanh GELU

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
# phi3 fuses Q/K/V into attn_qkv and gate/up into ffn_up (src/models/phi3.cpp:46-52); PEFT names them
# qkv_proj and gate_up_proj (gguf-py tensor_mapping.py:245, 515)
FUSED_MODULES: dict[str, str] = {
    "qkv_proj": "attn_qkv",
    "o_proj": "attn_output",
    "gate_up_proj": "ffn_up",
    "down_proj": "ffn_down",
}
ATTENTION_MODULES = frozenset({"q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj"})
LM_HEAD = "lm_head"  # output.weight; only when the model has its own (untied) output matrix
GGUF_TO_PEFT: dict[str, str] = ({v: k for k, v in TARGET_MODULES.items()} | {"attn_qkv": "qkv_proj"}
                                | {"output": LM_HEAD})
# every module name some architecture has, for validating a config before a model is known
ALL_MODULES: tuple[str, ...] = tuple(TARGET_MODULES) + ("qkv_proj", "gate_up_proj")


@dataclass(frozen=True)
class ArchSpec:
    name: str
    rope_type: int
    rope_freq_base: float          # default when the GGUF has no rope.freq_base
    qk_norm: bool = False          # blocks carry attn_q_norm / attn_k_norm (qwen3, gemma3)
    post_norms: bool = False       # blocks carry post_attention_norm / post_ffw_norm (gemma2/3)
    embd_scale: bool = False       # token embeddings times sqrt(n_embd) (gemma)
    ffn_act: int = FFN_SWIGLU
    scale_q: bool = False          # Q scaled before attention, softmax scale 1 (gemma, phi3)
    fused: bool = False            # attn_qkv and ffn_up = [gate; up] (phi3)
    attn_softcap: float = 0.0      # default of {arch}.attn_logit_softcapping; 0: no attention softcap
    final_softcap: float = 0.0     # default of {arch}.final_logit_softcapping (0: only if the key is there)
    swa_period: int = 0            # every period-th layer global, the others sliding-window; 0: no SWA
    swa_window: int = 0            # default of {arch}.attention.sliding_window (0: SWA only if the key is > 0)
    modules: dict[str, str] = field(default_factory=lambda: dict(TARGET_MODULES))


ARCHITECTURES: dict[str, ArchSpec] = {
    # Llama 2/3 (rope_freqs for 3.x), Mistral, SmolLM/SmolLM2
    "llama": ArchSpec("llama", ROPE_NORM, 10000.0),
    # q/k/v biases are optional tensors, found in the file
    "qwen2": ArchSpec("qwen2", ROPE_NEOX, 10000.0),
    # per-head RMS norm of q and k before rope; head_dim may differ from n_embd / n_head
    "qwen3": ArchSpec("qwen3", ROPE_NEOX, 10000.0, qk_norm=True),
    # Gemma 2: softcaps 50 (attention) and 30 (final logits) by default (src/llama-hparams.h:134-136),
    # window 4096, every 2nd layer global (src/models/gemma2.cpp:4-15)
    "gemma2": ArchSpec("gemma2", ROPE_NEOX, 10000.0, post_norms=True, embd_scale=True, ffn_act=FFN_GEGLU,
                       scale_q=True, attn_softcap=50.0, final_softcap=30.0, swa_period=2, swa_window=4096),
    # Gemma 3: per-head q/k norms, no attention softcap, final softcap only where the key is, window only
    # where the key is > 0, every 6th layer global (src/models/gemma3.cpp:3-31)
    "gemma3": ArchSpec("gemma3", ROPE_NEOX, 10000.0, qk_norm=True, post_norms=True, embd_scale=True,
                       ffn_act=FFN_GEGLU, scale_q=True, swa_period=6),
    # Phi-3, Phi-3.5, Phi-4-mini: fused attn_qkv and gate/up, partial rotary (src/models/phi3.cpp)
    "phi3": ArchSpec("phi3", ROPE_NEOX, 10000.0, scale_q=True, fused=True, modules=dict(FUSED_MODULES)),
}


def peft_module(stem: str, arch: str = "llama") -> str:
    """The PEFT name of GGUF stem ``stem`` in ``arch``: 'ffn_up' -> 'up_proj', or 'gate_up_proj' in phi3."""
    spec = ARCHITECTURES.get(arch, ARCHITECTURES["llama"])
    for peft, s in spec.modules.items():
        if s == stem:
            return peft
    if stem == "output":
        return LM_HEAD
    return GGUF_TO_PEFT[stem]


def hf_module(gguf_name: str, arch: str = "llama") -> str:
    """'blk.3.attn_q.weight' -> 'model.layers.3.self_attn.q_proj'; 'output.weight' -> 'lm_head'."""
    if gguf_name == "output.weight":
        return LM_HEAD
    _, layer, stem, _ = gguf_name.split(".")
    peft = peft_module(stem, arch)
    return f"model.layers.{layer}.{'self_attn' if peft in ATTENTION_MODULES else 'mlp'}.{peft}"


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
    attn_softcap: float = 0.0
    final_softcap: float = 0.0
    n_swa: int = 0
    swa_layers: tuple[bool, ...] = ()      # per layer, when n_swa > 0
    rope_freq_base_swa: float = 10000.0    # src/llama-hparams.h:151-153
    rope_freq_scale_swa: float = 1.0

    @property
    def spec(self) -> ArchSpec:
        return ARCHITECTURES[self.arch]

    @property
    def kq_scale(self) -> float:
        # gemma's 27B models scale by 1/sqrt(n_embd / n_head) (src/models/gemma2.cpp:25-27, gemma3.cpp:29-31)
        if (self.arch, self.n_layers) in (("gemma2", 46), ("gemma3", 62)):
            return 1.0 / math.sqrt(self.n_embd // self.n_head)
        return 1.0 / math.sqrt(self.head_dim)

    @property
    def embd_scale(self) -> float:
        return math.sqrt(self.n_embd) if self.spec.embd_scale else 0.0


def supported_list() -> str:
    return ", ".join(sorted(ARCHITECTURES))
