"""LoRATrainer on tiny random models: exact resume, interruption, accumulation, NaN policies, outputs,
unwritable directories, and two trainers sharing one BaseModel."""

from __future__ import annotations

import json
import math
import os
import signal
import threading

import numpy as np
import pytest
from conftest import N_THREADS

from ggml_lora import Adapter, BaseModel, LoRAConfig, LoRATrainer, TrainingConfig, cpu_has_amx_bf16
from ggml_lora.errors import CheckpointError, TrainingDivergedError
from ggml_lora.gguf_header import read_header

WORDS = ["river", "town", "stone", "bridge", "market", "harbour", "north", "south", "old", "new", "green", "red", "bell", "tower", "mill", "road", "field", "school", "the", "of", "and", "a", "in", "on", "lies", "near", "by", "with"]


def texts(n: int, seed: int = 0, words: int = 24) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=words)) + "." for _ in range(n)]


@pytest.fixture(scope="module")
def tiny(tiny_model_file):
    with BaseModel.load(tiny_model_file("llama", "f32"), n_threads=N_THREADS) as model:
        yield model


def config(tmp_path, name="run", **kw) -> TrainingConfig:
    base = dict(max_steps=6, batch_size=2, learning_rate=1e-2, max_seq_length=32, eval_every=2, save_every=3,
                packing=False, progress=False, output_dir=str(tmp_path / name), seed=3)
    base.update(kw)
    return TrainingConfig(**base)


LORA = LoRAConfig(rank=4, target_modules=("q_proj", "v_proj", "down_proj"), dropout=0.1, seed=1)


def adapter_tensor_bytes(path) -> bytes:
    """The tensor data region of an adapter file (metadata may differ only where it says so)."""
    h = read_header(path)
    with open(path, "rb") as f:
        f.seek(h.data_offset)
        return f.read()


def test_resume_is_exact(tiny, tmp_path):
    data = texts(16)
    straight = LoRATrainer(tiny, LORA, config(tmp_path, "straight")).train(data, valid=texts(4, seed=9))

    class InterruptAt:            # Ctrl-C delivered to ourselves after step 3
        def on_step(self, trainer, rec):
            if rec["step"] == 3:
                os.kill(os.getpid(), signal.SIGINT)

    cfg = config(tmp_path, "resumed")
    first = LoRATrainer(tiny, LORA, cfg).train(data, valid=texts(4, seed=9), callbacks=[InterruptAt()])
    assert first.interrupted == "SIGINT" and first.global_step == 3
    assert first.adapter_path is None and first.checkpoint_path.name == "checkpoint-3"
    second = LoRATrainer(tiny, LORA, cfg).train(data, valid=texts(4, seed=9), resume_from=True)
    assert second.global_step == 6
    # bit-identical: same rows, same dropout masks, same moments, same float operations
    assert first.losses + second.losses == straight.losses
    assert [e["val_loss"] for e in second.evals] == [e["val_loss"] for e in straight.evals if e["step"] > 3]
    a, b = straight.adapter_path, second.adapter_path
    assert a.read_bytes() == b.read_bytes()
    assert straight.losses[-1] < straight.losses[0]
    # metrics.jsonl of the resumed run holds each step once
    steps = [json.loads(l)["step"] for l in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()
             if json.loads(l)["type"] == "train"]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_resume_refuses_a_different_run(tiny, tmp_path):
    data = texts(8)
    LoRATrainer(tiny, LORA, config(tmp_path, max_steps=3, save_every=1)).train(data)
    with pytest.raises(CheckpointError, match="learning_rate"):
        LoRATrainer(tiny, LORA, config(tmp_path, max_steps=3, learning_rate=2e-2)).train(data, resume_from=True)
    with pytest.raises(CheckpointError, match="other data"):
        LoRATrainer(tiny, LORA, config(tmp_path, max_steps=3)).train(texts(8, seed=5), resume_from=True)
    with pytest.raises(CheckpointError, match="no checkpoint"):
        LoRATrainer(tiny, LORA, config(tmp_path, max_steps=3)).train(data, resume_from=tmp_path / "nowhere")


