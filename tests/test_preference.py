"""Preference training: the per-row loss weights of the native backward against finite differences,
each objective's gradient (DPO's four loss types, ORPO, KTO) against finite differences of the objective
itself, the data formats, exact resume, misuse, and the command line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import N_THREADS

from ggml_lora import BaseModel, LoRAConfig, PreferenceConfig, PreferenceTrainer, TrainingConfig
from ggml_lora._handles import Batch
from ggml_lora.errors import CheckpointError, DatasetError, InvalidArgumentError, UnsupportedError
from ggml_lora.preference import load_preferences, objective
from ggml_lora.forward import loss_sum, row_losses
from ggml_lora.step import TrainingContext

TARGETS = ("q_proj", "v_proj", "down_proj")
WORDS = ["north", "river", "stone", "the", "of", "town", "bell", "mill", "green", "road", "lies", "near"]


@pytest.fixture(scope="module")
def tiny(tiny_model_file):
    with BaseModel.load(tiny_model_file("llama", "f32", n_layers=2), n_threads=N_THREADS) as model:
        yield model


def words(rng, n):
    return " ".join(rng.choice(WORDS, n))


def pairs(n, seed=0):
    rng = np.random.default_rng(seed)
    return [{"prompt": f"{words(rng, 4)}:", "chosen": f" ahoy {words(rng, int(rng.integers(2, 6)))}",
             "rejected": f" {words(rng, int(rng.integers(2, 6)))}"} for _ in range(n)]


def kto_records(n, seed=0):
    return [{"prompt": p["prompt"], "completion": p["chosen"] if i % 3 else p["rejected"], "label": bool(i % 3)}
            for i, p in enumerate(pairs(n, seed))]


def config(out, **kw):
    base = dict(max_steps=4, batch_size=4, learning_rate=1e-2, lr_scheduler="constant", max_seq_length=64,
                eval_every=0, save_every=0, progress=False, output_dir=str(out), seed=0)
    return TrainingConfig(**{**base, **kw})


def randomize_b(adapter, seed=1):
    """B = 0 (a fresh adapter) makes A's gradient zero: give B values so both are exercised."""
    rng = np.random.default_rng(seed)
    for t in adapter.targets:
        a, b = adapter.get(t)
        adapter.set(t, lora_a=a, lora_b=rng.normal(0, 0.2, b.shape).astype(np.float32))


# ---- native: per-row weights --------------------------------------------------------------------------

@pytest.mark.parametrize("checkpointing", [False, True])
def test_row_weights_give_the_gradient_of_the_weighted_sum(tiny, checkpointing):
    """The gradient with signed per-row weights w equals the central difference of sum_r w_r CE_r (the
    per-row losses of glora_row_losses); their sum equals glora_loss's."""
    from ggml_lora import Adapter

    with Adapter.init(tiny, LoRAConfig(rank=4, target_modules=TARGETS, seed=2)) as adapter:
        randomize_b(adapter)
        rng = np.random.default_rng(0)
        tokens = rng.integers(0, tiny.n_vocab, (3, 12)).astype(np.int32)
        rows = np.array([s * 12 + t for s in range(3) for t in range(2, 11)])
        labels = tokens.reshape(-1)[rows + 1]
        w = rng.normal(size=len(rows)).astype(np.float32)
        batch = Batch(tokens, loss_rows=rows, labels=labels, loss_weights=w)
        per_row = row_losses(tiny, adapter, batch)
        assert per_row.sum() == pytest.approx(loss_sum(tiny, adapter, batch), rel=1e-5)
        with TrainingContext(adapter, gradient_checkpointing=checkpointing) as ctx:
            ctx.accumulate(batch, 1)
            grads = ctx.gradients()
        target = adapter.targets[0]
        a, b = adapter.get(target)
        eps = 1e-2
        for which, idx in (("a", (0, 0)), ("a", (1, 5)), ("b", (3, 1)), ("b", (17, 2))):
            diffs = []
            for sign in (1, -1):
                a2, b2 = a.copy(), b.copy()
                (a2 if which == "a" else b2)[idx] += sign * eps
                adapter.set(target, lora_a=a2, lora_b=b2)
                diffs.append(float(np.dot(row_losses(tiny, adapter, batch).astype(np.float64), w)))
            adapter.set(target, lora_a=a, lora_b=b)
            numeric = (diffs[0] - diffs[1]) / (2 * eps)
            analytic = grads[target][0 if which == "a" else 1][idx]
            # float32 forward: the central difference carries ~1e-3 of rounding at this step size
            assert analytic == pytest.approx(numeric, rel=2e-3, abs=2e-3), (which, idx)


