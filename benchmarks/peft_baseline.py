"""The PyTorch + PEFT side of the comparison: bench_train.py's configurations, tokens and optimizer, on torch.

    python benchmarks/peft_baseline.py [--model PATH] [--threads N] [--steps 4] [--warmup 1] [--config NAME ...]
    python benchmarks/peft_baseline.py --quality [--quality-steps 30] [--threads N]

The base model is the same GGUF file, loaded by transformers' GGUF support, which dequantizes every weight
to float32 (ggml-lora keeps the file's quantized blocks); --precision bf16 stores them in bfloat16 and runs
the forward under torch.autocast("cpu", torch.bfloat16), the adapter staying float32 as PEFT keeps it. LoRA is PEFT's (r, lora_alpha = 2r, the same
target modules, lora_dropout 0); the optimizer is torch.optim.AdamW with ggml-lora's betas, eps and weight
decay, after clipping the gradient norm to 1.0 as bench_train.py does. The loss is the mean next-token
cross-entropy over every position but the first of each sequence, as ggml-lora's loss_batch.

Each configuration runs in a fresh process, so peak RSS is that configuration's. It is the process's
high-water mark (ru_maxrss), model loading included, as bench_train.py reports it; `load_peak_rss_mib`
is the same mark taken after loading and wrapping the model, before the first step, and
`run_peak_rss_mib` the peak of the training and evaluation alone (Linux; null elsewhere).

--quality trains the quality setting of quality_ours.py from ggml-lora's own initial adapter (exported to
a PEFT folder, so both sides start from identical A and B) and prints the validation loss before/after.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench_train import CONFIGS, Config, peak_rss_mib, resolve_model
from ggml_lora.step import TrainingContext

os.environ.setdefault("TQDM_DISABLE", "1")     # transformers' GGUF dequantization bar; read when tqdm is imported

# bench_train.run's learning rate and clipping; betas, eps and weight decay are TrainingContext.step's defaults
LEARNING_RATE = 1e-4
MAX_GRAD_NORM = 1.0
_STEP_DEFAULTS = inspect.signature(TrainingContext.step).parameters
BETAS, EPS, WEIGHT_DECAY = (_STEP_DEFAULTS[k].default for k in ("betas", "eps", "weight_decay"))


def bench_tokens(n_vocab: int, cfg: Config, n_steps: int) -> np.ndarray:
    """bench_train.run's draw (seed 0, same shape), so both sides train on identical ids: (n_steps, B, T)."""
    return np.random.default_rng(0).integers(0, n_vocab, (n_steps, cfg.batch, cfg.length))


PRECISIONS = ("fp32", "bf16")


def load_hf(path: Path, precision: str = "fp32"):
    """The GGUF as a transformers model (q/k rows un-permuted back to Hugging Face's order), its weights
    float32, or bfloat16 for precision "bf16"."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging

    logging.disable_progress_bar()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)


def autocast(precision: str):
    """bf16: the forward under torch.autocast("cpu", torch.bfloat16) (PEFT keeps the adapter float32)."""
    import contextlib

    import torch

    return torch.autocast("cpu", torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()


def train_step(model, optimizer, params, ids, max_grad_norm: float, precision: str = "fp32", **batch) -> float:
    """Forward + backward + clip + AdamW; returns the mean next-token cross-entropy before the update.
    ``batch``: labels and attention_mask of padded rows (default: every position of ``ids`` is a label)."""
    import torch

    with autocast(precision):
        loss = model(input_ids=ids, **({"labels": ids} | batch)).loss    # HF shifts the labels: mean over targets
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(loss.detach())


def eval_loss(model, ids, precision: str = "fp32", **batch) -> float:
    import torch

    with torch.no_grad(), autocast(precision):
        return float(model(input_ids=ids, **({"labels": ids} | batch)).loss)


def padded_batches(path: Path) -> list[dict]:
    """bench_train.py's chat rows (save_rows) as HF batches: right-padded to the longest row of each batch,
    as transformers' collators pad, attention_mask 0 and label -100 on padding and on tokens that are not
    targets (the prompts), so the loss is the mean over the same targets as ggml-lora's."""
    import torch

    z = np.load(path)
    ends = np.cumsum(z["lengths"])
    rows = list(zip(np.split(z["tokens"], ends[:-1]), np.split(z["mask"], ends[:-1])))
    out, i = [], 0
    for n in z["batch"]:
        group, i = rows[i:i + n], i + n
        T = max(len(t) for t, _ in group)
        ids = torch.zeros((n, T), dtype=torch.long)
        attn = torch.zeros((n, T), dtype=torch.long)
        labels = torch.full((n, T), -100, dtype=torch.long)
        for r, (t, m) in enumerate(group):
            ids[r, :len(t)] = torch.from_numpy(t.astype(np.int64))
            attn[r, :len(t)] = 1
            labels[r, :len(t)] = torch.from_numpy(np.where(m, t, -100).astype(np.int64))
        labels[:, 0] = -100
        out.append({"ids": ids, "attention_mask": attn, "labels": labels, "real_tokens": int(sum(len(t) for t, _ in group))})
    return out


