"""Interruptions of a real `ggml-lora train` process: SIGTERM checkpoints and exits; SIGKILL at random
moments never leaves a broken checkpoint or adapter, and --resume ends at the very bytes of an
uninterrupted run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import N_THREADS
from test_trainer import texts

from ggml_lora import Adapter, BaseModel
from ggml_lora.checkpoint import list_checkpoints, read_checkpoint

KILLS = int(os.environ.get("GGML_LORA_KILLS", "20"))


def train_cmd(model: Path, data: Path, out: Path, steps: int, resume: bool = False) -> list[str]:
    cmd = [sys.executable, "-m", "ggml_lora", "train", "--model", str(model), "--data", str(data),
           "--output-dir", str(out), "--max-steps", str(steps), "--batch-size", "2", "--max-seq-length", "32",
           "--rank", "4", "--target-modules", "q_proj,v_proj", "--dropout", "0.1", "--learning-rate", "0.01",
           "--save-every", "1", "--save-total-limit", "2", "--eval-every", "0", "--no-progress",
           "--n-threads", str(N_THREADS), "--seed", "5"]
    return cmd + (["--resume"] if resume else [])


@pytest.fixture(scope="module")
def setup(tiny_model_file, tmp_path_factory):
    root = tmp_path_factory.mktemp("interrupts")
    data = root / "data.txt"
    data.write_text("\n\n".join(texts(24, seed=11)))
    return tiny_model_file("llama", "f32"), data, root


def check_outputs(model_path: Path, out: Path) -> int:
    """Every checkpoint and adapter on disk loads; returns the newest checkpoint's step (0 if none)."""
    with BaseModel.load(model_path, n_threads=N_THREADS) as model:
        found = list_checkpoints(out / "checkpoints")
        for _, path in found:
            state, moments, _ = read_checkpoint(path)
            assert state["step"] == int(path.name.split("-")[1])
            with Adapter.load(model, path / "adapter.gguf") as a:
                assert set(moments) == set(a.targets)
        if (out / "adapter.gguf").exists():
            Adapter.load(model, out / "adapter.gguf").close()
    return found[-1][0] if found else 0


def test_sigterm_checkpoints_and_exits(setup):
    model, data, root = setup
    out = root / "term"
    proc = subprocess.Popen(train_cmd(model, data, out, steps=10_000), stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not list_checkpoints(out / "checkpoints") and time.time() < deadline:
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert "SIGTERM" in err and "--resume" in err
    step = check_outputs(model, out)
    assert step >= 1
    assert not (out / "adapter.gguf").exists()         # the final adapter only comes with the last step


def first_step_time(proc: subprocess.Popen, out: Path) -> float:
    """Seconds from start until metrics.jsonl shows a training step (the process keeps running)."""
    t0 = time.time()
    while proc.poll() is None:
        metrics = out / "metrics.jsonl"
        if metrics.exists() and '"train"' in metrics.read_text():
            break
        time.sleep(0.02)
    return time.time() - t0


def newest_step(out: Path) -> int:
    found = list_checkpoints(out / "checkpoints")
    return found[-1][0] if found else 0


def test_sigkill_at_random_moments_then_resume(setup):
    """A quarter of the kills land in start-up (loading the model, the data, the checkpoint), the rest
    after 1-3 new checkpoints at a random moment of the next step (its checkpoint write and pruning
    included). Kills are timed from the run's own progress, not the clock alone: a resumed run's start-up
    varies by more than a step on a busy machine, so fixed windows left runs that never got anywhere."""
    model, data, root = setup
    steps = 40
    ref = root / "reference"
    t0 = time.time()
    proc = subprocess.Popen(train_cmd(model, data, ref, steps), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    startup = first_step_time(proc, ref)
    _, err = proc.communicate()
    assert proc.returncode == 0, err
    per_step = (time.time() - t0 - startup) / steps

    out = root / "killed"
    rng = np.random.default_rng(0)
    progress, in_startup = [], 0
    for _ in range(KILLS):
        before = newest_step(out)
        proc = subprocess.Popen(train_cmd(model, data, out, steps, resume=before > 0), stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        if rng.random() < 0.25:
            in_startup += 1
            time.sleep(rng.uniform(0.0, 0.5 * startup))
        else:
            target = min(before + int(rng.integers(1, 4)), steps)
            while newest_step(out) < target and proc.poll() is None:
                time.sleep(0.005)
            time.sleep(rng.uniform(0.0, 1.5 * per_step))
        proc.kill()
        proc.wait()
        progress.append(check_outputs(model, out))
    final = subprocess.run(train_cmd(model, data, out, steps, resume=bool(list_checkpoints(out / "checkpoints"))),
                           capture_output=True, text=True)
    assert final.returncode == 0, final.stderr
    print(f"{KILLS} kills survived ({in_startup} in start-up; start-up {startup:.1f} s, {per_step * 1000:.0f} "
          f"ms/step); newest checkpoint after each: {progress}")
    assert len(set(progress)) > 3, "the kills did not land at different points of the run"
    assert (out / "adapter.gguf").read_bytes() == (ref / "adapter.gguf").read_bytes()
