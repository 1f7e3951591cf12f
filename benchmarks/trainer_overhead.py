"""The training loop's cost around the steps: the same `ggml-lora train` run by two source trees (e.g. before
and after a restructuring of the trainer), alternating, in fresh processes, on the same native library.
Prints one JSON object: per tree, the steady-state tokens/s of the steps (metrics.jsonl, first step left
out) and the whole command's wall time, medians over the repeats, and their ratios measured in the same run.

    git worktree add /tmp/before <rev>
    python benchmarks/trainer_overhead.py --tree before=/tmp/before/src --tree after=src --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_once(src: str, out: Path, args) -> dict:
    cmd = [sys.executable, "-m", "ggml_lora", "train", "--data", str(ROOT / "examples" / "data" / "facts"),
           "--rank", "8", "--target-modules", "q_proj,v_proj", "--batch-size", "4", "--max-steps", str(args.steps),
           "--learning-rate", "1e-3", "--eval-every", "0", "--save-every", "0", "--no-progress",
           "--output-dir", str(out), "--n-threads", str(args.threads)]
    env = {**os.environ, "PYTHONPATH": src}
    t0 = time.perf_counter()
    subprocess.run(cmd, env=env, check=True, capture_output=True)
    wall = time.perf_counter() - t0
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in steps if r.get("type") == "train"]
    # tokens/s of the steps after the first (which builds the graphs): from the cumulative counters
    tokens = sum(r["supervised_tokens"] for r in steps[1:])
    seconds = steps[-1]["elapsed_s"] - steps[0]["elapsed_s"]
    return {"wall_s": wall, "supervised_tokens_per_s": tokens / seconds if seconds > 0 else 0.0,
            "final_loss": steps[-1]["loss"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tree", action="append", required=True, metavar="NAME=SRC", help="a source tree (its src/)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    trees = dict(t.split("=", 1) for t in args.tree)
    runs: dict[str, list[dict]] = {name: [] for name in trees}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            for name, src in trees.items():
                runs[name].append(run_once(str(Path(src).resolve()), Path(tmp) / f"{name}-{r}", args))
    med = {name: {k: statistics.median(x[k] for x in rs) for k in ("wall_s", "supervised_tokens_per_s")}
           for name, rs in runs.items()}
    first = next(iter(trees))
    flags = sorted({f for line in open("/proc/cpuinfo") if line.startswith("flags") for f in line.split()
                    if f.startswith(("avx", "amx", "fma"))}) if Path("/proc/cpuinfo").exists() else []
    print(json.dumps({"machine": platform.processor() or platform.machine(), "cpu_flags": flags,
                      "threads": args.threads, "steps": args.steps, "repeats": args.repeats, "median": med,
                      "ratio_to_" + first: {name: {k: m[k] / med[first][k] for k in m} for name, m in med.items()},
                      "runs": {name: [{k: round(v, 3) for k, v in x.items()} for x in rs] for name, rs in runs.items()},
                      "final_loss": {name: [x["final_loss"] for x in rs] for name, rs in runs.items()}}, indent=2))


if __name__ == "__main__":
    main()
