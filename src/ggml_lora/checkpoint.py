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
    from .training import TrainingContext

STATE_FILE = "trainer_state.json"
ADAPTER_FILE = "adapter.gguf"
OPTIMIZER_FILE = "optimizer.npz"
_INTACT = "the adapter in memory is intact (trainer.save_adapter(path) writes it elsewhere)"
_NAME = re.compile(r"^checkpoint-(\d+)$")


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