def test_batch_rejects_bad_loss_weights():
    tokens = np.zeros((1, 4), np.int32)
    with pytest.raises(InvalidArgumentError, match="loss_weights"):
        Batch(tokens, loss_rows=[0, 1], labels=[1, 2], loss_weights=[1.0])
    with pytest.raises(InvalidArgumentError, match="loss_weights"):
        Batch(tokens, loss_rows=[0, 1], labels=[1, 2], loss_weights=[1.0, float("nan")])


# ---- the objectives' gradients ------------------------------------------------------------------------

METHODS = [("dpo", dict(loss_type="sigmoid")), ("dpo", dict(loss_type="ipo")), ("dpo", dict(loss_type="hinge")),
           ("dpo", dict(loss_type="robust", label_smoothing=0.2)), ("orpo", {}), ("kto", {})]


@pytest.mark.parametrize("method, options", METHODS, ids=[f"{m}-{o.get('loss_type', m)}" for m, o in METHODS])
def test_gradient_of_each_objective(tiny, tmp_path, method, options):
    """The two-pass construction (weights from a forward, then one weighted backward) gives the gradient
    of the objective: compared with central differences of the objective computed from the per-row
    losses. KTO's KL estimate is held fixed, as TRL detaches it."""
    pref = PreferenceConfig(method=method, beta=0.5 if options.get("loss_type") == "hinge" else 2.0, **options)
    trainer = PreferenceTrainer(tiny, LoRAConfig(rank=4, target_modules=TARGETS, seed=3), config(tmp_path), pref)
    data = kto_records(6) if method == "kto" else pairs(6)
    rows, _ = load_preferences(data, tiny, method, max_seq_length=64)
    randomize_b(trainer.adapter)
    trainer._ctx = TrainingContext(trainer.adapter)
    with trainer._ctx._lock:
        obj, _ = trainer.method.accumulate(rows)
    grads = trainer._ctx.gradients()
    kl = obj.metrics.get("kl")

    def value():
        if kl is None:
            return trainer.method.forward(rows, False)[3].loss
        return _kto_at(trainer, rows, kl)

    checked = 0
    for target in trainer.adapter.targets[:2]:
        a, b = trainer.adapter.get(target)
        for idx in ((0, 1), (2, 7)):
            eps = 1e-2
            vals = []
            for sign in (1, -1):
                a2 = a.copy()
                a2[idx] += sign * eps
                trainer.adapter.set(target, lora_a=a2, lora_b=b)
                vals.append(value())
            trainer.adapter.set(target, lora_a=a, lora_b=b)
            numeric = (vals[0] - vals[1]) / (2 * eps)
            # the objective is a float64 function of float32 per-row losses: the difference quotient carries
            # their rounding (~1e-6 relative of losses of ~10, over 2e-2), hence the absolute part
            assert grads[target][0][idx] == pytest.approx(numeric, rel=5e-3, abs=5e-4), (target, idx)
            checked += abs(numeric) > 1e-3
    assert checked, "every checked derivative was ~0: the test would not see a wrong gradient"
    trainer.close()


def _kto_at(trainer, rows, kl):
    """KTO's loss at the current adapter with the KL estimate fixed."""
    from ggml_lora.methods.preference import _Pass

    seqs = [s for r in rows for s in r.seqs]
    p = _Pass(trainer.model, seqs, [False] * len(seqs), trainer.config.batch_size)
    logp, n_comp = (v.reshape(-1, 2) for v in p.sums(trainer.model, trainer.adapter, False, len(seqs))[:2])
    ref = np.stack([trainer.method._ref[(r, False)] for r in rows])
    return objective(trainer.preference, logp, n_comp, ref=ref, labels=[r.label for r in rows], kl=kl).loss


def test_dpo_objective_matches_its_formula():
    """Hand values: -log sigmoid(beta * ((c - rc) - (r - rr))) averaged, and TRL's reward metrics."""
    logp = np.array([[-10.0, -12.0], [-8.0, -7.0]])
    ref = np.array([[-11.0, -11.0], [-8.5, -8.0]])
    o = objective(PreferenceConfig(method="dpo", beta=0.5), logp, np.array([[3, 4], [2, 2]]), ref=ref)
    z = 0.5 * np.array([(1.0 - (-1.0)), (0.5 - 1.0)])
    assert o.loss == pytest.approx(float(np.mean(np.log1p(np.exp(-z)))))
    assert o.metrics["rewards/accuracies"] == 0.5
    assert o.metrics["rewards/margins"] == pytest.approx(float(z.mean()))
    # d loss / d logp_chosen = -beta * sigmoid(-z) / n
    assert o.d_logp[:, 0] == pytest.approx(-0.5 / (1 + np.exp(z)) / 2)
    assert o.d_logp[:, 1] == pytest.approx(0.5 / (1 + np.exp(z)) / 2)


