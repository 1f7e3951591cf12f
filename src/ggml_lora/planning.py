"""Planning a run: which device, which precision path for the frozen products (AMX bfloat16 tiles, F16
copies or the stored blocks), whether gradient checkpointing is needed, and the memory budget: every
choice that depends on the model, the configs and the hardware (hardware.py reports the latter) is made
here, before the first step.

Nothing else in the package asks whether a device is the CPU. The native side has its one counterpart
(``glora_backends_init``): our CPU kernels and graph rewrites run only where the model's device is
ggml's CPU backend; any other device runs ggml's own ops.
"""

from __future__ import annotations

import logging
from . import hardware
from .errors import OutOfMemoryError, UnsupportedError

# LoRATrainer and TrainingContext in annotations: model.py imports this module and both import model.py,
# so the names are not imported here

log = logging.getLogger("ggml_lora.train")


def is_cpu(device: str) -> bool:
    """Whether ``device`` (a model's device name) is ggml's CPU backend."""
    found = hardware.device(device)
    return found.type == "cpu" if found is not None else device.upper() == "CPU"


def amx_bf16_applies(device: str) -> bool:
    """``amx_bf16=None``: products on AMX tiles in bfloat16 where the model is on a CPU that has them (an order
    of magnitude faster there than ggml's F16 or BF16 kernels)."""
    return is_cpu(device) and hardware.cpu_has_amx_bf16()


def f16_copies_may_help(device: str) -> bool:
    """``f16_weights=None`` may choose F16 copies of the quantized weights only on a CPU, where ggml's F16
    products beat its quantized ones (benchmarks/README.md); a GPU backend multiplies the stored blocks
    at full speed and the copies would only cost its memory."""
    return is_cpu(device)


def available_memory(device: str) -> int | None:
    """Bytes free for a model on ``device``: the host's available memory for the CPU, the backend's free
    memory for any other device (None when unknown)."""
    if is_cpu(device):
        return hardware.host_memory_available()
    found = hardware.device(device)
    return (found.memory_free or None) if found is not None else None


def fallback_warning(device: str, device_share: float, cpu_ops: tuple[str, ...]) -> str | None:
    """The warning a run on ``device`` owes its user when ggml's scheduler ran part of its work on the CPU
    (a GPU run must never compute on the CPU silently); None when all of it ran on the device."""
    if is_cpu(device) or not cpu_ops:
        return None
    return (f"{1 - device_share:.1%} of the step's work ran on the CPU instead of {device} "
            f"(ops {device} lacks): {', '.join(cpu_ops)}")


# ---- a trainer's plan --------------------------------------------------------------------------------

def prepare(trainer: LoRATrainer) -> None:
    """A fresh training context for ``trainer``: the AMX decision, then F16 copies where they may help
    (``f16_weights=None``; settled by ``fit`` once the step's length is known)."""
    cfg = trainer.config
    if trainer._ctx is not None:
        trainer._ctx.close()
    choose_amx_bf16(trainer)
    trainer._ctx = trainer.new_context(cfg.gradient_checkpointing, f16_copies_may_help(trainer.model.device)
                           if cfg.f16_weights is None else cfg.f16_weights)


def fit(trainer: LoRATrainer, seq_len: int) -> dict:
    """Settle F16 copies (``f16_weights=None``) and gradient checkpointing for steps of ``seq_len`` tokens,
    or refuse a step that cannot fit; returns the memory estimate checked (bytes)."""
    if trainer.config.f16_weights is None:
        choose_f16_weights(trainer, seq_len)
    return check_memory(trainer, seq_len)


def choose_amx_bf16(trainer: LoRATrainer) -> None:
    """amx_bf16=None: products on AMX tiles where every process's CPU has them (an order of magnitude faster
    there than ggml's F16 or BF16 kernels); True where one has none: the model's UnsupportedError."""
    on = trainer.config.amx_bf16
    if on is None:
        on = amx_bf16_applies(trainer.model.device)
        if trainer.comm.size > 1:
            on = all(trainer.comm.allgather(on))
        if on:
            log.info("amx_bf16: products through the frozen weights on AMX tiles in bfloat16 "
                     "(amx_bf16=False keeps F16 copies and ggml's kernels)")
    trainer.model.set_amx_bf16(on)


def choose_f16_weights(trainer: LoRATrainer, seq_len: int) -> None:
    """f16_weights=None: keep the F16 copies (faster on CPU) only when they take at most a quarter of the
    memory available and the step's whole estimated peak at most half, so the copies never decide
    whether a model fits; otherwise train on the stored blocks. Every process must choose alike."""
    model, ctx = trainer.model, trainer._ctx
    chosen = False
    quantized = any(t.type_name != "F32" and len(t.shape) == 2 for t in model.tensors.values())
    if ctx.f16_weights and model.amx_bf16 and quantized:
        chosen = True               # no copies: the AMX products read the stored blocks (BaseModel.set_amx_bf16)
        log.info("f16_weights: the training forward multiplies the stored blocks on AMX tiles in bfloat16 "
                 "(no copies); f16_weights=False keeps llama.cpp's kernels for it")
    elif ctx.f16_weights:
        est = estimate(trainer, seq_len)
        total = sum(v for k, v in est.items() if k != "total")
        if trainer.config.memory_limit_gib is not None:
            budget = int(trainer.config.memory_limit_gib * 2**30)
        else:
            free = available_memory(model.device)
            # the weights, adapter and working copies that exist already are not in MemAvailable
            budget = None if free is None else free + est["weights"] + est["adapter"]
        chosen = est["f16_weights"] > 0 and budget is not None and \
            4 * est["f16_weights"] <= budget and 2 * total <= budget
        if chosen:
            log.info("f16_weights: training through F16 copies of the quantized weights (%.2f GiB; the step's "
                     "estimated peak %.2f GiB of %.2f GiB); f16_weights=False trains on the stored blocks",
                     est["f16_weights"] / 2**30, total / 2**30, budget / 2**30)
    if trainer.comm.size > 1:
        chosen = all(trainer.comm.allgather(chosen))
    if chosen != ctx.f16_weights:
        ctx.close()
        trainer._ctx = trainer.new_context(trainer.config.gradient_checkpointing, chosen)


