"""ggml-lora (bench_train.py) against PyTorch + PEFT (peft_baseline.py), alternating, plus llama.cpp as an eval reference.

    python benchmarks/compare.py [--model PATH] [--threads N] [--steps 4] [--warmup 1] [--repeats 2] [--config NAME ...]
    python benchmarks/compare.py --quality [--quality-steps 30] [--threads N]

Every run is a fresh process (one configuration, one implementation), so each peak RSS is that run's.
ggml-lora runs twice, as configured by default (training through the stored quantized weights) and
with --f16-weights (training forward through F16 copies). Within a repeat the implementations run back
to back and the order rotates every repeat, so slow drift of the machine falls on all. Ratios are
ours / PEFT per repeat (paired), reported as the median and the min-max over repeats; the tokens/s
columns are medians. "eval vs llama.cpp" divides our eval
tokens/s (forward + loss over every position) by llama-cpp-python's prompt processing of the same ids
on the same threads (logits of the last token only, so llama.cpp does less work per token); "f16"
evaluates through the F16 copies (evaluate(f16_weights=True)), the plain column through the stored
blocks, as llama.cpp does.

stdout: one JSON object per configuration, then a Markdown table; every single run's JSON goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench_train import CONFIGS, default_model
from peft_baseline import bench_tokens

HERE = Path(__file__).resolve().parent
IMPLS = {"ours": "ggml-lora", "f16": "ggml-lora --f16-weights", "peft": "peft", "llama": "llama-cpp-python"}


def run_json(cmd: list[str], impl: str) -> dict:
    """The last stdout line of ``cmd`` as JSON, tagged with ``impl``; echoed to stderr."""
    out = subprocess.run([sys.executable, *cmd], check=True, stdout=subprocess.PIPE, text=True).stdout
    result = {"impl": impl} | json.loads(out.strip().splitlines()[-1])
    print(json.dumps(result), file=sys.stderr, flush=True)
    return result


def llama_cpp_eval(path: Path, name: str, threads: int, n_steps: int) -> dict:
    """Prompt processing of bench_train's first batch, one sequence at a time after a reset."""
    from llama_cpp import Llama

    cfg = CONFIGS[name]
    llm = Llama(model_path=str(path), n_ctx=max(cfg.length, 512), n_batch=512, n_threads=threads,
                n_threads_batch=threads, logits_all=False, verbose=False)
    rows = bench_tokens(llm.n_vocab(), cfg, n_steps)[0]      # (B, T): the batch bench_train evaluates
    llm.reset()
    llm.eval(rows[0].tolist())                              # warm-up, untimed
    elapsed = 0.0
    for row in rows:
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(row.tolist())
        elapsed += time.perf_counter() - t0
    llm.close()
    return {"config": name, "impl": "llama-cpp-python", "threads": threads,
            "eval_tokens_per_s": round(rows.size / elapsed, 1)}


def spread(values: list[float]) -> dict:
    return {"median": round(statistics.median(values), 3), "min": round(min(values), 3), "max": round(max(values), 3)}


def summarize(name: str, runs: dict[str, list[dict]]) -> dict:
    def med(impl: str, key: str) -> float:
        return round(statistics.median(r[key] for r in runs[impl]), 1)

    def ratio(a: str, b: str, key: str) -> dict:
        return spread([x[key] / y[key] for x, y in zip(runs[a], runs[b])])

    out = {"config": name, "repeats": len(runs["ours"])}
    for impl in ("ours", "f16", "peft"):
        out[f"{impl}_train_tokens_per_s"] = med(impl, "train_tokens_per_s")
        out[f"{impl}_peak_rss_mib"] = med(impl, "peak_rss_mib")
    for impl in ("ours", "f16"):
        out[f"{impl}_train_ratio"] = ratio(impl, "peft", "train_tokens_per_s")
        out[f"{impl}_peak_rss_ratio"] = ratio(impl, "peft", "peak_rss_mib")
    out |= {"ours_eval_tokens_per_s": med("ours", "eval_tokens_per_s"),
            "peft_eval_tokens_per_s": med("peft", "eval_tokens_per_s"),
            "eval_ratio": ratio("ours", "peft", "eval_tokens_per_s"),
            "llama_cpp_eval_tokens_per_s": med("llama", "eval_tokens_per_s"),
            "eval_vs_llama_cpp": ratio("ours", "llama", "eval_tokens_per_s"),
            "f16_eval_tokens_per_s": med("f16", "eval_tokens_per_s"),
            "f16_eval_vs_llama_cpp": ratio("f16", "llama", "eval_tokens_per_s")}
    return out