def test_accumulation_equals_a_larger_batch(tiny, tmp_path):
    """batch_size x gradient_accumulation_steps rows per step, loss normalised over the whole step."""
    data = texts(12)
    lora = LoRAConfig(rank=4, target_modules=("q_proj", "v_proj"), seed=1)     # no dropout: masks differ per micro-batch
    runs = {}
    for bs, gas in ((4, 1), (2, 2), (1, 4)):
        cfg = config(tmp_path, f"acc{bs}x{gas}", batch_size=bs, gradient_accumulation_steps=gas, max_steps=3,
                     eval_every=0, save_every=0)
        t = LoRATrainer(tiny, lora, cfg)
        runs[(bs, gas)] = (t.train(data).losses, t.adapter.tensors())
    ref_losses, ref_tensors = runs[(4, 1)]
    for key, (losses, tensors) in runs.items():
        # float32 sums in another grouping: relative 1e-5 on the loss, 1e-4 of the largest entry on weights
        np.testing.assert_allclose(losses, ref_losses, rtol=1e-5, err_msg=str(key))
        for name, (_, b) in tensors.items():
            _, rb = ref_tensors[name]
            np.testing.assert_allclose(b, rb, atol=1e-4 * np.abs(rb).max(), err_msg=f"{key} {name}")


def test_outputs_callbacks_and_evaluation_points(tiny, tmp_path):
    seen = {"on_step": [], "on_eval": [], "on_save": []}

    class Recorder:
        def on_step(self, trainer, rec):
            seen["on_step"].append(rec["step"])

        def on_eval(self, trainer, rec):
            seen["on_eval"].append(rec["step"])

        def on_save(self, trainer, path):
            seen["on_save"].append(path.name)

    cfg = config(tmp_path, max_steps=5, eval_every=2, save_every=2, save_total_limit=2)
    hist = LoRATrainer(tiny, LORA, cfg).train(texts(10), valid=texts(3, seed=7), callbacks=[Recorder()])
    out = tmp_path / "run"
    assert seen == {"on_step": [1, 2, 3, 4, 5], "on_eval": [0, 2, 4, 5],
                    "on_save": ["checkpoint-2", "checkpoint-4", "checkpoint-5"]}
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint-4", "checkpoint-5"]  # limit 2
    cfg_doc = json.loads((out / "adapter_config.json").read_text())
    assert cfg_doc["lora"]["rank"] == 4 and cfg_doc["training"]["max_steps"] == 5
    assert cfg_doc["resolved"]["total_steps"] == 5
    records = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["type"] == "train"]
    assert [r["step"] for r in train] == [1, 2, 3, 4, 5]
    for r in train:
        assert math.isfinite(r["loss"]) and r["learning_rate"] > 0 and r["tokens_per_s"] > 0
        assert r["peak_rss_bytes"] > 1 << 20
    evals = [r for r in records if r["type"] == "eval"]
    assert [r["step"] for r in evals] == [0, 2, 4, 5]
    assert all(r["val_ppl"] == pytest.approx(math.exp(r["val_loss"])) for r in evals)
    assert hist.adapter_path == out / "adapter.gguf"
    with Adapter.load(tiny, hist.adapter_path) as loaded:
        assert loaded.targets
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_eval_zero_and_save_zero_turn_them_off(tiny, tmp_path):
    hist = LoRATrainer(tiny, LORA, config(tmp_path, max_steps=2, eval_every=0, save_every=0)).train(
        texts(6), valid=texts(2, seed=4))
    assert hist.evals == [] and not (tmp_path / "run" / "checkpoints").exists()
    assert hist.adapter_path.is_file()