def estimate(trainer: LoRATrainer, seq_len: int, ctx: TrainingContext | None = None) -> dict:
    """The estimated peak of one step (bytes by part, and "total"). A method that weights each loss row
    (preference, GRPO) keeps a weighted copy of the logits' gradient: n_vocab x loss rows in F32, or with
    checkpointing one LM-head chunk of about 64 MiB."""
    ctx = ctx or trainer._ctx
    cfg = trainer.config
    est = ctx.measure(cfg.batch_size, seq_len)
    if trainer.method.weights_loss_rows:
        extra = trainer.model.n_vocab * cfg.batch_size * (seq_len - 1) * 4
        est["compute"] += min(extra, 64 << 20) if ctx.gradient_checkpointing else extra
    est["total"] = sum(est.values())
    gib = {k: round(v / 2**30, 3) for k, v in est.items()}
    log.info("estimated peak memory of a step: %.2f GiB (%s)", gib["total"],
             ", ".join(f"{k} {v}" for k, v in gib.items() if k != "total"))
    return est


def _shortfall(trainer: LoRATrainer, est: dict) -> tuple[int, int, str] | None:
    """(bytes still to come, bytes available, where) when the step does not fit; None when it does."""
    cfg, device = trainer.config, trainer.model.device
    # the weights, the adapter and the working copies exist by now; the rest is still to come
    to_come = est["total"] - est["weights"] - est["adapter"] - est["transposed"] - est["f16_weights"]
    if cfg.memory_limit_gib is not None:
        budget, what = int(cfg.memory_limit_gib * 2**30) - (est["total"] - to_come), "memory_limit_gib"
    else:
        budget, what = available_memory(device), f"available on {device}"
    if budget is not None and to_come > budget:
        return to_come, budget, what
    return None


def check_memory(trainer: LoRATrainer, seq_len: int) -> dict:
    """Estimate the peak of a step before running one; refuse when it cannot fit. When the one-graph
    step does not fit (or its graph cannot be built at this length) and gradient checkpointing would,
    switch checkpointing on and say so: same gradients, about a third more compute."""
    cfg = trainer.config
    try:
        est = estimate(trainer, seq_len)
        short = _shortfall(trainer, est)
    except UnsupportedError as e:
        if trainer._ctx.gradient_checkpointing:
            raise
        est, short, why = None, None, str(e)
    else:
        why = None if short is None else f"needs about {short[0] / 2**30:.2f} GiB more than {short[2]}"
    if why is not None and not trainer._ctx.gradient_checkpointing:
        ctx = trainer.new_context(True, trainer._ctx.f16_weights)
        ckpt_est = estimate(trainer, seq_len, ctx)
        if _shortfall(trainer, ckpt_est) is None:
            trainer._ctx.close()
            trainer._ctx = ctx
            note = (f"gradient checkpointing switched on: a one-graph step of {cfg.batch_size} x {seq_len} tokens "
                    f"{why}; with checkpointing the estimated peak is {ckpt_est['total'] / 2**30:.2f} GiB (same "
                    "gradients, about a third more compute; set gradient_checkpointing=True to say so yourself)")
            trainer.note(note)
            log.warning("%s", note)
            return ckpt_est
        ctx.close()
    if est is None:
        raise UnsupportedError(why)
    if short is not None:
        to_come, budget, what = short
        gib = {k: round(v / 2**30, 3) for k, v in est.items()}
        hints = ["lower batch_size (use gradient_accumulation_steps to keep the step size)", "lower max_seq_length"]
        if trainer._ctx.f16_weights:
            hints.append("set f16_weights=False")
        if cfg.keep_transposed_weights:
            hints.append("set keep_transposed_weights=False")
        raise OutOfMemoryError(
            f"a training step of {cfg.batch_size} x {seq_len} tokens needs about {to_come / 2**30:.2f} GiB more "
            f"(estimated peak {gib['total']} GiB: {', '.join(f'{k} {v}' for k, v in gib.items() if k != 'total')})"
            f", but only {max(budget, 0) / 2**30:.2f} GiB is {what}"
            + (" even with gradient checkpointing" if not cfg.gradient_checkpointing else "")
            + f". To fit: {'; '.join(hints)}.")
    return est


def report_placement(placement, progress) -> None:
    """One progress line on where a run's first step ran (a model.Placement); a warning when part of it fell
    back to the CPU."""
    progress.message(f"placement: {placement.line()}")
    warning = fallback_warning(placement.device, placement.device_share, placement.cpu_ops)
    if warning:
        log.warning(warning)
