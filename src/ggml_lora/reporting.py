"""What a training run tells the user: the progress line, metrics.jsonl, loss.png, and callbacks."""

from __future__ import annotations

import json
import logging
import math
import os
import resource
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

log = logging.getLogger("ggml_lora.train")


@runtime_checkable
class TrainerCallback(Protocol):
    """Hooks a user can pass to ``LoRATrainer.train(callbacks=...)``; any subset of the methods will do.

    ``record`` is the same dict that goes to metrics.jsonl.
    """

    def on_step(self, trainer: Any, record: dict) -> None: ...
    def on_eval(self, trainer: Any, record: dict) -> None: ...
    def on_save(self, trainer: Any, path: Path) -> None: ...


def call_hooks(callbacks: Iterable[Any], name: str, *args: Any) -> None:
    for cb in callbacks:
        fn = getattr(cb, name, None)
        if fn is not None:
            fn(*args)


def peak_rss_bytes() -> int:
    """Peak resident memory of this process so far (ru_maxrss: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


class MetricsLog:
    """output_dir/metrics.jsonl: one JSON object per line, flushed as written."""

    def __init__(self, path: Path, resume_step: int | None):
        self.path = path
        self.records: list[dict] = []
        if resume_step is not None and path.exists():
            # keep what happened up to the checkpoint; a half-written last line (killed run) is dropped
            for line in path.read_text(errors="replace").splitlines():
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue
                if isinstance(rec, dict) and rec.get("step", math.inf) <= resume_step:
                    self.records.append(rec)
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "w") as f:
            for rec in self.records:
                f.write(json.dumps(rec) + "\n")
        os.replace(tmp, path)
        self._f = open(path, "a")
        self._failed = False

    def write(self, record: dict) -> None:
        """Append a record; a failed write (disk full) is reported once and does not stop training:
        the next checkpoint save reports the disk as an error."""
        self.records.append(record)
        try:
            self._f.write(json.dumps(record) + "\n")
            self._f.flush()
        except OSError as e:
            if not self._failed:
                log.warning("cannot write %s (%s); training goes on, later records are kept in memory", self.path, e)
            self._failed = True

    def close(self) -> None:
        try:
            self._f.close()
        except OSError:
            pass


_warned_plot = False


def plot_losses(records: list[dict], path: Path) -> Path | None:
    """loss.png: train and validation loss against step. Needs matplotlib (the ``plot`` extra).

    Never raises for a file problem: a plot is not worth interrupting (or masking an error of) a run.
    """
    try:
        return _plot(records, path)
    except OSError as e:
        log.warning("cannot write %s: %s", path, e)
        return None


def _plot(records: list[dict], path: Path) -> Path | None:
    global _warned_plot
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        if not _warned_plot:
            log.warning("matplotlib is not installed: no loss.png (pip install 'ggml-lora[plot]')")
            _warned_plot = True
        return None
    train = [(r["step"], r["loss"]) for r in records if r.get("type") == "train" and math.isfinite(r["loss"])]
    valid = [(r["step"], r["val_loss"]) for r in records if r.get("type") == "eval"]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if train:
        ax.plot(*zip(*train), label="train", linewidth=1)
    if valid:
        ax.plot(*zip(*valid), "o-", label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (mean cross-entropy)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = path.with_name(".loss.png.tmp")
    try:
        fig.savefig(tmp, format="png")
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        if tmp.exists():
            tmp.unlink()
    return path


class Progress:
    """One line that updates each step: loss, lr, grad norm, tokens/s, elapsed and remaining, peak memory."""

    def __init__(self, total: int, initial: int, enabled: bool):
        self.bar = None
        if enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, leave=True)

    def step(self, rec: dict) -> None:
        if self.bar is None:
            return
        self.bar.set_postfix_str(f"loss {rec['loss']:.4f} lr {rec['learning_rate']:.2e} gnorm {rec['grad_norm']:.3f} "
                                 f"{rec['tokens_per_s']:.0f} tok/s mem {rec['peak_rss_bytes'] / 2**30:.2f} GiB",
                                 refresh=False)
        self.bar.update(1)

    def message(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text)
        else:
            log.info(text)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


__all__ = ["MetricsLog", "Progress", "TrainerCallback", "call_hooks", "peak_rss_bytes", "plot_losses"]