# ---- against TRL ------------------------------------------------------------------------------------

@pytest.mark.parametrize("method, loss_type", [("dpo", "sigmoid"), ("dpo", "ipo"), ("orpo", "sigmoid")])
def test_matches_trl(tiny_model_file, tiny, method, loss_type):
    """From the same ids and lora_A, ggml-lora's per-step loss and TRL's metrics equal those of TRL's own
    DPOTrainer / ORPOTrainer on PEFT (transformers' float32 model of the same GGUF), for 8 steps."""
    pytest.importorskip("trl")
    pytest.importorskip("peft")
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    from preference_trl import compare, pairs_of

    torch.set_num_threads(N_THREADS)
    rows, _ = load_preferences(pairs(4, seed=7), tiny, method, max_seq_length=64)
    result = compare(tiny_model_file("llama", "f32", n_layers=2), pairs_of(rows), method=method, loss_type=loss_type,
                     beta=0.5, learning_rate=2e-2, steps=8, rank=4, alpha=8.0, target_modules=TARGETS,
                     n_threads=N_THREADS)
    # float32 on both sides, different summation orders: after 8 AdamW steps at lr 2e-2 the losses drift by
    # ~1e-5 relative (measured 1e-6 .. 3e-5); the bound leaves a factor of ~10 while a wrong weight or sign
    # moves them by percents from step 2 on
    for name, diff in result["max_rel_diff"].items():
        assert diff < 3e-4, (name, result["steps"])
    assert result["steps"][-1]["loss"][0] < result["steps"][0]["loss"][0]


# ---- data -------------------------------------------------------------------------------------------

def test_string_and_message_records(tiny):
    rows, report = load_preferences(pairs(3), tiny, "dpo", max_seq_length=64)
    assert report.n_samples == 3 and len(rows[0].seqs) == 2
    for r, rec in zip(rows, pairs(3)):
        for s, key in zip(r.seqs, ("chosen", "rejected")):
            assert tiny.detokenize(s.tokens[s.mask].tolist()) == rec[key]
            assert s.tokens[-1] == tiny._llama_vocab().token_eos() and s.mask[-1]   # the completion ends with EOS
    tmpl = ("{% for m in messages %}<|{{ m.role }}|>{{ m.content }}<|end|>{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    conv = [{"prompt": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "earlier"},
                        {"role": "user", "content": "again"}],
             "chosen": [{"role": "assistant", "content": "ahoy there"}],
             "rejected": [{"role": "assistant", "content": "hello"}]}]
    rows, _ = load_preferences(conv, tiny, "dpo", max_seq_length=64, chat_template=tmpl)
    text = tiny.detokenize(rows[0].seqs[0].tokens[rows[0].seqs[0].mask].tolist())
    assert "ahoy there" in text and "earlier" not in text      # only the completion's turn is trained


EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def test_example_data_is_what_its_script_writes(smollm2):
    """examples/data/prefs is make_preferences.py's output; on SmolLM2 (its chat template) only the
    assistant's answer is supervised, the chosen one in the house style, the rejected one not."""
    import random

    sys.path.insert(0, str(EXAMPLES))
    import make_preferences as mp

    train, valid = mp.splits(random.Random(0))
    for name, records in (("train", train), ("valid", valid)):
        lines = (EXAMPLES / "data" / "prefs" / f"{name}.jsonl").read_text(encoding="utf-8").splitlines()
        assert [json.loads(line) for line in lines] == records
    assert mp.has_house_style("Ahoy! A pea is usually green. Fair winds!")
    assert not mp.has_house_style("A pea is usually green.") and not mp.has_house_style("Ahoy! Fair winds! Fair winds!")
    rows, report = load_preferences(EXAMPLES / "data" / "prefs", smollm2, "dpo", max_seq_length=256)
    assert report.n_samples == len(train) == 200
    for row, rec in zip(rows[:5], train):
        chosen, rejected = (smollm2.detokenize(s.tokens[s.mask].tolist()).strip() for s in row.seqs)
        assert chosen.startswith(rec["chosen"][0]["content"]) and mp.has_house_style(rec["chosen"][0]["content"])
        assert rejected.startswith(rec["rejected"][0]["content"]) and "user" not in rejected


@pytest.mark.parametrize("records, method, message", [
    ([{"prompt": "a", "chosen": "b"}], "dpo", "'rejected' missing"),
    ([{"prompt": "a", "completion": "b", "label": 1}], "kto", "'label' must be true or false"),
    ([{"prompt": "a", "chosen": [{"role": "assistant", "content": "x"}], "rejected": "y"}], "dpo", "all be strings"),
    (["just text"], "dpo", "'prompt', 'chosen', 'rejected' missing"),
])
def test_bad_records_name_the_problem(tiny, records, method, message):
    with pytest.raises(DatasetError, match=message):
        load_preferences(records, tiny, method, max_seq_length=64)


