"""Validation loss before/after a short training run of ggml-lora: our side of the quality check against PEFT.

    python benchmarks/quality_ours.py [--model PATH] [--device auto] [--threads N] [--quality-steps 30]

The check: at equal steps, data and hyperparameters, the validation loss after training is within 1% of
PEFT's (benchmarks/peft_baseline.py --quality, which starts from this file's initial adapter and tokens,
so both sides begin with identical A and B). Setting: bench_train.py's r8-qv-4x256, AdamW at lr 1e-3,
gradient norm clipped to 1.0; data is examples/textgen.py's English text in our tokenizer's ids (the
tokenizer transformers builds from the GGUF drops SmolLM2's one-digit-per-token rule, so PEFT reuses ours).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from bench_train import CONFIGS, default_model
from ggml_lora import Adapter, BaseModel, LoRAConfig
from ggml_lora.forward import evaluate, loss_batch
from ggml_lora.step import TrainingContext

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from textgen import english_text  # noqa: E402

QUALITY = CONFIGS["r8-qv-4x256"]
LEARNING_RATE = 1e-3
MAX_GRAD_NORM = 1.0
TRAIN_SEED, VALID_SEED = 1, 2            # english_text seeds: different sentences, the same facts


def text_ids(model: BaseModel, seed: int, n_tokens: int) -> np.ndarray:
    """The first n_tokens ids of english_text(seed), grown until long enough."""
    n_sentences = n_tokens // 10 + 16
    while True:
        ids = model.tokenize(english_text(n_sentences, seed=seed), add_special=False)
        if len(ids) >= n_tokens:
            return np.array(ids[:n_tokens], dtype=np.int32)
        n_sentences *= 2


def quality_tokens(model: BaseModel, steps: int) -> tuple[np.ndarray, np.ndarray]:
    """Training ids (steps, B, T) and validation ids (B, T), B x T = QUALITY's batch x length."""
    b, t = QUALITY.batch, QUALITY.length
    train = text_ids(model, TRAIN_SEED, steps * b * t).reshape(steps, b, t)
    valid = text_ids(model, VALID_SEED, b * t).reshape(b, t)
    return train, valid


def initial_adapter(model: BaseModel) -> Adapter:
    """A kaiming-uniform (seed 0), B = 0: the adapter both sides start from."""
    return Adapter.init(model, LoRAConfig(rank=QUALITY.rank, alpha=2 * QUALITY.rank, target_modules=QUALITY.targets))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int)
    ap.add_argument("--quality-steps", type=int, default=30)
    ap.add_argument("--f16-weights", action="store_true", help="train through F16 copies of the quantized weights")
    ap.add_argument("--bf16", action="store_true", help="bfloat16 products on AMX tiles (CPUs with AMX-BF16 only)")
    args = ap.parse_args()
    steps = args.quality_steps
    path = args.model or default_model()
    with BaseModel.load(path, device=args.device, n_threads=args.threads, n_ctx=QUALITY.length) as model:
        model.set_amx_bf16(args.bf16)
        train, valid = quality_tokens(model, steps)
        with initial_adapter(model) as adapter, TrainingContext(adapter, f16_weights=args.f16_weights) as ctx:
            before = evaluate(model, adapter, valid)[0]
            losses = [ctx.step([loss_batch(model, train[i])], learning_rate=LEARNING_RATE, step=i + 1,
                               max_grad_norm=MAX_GRAD_NORM).loss for i in range(steps)]
            after = evaluate(model, adapter, valid)[0]
    print(json.dumps({"impl": "ggml-lora", "f16_weights": args.f16_weights, "bf16": args.bf16, "quality": QUALITY.name, "steps": steps, "learning_rate": LEARNING_RATE,
                      "valid_loss_before": round(before, 5), "valid_loss_after": round(after, 5),
                      "train_loss_first": round(losses[0], 5), "train_loss_last": round(losses[-1], 5),
                      "train_losses": [round(x, 4) for x in losses]}), flush=True)


if __name__ == "__main__":
    main()
