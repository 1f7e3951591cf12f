"""Data-parallel training over MPI gives what one process gives on the same global batch, with real
processes (`mpiexec -n 2`, MPICH from PyPI).

The reference for every distributed run is one process training on the same global batch: the rows of
each optimizer step, their order and their dropout masks are the same, so the only differences allowed
are those of float32 rounding where the two group their sums differently."""

from __future__ import annotations

import json
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import N_THREADS
from gguf import GGUFReader

from ggml_lora import Adapter, BaseModel, LoRAConfig
from ggml_lora.data import Row, collate, n_targets
from ggml_lora.step import TrainingContext

pytest.importorskip("mpi4py")
MPIEXEC = Path(sys.executable).parent / "mpiexec"
if not MPIEXEC.exists():
    MPIEXEC = Path(shutil.which("mpiexec") or "mpiexec")
RUNNER = Path(__file__).resolve().parent / "distributed_run.py"
WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi".split()
COMMON = ("--max-steps", "10", "--dropout", "0.1", "--learning-rate", "1e-3", "--eval-every", "5", "--save-every",
          "5", "--no-progress", "--target-modules", "q_proj,v_proj,down_proj", "--n-threads", "1",
          "--save-total-limit", "none")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """37 prompt/completion records of varied lengths (rows of unequal length: padding differs between
    a batch of 4 and two of 2), 9 for validation."""
    root = tmp_path_factory.mktemp("dp-data")
    rng = random.Random(0)

    def text(lo, hi):
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))
    for name, n in (("train.jsonl", 37), ("valid.jsonl", 9)):
        with open(root / name, "w") as f:
            for _ in range(n):
                f.write(json.dumps({"prompt": text(3, 9), "completion": text(2, 12)}) + "\n")
    return root


