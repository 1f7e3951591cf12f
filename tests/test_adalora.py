"""AdaLoRA against PEFT's own AdaLoraModel and RankAllocator: the budget schedule step by step; from
the same initial triplets, data and optimizer, the per-step losses, the kept ranks per module and the
validation loss; the saved adapter in llama-cpp-python; exact resume."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import N_THREADS
from reference import assert_parity, llama_logits

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from adalora_peft import peft_adalora  # noqa: E402

from ggml_lora import Adapter, BaseModel, LoRAConfig, LoRATrainer, TrainingConfig
from ggml_lora.adalora import AdaLoRA, budget_schedule
from ggml_lora.arch import hf_module
from ggml_lora.data import load_dataset
from ggml_lora.errors import InvalidArgumentError

TARGETS = ("q_proj", "v_proj", "down_proj")
ADA = dict(peft_type="adalora", init_r=6, target_r=3, alpha=8.0, target_modules=TARGETS, tinit=2, tfinal=2,
           deltaT=1, seed=4)
STEPS = 10
SEQ = 24
WORDS = ["north", "river", "stone", "the", "of", "town", "bell", "mill", "green", "road", "lies", "near"]


def corpus(n_words: int, seed: int) -> str:
    rng = np.random.default_rng(seed)
    return " ".join(rng.choice(WORDS, n_words))


@pytest.fixture(scope="module")
def model_file(tiny_model_file):
    return tiny_model_file("llama", "f32", n_layers=2)


@pytest.fixture(scope="module")
def tiny(model_file):
    with BaseModel.load(model_file, n_threads=N_THREADS) as model:
        yield model


def rows_of(model, path):
    """The windows of SEQ tokens the trainer makes of a .txt file (the last one shorter)."""
    return load_dataset(path, model, max_seq_length=SEQ)[0]


def train_config(out, **kw):
    base = dict(max_steps=STEPS, learning_rate=2e-2, lr_scheduler="constant", max_seq_length=SEQ, eval_every=0,
                save_every=0, progress=False, output_dir=str(out), seed=0, max_grad_norm=1.0)
    return TrainingConfig(**{**base, **kw})


@pytest.mark.parametrize("kw", [dict(tinit=0, tfinal=0, deltaT=1, total_step=10),
                                dict(tinit=3, tfinal=4, deltaT=2, total_step=20),
                                dict(tinit=1, tfinal=0, deltaT=5, total_step=37)])
def test_budget_schedule_is_peft_s(kw):
    pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    from peft.tuners.adalora.layer import RankAllocator

    class Tiny(__import__("torch").nn.Module):       # named like PEFT's layers: 4 modules of rank 12
        def __init__(self):
            super().__init__()
            torch = __import__("torch")
            self.m = torch.nn.ModuleList([torch.nn.ParameterDict({"default": torch.nn.Parameter(torch.zeros(12, 5))})
                                          for _ in range(4)])

        def named_parameters(self, *a, **k):
            for i, m in enumerate(self.m):
                yield f"layers.{i}.lora_A.default", m["default"]

    cfg = peft.AdaLoraConfig(init_r=12, target_r=5, **kw)
    alloc = RankAllocator(Tiny(), cfg, "default")
    for step in range(1, kw["total_step"] + 3):
        ours = budget_schedule(step, init_bgt=48, target_bgt=20, tinit=kw["tinit"], tfinal=kw["tfinal"],
                               total_step=kw["total_step"], deltaT=kw["deltaT"])
        assert ours == alloc.budget_schedule(step), step


def test_matches_peft_adalora(tiny, model_file, tmp_path):
    """Same triplets, same rows, same AdamW and clipping: PEFT's AdaLoRA (AdaLoraModel.forward with its
    orthogonal regulariser, update_and_allocate after each step) and ours agree step by step."""
    pytest.importorskip("torch")
    pytest.importorskip("peft")
    pytest.importorskip("transformers")

    (tmp_path / "train.txt").write_text(corpus(160, 0))
    (tmp_path / "valid.txt").write_text(corpus(60, 1))
    train, valid = rows_of(tiny, tmp_path / "train.txt"), rows_of(tiny, tmp_path / "valid.txt")
    assert len(train) >= 6 and len(valid) >= 2 and len(train[-1].tokens) < SEQ
    lora = LoRAConfig(**ADA)

    # ours: one batch of every row per step (its order within the batch does not change the mean loss)
    trainer = LoRATrainer(tiny, lora, train_config(tmp_path / "ours", batch_size=len(train)))
    init = AdaLoRA(trainer.adapter, lora, STEPS).params       # what train() starts from: seeded by lora.seed
    init = {t: {k: v.copy() for k, v in p.items()} for t, p in init.items()}
    history = trainer.train(tmp_path / "train.txt", valid=tmp_path / "valid.txt")
    ours_val = trainer.evaluate(valid)["val_loss"]

    ref = peft_adalora(model_file, lora, init, tiny.hparams.n_head, train, valid, STEPS, learning_rate=2e-2)
    peft_losses, peft_orth, peft_norms, peft_val = ref["losses"], ref["orth_losses"], ref["grad_norms"], ref["val_loss"]

    # F32 on both sides; differences are summation order, compounded over 10 Adam steps at lr 2e-2
    np.testing.assert_allclose(history.losses, peft_losses, rtol=2e-4)
    np.testing.assert_allclose([r["grad_norm"] for r in history.steps], peft_norms, rtol=1e-3)
    # the regulariser as PEFT adds it to the loss (read back as loss - CE: float32 rounding of ~12)
    np.testing.assert_allclose([r["orth_loss"] for r in history.steps], peft_orth, rtol=0, atol=2e-5)
    peft_ranks = ref["ranks"]
    ours_ranks = {hf_module(t): r for t, r in trainer.method.adalora.ranks().items()}
    print("ranks ours", ours_ranks, "peft", peft_ranks, "val", ours_val, peft_val)
    assert ours_ranks == peft_ranks
    assert sum(ours_ranks.values()) == lora.target_r * len(ours_ranks)
    assert ours_val == pytest.approx(peft_val, rel=2e-4)


def test_saved_adapter_has_a_rank_per_tensor_and_llama_cpp_agrees(tiny, model_file, tmp_path):
    (tmp_path / "train.txt").write_text(corpus(200, 2))
    trainer = LoRATrainer(tiny, LoRAConfig(**{**ADA, "target_r": 2}), train_config(tmp_path / "out", batch_size=4))
    history = trainer.train(tmp_path / "train.txt")
    ranks = trainer.method.adalora.ranks()
    assert sum(ranks.values()) == 2 * len(ranks) and len(set(ranks.values())) > 1
    tokens = np.array(tiny.tokenize(corpus(20, 3)), dtype=np.int32)
    training_forward = tiny.logits(tokens, trainer.adapter)          # init_r triplets, masked ones at E = 0
    with Adapter.load(tiny, history.adapter_path) as saved:
        assert saved.ranks == {t: r for t, r in ranks.items() if r}
        np.testing.assert_allclose(tiny.logits(tokens, saved), training_forward, rtol=0, atol=1e-4)
    assert np.abs(training_forward - tiny.logits(tokens)).max() > 1e-3      # it learned something
    assert_parity(training_forward, llama_logits(model_file, tokens, lora=history.adapter_path, n_threads=N_THREADS),
                  "adalora")


def test_resume_is_exact(tiny, tmp_path):
    (tmp_path / "train.txt").write_text(corpus(200, 5))
    lora = LoRAConfig(**{**ADA, "dropout": 0.1})
    straight = LoRATrainer(tiny, lora, train_config(tmp_path / "a", batch_size=2, save_every=3)).train(tmp_path / "train.txt")

    class InterruptAt:
        def on_step(self, trainer, rec):
            if rec["step"] == 5:        # inside the budgeting phase: EMAs and masks must carry over
                os.kill(os.getpid(), signal.SIGINT)

    cfg = train_config(tmp_path / "b", batch_size=2, save_every=3)
    first = LoRATrainer(tiny, lora, cfg).train(tmp_path / "train.txt", callbacks=[InterruptAt()])
    assert first.global_step == 5
    second = LoRATrainer(tiny, lora, cfg).train(tmp_path / "train.txt", resume_from=True)
    assert first.losses + second.losses == straight.losses
    assert [r["budget"] for r in straight.steps] == [r["budget"] for r in first.steps + second.steps]
    assert second.adapter_path.read_bytes() == straight.adapter_path.read_bytes()


@pytest.mark.parametrize("kw, words", [
    (dict(target_r=20), "must be at most init_r"),
    (dict(init_r=0), "must be a positive integer"),
    (dict(beta1=1.0), r"must be in \(0, 1\)"),
    (dict(rank_pattern={"q_proj": 2}), "takes no rank_pattern"),
    (dict(orth_reg_weight=-1.0), ">= 0"),
])
def test_bad_adalora_configs(kw, words):
    with pytest.raises(InvalidArgumentError, match=words):
        LoRAConfig(**{**ADA, **kw})


def test_schedule_without_a_budgeting_phase_is_refused(tiny, tmp_path):
    (tmp_path / "t.txt").write_text(corpus(100, 6))
    lora = LoRAConfig(**{**ADA, "tinit": 6, "tfinal": 4})
    with pytest.raises(InvalidArgumentError, match="leave no budgeting phase"):
        LoRATrainer(tiny, lora, train_config(tmp_path / "o")).train(tmp_path / "t.txt")
