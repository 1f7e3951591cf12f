"""What a training run tells the user: the progress line, metrics.jsonl, loss.png, and callbacks."""

from __future__ import annotations

import json
import logging
import math
import os
import resource
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from .config import REPORT_TO
from .errors import InvalidArgumentError
from .model import Placement

log = logging.getLogger("ggml_lora.train")


@runtime_checkable
class TrainerCallback(Protocol):
    """Hooks a user can pass to ``LoRATrainer.train(callbacks=...)``; any subset of the methods will do.

    ``record`` is the same dict that goes to metrics.jsonl.
    """

    def on_step(self, trainer: Any, record: dict) -> None: ...
    def on_eval(self, trainer: Any, record: dict) -> None: ...
    def on_save(self, trainer: Any, path: Path) -> None: ...


@dataclass
class TrainingHistory:
    """What ``train`` did. ``steps``/``evals`` are the records also written to metrics.jsonl."""

    steps: list[dict] = field(default_factory=list)
    evals: list[dict] = field(default_factory=list)
    global_step: int = 0
    total_steps: int = 0
    interrupted: str | None = None          # "SIGINT" / "SIGTERM" when stopped by a signal
    skipped_steps: int = 0
    adapter_path: Path | None = None        # the final adapter (None when interrupted)
    checkpoint_path: Path | None = None     # the newest checkpoint written
    data: dict = field(default_factory=dict)
    memory: dict = field(default_factory=dict)   # the estimate checked before the first step (bytes)
    placement: Placement | None = None      # where the first step's work ran (device vs the CPU fallback)

    @property
    def losses(self) -> list[float]:
        return [r["loss"] for r in self.steps]


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

    def __init__(self, path: Path, resume_step: int | None, enabled: bool = True):
        self.path = path
        self.records: list[dict] = []
        self._f = None
        if not enabled:      # another rank than 0 of a distributed run: records kept, nothing written
            return
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
        if self._f is None:
            return
        try:
            self._f.write(json.dumps(record) + "\n")
            self._f.flush()
        except OSError as e:
            if not self._failed:
                log.warning("cannot write %s (%s); training goes on, later records are kept in memory", self.path, e)
            self._failed = True

    def close(self) -> None:
        try:
            if self._f is not None:
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
    # GRPO's evaluations report rewards, not a loss
    valid = [(r["step"], r["val_loss"]) for r in records if r.get("type") == "eval" and "val_loss" in r]
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

    def __init__(self, total: int, initial: int, enabled: bool, quiet: bool = False):
        self.bar = None
        self.quiet = quiet          # ranks other than 0 of a distributed run say nothing
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
        if self.quiet:
            return
        if self.bar is not None:
            self.bar.write(text)
        else:
            log.info(text)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# ---- TensorBoard and MLflow: callbacks fed by the records of metrics.jsonl ----------------------------


# metrics.jsonl key -> the tag Hugging Face's Trainer uses, so dashboards line up with PEFT runs
_TAGS = {"train": {"loss": "train/loss", "learning_rate": "train/learning_rate", "grad_norm": "train/grad_norm",
                   "tokens_per_s": "train/tokens_per_s", "epoch": "train/epoch",
                   "peak_rss_bytes": "train/peak_rss_bytes"},
         "eval": {"val_loss": "eval/loss", "val_ppl": "eval/perplexity", "eval_s": "eval/runtime"}}


# TRL's preference metrics, logged as train/<name> and eval/<name> as TRL's trainers log them
_PREFERENCE = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
               "logps/rejected", "nll_loss", "log_odds_ratio", "log_odds_chosen", "kl")
_TAGS["train"].update({k: f"train/{k}" for k in _PREFERENCE})
_TAGS["eval"].update({f"val_{k}": f"eval/{k}" for k in _PREFERENCE})

# TRL's GRPO metrics (grpo_trainer.py:2293-2320, 2821-2830, 3213-3288), and rewards/<function>/mean and /std,
# whose names come from the reward functions: every key under rewards/ is reported
_GRPO = ("reward", "reward_std", "frac_reward_zero_std", "num_tokens", "entropy", "step_time", "cispo_clip_ratio",
         *(f"completions/{k}" for k in ("mean_length", "min_length", "max_length", "clipped_ratio",
                                        "mean_terminated_length", "min_terminated_length", "max_terminated_length")),
         *(f"clip_ratio/{k}" for k in ("low_mean", "high_mean", "region_mean", "low_min", "high_max")))
