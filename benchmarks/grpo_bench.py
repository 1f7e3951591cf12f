"""One GRPO step's time, split: generation (llama.cpp, through the live adapter), old-policy / reference
log-probabilities, the training step; tokens/s of each and peak RSS, as JSON. ``--trl`` adds the same steps
in TRL 1.16's GRPOTrainer on PEFT (transformers' float32 model of the same GGUF, generation by
transformers, as a TRL user without vLLM gets), in the same process after ours.

    python benchmarks/grpo_bench.py [--model PATH] [--steps 3] [--prompts 2] [--num-generations 8]
                                    [--max-completion-length 32] [--beta 0.04] [--num-iterations 1]
                                    [--threads 2] [--trl]

Prompts are examples/data/arith's (chat prompts of SmolLM2's template), the reward examples/grpo_arithmetic.py's
exact_answer + contains_answer. The first step also pays for starting llama.cpp's context; the JSON gives
each step and the mean of the steps after the first.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "examples"))
os.environ.setdefault("TQDM_DISABLE", "1")


def ours(model_path, args) -> dict:
    from grpo_arithmetic import DATA, contains_answer, exact_answer

    from ggml_lora import BaseModel, GRPOConfig, GRPOTrainer, LoRAConfig, TrainingConfig
    from ggml_lora.reporting import peak_rss_bytes

    G = args.num_generations
    with BaseModel.load(model_path, n_threads=args.threads) as model, tempfile.TemporaryDirectory() as out:
        cfg = TrainingConfig(max_steps=args.steps, batch_size=args.prompts * G, learning_rate=1e-4, output_dir=out,
                             max_seq_length=args.max_completion_length + 64, eval_every=0, save_every=0,
                             progress=False, n_threads=args.threads)
        grpo = GRPOConfig(num_generations=G, max_completion_length=args.max_completion_length, beta=args.beta,
                          num_iterations=args.num_iterations)
        lora = LoRAConfig(rank=16, target_modules=tuple(args.targets.split(",")))
        with GRPOTrainer(model, [exact_answer, contains_answer], lora, cfg, grpo) as trainer:
            t0 = time.perf_counter()
            history = trainer.train(DATA / "train.jsonl")
            wall = time.perf_counter() - t0
            f16 = trainer._ctx.f16_weights
    steps = []
    for r in history.steps:
        ro = {k: r.get(k, 0.0) for k in ("time/generation_s", "time/adapter_refresh_s", "time/old_ref_logps_s",
                                         "time/logps_s", "time/train_s", "step_time", "completions/mean_length",
                                         "generation_tokens_per_s")}
        ro["train_tokens_per_s"] = r["supervised_tokens"] / ro["time/train_s"] if ro["time/train_s"] else None
        steps.append({"step": r["step"], **ro})
    later = steps[1:] or steps
    mean = {k: float(np.mean([s[k] for s in later if s[k] is not None]))
            for k in steps[0] if k != "step" and any(s[k] is not None for s in later)}
    return {"steps": steps, "mean_after_first": mean, "wall_s": wall, "steps_per_hour": 3600 * args.steps / wall,
            "peak_rss_bytes": peak_rss_bytes(), "f16_weights": f16}


def trl(model_path, args) -> dict:
    import datasets
    import peft
    import torch
    from grpo_arithmetic import DATA, contains_answer, exact_answer
    from transformers import AutoTokenizer, PrinterCallback
    from trl import GRPOConfig, GRPOTrainer

    from trl_reference import _load_float32

    torch.set_num_threads(args.threads or 2)
    path = Path(model_path)
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    model = _load_float32(path)
    records = [json.loads(line) for line in (DATA / "train.jsonl").read_text().splitlines()]
    G = args.num_generations
    times: list[float] = []

    class Timed(GRPOTrainer):
        def training_step(self, *a, **kw):
            t = time.perf_counter()
            out = super().training_step(*a, **kw)
            times.append(time.perf_counter() - t)
            return out

    lora = peft.LoraConfig(r=16, lora_alpha=32, target_modules=args.targets.split(","), lora_dropout=0.0,
                           task_type="CAUSAL_LM")
    with tempfile.TemporaryDirectory() as out:
        cfg = GRPOConfig(output_dir=out, per_device_train_batch_size=args.prompts * G, gradient_accumulation_steps=1,
                         num_generations=G, max_completion_length=args.max_completion_length, beta=args.beta,
                         num_iterations=args.num_iterations, max_steps=args.steps, learning_rate=1e-4,
                         logging_steps=1, save_strategy="no", report_to="none", use_cpu=True, bf16=False,
                         disable_tqdm=True, seed=0)
        trainer = Timed(model=model, reward_funcs=[exact_answer, contains_answer], args=cfg,
                        train_dataset=datasets.Dataset.from_list(records), processing_class=tokenizer,
                        peft_config=lora)
        trainer.remove_callback(PrinterCallback)        # its log lines would go into the JSON on stdout
        t0 = time.perf_counter()
        trainer.train()
        wall = time.perf_counter() - t0
    from ggml_lora.reporting import peak_rss_bytes

    return {"step_s": times, "mean_after_first": float(np.mean(times[1:] or times)), "wall_s": wall,
            "steps_per_hour": 3600 * args.steps / wall, "peak_rss_bytes": peak_rss_bytes()}


def main() -> None:
    from bench_train import default_model

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, default=None)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--prompts", type=int, default=2)
    ap.add_argument("--num-generations", type=int, default=8)
    ap.add_argument("--max-completion-length", type=int, default=32)
    ap.add_argument("--beta", type=float, default=0.04)
    ap.add_argument("--num-iterations", type=int, default=1)
    ap.add_argument("--targets", default="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--trl", action="store_true", help="also run TRL's GRPOTrainer on PEFT (peak RSS then covers both)")
    args = ap.parse_args()
    model_path = args.model or default_model()
    result = {"model": str(model_path), "config": vars(args) | {"model": str(model_path)},
              "cpu_count": os.cpu_count(), "ours": ours(model_path, args)}
    if args.trl:
        result["trl"] = trl(model_path, args)
        result["speedup_steps_per_hour"] = result["ours"]["steps_per_hour"] / result["trl"]["steps_per_hour"]
    print(json.dumps(result, indent=1, default=str))


if __name__ == "__main__":
    main()
