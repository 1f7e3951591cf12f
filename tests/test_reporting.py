"""report_to: TensorBoard event files and MLflow's local store, read back with the libraries' own
readers and compared with metrics.jsonl, across a failed and resumed run."""

from __future__ import annotations

import json

import pytest
from test_trainer import LORA, config, texts, tiny  # noqa: F401  (fixture)

from ggml_lora import LoRATrainer, TrainingConfig
from ggml_lora.errors import InvalidArgumentError


class Boom(Exception):
    pass


class FailAt:
    """The process dies between checkpoints: step 3 is reported, the checkpoint is at step 2."""

    def on_step(self, trainer, rec):
        if rec["step"] == 3:
            raise Boom


def records(out, kind):
    return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["type"] == kind]


def run_twice(tiny, cfg):
    data, valid = texts(12), texts(4, seed=9)
    with pytest.raises(Boom):
        LoRATrainer(tiny, LORA, cfg).train(data, valid=valid, callbacks=[FailAt()])
    return LoRATrainer(tiny, LORA, cfg).train(data, valid=valid, resume_from=True)


def test_tensorboard_events_match_metrics(tiny, tmp_path):
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    pytest.importorskip("tensorboardX")
    cfg = config(tmp_path, save_every=2, report_to="tensorboard")
    history = run_twice(tiny, cfg)
    assert history.global_step == 6
    out = tmp_path / "run"
    assert len(list((out / "runs").glob("events.out.tfevents.*"))) == 2    # one per writer, even in one second
    acc = event_accumulator.EventAccumulator(str(out / "runs"))
    acc.Reload()
    loss = acc.Scalars("train/loss")
    # the failed run's step 3 was purged by the resumed writer: each step once, with the resumed value
    assert [e.step for e in loss] == [1, 2, 3, 4, 5, 6]
    want = {r["step"]: r for r in records(out, "train")}
    for e in loss:       # event files store float32
        assert e.value == pytest.approx(want[e.step]["loss"], rel=1e-6)
    lr = {e.step: e.value for e in acc.Scalars("train/learning_rate")}
    assert lr == pytest.approx({s: r["learning_rate"] for s, r in want.items()}, rel=1e-6)
    evals = records(out, "eval")
    assert [(e.step, pytest.approx(e.value, rel=1e-6)) for e in acc.Scalars("eval/loss")] == \
        [(r["step"], r["val_loss"]) for r in evals]


def test_mlflow_run_matches_metrics(tiny, tmp_path, monkeypatch):
    mlflow = pytest.importorskip("mlflow")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    cfg = config(tmp_path, save_every=2, report_to=["mlflow"], run_name="tiny")
    run_twice(tiny, cfg)
    out = tmp_path / "run"
    client = mlflow.tracking.MlflowClient((out / "mlruns").resolve().as_uri())
    run_id = (out / "mlflow_run_id").read_text().strip()
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "tiny"
    assert run.data.params["lora.rank"] == str(LORA.rank)
    assert run.data.params["training.learning_rate"] == str(cfg.learning_rate)
    assert len(client.search_runs([run.info.experiment_id])) == 1          # the resume continued the run
    history = client.get_metric_history(run_id, "train/loss")
    # MLflow keeps every logged value: step 3 twice (the failed run, then the resumed one), the last counts
    assert sorted(m.step for m in history) == [1, 2, 3, 3, 4, 5, 6]
    last = {}
    for m in sorted(history, key=lambda m: m.timestamp):
        last[m.step] = m.value
    want = {r["step"]: r["loss"] for r in records(out, "train")}
    assert last == pytest.approx(want, rel=1e-12)
    assert sorted(m.step for m in client.get_metric_history(run_id, "eval/loss")) == \
        [r["step"] for r in records(out, "eval")] == [0, 2, 4, 6]


def test_report_to_is_checked():
    assert TrainingConfig(report_to="all").report_to == ("tensorboard", "mlflow")
    assert TrainingConfig(report_to=["none"]).report_to == ()
    with pytest.raises(InvalidArgumentError, match="report_to='wandb': unknown; valid: tensorboard, mlflow"):
        TrainingConfig(report_to=["wandb"])


def test_missing_package_is_named_before_training(tiny, tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a))
    with pytest.raises(InvalidArgumentError, match=r"mlflow-skinny package, which is not installed.*ggml-lora\[mlflow\]"):
        LoRATrainer(tiny, LORA, config(tmp_path, report_to="mlflow")).train(texts(4))
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