def chat_batches(path: Path, cfg: Config, n_steps: int, rows: Path | None) -> list[dict]:
    """The chat rows of ``cfg`` from ``rows``, or written now by bench_train.py (a process of its own, so the
    GGUF loaded there to tokenize is not counted here)."""
    if rows is not None:
        return padded_batches(rows)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "rows.npz"
        subprocess.run([sys.executable, str(Path(__file__).with_name("bench_train.py")), "--model", str(path),
                        "--config", cfg.name, "--steps", str(n_steps), "--warmup", "0", "--write-rows", str(out)],
                       check=True, stdout=subprocess.DEVNULL)
        return padded_batches(out)


def adamw(model, learning_rate: float):
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    return params, torch.optim.AdamW(params, lr=learning_rate, betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY)


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) so run_peak_rss_mib covers what follows; Linux only."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def vm_hwm_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024.0
    raise OSError("no VmHWM in /proc/self/status")


def run(path: Path, cfg: Config, steps: int, warmup: int, precision: str = "fp32", rows: Path | None = None) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(r=cfg.rank, lora_alpha=2 * cfg.rank, target_modules=list(cfg.targets), lora_dropout=0.0,
                      bias="none", task_type="CAUSAL_LM")
    model = get_peft_model(load_hf(path, precision), lora)
    if cfg.checkpointing:   # transformers' own activation checkpointing, as ggml-lora's run of this config
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    load_peak = peak_rss_mib()
    hwm = reset_peak_rss()
    if cfg.data:
        batches = chat_batches(path, cfg, steps + warmup, rows)
    else:
        tokens = torch.from_numpy(bench_tokens(model.config.vocab_size, cfg, steps + warmup))   # (steps, B, T) int64
        batches = [{"ids": t, "real_tokens": t.numel()} for t in tokens]
    extra = [{k: v for k, v in b.items() if k in ("labels", "attention_mask")} for b in batches]
    params, optimizer = adamw(model, LEARNING_RATE)
    times = []
    for i in range(steps + warmup):
        t0 = time.perf_counter()
        loss = train_step(model, optimizer, params, batches[i]["ids"], MAX_GRAD_NORM, precision, **extra[i])
        times.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    eval_loss(model, batches[0]["ids"], precision, **extra[0])
    eval_s = time.perf_counter() - t0
    step_s = float(np.mean(times[warmup:]))
    n = float(np.mean([b["real_tokens"] for b in batches[warmup:]]))
    return {"config": cfg.name, "precision": precision, "rank": cfg.rank, "targets": list(cfg.targets), "batch": cfg.batch,
            "length": cfg.length, "gradient_checkpointing": cfg.checkpointing, "steps": steps, "step_s": round(step_s, 3),
            "train_tokens_per_s": round(n / step_s, 1), "eval_tokens_per_s": round(batches[0]["real_tokens"] / eval_s, 1),
            **({"data": cfg.data, "padded_tokens_per_step": [int(b["ids"].numel()) for b in batches],
                "real_tokens_per_step": [b["real_tokens"] for b in batches]} if cfg.data else {}),
            # clear_refs lowers ru_maxrss too: the process peak is the larger of the two marks
            "last_loss": round(loss, 4), "peak_rss_mib": round(max(load_peak, peak_rss_mib()), 1),
            "load_peak_rss_mib": round(load_peak, 1), "run_peak_rss_mib": round(vm_hwm_mib(), 1) if hwm else None}