def test_nan_skip_drops_poisoned_steps(tiny_model_file, tmp_path):
    """A corrupted base model: one token's embedding row is NaN, so every row holding it gives a NaN loss."""
    path = tmp_path / "poisoned.gguf"
    path.write_bytes(tiny_model_file("llama", "f32", tied=False).read_bytes())   # tied, the LM head row would be NaN too
    with BaseModel.load(path, n_threads=N_THREADS) as model:
        poison = model.tokenize("harbour", add_special=False)[-1]
        emb = read_header(path).tensors["token_embd.weight"]
        with open(path, "r+b") as f:
            f.seek(emb.offset + poison * model.n_embd * 4)
            f.write(np.full(model.n_embd, np.nan, dtype=np.float32).tobytes())
    clean = [t.replace("harbour", "bridge") for t in texts(6)]
    data = clean[:3] + ["the old harbour lies near the mill."] + clean[3:]
    with BaseModel.load(path, n_threads=N_THREADS) as model:
        cfg = config(tmp_path, batch_size=1, max_steps=7, nan_policy="skip", eval_every=0, save_every=0)
        trainer = LoRATrainer(model, LORA, cfg)
        hist = trainer.train(data)
        skipped = [r["step"] for r in hist.steps if r.get("skipped")]
        assert hist.skipped_steps == 1 and len(skipped) == 1
        assert all(math.isfinite(r["loss"]) for r in hist.steps if not r.get("skipped"))
        assert all(np.isfinite(x).all() for pair in trainer.adapter.tensors().values() for x in pair)
        assert hist.adapter_path.is_file()

        # the default policy stops at that step, naming it and the last good checkpoint
        bad = skipped[0]
        assert bad > 1, "seed puts the poisoned row first; pick another so a checkpoint exists before it"
        stop = config(tmp_path, "stop", batch_size=1, max_steps=7, eval_every=0, save_every=1)
        with pytest.raises(TrainingDivergedError, match=f"step {bad}: loss nan") as err:
            LoRATrainer(model, LORA, stop).train(data)
        assert err.value.step == bad
        good = tmp_path / "stop" / "checkpoints" / f"checkpoint-{bad - 1}"
        assert str(good) in str(err.value)
        assert not (tmp_path / "stop" / "adapter.gguf").exists()
        with Adapter.load(model, good / "adapter.gguf") as back:
            assert all(np.isfinite(x).all() for pair in back.tensors().values() for x in pair)


