"""Golden runs: a few fixed-seed steps of SFT, AdaLoRA and DPO on a tiny model, reduced to hashes of the
saved adapter, the final checkpoint and the metrics lines (timings left out).

A restructuring of the trainer must not change a bit of what training computes. The hashes depend on
the CPU's kernels (ggml picks AVX2, AVX-512 or AMX code), so they are recorded per CPU feature set:

    PYTHONPATH=src python tests/golden_run.py --record      # on the commit before the change
    pytest tests/test_golden_run.py                         # after it: same hashes on this CPU class
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

GOLDEN_FILE = Path(__file__).resolve().parent / "golden_runs.json"
# what a record holds that is not computed from the data (wall clock, memory)
VOLATILE = ("tokens_per_s", "elapsed_s", "peak_rss_bytes", "eval_s", "step_time")
WORDS = ["north", "river", "stone", "the", "of", "town", "bell", "mill", "green", "road", "lies", "near"]
N_THREADS = 2


def cpu_class() -> str:
    """The CPU the hashes hold for, as one key: ggml's features (which kernels run) and a digest of the model
    name and every flag /proc/cpuinfo lists (GGML_NATIVE compiles with -march=native, and two CPUs with the
    same ggml features, say Zen 4 and Zen 5, may still be vectorised differently)."""
    import platform

    import ggml_lora

    features = " ".join(sorted(k for k, v in ggml_lora.cpu_features().items() if v not in ("0", "")))
    info = {}
    try:
        for line in open("/proc/cpuinfo"):
            key, _, value = line.partition(":")
            if key.strip() in ("model name", "flags") and key.strip() not in info:
                info[key.strip()] = " ".join(sorted(value.split())) if key.strip() == "flags" else value.strip()
    except OSError:
        info["machine"] = platform.machine()
    cpu = hashlib.sha256(json.dumps(info, sort_keys=True).encode()).hexdigest()[:12]
    return f"{features} | {info.get('model name', platform.machine())} {cpu}"


def _text(rng, n: int) -> str:
    return " ".join(rng.choice(WORDS, n))


def _pairs(n: int) -> list[dict]:
    rng = np.random.default_rng(0)
    return [{"prompt": f"{_text(rng, 4)}:", "chosen": f" ahoy {_text(rng, int(rng.integers(2, 6)))}",
             "rejected": f" {_text(rng, int(rng.integers(2, 6)))}"} for _ in range(n)]


def _digest(out: Path) -> dict[str, str]:
    """sha256 (16 hex digits) of the adapter file, of every file of the newest checkpoint, and of the
    metrics lines without their timings."""
    def h(data: bytes) -> str:
        return hashlib.sha256(data).hexdigest()[:16]

    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    lines = [json.dumps({k: v for k, v in r.items() if k not in VOLATILE}, sort_keys=True) for r in records]
    result = {"adapter": h((out / "adapter.gguf").read_bytes()), "metrics": h("\n".join(lines).encode())}
    ckpts = sorted((out / "checkpoints").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    for f in sorted(ckpts[-1].iterdir()):
        data = f.read_bytes()
        if f.suffix == ".json":          # the state names output_dir, a temporary folder here
            data = f.read_text().replace(str(out), "<output_dir>").encode()
        result[f"checkpoint/{f.name}"] = h(data)
    return result


def run_all(root: Path) -> dict[str, dict[str, str]]:
    from tinymodels import write_tiny_model

    from ggml_lora import BaseModel, LoRAConfig, LoRATrainer, PreferenceConfig, PreferenceTrainer, TrainingConfig

    model_file = write_tiny_model(root / "tiny-q8_0.gguf", "llama", "q8_0", n_layers=2)
    rng = np.random.default_rng(1)
    text = root / "corpus.txt"
    text.write_text(_text(rng, 600))
    base = dict(learning_rate=2e-2, lr_scheduler="cosine", warmup_steps=1, max_seq_length=32, eval_every=2,
                save_every=3, progress=False, seed=0, max_grad_norm=1.0, valid_fraction=0.2, batch_size=2,
                gradient_accumulation_steps=2)
    runs = {
        "sft": (LoRAConfig(rank=4, alpha=8, target_modules=("q_proj", "v_proj", "down_proj"), dropout=0.1, seed=2),
                dict(max_steps=6)),
        "adalora": (LoRAConfig(peft_type="adalora", init_r=6, target_r=3, alpha=8.0,
                               target_modules=("q_proj", "v_proj", "down_proj"), tinit=1, tfinal=2, deltaT=1, seed=4),
                    dict(max_steps=6)),
        "dpo": (LoRAConfig(rank=4, target_modules=("q_proj", "v_proj"), seed=3), dict(max_steps=4)),
    }
    result = {}
    with BaseModel.load(model_file, n_threads=N_THREADS) as model:
        for name, (lora, extra) in runs.items():
            out = root / name
            cfg = TrainingConfig(**{**base, **extra, "output_dir": str(out)})
            if name == "dpo":
                trainer = PreferenceTrainer(model, lora, cfg, PreferenceConfig(method="dpo", beta=0.5))
                data = _pairs(12)
            else:
                trainer = LoRATrainer(model, lora, cfg)
                data = str(text)
            with trainer:
                trainer.train(data)
            result[name] = _digest(out)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--record", action="store_true", help=f"write this CPU class's hashes into {GOLDEN_FILE.name}")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        hashes = run_all(Path(tmp))
    print(json.dumps({cpu_class(): hashes}, indent=2))
    if args.record:
        golden = json.loads(GOLDEN_FILE.read_text()) if GOLDEN_FILE.exists() else {}
        golden[cpu_class()] = hashes
        GOLDEN_FILE.write_text(json.dumps(golden, indent=2, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
