"""ggml-lora's DPO / ORPO against TRL's trainers, step by step, from the same token ids and initial adapter.

    python benchmarks/preference_trl.py [--model PATH] [--method dpo|orpo] [--loss-type sigmoid|ipo|hinge]
                                        [--steps 20] [--pairs 8] [--f16-weights] [--threads 2]

The pairs are the first ``--pairs`` records of examples/data/prefs/train.jsonl as ggml-lora tokenizes
them (the GGUF's chat template, the completion's assistant turn supervised), split into prompt and
completion ids; TRL gets exactly those ids (benchmarks/trl_reference.py). Both sides start from the
same lora_A (ggml-lora's seeded Kaiming-uniform init) and B = 0, take one optimizer step per ``step`` over
every pair, AdamW with a constant learning rate. Prints one JSON object: per step, both losses and
TRL's metrics, and the largest relative differences.

ggml-lora trains through the GGUF's stored blocks (llama.cpp's arithmetic: int8 activations in the
quantized products) unless --f16-weights; TRL through transformers' float32 dequantization, or with
--f16-weights, the same weights rounded to float16 as ggml-lora's F16 copies.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
METRICS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected")
ORPO_METRICS = ("nll_loss", "log_odds_ratio", "log_odds_chosen")


def pairs_of(rows) -> list[dict]:
    """TRL's {prompt_ids, chosen_ids, rejected_ids} of PreferenceRows whose completions are contiguous and
    end their sequences (what a prompt + completion split can express)."""
    out = []
    for i, row in enumerate(rows):
        parts = []
        for s in row.seqs:
            idx = np.flatnonzero(s.mask)
            k, end = int(idx[0]), int(idx[-1]) + 1
            if not s.mask[k:end].all():
                raise ValueError(f"row {i}: the completion is not contiguous")
            parts.append((s.tokens[:k].tolist(), s.tokens[k:end].tolist()))
        if parts[0][0] != parts[1][0]:
            raise ValueError(f"row {i}: chosen and rejected tokenize the prompt differently")
        out.append({"prompt_ids": parts[0][0], "chosen_ids": parts[0][1], "rejected_ids": parts[1][1]})
    return out


def rows_of(pairs: list[dict]):
    """PreferenceRows holding exactly these ids, the completions supervised."""
    from ggml_lora.data import Sample
    from ggml_lora.preference import PreferenceRow

    rows = []
    for p in pairs:
        seqs = []
        for key in ("chosen_ids", "rejected_ids"):
            tokens = np.array(p["prompt_ids"] + p[key], dtype=np.int32)
            mask = np.zeros(len(tokens), dtype=bool)
            mask[len(p["prompt_ids"]):] = True
            seqs.append(Sample(tokens, mask))
        rows.append(PreferenceRow(tuple(seqs)))
    return rows


def ours(model, pairs: list[dict], *, method: str, beta: float, learning_rate: float, steps: int, rank: int,
         alpha: float, target_modules: tuple[str, ...], loss_type: str = "sigmoid", max_grad_norm: float = 0.0,
         f16_weights: bool = False, seed: int = 0) -> tuple[list[dict], dict[str, np.ndarray]]:
    """(per-step records of a PreferenceTrainer over all ``pairs`` per step, the initial lora_A by PEFT
    module name)."""
    from ggml_lora import Adapter, LoRAConfig, PreferenceConfig, PreferenceTrainer, TrainingConfig
    from ggml_lora.arch import hf_module

    lora = LoRAConfig(rank=rank, alpha=alpha, target_modules=target_modules, seed=seed)
    adapter = Adapter.init(model, lora)
    lora_a = {hf_module(t): adapter.get(t)[0].copy() for t in adapter.targets}
    with tempfile.TemporaryDirectory() as out:
        cfg = TrainingConfig(max_steps=steps, batch_size=len(pairs), learning_rate=learning_rate,
                             lr_scheduler="constant", max_grad_norm=max_grad_norm, weight_decay=0.0,
                             eval_every=0, save_every=0, progress=False, output_dir=out, f16_weights=f16_weights,
                             max_seq_length=max(len(p["prompt_ids"]) + max(len(p["chosen_ids"]), len(p["rejected_ids"]))
                                                for p in pairs))
        pref = PreferenceConfig(method=method, beta=beta, loss_type=loss_type)
        with PreferenceTrainer(model, lora, cfg, pref, adapter=adapter) as trainer:
            history = trainer.train(rows_of(pairs))
    adapter.close()
    return history.steps, lora_a


def compare(model_path, pairs: list[dict], *, method: str, f16_weights: bool = False, **kw) -> dict:
    """Both runs and their per-step differences."""
    from trl_reference import trl_reference

    from ggml_lora import BaseModel

    with BaseModel.load(model_path, n_threads=kw.pop("n_threads", None)) as model:
        t0 = time.perf_counter()
        mine, lora_a = ours(model, pairs, method=method, f16_weights=f16_weights, **kw)
        ours_s = time.perf_counter() - t0
    kw.pop("seed", None)
    t0 = time.perf_counter()
    theirs = trl_reference(str(model_path), pairs, method=method, lora_a=lora_a, f16=f16_weights,
                           target_modules=list(kw.pop("target_modules")), **kw)
    trl_s = time.perf_counter() - t0
    names = METRICS + (ORPO_METRICS if method == "orpo" else ())
    steps = [{"step": a["step"], **{f"{n}": [a[n], b[n]] for n in names}} for a, b in zip(mine, theirs)]
    worst = {n: max(abs(a[n] - b[n]) / max(abs(b[n]), 1e-3) for a, b in zip(mine, theirs)) for n in names}
    # per-step relative differences blow up where a value crosses zero (rewards) or vanishes (DPO's loss):
    # also against the largest magnitude TRL's run reaches
    span = {n: max(abs(a[n] - b[n]) for a, b in zip(mine, theirs)) / max(max(abs(b[n]) for b in theirs), 1e-6)
            for n in names}
    return {"method": method, "steps": steps, "max_rel_diff": worst, "max_diff_over_range": span,
            "ours_s": ours_s, "trl_s": trl_s}


def main() -> None:
    from bench_train import default_model

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, default=None, help="GGUF (default: SmolLM2-135M-Instruct Q4_1)")
    ap.add_argument("--method", choices=("dpo", "orpo"), default="dpo")
    ap.add_argument("--loss-type", choices=("sigmoid", "ipo", "hinge"), default="sigmoid")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--pairs", type=int, default=8)
    ap.add_argument("--beta", type=float, default=0.1)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--targets", default="q_proj,v_proj")
    ap.add_argument("--f16-weights", action="store_true")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    import torch

    from ggml_lora import BaseModel
    from ggml_lora.preference import load_preferences

    torch.set_num_threads(args.threads)
    model_path = args.model or default_model()
    with BaseModel.load(model_path) as model:
        rows, _ = load_preferences(HERE.parent / "examples" / "data" / "prefs", model, args.method, max_seq_length=256)
    pairs = pairs_of(rows[:args.pairs])
    result = compare(model_path, pairs, method=args.method, loss_type=args.loss_type, beta=args.beta,
                     learning_rate=args.lr, steps=args.steps, rank=args.rank, alpha=2.0 * args.rank,
                     target_modules=tuple(args.targets.split(",")), f16_weights=args.f16_weights,
                     n_threads=args.threads)
    result.update(model=str(model_path), pairs=len(pairs), f16_weights=args.f16_weights, lr=args.lr, beta=args.beta)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