def load_only(path: Path, precision: str) -> dict:
    """Peak RSS of loading the GGUF into transformers and wrapping it with PEFT, nothing else: what a
    model too large to train here costs before its first step."""
    from peft import LoraConfig, get_peft_model

    t0 = time.perf_counter()
    model = get_peft_model(load_hf(path, precision), LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0,
                           target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], task_type="CAUSAL_LM"))
    n = sum(p.numel() for p in model.parameters())
    return {"precision": precision, "load_only": True, "parameters": n, "load_s": round(time.perf_counter() - t0, 1),
            "peak_rss_mib": round(peak_rss_mib(), 1)}


def quality(path: Path, steps: int, threads: int | None) -> dict:
    """quality_ours.py's run, on PEFT, from ggml-lora's initial adapter and tokens."""
    import torch
    from peft import PeftModel

    from ggml_lora import BaseModel
    from ggml_lora.peft import export_peft
    from quality_ours import LEARNING_RATE as Q_LR, MAX_GRAD_NORM as Q_CLIP, QUALITY, initial_adapter, quality_tokens

    with tempfile.TemporaryDirectory() as tmp:
        with BaseModel.load(path, n_threads=threads, n_ctx=QUALITY.length) as gm:
            train, valid = quality_tokens(gm, steps)
            with initial_adapter(gm) as adapter:
                export_peft(adapter, tmp)
        model = PeftModel.from_pretrained(load_hf(path), tmp, is_trainable=True)
    train, valid = torch.from_numpy(train).long(), torch.from_numpy(valid).long()
    params, optimizer = adamw(model, Q_LR)
    model.train()
    before = eval_loss(model, valid)
    losses = [train_step(model, optimizer, params, train[i], Q_CLIP) for i in range(steps)]
    after = eval_loss(model, valid)
    return {"impl": "peft", "quality": QUALITY.name, "steps": steps, "learning_rate": Q_LR,
            "valid_loss_before": round(before, 5), "valid_loss_after": round(after, 5),
            "train_loss_first": round(losses[0], 5), "train_loss_last": round(losses[-1], 5),
            "train_losses": [round(x, 4) for x in losses]}


def header(path: Path, threads: int | None) -> dict:
    import peft
    import torch
    import transformers

    return {"model": path.name, "device": "cpu", "threads": threads, "machine": platform.machine(),
            "python": sys.version.split()[0], "torch": torch.__version__, "transformers": transformers.__version__,
            "peft": peft.__version__, "impl": "peft",
            # the instruction sets PyTorch's kernels use: ATen's dispatch, and any limit set on MKL and oneDNN
            # (ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2 ONEDNN_MAX_CPU_ISA=AVX2: an AVX2-only CPU's)
            "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
            **{k.lower(): os.environ[k] for k in ("MKL_ENABLE_INSTRUCTIONS", "ONEDNN_MAX_CPU_ISA") if k in os.environ}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path)
    ap.add_argument("--threads", type=int)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--config", "--configs", dest="config", action="extend", nargs="+", choices=sorted(CONFIGS))
    ap.add_argument("--precision", choices=PRECISIONS, default="fp32",
                    help="bf16: weights in bfloat16 and the forward under CPU autocast (adapter float32)")
    ap.add_argument("--load-only", action="store_true",
                    help="only load the model and wrap it with PEFT (r16 q,k,v,o); print the peak RSS")
    ap.add_argument("--quality", action="store_true", help="the validation-loss check instead of throughput")
    ap.add_argument("--quality-steps", type=int, default=30)
    ap.add_argument("--rows", type=Path, help="chat rows written by bench_train.py --write-rows (facts configuration)")
    ap.add_argument("--in-process", action="store_true", help=argparse.SUPPRESS)   # one configuration, here
    args = ap.parse_args()
    path = resolve_model(args.model)
    if args.load_only:
        print(json.dumps(header(path, args.threads) | load_only(path, args.precision)), flush=True)
        return
    if args.quality or args.in_process:
        import torch

        if args.threads:
            torch.set_num_threads(args.threads)
        if args.quality:
            print(json.dumps(quality(path, args.quality_steps, args.threads)), flush=True)
        else:
            for name in args.config:
                print(json.dumps(header(path, args.threads) | run(path, CONFIGS[name], args.steps, args.warmup,
                                                                  args.precision, args.rows)),
                      flush=True)
        return
    for name in args.config or sorted(CONFIGS):
        cmd = [sys.executable, __file__, "--in-process", "--config", name, "--model", str(path),
               "--steps", str(args.steps), "--warmup", str(args.warmup), "--precision", args.precision]
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        if args.rows:
            cmd += ["--rows", str(args.rows)]
        subprocess.run(cmd, check=True)


if __name__ == "__main__":
    main()
