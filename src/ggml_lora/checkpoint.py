"""Checkpoints: the adapter, the optimizer moments and the loop state, written so that a crash at any
moment leaves either the previous checkpoint or the new one, never half of one.

A checkpoint is a folder ``checkpoints/checkpoint-<step>/`` holding ``adapter.gguf`` (a normal
llama.cpp LoRA file), ``optimizer.npz`` (AdamW moments) and ``trainer_state.json``. It is built under a
temporary name and renamed into place in one step; ``trainer_state.json`` is written last, so a folder
without it is not a checkpoint.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .adapter_file import new_file_mode
from .errors import CheckpointError

if TYPE_CHECKING:
    from .adapter import Adapter
    from .step import TrainingContext
# LoRATrainer in annotations: trainer.py imports this module, so the name is not imported here

STATE_FILE = "trainer_state.json"
ADAPTER_FILE = "adapter.gguf"
OPTIMIZER_FILE = "optimizer.npz"
_INTACT = "the adapter in memory is intact (trainer.save_adapter(path) writes it elsewhere)"
_NAME = re.compile(r"^checkpoint-(\d+)$")
STATE_VERSION = 1
# Config keys that change the trajectory: a resume with other values would not continue the same run.
LORA_TRAJECTORY_KEYS = ("rank", "alpha", "use_rslora", "dropout", "rank_pattern", "alpha_pattern", "peft_type",
                        "init_r", "target_r", "tinit", "tfinal", "deltaT", "beta1", "beta2", "orth_reg_weight",
                        "total_step")
TRAJECTORY_KEYS = ("batch_size", "gradient_accumulation_steps", "learning_rate", "lr_scheduler", "warmup_steps",
                   "warmup_ratio", "optimizer", "adam_beta1", "adam_beta2", "adam_epsilon", "weight_decay",
                   "max_grad_norm", "max_seq_length", "truncation", "packing", "train_on_prompt", "seed")
# batch_size and gradient_accumulation_steps may change on resume as long as the rows per optimizer step
# (times the processes) stay the same: the same data, order and update (see match_global_batch)
BATCH_KEYS = ("batch_size", "gradient_accumulation_steps")


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_checkpoint(root: Path, step: int, adapter: Adapter, ctx: TrainingContext, state: dict,
                     metadata: dict | None = None, extra: dict[str, np.ndarray] | None = None) -> Path:
    """Write checkpoint ``step`` under ``root`` (the checkpoints folder) atomically; returns its path.
    ``extra`` arrays (AdaLoRA's state) go into the optimizer file under their own keys."""
    final = root / f"checkpoint-{step}"
    try:
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".checkpoint-{step}.", suffix=".tmp", dir=root))
        os.chmod(tmp, new_file_mode(directory=True))
    except OSError as e:
        raise CheckpointError(f"cannot write checkpoint {final}: {e}; {_INTACT}") from e
    try:
        adapter.save(tmp / ADAPTER_FILE, metadata=metadata)
        arrays = {}
        if ctx.optimizer == "adamw":
            for target, (ma, va, mb, vb) in ctx.moments().items():
                arrays[f"{target}/m_a"], arrays[f"{target}/v_a"] = ma, va
                arrays[f"{target}/m_b"], arrays[f"{target}/v_b"] = mb, vb
        for target in adapter.pair_scales:      # the file holds B folded; resume needs the trained one
            arrays[f"{target}/b"] = adapter.get(target)[1]
        arrays.update(extra or {})
        with open(tmp / OPTIMIZER_FILE, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        with open(tmp / STATE_FILE, "w") as f:
            json.dump(state, f, indent=2, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        _fsync_dir(tmp)
        if final.exists():                      # the same step saved again (e.g. after a resume)
            old = root / f".{final.name}.old"
            shutil.rmtree(old, ignore_errors=True)
            os.rename(final, old)
            os.rename(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, final)
        _fsync_dir(root)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(f"cannot write checkpoint {final}: {e}; {_INTACT}") from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def list_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints under ``root``, oldest first."""
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _NAME.match(p.name)
        if m and all((p / f).is_file() for f in (STATE_FILE, ADAPTER_FILE, OPTIMIZER_FILE)):
            found.append((int(m.group(1)), p))
    return sorted(found)


def prune_checkpoints(root: Path, keep: int | None) -> None:
    """Delete all but the newest ``keep`` checkpoints, and leftovers of interrupted writes."""
    for p in root.glob(".checkpoint-*"):
        shutil.rmtree(p, ignore_errors=True)
    if keep is None:
        return
    found = list_checkpoints(root)
    for _, p in found[:-keep] if keep > 0 else found:
        # renamed first, so that a kill during the deletion leaves no half checkpoint under a valid name
        doomed = root / f".{p.name}.deleting"
        os.rename(p, doomed)
        shutil.rmtree(doomed, ignore_errors=True)


def resolve_checkpoint(path: str | os.PathLike[str]) -> Path:
    """A checkpoint folder, or the newest checkpoint of an output folder (or of its checkpoints/)."""
    p = Path(path)
    if (p / STATE_FILE).is_file():
        return p
    for root in (p / "checkpoints", p):
        found = list_checkpoints(root)
        if found:
            return found[-1][1]
    raise CheckpointError(f"{p}: no checkpoint found (expected {STATE_FILE} in it, or checkpoints/checkpoint-N/ "
                          "folders under it)")


def read_state(path: Path) -> dict:
    """The trainer state (trainer_state.json) of a checkpoint folder."""
    try:
        state = json.loads((path / STATE_FILE).read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: unreadable checkpoint ({e})") from e
    if not isinstance(state, dict) or "step" not in state:
        raise CheckpointError(f"{path / STATE_FILE}: not a ggml-lora trainer state")
    return state


def read_checkpoint(path: Path) -> tuple[dict, dict[str, tuple[np.ndarray, ...]], dict[str, np.ndarray]]:
    """(trainer state, {target: (m_a, v_a, m_b, v_b)}, {key: array} of everything else) of a checkpoint
    folder; the last holds "<target>/b", the B of pairs whose adapter file stores it folded (rank/alpha
    patterns), and "adalora/..." AdaLoRA's state."""
    moment_names = ("m_a", "v_a", "m_b", "v_b")
    state = read_state(path)
    try:
        moments: dict[str, list] = {}
        extra: dict[str, np.ndarray] = {}
        with np.load(path / OPTIMIZER_FILE) as z:
            for key in z.files:
                target, which = key.rsplit("/", 1)
                if which not in moment_names or key.startswith("adalora/"):
                    extra[key] = z[key]
                    continue
                moments.setdefault(target, [None] * 4)[moment_names.index(which)] = z[key]
    except (OSError, ValueError, KeyError) as e:
        raise CheckpointError(f"{path}: unreadable checkpoint ({e})") from e
    for target, parts in moments.items():
        if any(m is None for m in parts):
            raise CheckpointError(f"{path / OPTIMIZER_FILE}: incomplete moments for {target}")
    return state, {t: tuple(v) for t, v in moments.items()}, extra


__all__ = ["list_checkpoints", "prune_checkpoints", "read_checkpoint", "read_state", "resolve_checkpoint",
           "write_checkpoint"]


# ---- a trainer's checkpoints ---------------------------------------------------------------------------

def check_writable(directory: Path) -> None:
    """Fail before training if ``directory`` cannot be created or written."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / f".write-test-{os.getpid()}"
        with open(probe, "wb") as f:
            f.write(b"x")
        probe.unlink()
    except OSError as e:
        raise CheckpointError(f"output_dir {directory} is not writable ({e.strerror or e}); "
                              "choose another with output_dir= / --output-dir") from e


def trajectory(trainer: LoRATrainer) -> dict:
    """The settings that decide ``trainer``'s run (saved in the adapter's metadata)."""
    d = trainer.config.to_dict()
    return {**{k: d[k] for k in TRAJECTORY_KEYS}, **trainer.method.trajectory()}


def save_training(trainer: LoRATrainer, step: int, fingerprint: str, total: int) -> Path:
    """``trainer``'s checkpoint of ``step`` (written by rank 0, the older ones pruned to save_total_limit)."""
    from .distributed import check_replicas

    root = trainer.output_dir / "checkpoints"
    check_replicas(trainer, f"step {step}")
    if not trainer.is_main_process:
        return root / f"checkpoint-{step}"
    cfg = trainer.config
    state = {"version": STATE_VERSION, "step": step, "total_steps": total, "data_fingerprint": fingerprint,
             "training_config": cfg.to_dict(), "lora_config": trainer.lora_config.to_dict(),
             "targets": list(trainer.adapter.targets), "optimizer": trainer._ctx.optimizer,
             "base_model_sha256": trainer.model.sha256, "world_size": trainer.comm.size,
             "global_batch_size": trainer.global_rows, **trainer.method.state()}
    path = write_checkpoint(root, step, trainer.adapter, trainer._ctx, state, trainer.adapter_metadata(),
                            extra=trainer.method.state_arrays())
    prune_checkpoints(root, cfg.save_total_limit)
    return path


def match_global_batch(trainer: LoRATrainer, path: Path) -> None:
    """A resume continues the checkpoint's run: the same rows per optimizer step. With another number
    of processes, gradient_accumulation_steps is chosen to keep them (the step's rows, their order and
    the update are then the same), or the resume is refused naming what would fit."""
    import dataclasses

    state = read_state(path)
    saved_cfg = state.get("training_config") or {}
    saved_world = int(state.get("world_size", 1))
    saved = int(state.get("global_batch_size") or saved_cfg.get("batch_size", 0) *
                saved_cfg.get("gradient_accumulation_steps", 0))
    cfg, size = trainer.config, trainer.comm.size
    if saved == cfg.rows_per_step * size:
        return
    per = cfg.batch_size * size
    if saved_world != size and saved % per == 0:
        accum = saved // per
        trainer.note(f"resuming a {saved_world}-process run on {size}: gradient_accumulation_steps "
                     f"{cfg.gradient_accumulation_steps} -> {accum} keeps its {saved} rows per step")
        trainer.config = dataclasses.replace(cfg, gradient_accumulation_steps=accum)
        return
    raise CheckpointError(f"checkpoint {path} was trained with {saved} rows per optimizer step ({saved_world} "
                          f"process(es) x batch_size x gradient_accumulation_steps); this run has "
                          f"{cfg.rows_per_step * size} ({size} x {cfg.batch_size} x "
                          f"{cfg.gradient_accumulation_steps}); resuming needs processes x batch_size x "
                          f"gradient_accumulation_steps = {saved}")


def restore_training(trainer: LoRATrainer, path: Path, fingerprint: str, total: int) -> int:
    """Load checkpoint ``path`` into ``trainer``'s adapter, optimizer and method; returns its step."""
    from .adapter import Adapter

    state, moments, extra = read_checkpoint(path)
    trained_b = {k[:-2]: v for k, v in extra.items() if k.endswith("/b") and not k.startswith("adalora/")}
    where = f"checkpoint {path}"
    trainer.method.resume(state, where)
    if state.get("base_model_sha256") != trainer.model.sha256:
        raise CheckpointError(f"{where} was trained on another base model (sha256 differs)")
    adapter = trainer.adapter
    if sorted(state.get("targets", [])) != sorted(adapter.targets):
        raise CheckpointError(f"{where} adapts other modules than this LoRAConfig")
    saved = state.get("training_config", {})
    changed = [k for k in TRAJECTORY_KEYS if k not in BATCH_KEYS and saved.get(k) != getattr(trainer.config, k)]
    if changed:
        raise CheckpointError(f"{where}: resuming with other values of {', '.join(changed)} would not continue "
                              f"the same run (saved: {', '.join(f'{k}={saved.get(k)!r}' for k in changed)})")
    saved_lora, lora = state.get("lora_config") or {}, trainer.lora_config.to_dict()
    differ = [k for k in LORA_TRAJECTORY_KEYS if k in saved_lora and saved_lora[k] != lora[k]]
    if differ:
        raise CheckpointError(f"{where} was trained with other LoRA settings: "
                              + ", ".join(f"{k}={saved_lora[k]!r} (now {lora[k]!r})" for k in differ))
    if state.get("data_fingerprint") != fingerprint:
        raise CheckpointError(f"{where} was trained on other data (the tokenized rows differ)")
    step = int(state["step"])
    if step > total:
        raise CheckpointError(f"{where} is at step {step}, past the {total} steps of this configuration")
    loaded = Adapter.load(trainer.model, path / ADAPTER_FILE)
    try:
        for t in adapter.targets:
            a, b = loaded.get(t)
            if t in adapter.pair_scales and t not in trained_b:
                raise CheckpointError(f"{where} lacks the trained lora_b of {t} (a pair with its own scale)")
            adapter.set(t, lora_a=a, lora_b=trained_b.get(t, b))
    finally:
        loaded.close()
    if trainer._ctx.optimizer == "adamw":
        trainer._ctx.set_moments(moments)
    trainer.method.load_state_arrays(extra, where)
    return step