def test_unwritable_output_dir_is_detected_before_training(tiny, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(CheckpointError, match="not writable"):
        LoRATrainer(tiny, LORA, config(tmp_path, output_dir=str(blocker / "out"))).train(texts(4))
    assert blocker.read_text() == "not a folder"


def test_failed_save_keeps_the_adapter(tiny, tmp_path):
    """The checkpoints folder becomes unwritable mid-run (a file takes its place): the error says so, the
    adapter in memory is intact and can be saved elsewhere."""
    class Block:
        def on_step(self, trainer, rec):
            if rec["step"] == 1:
                (tmp_path / "run" / "checkpoints").write_text("in the way")

    trainer = LoRATrainer(tiny, LORA, config(tmp_path, save_every=2))
    with pytest.raises(CheckpointError, match="adapter in memory is intact"):
        trainer.train(texts(8), callbacks=[Block()])
    saved = trainer.save_adapter(tmp_path / "elsewhere.gguf")
    with Adapter.load(tiny, saved) as back:
        for t in trainer.adapter.targets:
            np.testing.assert_array_equal(back.get(t)[1], trainer.adapter.get(t)[1])
    assert np.abs(trainer.adapter.get(trainer.adapter.targets[0])[1]).max() > 0   # it did train


def test_two_trainers_share_one_model(tiny, tmp_path):
    """Two trainers in two threads on one BaseModel give exactly what each gives alone."""
    data_a, data_b = texts(8, seed=1), texts(8, seed=2)
    lora_b = LoRAConfig(rank=2, target_modules=("k_proj", "up_proj"), seed=5)
    alone_a = LoRATrainer(tiny, LORA, config(tmp_path, "a0", eval_every=0, save_every=0)).train(data_a).losses
    alone_b = LoRATrainer(tiny, lora_b, config(tmp_path, "b0", eval_every=0, save_every=0)).train(data_b).losses
    results = {}

    def run(name, lora, data):
        results[name] = LoRATrainer(tiny, lora, config(tmp_path, name, eval_every=0, save_every=0)).train(data).losses

    threads = [threading.Thread(target=run, args=("a", LORA, data_a)), threading.Thread(target=run, args=("b", lora_b, data_b))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results["a"] == alone_a and results["b"] == alone_b


def test_gradient_checkpointing_trains_the_same(tiny, tmp_path):
    """Checkpointing recomputes each block in the backward pass: same losses and weights, float32 noise
    only (sums regrouped per block: relative 1e-5 on the loss, 1e-4 of the largest entry of B)."""
    data = texts(8)
    runs = [LoRATrainer(tiny, LORA, config(tmp_path, f"gc{gc}", max_steps=3, eval_every=0, save_every=0,
                                           gradient_checkpointing=gc)) for gc in (False, True)]
    losses = [t.train(data).losses for t in runs]
    np.testing.assert_allclose(losses[1], losses[0], rtol=1e-5)
    for name in runs[0].adapter.targets:
        b0, b1 = runs[0].adapter.get(name)[1], runs[1].adapter.get(name)[1]
        np.testing.assert_allclose(b1, b0, atol=1e-4 * np.abs(b0).max())


def test_memory_estimate_refuses_what_cannot_fit(tiny, tmp_path):
    from ggml_lora.errors import OutOfMemoryError

    cfg = config(tmp_path, memory_limit_gib=1e-4)
    with pytest.raises(OutOfMemoryError, match=r"2 x \d+ tokens needs about .*even with gradient checkpointing.*batch_size"):
        LoRATrainer(tiny, LORA, cfg).train(texts(4))
    assert not (tmp_path / "run" / "metrics.jsonl").exists()     # refused before anything was written
    hist = LoRATrainer(tiny, LORA, config(tmp_path, "fits", max_steps=1, eval_every=0)).train(texts(4))
    assert hist.memory["total"] > hist.memory["weights"] > 0


def test_checkpointing_switched_on_when_only_it_fits(tiny, tmp_path, caplog):
    one = LoRATrainer(tiny, LORA, config(tmp_path, "one", max_steps=1, eval_every=0)).train(texts(4)).memory
    ckpt = LoRATrainer(tiny, LORA, config(tmp_path, "ckpt", max_steps=1, eval_every=0,
                                          gradient_checkpointing=True)).train(texts(4)).memory
    assert ckpt["compute"] + ckpt["checkpoints"] < one["compute"]      # the premise of the switch
    # a limit between the two peaks: the one-graph step would not fit, the checkpointed one does
    limit = (one["total"] + ckpt["total"]) / 2 / 2**30
    trainer = LoRATrainer(tiny, LORA, config(tmp_path, "auto", max_steps=2, eval_every=0, memory_limit_gib=limit))
    with caplog.at_level("WARNING", logger="ggml_lora.train"):
        hist = trainer.train(texts(4))
    assert trainer._ctx.gradient_checkpointing
    assert hist.memory == ckpt and len(hist.steps) == 2
    assert any("gradient checkpointing switched on" in r.message for r in caplog.records)


FULL_DISK = r"""
import resource, signal, sys
import numpy as np
from ggml_lora import Adapter, BaseModel, LoRAConfig, LoRATrainer, TrainingConfig
from ggml_lora.errors import CheckpointError
model_path, out, data = sys.argv[1], sys.argv[2], sys.argv[3].split("|")
with BaseModel.load(model_path, n_threads=2) as model:
    trainer = LoRATrainer(model, LoRAConfig(rank=4, target_modules=("q_proj", "v_proj", "down_proj")),
                          TrainingConfig(max_steps=3, batch_size=2, max_seq_length=32, save_every=1, eval_every=0,
                                         progress=False, output_dir=out))
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)          # a write past the limit fails with EFBIG
    resource.setrlimit(resource.RLIMIT_FSIZE, (6000, resource.RLIM_INFINITY))
    try:
        trainer.train(data)
        sys.exit("no error")
    except CheckpointError as e:
        print("ERROR", e)
    resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    saved = trainer.save_adapter(out + "/../rescued.gguf")
    with Adapter.load(model, saved) as back:
        b = back.get(back.targets[0])[1]
        assert np.array_equal(b, trainer.adapter.get(back.targets[0])[1]) and np.abs(b).max() > 0
    print("RESCUED", saved)
"""


def test_full_disk_at_the_first_save_keeps_the_adapter(tiny_model_file, tmp_path):
    """A real write failure from the OS (file-size limit: EFBIG, as a full disk gives ENOSPC) when the first
    checkpoint is written: a clear error, no half checkpoint, and the trained adapter saved elsewhere."""
    import subprocess
    import sys

    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-c", FULL_DISK, str(tiny_model_file("llama", "f32")), str(out),
                           "|".join(texts(6))], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "ERROR cannot write checkpoint" in proc.stdout and "adapter in memory is intact" in proc.stdout
    assert "RESCUED" in proc.stdout
    assert not list((out / "checkpoints").glob("*"))          # the partial checkpoint was removed
    assert (tmp_path / "rescued.gguf").stat().st_size > 6000


def test_rows_of_a_micro_batch_are_packed_without_dropout(tiny, tmp_path):
    """Without LoRA dropout the trainer packs a micro-batch's shorter rows into shared sequences (collate's
    pack): fewer sequences, and the losses and adapter of the padded micro-batches. A dropout of 1e-12
    keeps every value (each mask is 1 + 1e-12; a drop has probability 1e-12 per value) but gives each row a
    sequence of its own, so that run is the padded one."""
    from ggml_lora.data import load_dataset, make_rows

    data = [t for w in (4, 20, 6, 24, 8, 18, 5, 22, 7, 16) for t in texts(1, seed=w, words=w)]
    valid = [t for w in (3, 21, 9) for t in texts(1, seed=100 + w, words=w)]
    runs = {}
    for name, dropout in (("packed", 0.0), ("padded", 1e-12)):
        lora = LoRAConfig(rank=4, target_modules=("q_proj", "v_proj", "down_proj"), dropout=dropout, seed=1)
        trainer = LoRATrainer(tiny, lora, config(tmp_path, name, batch_size=4, max_steps=5, eval_every=5))
        runs[name] = trainer.train(data, valid=valid), {t: trainer.adapter.get(t) for t in trainer.adapter.targets}
        samples = load_dataset(data[:4], tiny, max_seq_length=32)[0]
        batches, _ = trainer.method.micro_batches(make_rows(samples, max_seq_length=32, packing=False))
        assert (batches[0].tokens.shape[0] < 4) if dropout == 0 else (batches[0].tokens.shape[0] == 4)
    (packed, a), (padded, b) = runs["packed"], runs["padded"]
    # float32 sums in another order (and the 1e-12 scale): measured below 1e-6 relative
    assert [r["loss"] for r in packed.steps] == pytest.approx([r["loss"] for r in padded.steps], rel=1e-5)
    assert [e["val_loss"] for e in packed.evals] == pytest.approx([e["val_loss"] for e in padded.evals], rel=1e-5)
    for t in a:
        for x, y in zip(a[t], b[t]):
            assert np.abs(x - y).max() <= 1e-4 * np.abs(x).max(), t


def test_f16_weights_are_chosen_only_where_they_fit_with_room(tiny_model_file, tmp_path):
    """f16_weights=None (the default) trains a quantized model on a CPU through F16 copies when they take at
    most a quarter of the memory and the step at most half; otherwise on the stored blocks. True and False
    are obeyed; a model without quantized matrices has nothing to copy. adapter_config.json says which."""
    from ggml_lora.data import load_dataset
    from ggml_lora.step import estimate_memory

    def chosen(model, name, **kw) -> bool:
        LoRATrainer(model, LORA, config(tmp_path, name, max_steps=1, eval_every=0, save_every=0, **kw)).train(texts(4))
        return json.loads((tmp_path / name / "adapter_config.json").read_text())["resolved"]["f16_weights"]

    with BaseModel.load(tiny_model_file("llama", "q4_1"), n_threads=N_THREADS) as model:
        longest = max(len(s.tokens) for s in load_dataset(texts(4), model, max_seq_length=32)[0])
        est = estimate_memory(model, LORA, 2, longest, f16_weights=True)     # the trainer's step
        assert est["f16_weights"] > 0
        total = est["total"]
        assert chosen(model, "auto", amx_bf16=False) is True
        # a limit the step fits in, but not twice over: the copies are not worth the room
        tight = 1.5 * total / 2**30
        assert chosen(model, "tight", memory_limit_gib=tight, amx_bf16=False) is False
        assert chosen(model, "forced", memory_limit_gib=tight, f16_weights=True, amx_bf16=False) is True
        assert chosen(model, "off", f16_weights=False) is False
        # with bf16 products on AMX tiles the forward reads the stored blocks: no copies, nothing to weigh
        assert chosen(model, "amx", memory_limit_gib=tight) is cpu_has_amx_bf16()
    with BaseModel.load(tiny_model_file("llama", "f32"), n_threads=N_THREADS) as model:
        assert chosen(model, "f32") is False