_TAGS["train"].update({k: f"train/{k}" for k in _GRPO})
_TAGS["eval"].update({f"val_{k}": f"eval/{k}" for k in _GRPO})
_REWARDS = {"train": ("rewards/", "train/"), "eval": ("val_rewards/", "eval/")}    # key prefix, tag = this + key


def _scalars(record: dict) -> dict[str, float]:
    kind = record.get("type")
    tags = dict(_TAGS.get(kind, {}))
    if kind in _REWARDS:
        prefix, to = _REWARDS[kind]
        tags.update({k: to + k.removeprefix("val_") for k in record if k.startswith(prefix) and k not in tags})
    out = {}
    for key, tag in tags.items():
        v = record.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            out[tag] = float(v)
    return out


class _Reporter:
    """Common ground: a failed write is reported once and does not stop training (as metrics.jsonl)."""

    name = ""

    def __init__(self) -> None:
        self._failed = False

    def _guard(self, fn, *args) -> None:
        if self._failed:
            return
        try:
            fn(*args)
        except Exception as e:           # a logging backend's error must not end a run
            self._failed = True
            log.warning("%s: cannot log (%s: %s); training goes on, metrics.jsonl has every record",
                        self.name, type(e).__name__, e)

    def on_step(self, trainer: Any, record: dict) -> None:
        self._guard(self._log, record)

    def on_eval(self, trainer: Any, record: dict) -> None:
        self._guard(self._log, record)

    def _log(self, record: dict) -> None:
        raise NotImplementedError

    def close(self, status: str = "FINISHED") -> None:
        pass


class TensorBoardReporter(_Reporter):
    """Event files under ``log_dir`` (TensorBoard's ``--logdir``), written with tensorboardX's
    SummaryWriter. On a resume from step N the writer purges events after N, so a killed run's
    tail does not show twice."""

    name = "tensorboard"

    def __init__(self, log_dir: Path, config: dict, resume_step: int | None = None):
        super().__init__()
        from tensorboardX import SummaryWriter

        self.log_dir = log_dir
        # the file name holds the second it was made in; two writers in one second (a run that fails
        # fast, then its resume) must not share it, and the resumed one must sort after
        self.writer = SummaryWriter(str(log_dir), purge_step=resume_step + 1 if resume_step else None,
                                    filename_suffix=f".from-step-{resume_step or 0:09d}")
        if not resume_step:
            self._guard(self.writer.add_text, "config", "```\n" + json.dumps(config, indent=2, default=str) + "\n```", 0)

    def _log(self, record: dict) -> None:
        for tag, value in _scalars(record).items():
            self.writer.add_scalar(tag, value, record["step"])
        self.writer.flush()

    def close(self, status: str = "FINISHED") -> None:
        try:
            self.writer.close()
        except Exception as e:
            log.warning("tensorboard: closing the writer failed: %s", e)


class MLflowReporter(_Reporter):
    """One MLflow run: the configuration as parameters, the records as metrics at their step.

    The tracking URI is ``MLFLOW_TRACKING_URI`` when set (a server, a database), else MLflow's local
    file store in ``output_dir/mlruns`` (``mlflow ui --backend-store-uri output_dir/mlruns``); the
    experiment is ``MLFLOW_EXPERIMENT_NAME`` or "ggml-lora". The run id is kept in
    ``output_dir/mlflow_run_id`` and a resumed run continues the same MLflow run."""

    name = "mlflow"
    RUN_ID_FILE = "mlflow_run_id"

    def __init__(self, output_dir: Path, config: dict, resume_step: int | None = None, run_name: str | None = None):
        super().__init__()
        uri = os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:
            uri = (output_dir / "mlruns").resolve().as_uri()
            # MLflow 3 keeps the file store in maintenance mode behind this switch; it is the store that
            # needs no server and no database, which is what a local training run wants
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        from mlflow.tracking import MlflowClient

        self.uri = uri
        self.client = MlflowClient(uri)
        self.run_id = None
        id_file = output_dir / self.RUN_ID_FILE
        if resume_step is not None and id_file.is_file():
            old = id_file.read_text().strip()
            try:
                self.client.get_run(old)
                self.run_id = old
                self.client.update_run(old, status="RUNNING")
            except Exception:
                self.run_id = None
        if self.run_id is None:
            name = os.environ.get("MLFLOW_EXPERIMENT_NAME", "ggml-lora")
            exp = self.client.get_experiment_by_name(name)
            exp_id = exp.experiment_id if exp is not None else self.client.create_experiment(name)
            run = self.client.create_run(exp_id, run_name=run_name, tags={"mlflow.source.name": "ggml-lora"})
            self.run_id = run.info.run_id
            self._guard(self._params, config)
            from .adapter_file import atomic_path

            with atomic_path(id_file) as tmp:
                Path(tmp).write_text(self.run_id + "\n")

    def _params(self, config: dict) -> None:
        from mlflow.entities import Param

        flat = {}
        for section, values in config.items():
            if isinstance(values, dict):
                for k, v in values.items():
                    flat[f"{section}.{k}"] = json.dumps(v) if isinstance(v, (list, dict)) else str(v)
        items = [Param(k, v[:6000]) for k, v in sorted(flat.items())]
        for i in range(0, len(items), 100):            # MLflow's batch limit
            self.client.log_batch(self.run_id, params=items[i:i + 100])

    def _log(self, record: dict) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(tag, v, now, int(record["step"]))
                   for tag, v in _scalars(record).items()]
        if metrics:
            self.client.log_batch(self.run_id, metrics=metrics)

    def close(self, status: str = "FINISHED") -> None:
        try:
            self.client.set_terminated(self.run_id, status=status)
        except Exception as e:
            log.warning("mlflow: cannot end run %s: %s", self.run_id, e)


