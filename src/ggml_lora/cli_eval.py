"""ggml-lora eval and generate: a data set's loss with and without adapters (our forward, llama.cpp's
arithmetic), and text from llama-cpp-python with adapters applied."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .cli_config import RUN_KEYS, model_path
from .config import LoRAConfig, TrainingConfig
from .errors import InvalidArgumentError


def _data_file(data: str, split: str) -> str:
    p = Path(data)
    if p.is_dir():
        f = p / f"{split}.jsonl"
        if not f.is_file():
            raise InvalidArgumentError(f"{p}: no {split}.jsonl (choose another --split)")
        return str(f)
    return data


def _eval(args: argparse.Namespace) -> int:
    from .adapter import Adapter
    from .data import load_dataset
    from .model import BaseModel
    from .chat import resolve_chat_template
    from .trainer import LoRATrainer

    path = model_path(args.model)
    config = TrainingConfig(max_seq_length=args.max_seq_length, batch_size=args.batch_size,
                            chat_template=args.chat_template, n_threads=args.n_threads, progress=False)
    with BaseModel.load(path, n_threads=args.n_threads, n_ctx=args.max_seq_length) as model:
        model.set_amx_bf16(args.amx_bf16)
        template = resolve_chat_template(config.chat_template)
        samples, _ = load_dataset(_data_file(args.data, args.split), model, max_seq_length=args.max_seq_length,
                                       chat_template=template)
        results = []
        adapters = [(None, None)] if not args.adapter or args.base else []
        adapters += [(a, Adapter.load(model, a)) for a in args.adapter or []]
        for path, adapter in adapters:
            trainer = LoRATrainer(model, LoRAConfig(), config, adapter=adapter)   # base model: an unused adapter
            r = trainer.evaluate(samples, adapter=adapter is not None, f16_weights=args.f16_weights)
            trainer.adapter.close()
            results.append({"adapter": path, "loss": r["val_loss"], "perplexity": r["val_ppl"],
                            "tokens": r["val_tokens"]})
    for r in results:
        print(json.dumps(r) if args.json else
              f"{r['adapter'] or 'base model':40s} loss {r['loss']:.4f}  perplexity {r['perplexity']:.3f}  "
              f"({r['tokens']} tokens)")
    return 0


# ---- generate ---------------------------------------------------------------------------------------

def parse_adapter_arg(text: str) -> tuple[str, float]:
    """PATH or PATH:SCALE."""
    path, sep, scale = text.rpartition(":")
    if sep and path and not Path(text).exists():
        try:
            return path, float(scale)
        except ValueError:
            pass
    return text, 1.0


def _generate(args: argparse.Namespace) -> int:
    from llama_cpp import Llama

    from .llama_cpp_python import apply_adapters, check_adapters

    path = model_path(args.model)
    adapters = [parse_adapter_arg(a) for a in args.adapter or []]
    check_adapters(path, [p for p, _ in adapters])
    llm = Llama(model_path=str(path), n_ctx=args.n_ctx, n_threads=args.n_threads, seed=args.seed,
                verbose=False)
    try:
        apply_adapters(llm, adapters)
        kw = dict(max_tokens=args.max_tokens, temperature=args.temperature, seed=args.seed)
        for prompt in args.prompt:
            if args.chat:
                messages = ([{"role": "system", "content": args.system}] if args.system else [])
                messages.append({"role": "user", "content": prompt})
                text = llm.create_chat_completion(messages=messages, **kw)["choices"][0]["message"]["content"]
            else:
                llm.reset()
                text = llm.create_completion(prompt, **kw)["choices"][0]["text"]
            if args.json:
                print(json.dumps({"prompt": prompt, "completion": text}), flush=True)
            elif len(args.prompt) > 1:
                print(f"{prompt}\n  -> {text.strip()}", flush=True)
            else:
                print(text, flush=True)
    finally:
        llm.close()
    return 0


def add_verbs(sub) -> None:
    p = sub.add_parser("eval", help="validation loss and perplexity, with and without adapters")
    p.add_argument("--model", help=RUN_KEYS["model"])
    p.add_argument("--data", required=True, help="a .txt/.jsonl file or a data folder (see --split)")
    p.add_argument("--split", default="valid", help="which file of a data folder: train, valid or test")
    p.add_argument("--adapter", action="append", help="a GGUF LoRA adapter (repeat to compare several)")
    p.add_argument("--base", action="store_true", help="also evaluate the base model when adapters are given")
    p.add_argument("--max-seq-length", type=int, default=TrainingConfig.max_seq_length)
    p.add_argument("--batch-size", type=int, default=TrainingConfig.batch_size)
    p.add_argument("--chat-template", default=None)
    p.add_argument("--n-threads", type=int, default=None)
    p.add_argument("--f16-weights", action="store_true",
                   help="evaluate through F16 copies of the quantized weights: faster on CPU, +2 bytes per "
                        "weight, the loss close to but no longer exactly llama.cpp's")
    p.add_argument("--amx-bf16", "--bf16", dest="amx_bf16", action="store_true",
                   help="with --f16-weights: the stored blocks multiplied on AMX tiles in bfloat16 (CPUs with AMX-BF16 only)")
    p.add_argument("--json", action="store_true", help="print JSON lines")
    p.set_defaults(func=_eval)

    p = sub.add_parser("generate", help="generate with llama-cpp-python and one or more adapters")
    p.add_argument("--model", help=RUN_KEYS["model"])
    p.add_argument("--adapter", action="append", metavar="PATH[:SCALE]", help="a GGUF LoRA adapter (repeatable)")
    p.add_argument("--prompt", action="append", required=True, help="a prompt (repeatable)")
    p.add_argument("--chat", action="store_true", help="send the prompt as a user message through the chat template")
    p.add_argument("--system", default=None, help="system message (with --chat)")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-ctx", type=int, default=2048)
    p.add_argument("--n-threads", type=int, default=None)
    p.add_argument("--json", action="store_true", help="print JSON lines")
    p.set_defaults(func=_generate)


__all__ = ["add_verbs", "parse_adapter_arg"]