def markdown(rows: list[dict], threads: int) -> str:
    def r(s: dict) -> str:
        return f"{s['median']:.2f} ({s['min']:.2f}-{s['max']:.2f})"

    lines = [f"ggml-lora vs PyTorch + PEFT, {threads} threads; ratios are ggml-lora / other, median (min-max); "
             "f16: ggml-lora with --f16-weights", "",
             ("| config | train tok/s ggml-lora / f16 / PEFT | train ratio | train ratio f16 "
              "| peak RSS MiB ggml-lora / f16 / PEFT | RSS ratio | RSS ratio f16 | eval ratio "
              "| eval tok/s ggml-lora / f16 / llama.cpp | eval vs llama.cpp | eval f16 vs llama.cpp |"),
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for s in rows:
        lines.append(f"| {s['config']} | {s['ours_train_tokens_per_s']:.0f} / {s['f16_train_tokens_per_s']:.0f} / "
                     f"{s['peft_train_tokens_per_s']:.0f} | {r(s['ours_train_ratio'])} | {r(s['f16_train_ratio'])} "
                     f"| {s['ours_peak_rss_mib']:.0f} / {s['f16_peak_rss_mib']:.0f} / {s['peft_peak_rss_mib']:.0f} "
                     f"| {r(s['ours_peak_rss_ratio'])} | {r(s['f16_peak_rss_ratio'])} | {r(s['eval_ratio'])} "
                     f"| {s['ours_eval_tokens_per_s']:.0f} / {s['f16_eval_tokens_per_s']:.0f} / "
                     f"{s['llama_cpp_eval_tokens_per_s']:.0f} "
                     f"| {r(s['eval_vs_llama_cpp'])} | {r(s['f16_eval_vs_llama_cpp'])} |")
    by_name = {s["config"]: s for s in rows}
    if "r8-qv-1x2048-gc" in by_name and "r8-qv-4x512" in by_name:
        long, short = by_name["r8-qv-1x2048-gc"], by_name["r8-qv-4x512"]
        lines += ["", "1x2048 with gradient checkpointing / 4x512 without, train tok/s: "
                  f"{long['ours_train_tokens_per_s'] / short['ours_train_tokens_per_s']:.2f} "
                  f"(f16: {long['f16_train_tokens_per_s'] / short['f16_train_tokens_per_s']:.2f}); "
                  f"1x2048 peak RSS {long['ours_peak_rss_mib']:.0f} MiB (f16: {long['f16_peak_rss_mib']:.0f})"]
    return "\n".join(lines)


def quality(path: Path, steps: int, threads: int) -> None:
    common = ["--model", str(path), "--threads", str(threads), "--quality-steps", str(steps)]
    ours = run_json([str(HERE / "quality_ours.py"), "--device", "CPU", *common], "ggml-lora")
    peft = run_json([str(HERE / "peft_baseline.py"), "--quality", *common], "peft")
    rel = ours["valid_loss_after"] / peft["valid_loss_after"] - 1.0
    # before training the two differ only by how each runs the base model (ggml's quantized matmuls
    # against transformers' float32 dequantization); that part of `rel` is not training
    rel_before = ours["valid_loss_before"] / peft["valid_loss_before"] - 1.0
    print(json.dumps(ours))
    print(json.dumps(peft))
    print(json.dumps({"quality": ours["quality"], "steps": steps, "ours_valid_loss_after": ours["valid_loss_after"],
                      "peft_valid_loss_after": peft["valid_loss_after"], "relative_difference": round(rel, 5),
                      "relative_difference_before": round(rel_before, 5),
                      "within_1_percent": abs(rel) <= 0.01}), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path)
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                    help="threads for every implementation (default: the CPUs this process may use)")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--config", "--configs", dest="config", action="extend", nargs="+", choices=sorted(CONFIGS))
    ap.add_argument("--quality", action="store_true", help="the validation-loss check instead of throughput")
    ap.add_argument("--quality-steps", type=int, default=30)
    ap.add_argument("--llama-cpp-eval", metavar="CONFIG", choices=sorted(CONFIGS), help=argparse.SUPPRESS)
    args = ap.parse_args()
    path = args.model or default_model()
    if args.llama_cpp_eval:
        print(json.dumps(llama_cpp_eval(path, args.llama_cpp_eval, args.threads, args.steps + args.warmup)))
        return
    if args.quality:
        quality(path, args.quality_steps, args.threads)
        return
    common = ["--model", str(path), "--threads", str(args.threads), "--steps", str(args.steps),
              "--warmup", str(args.warmup)]
    names = args.config or sorted(CONFIGS)
    runs = {name: {impl: [] for impl in IMPLS} for name in names}
    for repeat in range(args.repeats):
        for name in names:
            ours = [str(HERE / "bench_train.py"), "--device", "CPU", "--config", name, *common]
            cmds = {"ours": ours, "f16": [*ours, "--f16-weights"],
                    "peft": [str(HERE / "peft_baseline.py"), "--in-process", "--config", name, *common],
                    "llama": [str(HERE / "compare.py"), "--llama-cpp-eval", name, *common]}
            order = ["ours", "f16", "peft"]
            order = order[repeat % 3:] + order[:repeat % 3]
            for impl in (*order, "llama"):
                runs[name][impl].append(run_json(cmds[impl], IMPLS[impl]))
    rows = [summarize(name, r) for name, r in runs.items()]
    for row in rows:
        print(json.dumps(row))
    print()
    print(markdown(rows, args.threads), flush=True)


if __name__ == "__main__":
    main()