_PACKAGES = {"tensorboard": ("tensorboardX", "tensorboardX", "tensorboard"), "mlflow": ("mlflow", "mlflow-skinny", "mlflow")}


def write_adapter_config(trainer, reports: dict, packing: bool, total: int, steps_per_epoch: int | None) -> dict:
    """adapter_config.json: the run's settings, what they resolved to and its data (also the config the
    reporters log); written atomically. Returns the document."""
    from . import __version__
    from .adapter_file import atomic_path
    from .config import warmup_steps

    doc = {"ggml_lora_version": __version__, "base_model": str(trainer.model.path),
           "base_model_sha256": trainer.model.sha256, "lora": trainer.lora_config.to_dict(),
           "training": trainer.config.to_dict(), "resolved": {"packing": packing, "total_steps": total,
                                                              "steps_per_epoch": steps_per_epoch,
                                                              "warmup_steps": warmup_steps(trainer.config, total),
                                                              "file_alpha": trainer.adapter.alpha,
                                                              "processes": trainer.comm.size,
                                                              "f16_weights": trainer._ctx.f16_weights,
                                                              "amx_bf16": trainer.model.amx_bf16,
                                                              "global_batch_size": trainer.global_rows},
           "data": {k: r.to_dict() for k, r in reports.items()}, **trainer.method.config_extra()}
    with atomic_path(trainer.output_dir / "adapter_config.json") as tmp:
        tmp.write_text(json.dumps(doc, indent=2, default=str) + "\n")
    return doc


def check_reporters(report_to: tuple[str, ...]) -> None:
    """Fail before any data is read when a backend's package is not installed."""
    import importlib.util

    for name in report_to:
        module, pkg, extra = _PACKAGES[name]
        if importlib.util.find_spec(module) is None:
            raise InvalidArgumentError(f"report_to={name!r} needs the {pkg} package, which is not installed: "
                                       f"pip install 'ggml-lora[{extra}]'")


def make_reporters(report_to: tuple[str, ...], output_dir: Path, logging_dir: str | None, config: dict,
                   resume_step: int | None, run_name: str | None = None) -> list[_Reporter]:
    """The reporters ``report_to`` names, or an error naming the missing package before training starts."""
    out: list[_Reporter] = []
    for name in report_to:
        try:
            if name == "tensorboard":
                out.append(TensorBoardReporter(Path(logging_dir) if logging_dir else output_dir / "runs", config,
                                               resume_step))
            elif name == "mlflow":
                out.append(MLflowReporter(output_dir, config, resume_step, run_name))
        except ImportError as e:
            for r in out:
                r.close("KILLED")
            _, pkg, extra = _PACKAGES[name]
            raise InvalidArgumentError(f"report_to={name!r} needs {pkg} ({e}); pip install 'ggml-lora[{extra}]'") from None
    return out


__all__ = ["MLflowReporter", "MetricsLog", "Progress", "REPORT_TO", "TensorBoardReporter", "TrainerCallback",
           "TrainingHistory",
           "call_hooks", "check_reporters", "make_reporters", "peak_rss_bytes", "plot_losses"]
