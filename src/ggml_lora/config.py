"""Configuration dataclasses, validated at construction. The one place where defaults live."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any

from .arch import LM_HEAD, TARGET_MODULES
from .errors import InvalidArgumentError

INIT_STRATEGIES = ("kaiming", "gaussian", "pissa")


def _fail(cls: str, name: str, value: Any, why: str) -> InvalidArgumentError:
    return InvalidArgumentError(f"{cls}.{name}={value!r}: {why}")


def normalize_target(name: str) -> str:
    """A PEFT name (q_proj, ..., lm_head) for a PEFT or GGUF module name (attn_q, ..., output)."""
    from .arch import GGUF_TO_PEFT

    if name in TARGET_MODULES or name == LM_HEAD:
        return name
    if name in GGUF_TO_PEFT:
        return GGUF_TO_PEFT[name]
    raise KeyError(name)


@dataclass(frozen=True)
class LoRAConfig:
    """What to train: PEFT's vocabulary, with llama.cpp's scale.

    The LoRA term of a target ``W`` is ``scale · B·(A·dropout(x))`` with ``scale = alpha / rank``, or
    ``alpha / sqrt(rank)`` with ``use_rslora`` (folded into the alpha written to the file, so llama.cpp
    applies the same scale).
    """

    rank: int = 8                                   # r
    alpha: float | None = None                      # lora_alpha; None means 2·rank
    dropout: float = 0.0                            # lora_dropout, on the input of A, training only
    target_modules: tuple[str, ...] = ("q_proj", "v_proj")   # PEFT names or GGUF names (attn_q, ...)
    layers: tuple[int, ...] | None = None           # block indices to adapt; None means all
    use_rslora: bool = False                        # scale alpha/sqrt(r) instead of alpha/r
    init: str = "kaiming"                           # "kaiming" (PEFT default), "gaussian" or "pissa"
    seed: int = 0                                   # seeds the initialisation of A

    def __post_init__(self) -> None:
        c = type(self).__name__
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank <= 0:
            raise _fail(c, "rank", self.rank, "must be a positive integer")
        alpha = 2.0 * self.rank if self.alpha is None else self.alpha
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha <= 0:
            raise _fail(c, "alpha", self.alpha, "must be a positive finite number")
        object.__setattr__(self, "alpha", float(alpha))
        if not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1.0:
            raise _fail(c, "dropout", self.dropout, "must be in [0, 1)")
        targets = (self.target_modules,) if isinstance(self.target_modules, str) else tuple(self.target_modules)
        if not targets:
            raise _fail(c, "target_modules", self.target_modules, "must name at least one module")
        valid = ", ".join(list(TARGET_MODULES) + [LM_HEAD])
        resolved = []
        for t in targets:
            try:
                peft = normalize_target(t)
            except (KeyError, TypeError):
                raise _fail(c, "target_modules", t, f"unknown module; valid: {valid} "
                            "(or the GGUF names attn_q, attn_k, attn_v, attn_output, ffn_gate, ffn_up, "
                            "ffn_down, output)") from None
            if peft in resolved:
                raise _fail(c, "target_modules", t, "is listed twice")
            resolved.append(peft)
        object.__setattr__(self, "target_modules", tuple(resolved))
        if self.layers is not None:
            layers = tuple(self.layers)
            if not layers or any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in layers):
                raise _fail(c, "layers", self.layers, "must be a non-empty list of block indices >= 0")
            if len(set(layers)) != len(layers):
                raise _fail(c, "layers", self.layers, "lists a block twice")
            object.__setattr__(self, "layers", tuple(sorted(layers)))
        if self.init not in INIT_STRATEGIES:
            raise _fail(c, "init", self.init, f"must be one of {', '.join(INIT_STRATEGIES)}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise _fail(c, "seed", self.seed, "must be an integer")

    @property
    def scale(self) -> float:
        """The factor on B·A·x."""
        return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)

    @property
    def file_alpha(self) -> float:
        """The alpha llama.cpp must read so that its alpha / rank equals :attr:`scale`."""
        return self.scale * self.rank

    def to_dict(self) -> dict[str, Any]:
        return {f.name: (list(v) if isinstance(v := getattr(self, f.name), tuple) else v) for f in fields(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "LoRAConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise InvalidArgumentError(f"{cls.__name__}: unknown keys {unknown}; valid: {sorted(known)}")
        return cls(**data)


__all__ = ["LoRAConfig", "INIT_STRATEGIES", "normalize_target"]
