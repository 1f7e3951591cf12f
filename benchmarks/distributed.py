"""Data parallelism on one machine: N MPI ranks x T threads against 1 process x N·T threads, the same
global batch, data and seed (the README's facts chat data on SmolLM2-135M by default). One JSON object
per layout, then one comparing them.

    python benchmarks/distributed.py [--model PATH] [--data DIR] [--steps 12] [--ranks 2] [--threads 1]
                                     [--batch-size 4] [--rank 8] [--targets q_proj,v_proj]

Each layout is a real `ggml-lora train` run (`mpiexec -n N` for the ranks); tokens/s are the samples'
tokens (no padding) over the steps after the first (warm-up: graphs and first-touch pages), from the
runs' metrics.jsonl; allreduce_bytes is what each rank sums per optimizer step (the float32 LoRA
gradients and two float64 scalars). Validation and checkpoints are off so only training is timed.
A third run trains the ranks' micro-batches in one process (batch_size x ranks accumulation steps):
the losses of the ranks differ from one big batch's by float32 grouping only, which quantized weights
amplify (llama.cpp's products round activations to 8 bits), and that run shows how much of it is grouping.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_train import cpu_flags, default_model  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def run(ranks: int, threads: int, batch: int, args, out: Path, accumulation: int = 1) -> dict:
    cmd = [sys.executable, "-m", "ggml_lora", "train", "--model", str(args.model), "--data", str(args.data),
           "--output-dir", str(out), "--max-steps", str(args.steps), "--batch-size", str(batch),
           "--gradient-accumulation-steps", str(accumulation),
           "--n-threads", str(threads), "--rank", str(args.rank), "--target-modules", args.targets,
           "--eval-every", "0", "--save-every", "0", "--no-progress", "--seed", "0"]
    if ranks > 1:
        cmd = [str(Path(sys.executable).parent / "mpiexec"), "-n", str(ranks), *cmd]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in recs if r["type"] == "train"]
    first, last = steps[0], steps[-1]
    tokens = last["tokens_per_s"] * last["elapsed_s"] - first["tokens_per_s"] * first["elapsed_s"]
    return {"layout": f"{ranks} rank(s) x {threads} thread(s)" + (f", {accumulation} micro-batches of {batch}"
                                                                   if accumulation > 1 else ""),
            "ranks": ranks, "threads_per_rank": threads, "batch_size_per_rank": batch,
            "gradient_accumulation_steps": accumulation, "global_batch": batch * ranks * accumulation,
            "steps": len(steps),
            "tokens_per_s": round(tokens / (last["elapsed_s"] - first["elapsed_s"]), 1),
            "step_s": round((last["elapsed_s"] - first["elapsed_s"]) / (len(steps) - 1), 3),
            "wall_s": round(wall, 1), "allreduce_bytes_per_step": last.get("allreduce_bytes", 0),
            "peak_rss_mib_rank0": round(last["peak_rss_bytes"] / 2**20, 1),
            "losses": [round(r["loss"], 6) for r in steps]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path)
    ap.add_argument("--data", type=Path, default=ROOT / "examples" / "data" / "facts")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="threads per rank")
    ap.add_argument("--batch-size", type=int, default=4, help="rows per rank per step")
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--targets", default="q_proj,v_proj")
    args = ap.parse_args()
    args.model = args.model or default_model()
    header = {"model": args.model.name, "data": str(args.data), "machine": platform.machine(),
              "cpus": os.cpu_count(), "cpu_flags": cpu_flags(), "lora_rank": args.rank, "targets": args.targets}
    tmp = Path(tempfile.mkdtemp(prefix="dp-bench-"))
    try:
        single = run(1, args.ranks * args.threads, args.batch_size * args.ranks, args, tmp / "single")
        print(json.dumps(header | single), flush=True)
        multi = run(args.ranks, args.threads, args.batch_size, args, tmp / "multi")
        print(json.dumps(header | multi), flush=True)
        # the ranks' micro-batches in one process: the same float32 grouping as the distributed run
        grouped = run(1, args.ranks * args.threads, args.batch_size, args, tmp / "grouped", accumulation=args.ranks)
        print(json.dumps(header | grouped), flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    def worst(a, b):
        return max(abs(x - y) / abs(x) for x, y in zip(a["losses"], b["losses"]))
    print(json.dumps(header | {"ranks_vs_threads_tokens_per_s": round(multi["tokens_per_s"] / single["tokens_per_s"], 3),
                               "max_relative_loss_difference_vs_one_batch": worst(single, multi),
                               "max_relative_loss_difference_vs_same_micro_batches": worst(grouped, multi),
                               "one_batch_vs_same_micro_batches_in_one_process": worst(single, grouped),
                               "allreduce_bytes_per_step": multi["allreduce_bytes_per_step"]}), flush=True)


if __name__ == "__main__":
    main()