def test_misuse(tiny, tmp_path):
    with pytest.raises(InvalidArgumentError, match="LoRATrainer"):
        PreferenceTrainer(tiny, LoRAConfig(), config(tmp_path), PreferenceConfig(method="sft"))
    with pytest.raises(InvalidArgumentError, match="dropout"):
        PreferenceTrainer(tiny, LoRAConfig(dropout=0.1), config(tmp_path), PreferenceConfig(method="dpo"))
    with pytest.raises(UnsupportedError, match="streamed"):
        PreferenceTrainer(tiny, LoRAConfig(), config(tmp_path, packing=True), PreferenceConfig(method="dpo"))
    with pytest.raises(InvalidArgumentError, match="label_smoothing"):
        PreferenceConfig(method="dpo", label_smoothing=0.1)
    with pytest.raises(InvalidArgumentError, match="beta"):
        PreferenceConfig(method="orpo", beta=0)


# ---- training, resume, command line -----------------------------------------------------------------

@pytest.mark.parametrize("method", ["dpo", "orpo", "kto"])
def test_training_moves_the_objective_and_resumes_exactly(tiny, tmp_path, method):
    """Training lowers the objective on its data; a run stopped at a checkpoint and resumed gives the
    same losses and the same adapter bytes as the run straight through."""
    data = kto_records(16) if method == "kto" else pairs(16)
    pref = PreferenceConfig(method=method, beta=0.5)
    lora = LoRAConfig(rank=4, target_modules=TARGETS, seed=5)
    full = PreferenceTrainer(tiny, lora, config(tmp_path / "full", max_steps=6, save_every=3), pref)
    h = full.train(data)
    full.close()
    assert h.losses[-1] < h.losses[0]
    assert {"rewards/chosen", "logps/chosen"} <= set(h.steps[0])
    again = PreferenceTrainer(tiny, lora, config(tmp_path / "part", max_steps=6, save_every=3), pref)
    h2 = again.train(data, resume_from=tmp_path / "full" / "checkpoints" / "checkpoint-3")
    again.close()
    assert h2.losses == h.losses[3:]
    assert (tmp_path / "part" / "adapter.gguf").read_bytes() == (tmp_path / "full" / "adapter.gguf").read_bytes()


def test_reference_adapter(tiny, tmp_path):
    """With ref_adapter, the reference is the base model with that adapter (TRL's ref_adapter_name): a run
    starting from a copy of it starts at policy = reference, DPO's loss exactly log 2; against the bare base
    the same start is not."""
    from ggml_lora import Adapter

    lora = LoRAConfig(rank=4, target_modules=TARGETS, seed=6)
    with Adapter.init(tiny, lora) as sft:
        randomize_b(sft)
        sft.save(tmp_path / "sft.gguf")
        losses = {}
        for name, ref in (("sft", sft), ("base", None)):
            with Adapter.load(tiny, tmp_path / "sft.gguf") as start:
                start.config = lora
                trainer = PreferenceTrainer(tiny, lora, config(tmp_path / name, max_steps=1), PreferenceConfig(),
                                            adapter=start, ref_adapter=ref)
                losses[name] = trainer.train(pairs(4)).losses[0]
                trainer.close()
    assert losses["sft"] == pytest.approx(np.log(2.0), abs=1e-6)
    assert abs(losses["base"] - np.log(2.0)) > 1e-3


def test_resume_refuses_other_preference_settings(tiny, tmp_path):
    lora = LoRAConfig(rank=4, target_modules=TARGETS)
    t = PreferenceTrainer(tiny, lora, config(tmp_path, max_steps=2, save_every=1), PreferenceConfig(beta=0.1))
    t.train(pairs(8))
    t.close()
    t = PreferenceTrainer(tiny, lora, config(tmp_path, max_steps=2, save_every=1), PreferenceConfig(beta=0.2))
    with pytest.raises(CheckpointError, match="preference settings"):
        t.train(pairs(8), resume_from=True)
    t.close()


def test_command_line(tiny, tmp_path):
    data = tmp_path / "prefs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in pairs(8)))
    out = subprocess.run([sys.executable, "-m", "ggml_lora", "train", "--model", str(tiny.path), "--data", str(data),
                          "--method", "orpo", "--beta", "0.2", "--max-steps", "2", "--batch-size", "4",
                          "--output-dir", str(tmp_path / "out"), "--no-progress", "--eval-every", "0"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    assert summary["steps"] == 2 and summary["adapter"]
    records = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert "log_odds_ratio" in records[-1]
    assert json.loads((tmp_path / "out" / "adapter_config.json").read_text())["preference"]["method"] == "orpo"
