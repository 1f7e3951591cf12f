"""Configuration dataclasses, validated at construction. The one place where defaults live."""

from __future__ import annotations

import math
import re
import warnings
from dataclasses import InitVar, dataclass, field, fields
from typing import Any

from .arch import ALL_MODULES, LM_HEAD
from .errors import InvalidArgumentError

INIT_STRATEGIES = ("kaiming", "gaussian", "pissa")
PEFT_TYPES = ("lora", "adalora")


def _opt(default: Any, help: str) -> Any:
    """A dataclass field with its command-line help; the CLI derives its flags from these."""
    if isinstance(default, (list, dict, set)):
        raise TypeError("mutable default")
    return field(default=default, metadata={"help": help})


def _from_dict(cls: type, data: dict[str, Any]) -> Any:
    """``cls(**data)``, with unknown keys an error that lists the valid ones."""
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise InvalidArgumentError(f"{cls.__name__}: unknown keys {unknown}; valid: {sorted(known)}")
    return cls(**data)


def pattern_value(patterns: dict | None, module: str, default: Any) -> Any:
    """PEFT's rank_pattern/alpha_pattern lookup: the first key that matches the end of the module
    name as ``(.*\\.)?(key)$`` (peft.utils.other.get_pattern_key), else ``default``."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _fail(cls: str, name: str, value: Any, why: str) -> InvalidArgumentError:
    return InvalidArgumentError(f"{cls}.{name}={value!r}: {why}")


def normalize_target(name: str) -> str:
    """A PEFT name (q_proj, ..., lm_head) for a PEFT or GGUF module name (attn_q, ..., output)."""
    from .arch import GGUF_TO_PEFT

    if name in ALL_MODULES or name == LM_HEAD:
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

    rank: int = _opt(8, "LoRA rank r")
    alpha: float | None = _opt(None, "lora_alpha; the update is scaled by alpha/rank (default: 2*rank)")
    dropout: float = _opt(0.0, "lora_dropout on the input of A, training only, in [0, 1)")
    target_modules: tuple[str, ...] = _opt(("q_proj", "v_proj"),
                                           "modules to adapt, PEFT names (q_proj,k_proj,v_proj,o_proj,gate_proj,"
                                           "up_proj,down_proj,lm_head) or GGUF names (attn_q,...)")
    layers: tuple[int, ...] | None = _opt(None, "block indices to adapt (default: all)")
    use_rslora: bool = _opt(False, "scale by alpha/sqrt(rank) instead of alpha/rank (rsLoRA)")
    init: str = _opt("kaiming", "initialisation of A: kaiming (PEFT default), gaussian or pissa")
    seed: int = _opt(0, "seed of the initialisation of A")
    rank_pattern: dict[str, int] | None = _opt(None, "PEFT's rank_pattern: {module pattern: rank}, matched as PEFT "
                                                     "matches (a regex against the end of model.layers.N.self_attn.q_proj)")
    alpha_pattern: dict[str, float] | None = _opt(None, "PEFT's alpha_pattern: {module pattern: lora_alpha}")
    peft_type: str = _opt("lora", "lora, or adalora (AdaLoRA: SVD-form triplets pruned from init_r to target_r "
                                  "per module by importance, as PEFT's AdaLoraConfig)")
    init_r: int = _opt(12, "AdaLoRA: initial rank of every module")
    target_r: int = _opt(8, "AdaLoRA: average rank per module at the end")
    tinit: int = _opt(0, "AdaLoRA: steps of warmup before the budget shrinks")
    tfinal: int = _opt(0, "AdaLoRA: steps at the end with the final ranks fixed")
    deltaT: int = _opt(1, "AdaLoRA: steps between two budget allocations")
    beta1: float = _opt(0.85, "AdaLoRA: EMA coefficient of the sensitivity")
    beta2: float = _opt(0.85, "AdaLoRA: EMA coefficient of the uncertainty")
    orth_reg_weight: float = _opt(0.5, "AdaLoRA: weight of the orthogonal regulariser")
    total_step: int | None = _opt(None, "AdaLoRA: the schedule's total steps (default: the training's)")

    def __post_init__(self) -> None:
        c = type(self).__name__
        if self.peft_type not in PEFT_TYPES:
            raise _fail(c, "peft_type", self.peft_type, f"must be one of {', '.join(PEFT_TYPES)}")
        for name in ("init_r", "target_r", "deltaT"):
            v = getattr(self, name)
            if not _is_int(v) or v <= 0:
                raise _fail(c, name, v, "must be a positive integer")
        for name in ("tinit", "tfinal"):
            v = getattr(self, name)
            if not _is_int(v) or v < 0:
                raise _fail(c, name, v, "must be a non-negative integer")
        for name in ("beta1", "beta2"):
            v = getattr(self, name)
            if not _is_num(v) or not 0 < v < 1:
                raise _fail(c, name, v, "must be in (0, 1)")
        if not _is_num(self.orth_reg_weight) or self.orth_reg_weight < 0:
            raise _fail(c, "orth_reg_weight", self.orth_reg_weight, "must be a finite number >= 0")
        if self.total_step is not None and (not _is_int(self.total_step) or self.total_step <= 0):
            raise _fail(c, "total_step", self.total_step, "must be a positive integer or None")
        if self.peft_type == "adalora":
            if self.target_r > self.init_r:
                raise _fail(c, "target_r", self.target_r, f"must be at most init_r={self.init_r}")
            if self.rank_pattern or self.alpha_pattern or self.use_rslora or self.init != "kaiming":
                raise _fail(c, "peft_type", "adalora", "takes no rank_pattern, alpha_pattern, use_rslora or init "
                            "(its ranks come from init_r/target_r, its initialisation is PEFT's)")
            object.__setattr__(self, "rank", self.init_r)      # PEFT ignores r for AdaLoRA
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
        valid = ", ".join(list(ALL_MODULES) + [LM_HEAD])
        resolved = []
        for t in targets:
            try:
                peft = normalize_target(t)
            except (KeyError, TypeError):
                raise _fail(c, "target_modules", t, f"unknown module; valid: {valid} "
                            "(or the GGUF names attn_q, attn_k, attn_v, attn_qkv, attn_output, ffn_gate, "
                            "ffn_up, ffn_down, output)") from None
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
        for name, kind in (("rank_pattern", "rank"), ("alpha_pattern", "alpha")):
            pattern = getattr(self, name)
            if pattern is None:
                continue
            if not isinstance(pattern, dict):
                raise _fail(c, name, pattern, "must be a mapping {module pattern: value}")
            for key, value in pattern.items():
                if not isinstance(key, str) or not key:
                    raise _fail(c, name, pattern, f"key {key!r} must be a non-empty string")
                try:
                    re.compile(key)
                except re.error as e:
                    raise _fail(c, name, pattern, f"key {key!r} is not a valid regular expression ({e})") from None
                ok = (_is_int(value) and value > 0) if kind == "rank" else (_is_num(value) and value > 0)
                if not ok:
                    raise _fail(c, name, pattern, f"the {kind} for {key!r} must be a positive "
                                f"{'integer' if kind == 'rank' else 'finite number'}, got {value!r}")
            object.__setattr__(self, name, dict(pattern) or None)
        if self.init == "pissa" and (self.rank_pattern or self.alpha_pattern):
            raise _fail(c, "init", self.init, "cannot be combined with rank_pattern or alpha_pattern")

    @property
    def scale(self) -> float:
        """The factor on B·A·x (AdaLoRA: PEFT's alpha / (init_r + 1e-5) on B·diag(E)·A·x)."""
        if self.peft_type == "adalora":
            return self.alpha / (self.init_r + 1e-5)
        return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)

    def rank_for(self, module: str) -> int:
        """The rank of a module (a Hugging Face name, model.layers.N.self_attn.q_proj): rank_pattern's
        first matching key, else ``rank``."""
        return int(pattern_value(self.rank_pattern, module, self.rank))

    def scale_for(self, module: str) -> float:
        """The factor on B·A·x of one module, as PEFT computes it: its alpha over its rank (or the
        rank's square root with rsLoRA)."""
        if self.peft_type == "adalora":
            return self.scale
        r = self.rank_for(module)
        alpha = float(pattern_value(self.alpha_pattern, module, self.alpha))
        return alpha / (math.sqrt(r) if self.use_rslora else r)

    @property
    def file_alpha(self) -> float:
        """The alpha llama.cpp must read so that its alpha / rank equals :attr:`scale`."""
        return self.scale * self.rank

    def to_dict(self) -> dict[str, Any]:
        return {f.name: (list(v) if isinstance(v := getattr(self, f.name), tuple) else v) for f in fields(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LoRAConfig:
        return _from_dict(cls, data)


LR_SCHEDULERS = ("constant", "linear", "cosine")
OPTIMIZERS = ("adamw", "sgd")
NAN_POLICIES = ("stop", "skip")
DISTRIBUTED = ("auto", "mpi", "none")
REPORT_TO = ("tensorboard", "mlflow")
TRUNCATION = ("truncate", "drop")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


@dataclass(frozen=True)
class TrainingConfig:
    """How to train: the loop, the schedule, the data and the outputs. Names follow Hugging Face's
    TrainingArguments where one exists.

    One optimizer step sees ``batch_size × gradient_accumulation_steps`` rows (a row is one sequence of
    up to ``max_seq_length`` tokens: one sample, or several packed ones); the loss is the mean over all
    supervised tokens of the step, so accumulation gives the same update as one larger batch.
    """

    epochs: int = _opt(1, "passes over the training data (ignored when max_steps is set)")
    max_steps: int | None = _opt(None, "optimizer steps to run; overrides epochs")
    batch_size: int = _opt(4, "rows (sequences) per micro-batch")
    gradient_accumulation_steps: int = _opt(1, "micro-batches per optimizer step")
    learning_rate: float = _opt(2e-4, "peak learning rate")
    lr_scheduler: str = _opt("linear", "learning-rate schedule after warmup: constant, linear or cosine")
    warmup_steps: int = _opt(0, "steps of linear warmup from 0 to learning_rate")
    warmup_ratio: float = _opt(0.0, "warmup as a fraction of the total steps (instead of warmup_steps)")
    optimizer: str = _opt("adamw", "adamw or sgd")
    adam_beta1: float = _opt(0.9, "AdamW beta1")
    adam_beta2: float = _opt(0.999, "AdamW beta2")
    adam_epsilon: float = _opt(1e-8, "AdamW epsilon")
    weight_decay: float = _opt(0.0, "decoupled weight decay (AdamW)")
    max_grad_norm: float | None = _opt(1.0, "clip the global gradient norm to this (0 or None: no clipping)")
    max_seq_length: int = _opt(512, "longest row in tokens; longer samples are truncated or dropped")
    truncation: str = _opt("truncate", "what to do with samples longer than max_seq_length: truncate or drop")
    packing: bool | None = _opt(None, "pack short samples into rows, attention kept inside each sample "
                                      "(default: on for text data, off otherwise)")
    streaming: bool = _opt(False, "read and tokenize the training data as training consumes it, for data larger "
                                  "than memory (needs max_steps; rows are not packed)")
    shuffle_buffer: int = _opt(1000, "with streaming: rows are shuffled within a window of this many")
    train_on_prompt: bool = _opt(False, "prompt/completion and chat data: also put loss on the prompt")
    chat_template: str | None = _opt(None, "Jinja chat template (a file path, the template text, or a built-in: "
                                           "chatml, gemma, llama3); default: the GGUF's tokenizer.chat_template")
    valid_fraction: float = _opt(0.0, "hold out this fraction of the training samples for validation "
                                      "when no validation data is given")
    seed: int = _opt(0, "seeds data order, splits and dropout")
    eval_every: int = _opt(50, "evaluate every N steps (and before the first and after the last); 0: off")
    save_every: int = _opt(100, "write a checkpoint every N steps (and at the end); 0: only at the end")
    save_total_limit: int | None = _opt(3, "keep at most this many checkpoints (None: all)")
    output_dir: str = _opt("ggml-lora-out", "where adapter.gguf, checkpoints/, metrics.jsonl, loss.png go")
    nan_policy: str = _opt("stop", "on a NaN/Inf loss or gradient: stop (error, last checkpoint kept) "
                                   "or skip (drop the step, restore the last good parameters)")
    max_skipped_steps: int = _opt(10, "with nan_policy=skip: stop after this many consecutive skipped steps")
    device: str = _opt("auto", "ggml device name (CPU, CUDA0, ...) or auto")
    n_threads: int | None = _opt(None, "CPU threads (default: ggml's choice)")
    gradient_checkpointing: bool = _opt(False, "keep only each block's input and recompute the block in the "
                                                "backward pass: far less memory, about a third more compute")
    f16_weights: bool | None = _opt(None, "run the training forward through F16 copies of the quantized weights: "
                                           "faster on CPU, 2 more bytes per weight; evaluation keeps the stored "
                                           "weights. None (auto): on a CPU, when the copies take at most a quarter "
                                           "of the memory available and the whole step at most half")
    amx_bf16: bool | None = _opt(None, "multiply through the frozen weights on the CPU's AMX tiles in bfloat16 (the "
                                   "forward reads the stored blocks, no F16 copies; the attention too): "
                                   "activations rounded to bfloat16, sums in float32, as PyTorch's bf16 autocast. "
                                   "None (auto): on where the CPU has AMX-BF16; true elsewhere is an error")
    keep_transposed_weights: bool = _opt(False, "keep transposed F16 copies of the frozen weights between steps "
                                                "(2 bytes per weight) instead of making each one when the backward "
                                                "needs it: a little faster, same gradients")
    memory_limit_gib: float | None = _opt(None, "refuse to start when the estimated peak exceeds this "
                                                "(default: the memory the device has available)")
    progress: bool = _opt(True, "show a progress bar")
    report_to: tuple[str, ...] = _opt((), "also log the metrics to: tensorboard, mlflow (comma-separated), all or none")
    logging_dir: str | None = _opt(None, "TensorBoard event folder (default: output_dir/runs)")
    run_name: str | None = _opt(None, "the MLflow run's name")
    distributed: str = _opt("auto", "data-parallel training over MPI: auto (when an MPI launcher such as mpiexec "
                                    "or srun started more than one process), mpi, or none; batch_size is then "
                                    "per process")

    # amx_bf16's name until 0.1 (it never meant bfloat16 in general): accepted by __init__ for one more release;
    # read amx_bf16 (an InitVar is not stored, and dataclasses.replace passes this default along)
    bf16: InitVar[bool | None] = None

    def __post_init__(self, bf16: bool | None = None) -> None:
        if bf16 is not None:
            warnings.warn("TrainingConfig(bf16=...) is deprecated: use amx_bf16=", DeprecationWarning, stacklevel=3)
            object.__setattr__(self, "amx_bf16", bf16)
        c = type(self).__name__

        def positive_int(name: str, allow_none: bool = False, allow_zero: bool = False) -> None:
            v = getattr(self, name)
            if v is None and allow_none:
                return
            if not _is_int(v) or v < (0 if allow_zero else 1):
                raise _fail(c, name, v, f"must be {'a non-negative' if allow_zero else 'a positive'} integer"
                            + (" or None" if allow_none else ""))

        def choice(name: str, options: tuple[str, ...]) -> None:
            if getattr(self, name) not in options:
                raise _fail(c, name, getattr(self, name), f"must be one of {', '.join(options)}")

        report = (self.report_to,) if isinstance(self.report_to, str) else self.report_to
        if not isinstance(report, (tuple, list)) or not all(isinstance(r, str) for r in report):
            raise _fail(c, "report_to", self.report_to, "must be a list of names")
        if "all" in report:
            report = REPORT_TO
        report = tuple(dict.fromkeys(r for r in report if r != "none"))
        for r in report:
            if r not in REPORT_TO:
                raise _fail(c, "report_to", r, f"unknown; valid: {', '.join(REPORT_TO)}, all, none")
        object.__setattr__(self, "report_to", report)
        positive_int("epochs")
        positive_int("max_steps", allow_none=True)
        positive_int("batch_size")
        positive_int("gradient_accumulation_steps")
        positive_int("warmup_steps", allow_zero=True)
        positive_int("max_seq_length")
        positive_int("eval_every", allow_zero=True)
        positive_int("save_every", allow_zero=True)
        positive_int("save_total_limit", allow_none=True)
        positive_int("max_skipped_steps")
        positive_int("shuffle_buffer")
        if self.streaming and self.max_steps is None:
            raise _fail(c, "streaming", True, "needs max_steps: a stream's length is not known in advance")
        if self.streaming and self.packing:
            raise _fail(c, "packing", True, "streamed rows are not packed (streaming=True)")
        if self.streaming and self.valid_fraction:
            raise _fail(c, "valid_fraction", self.valid_fraction, "needs the whole dataset; with streaming, give "
                        "validation data (valid=, or a folder's valid file)")
        positive_int("n_threads", allow_none=True)
        if not _is_num(self.learning_rate) or self.learning_rate <= 0:
            raise _fail(c, "learning_rate", self.learning_rate, "must be a positive finite number")
        if not _is_num(self.warmup_ratio) or not 0.0 <= self.warmup_ratio < 1.0:
            raise _fail(c, "warmup_ratio", self.warmup_ratio, "must be in [0, 1)")
        if self.warmup_ratio > 0 and self.warmup_steps > 0:
            raise _fail(c, "warmup_ratio", self.warmup_ratio, "give warmup_steps or warmup_ratio, not both")
        for name in ("adam_beta1", "adam_beta2"):
            v = getattr(self, name)
            if not _is_num(v) or not 0.0 <= v < 1.0:
                raise _fail(c, name, v, "must be in [0, 1)")
        if not _is_num(self.adam_epsilon) or self.adam_epsilon <= 0:
            raise _fail(c, "adam_epsilon", self.adam_epsilon, "must be positive")
        if not _is_num(self.weight_decay) or self.weight_decay < 0:
            raise _fail(c, "weight_decay", self.weight_decay, "must be >= 0")
        if self.max_grad_norm is not None and (not _is_num(self.max_grad_norm) or self.max_grad_norm < 0):
            raise _fail(c, "max_grad_norm", self.max_grad_norm, "must be >= 0 or None")
        if self.memory_limit_gib is not None and (not _is_num(self.memory_limit_gib) or self.memory_limit_gib <= 0):
            raise _fail(c, "memory_limit_gib", self.memory_limit_gib, "must be a positive number or None")
        if not _is_num(self.valid_fraction) or not 0.0 <= self.valid_fraction < 1.0:
            raise _fail(c, "valid_fraction", self.valid_fraction, "must be in [0, 1)")
        if not _is_int(self.seed):
            raise _fail(c, "seed", self.seed, "must be an integer")
        choice("lr_scheduler", LR_SCHEDULERS)
        choice("optimizer", OPTIMIZERS)
        choice("nan_policy", NAN_POLICIES)
        choice("truncation", TRUNCATION)
        choice("distributed", DISTRIBUTED)
        for name in ("train_on_prompt", "gradient_checkpointing", "keep_transposed_weights", "progress"):
            if not isinstance(getattr(self, name), bool):
                raise _fail(c, name, getattr(self, name), "must be true or false")
        for name in ("packing", "f16_weights", "amx_bf16"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), bool):
                raise _fail(c, name, getattr(self, name), "must be true, false or None")
        for name in ("output_dir", "device"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise _fail(c, name, getattr(self, name), "must be a non-empty string")
        if self.chat_template is not None and not isinstance(self.chat_template, str):
            raise _fail(c, "chat_template", self.chat_template, "must be a string (file path or template)")

    @property
    def rows_per_step(self) -> int:
        """Rows one optimizer step sees: batch_size × gradient_accumulation_steps."""
        return self.batch_size * self.gradient_accumulation_steps

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainingConfig:
        if "bf16" in data:          # its name until 0.1: AMX tiles only, not bfloat16 in general
            warnings.warn("TrainingConfig: 'bf16' is deprecated, use 'amx_bf16'", DeprecationWarning, stacklevel=2)
            data = {("amx_bf16" if k == "bf16" else k): v for k, v in data.items()}
        return _from_dict(cls, data)



PREFERENCE_METHODS = ("sft", "dpo", "orpo", "kto")
DPO_LOSS_TYPES = ("sigmoid", "ipo", "hinge", "robust")


@dataclass(frozen=True)
class PreferenceConfig:
    """Preference training (TRL's DPOConfig, ORPOConfig and KTOConfig, by their option names).

    ``method="sft"`` is supervised fine-tuning (LoRATrainer, the command line's default); the others train
    on preference data with
    :class:`~ggml_lora.preference.PreferenceTrainer`: DPO and ORPO on ``{"prompt", "chosen", "rejected"}``
    records, KTO on ``{"prompt", "completion", "label"}``. DPO's and KTO's reference model is the base
    model with the adapter off (TRL's for a PEFT model), its log-probabilities computed once per sample.
    """

    method: str = _opt("dpo", "dpo, orpo or kto; sft is supervised training (LoRATrainer); grpo is online RL "
                              "(GRPOTrainer, GRPOConfig; command line only)")
    beta: float = _opt(0.1, "dpo/kto: strength of the KL penalty against the reference; orpo: weight of the "
                            "odds-ratio term (TRL's beta)")
    loss_type: str = _opt("sigmoid", "dpo: sigmoid (DPO), ipo, hinge or robust")
    label_smoothing: float = _opt(0.0, "dpo with loss_type=robust: the assumed rate of flipped labels, in [0, 0.5)")
    desirable_weight: float = _opt(1.0, "kto: weight of the desirable (label true) samples' losses")
    undesirable_weight: float = _opt(1.0, "kto: weight of the undesirable (label false) samples' losses")

    def __post_init__(self) -> None:
        c = "PreferenceConfig"
        if self.method not in PREFERENCE_METHODS:
            raise _fail(c, "method", self.method, f"must be one of {', '.join(PREFERENCE_METHODS)}")
        for name in ("beta", "desirable_weight", "undesirable_weight"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not (math.isfinite(v) and v > 0):
                raise _fail(c, name, v, "must be a positive number")
        if self.loss_type not in DPO_LOSS_TYPES:
            raise _fail(c, "loss_type", self.loss_type, f"must be one of {', '.join(DPO_LOSS_TYPES)}")
        ls = self.label_smoothing
        if isinstance(ls, bool) or not isinstance(ls, (int, float)) or not 0.0 <= ls < 0.5:
            raise _fail(c, "label_smoothing", ls, "must be in [0, 0.5)")
        if ls and self.loss_type != "robust":
            raise _fail(c, "label_smoothing", ls, "is used by loss_type='robust' only (as in TRL)")

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PreferenceConfig:
        return _from_dict(cls, data)


GRPO_LOSS_TYPES = ("dapo", "grpo", "bnpo", "dr_grpo", "cispo", "sapo", "luspo")
SCALE_REWARDS = ("group", "batch", "none")


@dataclass(frozen=True)
class GRPOConfig:
    """Group Relative Policy Optimization (TRL's GRPOConfig: its option names, defaults and meaning; TRL 1.16.0
    trl/trainer/grpo_config.py, "cfg:" lines below). Rollouts are sampled by llama.cpp from the base GGUF plus
    the adapter as it stands; see :class:`~ggml_lora.grpo.GRPOTrainer`.

    A step takes ``batch_size x gradient_accumulation_steps`` completions (TRL's per-device batch counts
    completions too), i.e. that / ``num_generations`` prompts, each sampled ``num_generations`` times.
    """

    num_generations: int = _opt(8, "completions sampled per prompt, >= 2 (cfg:480)")
    max_completion_length: int = _opt(512, "the most tokens sampled per completion (cfg:494)")
    temperature: float = _opt(1.0, "sampling temperature; the training log-probabilities use it too: logits / "
                                   "temperature, as TRL's (cfg:532)")
    top_p: float = _opt(1.0, "nucleus sampling: keep the smallest set of tokens with this much probability (cfg:536)")
    top_k: int = _opt(0, "sample among the k most likely tokens; 0 = all (cfg:543)")
    min_p: float | None = _opt(None, "drop tokens less likely than min_p x the most likely one (cfg:550)")
    beta: float = _opt(0.0, "weight of the k3 KL to the base model (adapter off); 0: no reference pass (cfg:681)")
    num_iterations: int = _opt(1, "optimizer steps per generation batch (mu), against its old-policy "
                                  "log-probabilities (cfg:689)")
    epsilon: float = _opt(0.2, "lower clipping range of the ratio (cfg:693)")
    epsilon_high: float | None = _opt(None, "upper clipping range (default: epsilon); cispo: the ratio's cap (cfg:705)")
    delta: float | None = _opt(None, "INTELLECT-2's cap of the unclipped ratio, > 1 + epsilon_high (cfg:697)")
    loss_type: str = _opt("dapo", "dapo, grpo, bnpo, dr_grpo, cispo, sapo or luspo, with TRL's normalisation (cfg:801)")
    importance_sampling_level: str = _opt("token", "token, or sequence (GSPO with loss_type=grpo) (cfg:760)")
    scale_rewards: str = _opt("group", "divide advantages by the std of the group, the batch, or none (cfg:789)")
    mask_truncated_completions: bool = _opt(False, "leave completions cut at max_completion_length out of the loss "
                                                   "(cfg:836)")
    reward_weights: tuple[float, ...] | None = _opt(None, "one weight per reward function (default: all 1) (cfg:770)")
    multi_objective_aggregation: str = _opt("sum_then_normalize", "sum_then_normalize, or normalize_then_sum (GDPO) "
                                                                  "(cfg:777)")
    sapo_temperature_pos: float = _opt(1.0, "sapo: gate temperature where the advantage is positive (cfg:722)")
    sapo_temperature_neg: float = _opt(1.05, "sapo: gate temperature elsewhere (cfg:714)")
    use_bias_correction_kl: bool = _opt(True, "multiply the KL term by the importance ratio (cfg:972)")

    def __post_init__(self) -> None:
        c = "GRPOConfig"

        def number(name, v, ok, why):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not ok(v):
                raise _fail(c, name, v, why)

        for name in ("num_generations", "max_completion_length", "num_iterations", "top_k"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int):
                raise _fail(c, name, v, "must be an integer")
        if self.num_generations < 2:
            raise _fail(c, "num_generations", self.num_generations, "must be at least 2: advantages compare the "
                        "completions of one prompt (TRL: cfg:1131-1141)")
        if self.max_completion_length < 1:
            raise _fail(c, "max_completion_length", self.max_completion_length, "must be positive")
        if self.num_iterations < 1:
            raise _fail(c, "num_iterations", self.num_iterations, "must be positive")
        if self.top_k < 0:
            raise _fail(c, "top_k", self.top_k, "must be >= 0 (0: off)")
        number("temperature", self.temperature, lambda v: v > 0, "must be positive")
        number("top_p", self.top_p, lambda v: 0 < v <= 1, "must be in (0, 1]")
        if self.min_p is not None:
            number("min_p", self.min_p, lambda v: 0 <= v <= 1, "must be in [0, 1]")
        number("beta", self.beta, lambda v: v >= 0, "must be >= 0")
        number("epsilon", self.epsilon, lambda v: 0 <= v < 1, "must be in [0, 1)")
        if self.epsilon_high is not None:
            number("epsilon_high", self.epsilon_high, lambda v: v > 0, "must be positive")
        if self.delta is not None:
            number("delta", self.delta, lambda v: v > 1 + self.eps_high, f"must exceed 1 + epsilon_high = "
                   f"{1 + self.eps_high}")
        for name in ("sapo_temperature_pos", "sapo_temperature_neg"):
            number(name, getattr(self, name), lambda v: v > 0, "must be positive")
        if self.loss_type not in GRPO_LOSS_TYPES:
            more = " (vespo is not implemented here)" if self.loss_type == "vespo" else ""
            raise _fail(c, "loss_type", self.loss_type, f"must be one of {', '.join(GRPO_LOSS_TYPES)}{more}")
        if self.importance_sampling_level not in ("token", "sequence"):
            raise _fail(c, "importance_sampling_level", self.importance_sampling_level, "must be token or sequence")
        scale = {True: "group", False: "none"}.get(self.scale_rewards, self.scale_rewards)    # TRL accepts bools
        if scale not in SCALE_REWARDS:
            raise _fail(c, "scale_rewards", self.scale_rewards, f"must be one of {', '.join(SCALE_REWARDS)}")
        object.__setattr__(self, "scale_rewards", scale)
        if self.multi_objective_aggregation not in ("sum_then_normalize", "normalize_then_sum"):
            raise _fail(c, "multi_objective_aggregation", self.multi_objective_aggregation,
                        "must be sum_then_normalize or normalize_then_sum")
        if self.reward_weights is not None:
            w = tuple(self.reward_weights)
            for v in w:
                number("reward_weights", v, lambda v: True, "every weight must be a finite number")
            object.__setattr__(self, "reward_weights", tuple(float(v) for v in w))
        if not isinstance(self.mask_truncated_completions, bool) or not isinstance(self.use_bias_correction_kl, bool):
            raise InvalidArgumentError(f"{c}: mask_truncated_completions and use_bias_correction_kl are True or False")

    @property
    def eps_high(self) -> float:
        """TRL's epsilon_high, which falls back to epsilon (grpo_trainer.py:945-946)."""
        return self.epsilon if self.epsilon_high is None else self.epsilon_high

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GRPOConfig:
        return _from_dict(cls, data)


def learning_rate_at(config: TrainingConfig, step: int, total_steps: int) -> float:
    """The learning rate of optimizer step ``step`` (1-based) of ``total_steps``.

    Warmup W steps: lr·k/W for k ≤ W. After it, with p = (k − W − 1) / (N − W) in [0, 1):
    constant lr; linear lr·(1 − p); cosine lr·(1 + cos πp)/2. The first step after warmup runs at
    the peak and the last one above zero (no step is wasted at lr = 0).
    """
    lr = config.learning_rate
    warmup = warmup_steps(config, total_steps)
    if step <= warmup:
        return lr * step / warmup
    p = (step - warmup - 1) / max(1, total_steps - warmup)
    if config.lr_scheduler == "linear":
        return lr * (1.0 - p)
    if config.lr_scheduler == "cosine":
        return lr * 0.5 * (1.0 + math.cos(math.pi * p))
    return lr


def warmup_steps(config: TrainingConfig, total_steps: int) -> int:
    if config.warmup_ratio > 0:
        return math.ceil(config.warmup_ratio * total_steps)
    return min(config.warmup_steps, total_steps)


__all__ = [
    "INIT_STRATEGIES",
    "GRPOConfig",
    "LR_SCHEDULERS",
    "LoRAConfig",
    "PreferenceConfig",
    "TrainingConfig",
    "learning_rate_at",
    "normalize_target",
    "warmup_steps",
]
