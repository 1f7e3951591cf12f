"""ggml-lora (bench_train.py) against PyTorch + PEFT (peft_baseline.py), alternating, plus llama.cpp as an eval reference.

    python benchmarks/compare.py [--model PATH] [--threads N] [--steps 4] [--warmup 1] [--repeats 2] [--config NAME ...]
                                 [--impl ours f16 bf16 peft peft-bf16 llama]
    python benchmarks/compare.py --quality [--quality-steps 30] [--threads N]

Every run is a fresh process (one configuration, one implementation), so each peak RSS is that run's.
By default ggml-lora runs twice, through the stored quantized weights (ours) and with --f16-weights
(training forward through F16 copies: what the trainer's default f16_weights=None chooses on a CPU when
the copies fit in a quarter of the memory available), against PEFT in float32; --impl picks others, e.g. PEFT with bfloat16 weights under CPU autocast (peft-bf16), or ggml-lora with
BF16 copies multiplied on AMX tiles (bf16: --f16-weights --bf16, what the trainer chooses by default on CPUs
with AMX-BF16). --model takes any GGUF,
the synthetic models of real shape (synthetic.py) included. Within a repeat the implementations run back
to back and the order rotates every repeat, so slow drift of the machine falls on all. Ratios are
ours / PEFT per repeat (paired), reported as the median and the min-max over repeats; the tokens/s
columns are medians. "eval vs llama.cpp" divides our eval
tokens/s (forward + loss over every position) by llama-cpp-python's prompt processing of the same ids
on the same threads (logits of the last token only, so llama.cpp does less work per token); "f16"
evaluates through the F16 copies (evaluate(f16_weights=True)), the plain column through the stored
blocks, as llama.cpp does.

facts-r8-all-b8 trains on the README main job's chat rows (bench_train.py writes them once; the same ids,
targets and batches on every side): ggml-lora collates them as its trainer does, PEFT pads each batch to
its longest row as transformers' collators do (labels -100 on prompts and padding); tokens/s count real
tokens on both sides; llama.cpp does not run for it.

stdout: one JSON object per configuration, then a Markdown table; every single run's JSON goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_train import CONFIGS, resolve_model
from peft_baseline import bench_tokens

HERE = Path(__file__).resolve().parent
IMPLS = {"ours": "ggml-lora", "f16": "ggml-lora --f16-weights", "bf16": "ggml-lora --f16-weights --bf16", "peft": "PEFT fp32", "peft-bf16": "PEFT bf16",
         "llama": "llama.cpp"}
OURS = ("ours", "f16", "bf16")
BASELINES = ("peft", "peft-bf16")
DEFAULT_IMPLS = ("ours", "f16", "peft", "llama")


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
    """Medians per implementation and paired ratios: each ggml-lora run over each PyTorch run (train tok/s,
    peak RSS, eval tok/s) and over llama.cpp (eval tok/s). Keys for PEFT fp32 keep their old names
    (ours_train_ratio); those for the other baselines name them (ours_train_ratio_peft-bf16)."""
    runs = {impl: r for impl, r in runs.items() if r}

    def med(impl: str, key: str) -> float:
        return round(statistics.median(r[key] for r in runs[impl]), 1)

    def ratio(a: str, b: str, key: str) -> dict:
        return spread([x[key] / y[key] for x, y in zip(runs[a], runs[b])])

    out = {"config": name, "repeats": max(len(r) for r in runs.values())}
    # the instruction sets each side's kernels were built or limited to (GGML_LORA_AVX2_ONLY; ATEN_CPU_CAPABILITY)
    for key in ("ggml_cpu_features", "torch_cpu_capability"):
        out |= next(({key: r[0][key]} for r in runs.values() if key in r[0]), {})
    for impl in runs:
        if impl != "llama":
            out[f"{impl}_train_tokens_per_s"] = med(impl, "train_tokens_per_s")
            out[f"{impl}_peak_rss_mib"] = med(impl, "peak_rss_mib")
        out[f"{impl}_eval_tokens_per_s"] = med(impl, "eval_tokens_per_s")
    for ours in (i for i in OURS if i in runs):
        for base in (i for i in BASELINES if i in runs):
            tag = "" if base == "peft" else f"_{base}"
            out[f"{ours}_train_ratio{tag}"] = ratio(ours, base, "train_tokens_per_s")
            out[f"{ours}_peak_rss_ratio{tag}"] = ratio(ours, base, "peak_rss_mib")
            out[f"{ours}_eval_ratio{tag}"] = ratio(ours, base, "eval_tokens_per_s")
        if "llama" in runs:
            out[f"{ours}_eval_vs_llama_cpp"] = ratio(ours, "llama", "eval_tokens_per_s")
    return out


def markdown(rows: list[dict], threads: int) -> str:
    def r(s: dict) -> str:
        return f"{s['median']:.2f} ({s['min']:.2f}-{s['max']:.2f})"

    present = [i for i in IMPLS if any(f"{i}_eval_tokens_per_s" in s for s in rows)]
    ours = [i for i in OURS if i in present]
    bases = [i for i in BASELINES if i in present]
    pairs = [(a, b) for a in ours for b in bases]
    trained = [i for i in present if i != "llama"]
    head = ["config", "train tok/s " + " / ".join(IMPLS[i] for i in trained),
            "peak RSS MiB " + " / ".join(IMPLS[i] for i in trained),
            *(f"train {IMPLS[a]} / {IMPLS[b]}" for a, b in pairs),
            *(f"RSS {IMPLS[a]} / {IMPLS[b]}" for a, b in pairs),
            *(f"eval {IMPLS[a]} / {IMPLS[b]}" for a, b in pairs),
            *(f"eval {IMPLS[a]} / llama.cpp" for a in ours if "llama" in present)]
    lines = [f"ggml-lora vs PyTorch + PEFT, {threads} threads; ratios median (min-max) over repeats", "",
             "| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for s in rows:
        cells = [s["config"], " / ".join(f"{s[f'{i}_train_tokens_per_s']:.1f}" for i in trained),
                 " / ".join(f"{s[f'{i}_peak_rss_mib']:.0f}" for i in trained)]
        for key in ("train_ratio", "peak_rss_ratio", "eval_ratio"):
            cells += [r(s[f"{a}_{key}" + ("" if b == "peft" else f"_{b}")]) for a, b in pairs]
        cells += [r(s[f"{a}_eval_vs_llama_cpp"]) if f"{a}_eval_vs_llama_cpp" in s else "-"
                  for a in ours if "llama" in present]
        lines.append("| " + " | ".join(cells) + " |")
    isa = next((s for s in rows if "ggml_cpu_features" in s or "torch_cpu_capability" in s), {})
    if isa:
        lines += ["", f"ggml-lora's ggml built for: {' '.join(isa.get('ggml_cpu_features', ['-']))}; "
                  f"PyTorch's CPU capability: {isa.get('torch_cpu_capability', '-')}"]
    by_name = {s["config"]: s for s in rows}
    if "r8-qv-1x2048-gc" in by_name and "r8-qv-4x512" in by_name and "ours" in present:
        long, short = by_name["r8-qv-1x2048-gc"], by_name["r8-qv-4x512"]
        lines += ["", "1x2048 with gradient checkpointing / 4x512 without, train tok/s: "
                  f"{long['ours_train_tokens_per_s'] / short['ours_train_tokens_per_s']:.2f}; "
                  f"1x2048 peak RSS {long['ours_peak_rss_mib']:.0f} MiB"]
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
    ap.add_argument("--impl", action="extend", nargs="+", choices=sorted(IMPLS),
                    help=f"implementations to run (default: {' '.join(DEFAULT_IMPLS)}); peft-bf16: PEFT with "
                         "bfloat16 weights and CPU autocast")
    ap.add_argument("--quality", action="store_true", help="the validation-loss check instead of throughput")
    ap.add_argument("--quality-steps", type=int, default=30)
    ap.add_argument("--llama-cpp-eval", metavar="CONFIG", choices=sorted(CONFIGS), help=argparse.SUPPRESS)
    args = ap.parse_args()
    path = resolve_model(args.model)
    if args.llama_cpp_eval:
        print(json.dumps(llama_cpp_eval(path, args.llama_cpp_eval, args.threads, args.steps + args.warmup)))
        return
    if args.quality:
        quality(path, args.quality_steps, args.threads)
        return
    common = ["--model", str(path), "--threads", str(args.threads), "--steps", str(args.steps),
              "--warmup", str(args.warmup)]
    names = args.config or sorted(CONFIGS)
    impls = [i for i in IMPLS if i in (args.impl or DEFAULT_IMPLS)]
    if not any(i in impls for i in OURS):
        ap.error("--impl needs ours, f16 or bf16: every ratio is ggml-lora over another implementation")
    runs = {name: {impl: [] for impl in impls if impl != "llama" or not CONFIGS[name].data} for name in names}
    tmp = tempfile.TemporaryDirectory()
    rows = {}
    for name in (n for n in names if CONFIGS[n].data):    # chat rows: tokenized once, the same for every side
        rows[name] = ["--rows", str(Path(tmp.name) / f"{name}.npz")]
        subprocess.run([sys.executable, str(HERE / "bench_train.py"), "--config", name, *common,
                        "--write-rows", rows[name][1]], check=True)
    for repeat in range(args.repeats):
        for name in names:
            ours = [str(HERE / "bench_train.py"), "--device", "CPU", "--config", name, *common]
            peft = [str(HERE / "peft_baseline.py"), "--in-process", "--config", name, *common, *rows.get(name, [])]
            cmds = {"ours": ours, "f16": [*ours, "--f16-weights"], "bf16": [*ours, "--f16-weights", "--bf16"],
                    "peft": [*peft, "--precision", "fp32"], "peft-bf16": [*peft, "--precision", "bf16"],
                    "llama": [str(HERE / "compare.py"), "--llama-cpp-eval", name, *common]}
            order = [i for i in impls if i != "llama"]
            order = order[repeat % len(order):] + order[:repeat % len(order)]
            for impl in (*order, *(["llama"] if "llama" in runs[name] else [])):
                runs[name][impl].append(run_json(cmds[impl], IMPLS[impl]))
    rows = [summarize(name, r) for name, r in runs.items()]
    for row in rows:
        print(json.dumps(row))
    print()
    print(markdown(rows, args.threads), flush=True)


if __name__ == "__main__":
    main()