def launch(n: int, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    cmd = [str(MPIEXEC), "-n", str(n), *args] if n > 0 else list(args)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def train_cli(n: int, model: Path, data: Path, out: Path, *extra: str, check: bool = True):
    proc = launch(n, sys.executable, "-m", "ggml_lora", "train", "--model", str(model), "--data",
                  str(data / "train.jsonl"), "--valid", str(data / "valid.jsonl"), "--output-dir", str(out),
                  *COMMON, *extra)
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def tensors(path: Path) -> dict[str, np.ndarray]:
    return {t.name: np.array(t.data) for t in GGUFReader(path).tensors}


def test_row_masks_do_not_depend_on_the_batch(tiny_model_file):
    """With seq_keys, a row's dropout masks (every projection and the LM head's loss rows) depend on its
    key alone: one batch of 4 rows gives the gradient of the same rows split 2 + 2 (different padding),
    with and without gradient checkpointing. Without keys the masks follow the flat position, and the
    split differs: the check can fail."""
    path = tiny_model_file("llama", "f32", tied=False)
    targets = ("q_proj", "v_proj", "down_proj", "lm_head")
    rng = np.random.default_rng(5)
    with BaseModel.load(path, n_threads=N_THREADS) as model:
        rows = []
        for n in (9, 23, 14, 30):
            mask = np.ones(n, bool)
            mask[: n // 3] = False
            rows.append(Row(rng.integers(0, model.n_vocab, n).astype(np.int32), mask, None))
        n_tok = sum(n_targets(r) for r in rows)
        assert n_tok == collate(rows).n_loss

        def grads(groups, keyed, checkpointing):
            with Adapter.init(model, LoRAConfig(rank=4, target_modules=targets, dropout=0.3)) as ad:
                r2 = np.random.default_rng(3)
                for t in ad.targets:
                    a, b = ad.get(t)
                    ad.set(t, lora_a=r2.normal(0, 0.2, a.shape), lora_b=r2.normal(0, 0.1, b.shape))
                with TrainingContext(ad, gradient_checkpointing=checkpointing) as ctx:
                    for lo, hi in groups:
                        keys = np.arange(lo, hi) if keyed else None
                        ctx.accumulate(collate(rows[lo:hi], seq_keys=keys), n_tok, dropout_seed=7)
                    return ctx.gradients()

        for checkpointing in (False, True):
            whole = grads([(0, 4)], True, checkpointing)
            split = grads([(0, 2), (2, 4)], True, checkpointing)
            unkeyed = grads([(0, 2), (2, 4)], False, checkpointing)
            worst_unkeyed = 0.0
            for t in whole:
                for x, y, z in zip(whole[t], split[t], unkeyed[t]):
                    scale = np.abs(x).max()
                    assert scale > 0
                    # float32 sums grouped differently (4 rows vs 2 + 2): measured below 1e-6 of the largest
                    assert np.abs(x - y).max() <= 1e-5 * scale, t
                    worst_unkeyed = max(worst_unkeyed, np.abs(x - z).max() / scale)
            assert worst_unkeyed > 1e-2, "masks keyed by position should differ once the batch is split"


def test_supervised_count_of_a_row_is_what_collate_makes_of_it():
    """Each rank counts the supervised tokens of the whole step from the rows (no message): the count
    must be collate's, packed rows (segments) and padding included."""
    from ggml_lora.data import Sample, make_rows

    rng = np.random.default_rng(2)
    samples = []
    for _ in range(40):
        n = int(rng.integers(2, 30))
        mask = rng.random(n) < 0.7
        mask[0] = False
        samples.append(Sample(rng.integers(0, 100, n).astype(np.int32), mask))
    for packing in (False, True):
        rows = make_rows(samples, max_seq_length=64, packing=packing, seed=1)
        assert packing is False or any(r.segments is not None for r in rows)
        for lo in range(0, len(rows), 3):
            group = rows[lo:lo + 3]
            assert sum(n_targets(r) for r in group) == collate(group).n_loss


def test_two_ranks_train_as_one_process(tiny_model_file, data_dir, tmp_path):
    """N=2 x batch 2 against N=1 x batch 4 and N=1 x batch 2 x accumulation 2, 10 steps, dropout 0.1.

    Against batch 2 x accumulation 2 (the same micro-batches, summed in the same order: rank 0's
    gradient plus rank 1's is what the accumulator adds) every loss and every adapter value is bitwise
    equal. Against one batch of 4 only float32 rounding differs (other padding, other grouping of sums):
    losses within 1e-6 relative (measured 2e-7), adapter values within 3e-5 of each tensor's largest
    (measured 6.5e-6 on an AVX2 CPU and 1.1e-5 on an AVX-512 one, whose kernels group the float32 sums
    differently; AdamW divides tiny gradients by their own root mean square)."""
    model = tiny_model_file("llama", "f32")
    one, acc, two = tmp_path / "one", tmp_path / "acc", tmp_path / "two"
    train_cli(0, model, data_dir, one, "--batch-size", "4")
    train_cli(0, model, data_dir, acc, "--batch-size", "2", "--gradient-accumulation-steps", "2")
    proc = train_cli(2, model, data_dir, two, "--batch-size", "2")
    assert proc.stdout.count('"steps": 10') == 1, "rank 0 alone prints the summary"
    assert proc.stderr.count("adapter written") == 1, "rank 0 alone reports"
    assert "2 processes (MPI)" in proc.stderr

    m1, ma, m2 = metrics(one), metrics(acc), metrics(two)
    assert [r["step"] for r in m2] == [r["step"] for r in m1] and len(m2) == 13    # 10 steps, 3 evaluations
    for r1, ra, r2 in zip(m1, ma, m2):
        key = "loss" if r1["type"] == "train" else "val_loss"
        assert r2[key] == ra[key], (r1["step"], key)
        assert r2[key] == pytest.approx(r1[key], rel=1e-6), (r1["step"], key)
        if r1["type"] == "train":
            assert r2["supervised_tokens"] == r1["supervised_tokens"]
    t1, ta, t2 = tensors(one / "adapter.gguf"), tensors(acc / "adapter.gguf"), tensors(two / "adapter.gguf")
    for name in t1:
        assert np.array_equal(t2[name], ta[name]), name
        assert np.abs(t2[name] - t1[name]).max() <= 3e-5 * np.abs(t1[name]).max(), name

    state = json.loads((two / "checkpoints" / "checkpoint-5" / "trainer_state.json").read_text())
    assert state["world_size"] == 2 and state["global_batch_size"] == 4
    doc = json.loads((two / "adapter_config.json").read_text())
    assert doc["training"]["batch_size"] == 2 and doc["training"]["distributed"] == "auto"


def test_two_ranks_train_gemma3_as_one_process(tiny_model_file, data_dir, tmp_path):
    """gemma3 (sandwich norms, GEGLU, a sliding window of 8 that the rows exceed, q/k norms) over 2 ranks x
    batch 2 against one process with batch 2 x accumulation 2: every loss and adapter value bitwise equal,
    and the ranks' adapters agree at the step-5 checkpoint (the hash check there stops a run otherwise)."""
    model = tiny_model_file("gemma3", "f32")
    acc, two = tmp_path / "acc", tmp_path / "two"
    extra = ("--batch-size", "2", "--max-steps", "6")
    train_cli(0, model, data_dir, acc, *extra, "--gradient-accumulation-steps", "2")
    proc = train_cli(2, model, data_dir, two, *extra)
    assert "2 processes (MPI)" in proc.stderr and proc.stderr.count("adapter written") == 1
    assert (two / "checkpoints" / "checkpoint-5").is_dir()
    assert [r.get("loss", r.get("val_loss")) for r in metrics(two)] == \
           [r.get("loss", r.get("val_loss")) for r in metrics(acc)]
    t_acc, t_two = tensors(acc / "adapter.gguf"), tensors(two / "adapter.gguf")
    assert t_acc.keys() == t_two.keys() and all(np.array_equal(t_acc[k], t_two[k]) for k in t_acc)
    assert any(np.abs(v).max() > 0 for k, v in t_two.items() if "lora_b" in k)      # training moved B off zero


def test_streamed_data_over_two_ranks(tiny_model_file, data_dir, tmp_path):
    """Streaming: each rank reads the stream and keeps its share of each step's rows; the same losses
    and adapter, bit for bit, as one process streaming with the ranks' micro-batches."""
    model = tiny_model_file("llama", "f32")
    one, two = tmp_path / "one", tmp_path / "two"
    extra = ("--streaming", "--shuffle-buffer", "8", "--max-steps", "6")
    train_cli(0, model, data_dir, one, "--batch-size", "2", "--gradient-accumulation-steps", "2", *extra)
    train_cli(2, model, data_dir, two, "--batch-size", "2", *extra)
    assert [r.get("loss", r.get("val_loss")) for r in metrics(two)] == \
           [r.get("loss", r.get("val_loss")) for r in metrics(one)]
    t1, t2 = tensors(one / "adapter.gguf"), tensors(two / "adapter.gguf")
    assert all(np.array_equal(t1[k], t2[k]) for k in t1)


def test_resume_with_the_same_and_another_number_of_processes(tiny_model_file, data_dir, tmp_path):
    """A 2-rank run stopped at its step-5 checkpoint continues exactly on 2 ranks, and on 1 process with
    batch 2 (gradient accumulation 2 chosen to keep the 4 rows per step): the same adapter, bit for bit,
    as the run straight through. A process count that cannot keep the rows per step is refused."""
    model = tiny_model_file("llama", "f32")
    straight = tmp_path / "straight"
    train_cli(2, model, data_dir, straight, "--batch-size", "2")
    final = tensors(straight / "adapter.gguf")
    for n in (2, 1):
        out = tmp_path / f"resumed-on-{n}"
        (out / "checkpoints").mkdir(parents=True)
        shutil.copytree(straight / "checkpoints" / "checkpoint-5", out / "checkpoints" / "checkpoint-5")
        proc = train_cli(n, model, data_dir, out, "--batch-size", "2", "--resume")
        if n == 1:
            assert "gradient_accumulation_steps 1 -> 2 keeps its 4 rows per step" in proc.stderr
        got = tensors(out / "adapter.gguf")
        for name in final:
            assert np.array_equal(got[name], final[name]), (n, name)
        assert [r["loss"] for r in metrics(out) if r["type"] == "train" and r["step"] > 5] == \
               [r["loss"] for r in metrics(straight) if r["type"] == "train" and r["step"] > 5]
    out = tmp_path / "refused"
    (out / "checkpoints").mkdir(parents=True)
    shutil.copytree(straight / "checkpoints" / "checkpoint-5", out / "checkpoints" / "checkpoint-5")
    proc = train_cli(0, model, data_dir, out, "--batch-size", "3", "--resume", check=False)
    assert proc.returncode != 0
    assert "trained with 4 rows per optimizer step" in proc.stderr and "= 4" in proc.stderr


def _run(n: int, model: Path, data: Path, out: Path, *extra: str, timeout: float = 120):
    t = time.monotonic()
    proc = launch(n, sys.executable, str(RUNNER), str(model), str(data), str(out), *extra, timeout=timeout)
    return proc, time.monotonic() - t


@pytest.mark.parametrize("fault", ["raise", "kill"])
def test_a_failing_rank_ends_every_rank(tiny_model_file, data_dir, tmp_path, fault):
    """Rank 1 raises (or is killed with SIGKILL) in step 7: the job ends within seconds, never waiting
    in a collective, with the cause on stderr; checkpoint-5 is loadable and a resume completes."""
    model = tiny_model_file("llama", "f32")
    out = tmp_path / "out"
    proc, took = _run(2, model, data_dir / "train.jsonl", out, "--steps", "10", f"--{fault}-at", "7")
    assert proc.returncode != 0
    assert took < 60
    if fault == "raise":
        assert "rank 1 of 2: RuntimeError: boom at step 7" in proc.stderr
        assert "MPI_Abort" in proc.stderr
    else:
        said = (proc.stdout + proc.stderr).lower()     # the launcher's report (MPICH: on stdout)
        assert "signal 9" in said or "killed" in said
    ckpts = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert "checkpoint-5" in ckpts and "checkpoint-10" not in ckpts
    with BaseModel.load(model, n_threads=N_THREADS) as m, Adapter.load(m, out / "checkpoints/checkpoint-5/adapter.gguf"):
        pass
    proc, _ = _run(2, model, data_dir / "train.jsonl", out, "--steps", "10", "--resume")
    assert proc.returncode == 0, proc.stderr[-2000:]
    reports = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert [r["step"] for r in reports] == [10, 10] and len(reports[0]["losses"]) == 5
    assert (out / "adapter.gguf").is_file()


def test_a_signal_on_one_rank_stops_all_after_the_same_step(tiny_model_file, data_dir, tmp_path):
    """SIGTERM reaches rank 1 alone in step 6: the ranks agree at the end of a step, rank 0 writes the
    checkpoint of that step, every rank returns interrupted at the same step."""
    model = tiny_model_file("llama", "f32")
    out = tmp_path / "out"
    proc, _ = _run(2, model, data_dir / "train.jsonl", out, "--steps", "10", "--signal-at", "6")
    assert proc.returncode == 0, proc.stderr[-2000:]
    reports = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(reports) == 2
    steps = {r["step"] for r in reports}
    assert len(steps) == 1 and {r["interrupted"] for r in reports} == {"SIGTERM"}
    step = steps.pop()
    assert step >= 6 and (out / "checkpoints" / f"checkpoint-{step}").is_dir()
    # the gradients of every LoRA pair (q, v of 2 layers, rank 4) plus two float64 scalars per step
    assert reports[0]["reduced_bytes"] == 4 * 2 * (4 * 64 + 64 * 4 + 4 * 64 + 32 * 4) + 16


def test_ranks_whose_adapters_differ_stop_at_the_checkpoint(tiny_model_file, data_dir, tmp_path):
    """One float32 ulp of one value on rank 1 after step 4: the hash check at the step-5 checkpoint stops
    every rank, naming both hashes, before rank 0 writes that checkpoint."""
    model = tiny_model_file("llama", "f32")
    out = tmp_path / "out"
    proc, took = _run(2, model, data_dir / "train.jsonl", out, "--perturb-at", "4")
    assert proc.returncode != 0 and took < 60
    assert "DistributedError: step 5: the ranks' adapters differ (rank 0 " in proc.stderr, proc.stderr[-2000:]
    assert not (out / "checkpoints" / "checkpoint-5").exists()


def test_ranks_with_different_data_refuse_to_train(tiny_model_file, data_dir, tmp_path):
    model = tiny_model_file("llama", "f32")
    shutil.copy(data_dir / "train.jsonl", tmp_path / "t0.jsonl")
    lines = (data_dir / "train.jsonl").read_text().splitlines()
    (tmp_path / "t1.jsonl").write_text("\n".join(lines[:-1]) + "\n")
    proc, took = _run(2, model, tmp_path / "tRANK.jsonl", tmp_path / "out", "--data-per-rank")
    assert proc.returncode != 0 and took < 60
    assert "DistributedError: the 2 processes disagree on their data" in proc.stderr


def test_grpo_over_two_ranks_trains_as_one_process(tiny_model_file, data_dir, tmp_path):
    """GRPO under mpiexec -n 2: each rank samples, scores and back-propagates its half of a step's prompts
    (generators keyed by the prompt's place in the whole batch), the rollouts are gathered so that both
    compute the same advantages and loss, and the gradients are summed. 2 ranks x batch 4 against one process
    with batch 4 x accumulation 2 (the same micro-batches): the same completions, rewards and held-out rewards,
    per-step losses within rtol 1e-5 and adapters within 1e-4 of each tensor's largest value (measured 1.7e-6
    and 7.6e-6: each rank sums its two micro-batches' gradients before the all-reduce adds the ranks', one
    process adds the four in turn, so float32 groups the sums otherwise and AdamW carries that on); rank 0
    alone writes, and the ranks' adapters agree bit for bit at the checkpoint (else the run stops)."""
    model = tiny_model_file("llama", "f32", n_layers=2)
    rewards = tmp_path / "even_reward.py"         # varies within a group: completions run to the length limit
    rewards.write_text("def even(prompts, completions, completion_ids, **kw):\n"
                       "    return [float(sum(t % 2 == 0 for t in c)) for c in completion_ids]\n")
    args = ("--method", "grpo", "--reward", f"{rewards}:even", "--num-generations", "4", "--max-completion-length",
            "8", "--batch-size", "4", "--max-seq-length", "64", "--max-steps", "6", "--beta", "0.04",
            "--num-iterations", "2", "--learning-rate", "1e-2", "--eval-every", "3", "--save-every", "3",
            "--no-progress", "--n-threads", "1", "--target-modules", "q_proj,v_proj")
    runs = {}
    for n, name, accumulation in ((0, "one", "2"), (2, "two", "1")):
        out = tmp_path / name
        proc = launch(n, sys.executable, "-m", "ggml_lora", "train", "--model", str(model), "--data",
                      str(data_dir / "train.jsonl"), "--valid", str(data_dir / "valid.jsonl"), "--output-dir",
                      str(out), *args, "--gradient-accumulation-steps", accumulation, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs[name] = (proc, out)
    proc, two = runs["two"]
    assert "2 processes (MPI)" in proc.stderr and proc.stderr.count("adapter written") == 1
    assert (two / "checkpoints" / "checkpoint-3").is_dir()           # the ranks' adapters agreed there
    m1, m2 = metrics(runs["one"][1]), metrics(two)
    assert [(r["type"], r["step"]) for r in m1] == [(r["type"], r["step"]) for r in m2]
    for r1, r2 in zip(m1, m2):
        if r1["type"] == "train":
            for key in ("reward", "completions/mean_length"):      # on the steps that generate
                assert r2.get(key) == r1.get(key), (r1["step"], key)
            assert r2["loss"] == pytest.approx(r1["loss"], rel=1e-5, abs=1e-7), r1["step"]
        else:
            assert r2["val_reward"] == r1["val_reward"], r1["step"]
    t1, t2 = tensors(runs["one"][1] / "adapter.gguf"), tensors(two / "adapter.gguf")
    for name in t1:
        assert np.abs(t2[name] - t1[name]).max() <= 1e-4 * np.abs(t1[name]).max(), name
    assert any(np.abs(v).max() > 0 for k, v in t2.items() if "lora_b" in k)          # training moved B off zero


def test_preference_training_says_it_runs_in_one_process(tiny_model_file, data_dir, tmp_path):
    model = tiny_model_file("llama", "f32")
    proc, _ = _run(2, model, data_dir / "train.jsonl", tmp_path / "out", "--preference")
    assert proc.returncode != 0
    assert "PreferenceTrainer does not train over several processes yet (2 were launched)" in proc.stderr


def test_without_mpi4py_a_clear_error(monkeypatch):
    from ggml_lora import TrainingConfig
    from ggml_lora.distributed import communicator
    from ggml_lora.errors import UnsupportedError

    monkeypatch.setitem(sys.modules, "mpi4py", None)
    with pytest.raises(UnsupportedError, match=r"pip install \"ggml-lora\[mpi\]\""):
        communicator("mpi")
    assert communicator("auto").size == 1            # not launched by MPI: one process, no mpi4py needed
    with pytest.raises(ValueError, match="distributed"):
        TrainingConfig(distributed="nccl")


def test_threads_are_shared_among_the_ranks_of_a_machine(monkeypatch):
    from ggml_lora import distributed, hardware

    monkeypatch.setenv("PMI_SIZE", "4")
    monkeypatch.setenv("MPI_LOCALNRANKS", "2")
    monkeypatch.setattr(hardware.os, "cpu_count", lambda: 16)
    monkeypatch.setattr(hardware.os, "sched_getaffinity", lambda pid: set(range(16)))
    assert distributed.launched_size() == 4 and distributed.default_threads() == 8
    monkeypatch.setattr(hardware.os, "sched_getaffinity", lambda pid: {3})    # bound to one core
    assert distributed.default_threads() == 1
    for var in ("PMI_SIZE", "MPI_LOCALNRANKS"):
        monkeypatch.delenv(var)
    assert distributed.launched_size() == 1 and distributed.default_threads() is None
