"""The command line end to end on the real SmolLM2-135M-Instruct: `ggml-lora train` on a dozen made-up
facts (examples/data/facts, chat format), then `ggml-lora eval` and `ggml-lora generate --adapter`
through llama-cpp-python. Questions are the validation paraphrases, never seen in training."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import N_THREADS

ROOT = Path(__file__).resolve().parents[1]
FACTS = ROOT / "examples" / "data" / "facts"


def cli(*args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "ggml_lora", *args], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def recalled_facts(model: Path, questions: dict[str, str], adapter: Path, *options: str) -> dict[str, list[str]]:
    """{"base": answers, "adapter": answers} that contain the wanted answer, of `ggml-lora generate` (greedy,
    llama.cpp) asked ``questions`` (answer -> question) without and with ``adapter``; printed per question."""
    recalled = {}
    for label, extra in (("base", []), ("adapter", ["--adapter", str(adapter)])):
        args = ["generate", "--model", str(model), "--json", "--n-threads", str(N_THREADS), *options, *extra]
        for q in questions.values():
            args += ["--prompt", q]
        answers = [json.loads(line)["completion"].strip() for line in cli(*args).stdout.splitlines()]
        recalled[label] = [a for a, want in zip(answers, questions) if want in a]
        print(f"{label}: {len(recalled[label])}/{len(questions)} facts recalled")
        for a, want in zip(answers, questions):
            print(f"  {'ok  ' if want in a else 'miss'} {a!r} (want {want!r})")
    return recalled


def held_out_questions() -> dict[str, str]:
    """answer -> one validation question that asks for it alone (one user turn, one assistant turn)."""
    out: dict[str, str] = {}
    for line in (FACTS / "valid.jsonl").read_text().splitlines():
        msgs = json.loads(line)["messages"]
        turns = [m for m in msgs if m["role"] != "system"]
        if len(turns) == 2 and not any(m["role"] == "system" for m in msgs):
            out.setdefault(turns[1]["content"], turns[0]["content"])
    return out


@pytest.mark.slow
def test_train_eval_generate_on_smollm2(smollm2_file, tmp_path):
    out = tmp_path / "facts-out"
    cli("train", "-c", "examples/configs/facts.yaml", "--model", str(smollm2_file), "--output-dir", str(out),
        "--n-threads", str(N_THREADS), "--no-progress")
    for name in ("adapter.gguf", "adapter_config.json", "metrics.jsonl", "loss.png", "checkpoints/checkpoint-42"):
        assert (out / name).exists(), name

    ev = cli("eval", "--model", str(smollm2_file), "--data", str(FACTS), "--adapter", str(out / "adapter.gguf"),
             "--base", "--json", "--n-threads", str(N_THREADS))
    base, tuned = (json.loads(line) for line in ev.stdout.splitlines())
    assert base["adapter"] is None and tuned["adapter"].endswith("adapter.gguf")
    print(f"validation loss: base {base['loss']:.4f}, adapter {tuned['loss']:.4f} ({tuned['tokens']} tokens)")
    assert tuned["loss"] < 0.5 * base["loss"]
    fast = json.loads(cli("eval", "--model", str(smollm2_file), "--data", str(FACTS), "--adapter",
                          str(out / "adapter.gguf"), "--f16-weights", "--json", "--n-threads", str(N_THREADS)).stdout)
    print(f"validation loss through F16 weight copies: {fast['loss']:.4f}")
    # F16 weights and activations instead of Q4_1 blocks and 8-bit activations: rounding only. It moves
    # the mean loss per token by about 1e-3 nats (measured: 0.0017 on this adapter's 0.048, 2e-4 relative
    # on random tokens); near-zero losses make a relative bound meaningless, so the bound is absolute
    assert fast["tokens"] == tuned["tokens"] and fast["loss"] == pytest.approx(tuned["loss"], abs=1e-2)

    questions = held_out_questions()
    assert len(questions) >= 10
    recalled = recalled_facts(smollm2_file, questions, out / "adapter.gguf", "--chat", "--max-tokens", "32")
    # greedy decoding through llama.cpp with the adapter file: most held-out questions answered word for
    # word (measured: see the closing note), and the base model knows none of the made-up facts
    assert len(recalled["adapter"]) >= 0.75 * len(questions)
    assert recalled["base"] == []
