"""ggml-lora train: a LoRA adapter by SFT, AdaLoRA, DPO/ORPO/KTO or GRPO (--method), from flags and a
config file (cli_config.py)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .cli_config import RUN_KEYS, add_config_flags, model_path, resolve_configs
from .errors import InvalidArgumentError


def load_reward(spec: str):
    """A reward function from ``module:function`` or ``path/to/file.py:function``."""
    import importlib

    where, sep, name = str(spec).rpartition(":")
    if not sep or not where or not name:
        raise InvalidArgumentError(f"--reward {spec!r}: expected module:function or path/to/file.py:function")
    try:
        if where.endswith(".py") or Path(where).is_file():
            path = Path(where)
            if not path.is_file():
                raise InvalidArgumentError(f"--reward {spec!r}: no file {path}")
            module_spec = importlib.util.spec_from_file_location(path.stem, path)
            module = importlib.util.module_from_spec(module_spec)
            module_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(where)
    except InvalidArgumentError:
        raise
    except Exception as e:
        raise InvalidArgumentError(f"--reward {spec!r}: cannot import {where}: {type(e).__name__}: {e}") from e
    func = getattr(module, name, None)
    if not callable(func):
        raise InvalidArgumentError(f"--reward {spec!r}: {where} has no function {name!r}")
    return func


def _train(args: argparse.Namespace) -> int:
    from .model import BaseModel
    from .trainer import LoRATrainer

    lora, training, run = resolve_configs(args)
    if not run["data"]:
        raise InvalidArgumentError("no training data: pass --data PATH (or data: in the config file)")
    path = model_path(run["model"])
    with BaseModel.load(path, device=training.device, n_threads=training.n_threads,
                        n_ctx=max(training.max_seq_length, 1)) as model:
        if run["grpo"] is not None:
            from .grpo import GRPOTrainer

            trainer = GRPOTrainer(model, [load_reward(r) for r in run["reward"]], lora, training, run["grpo"])
        elif run["preference"] is None:
            trainer = LoRATrainer(model, lora, training)
        else:
            from .preference import PreferenceTrainer

            trainer = PreferenceTrainer(model, lora, training, run["preference"])
        main = trainer.is_main_process       # under mpiexec, rank 0 alone prints
        if main:
            print(f"model: {path} ({model.arch}, {model.n_layers} layers, device {model.device})"
                  + (f"; {trainer.comm.size} processes (MPI)" if trainer.comm.size > 1 else ""), file=sys.stderr)
        history = trainer.train(run["data"], valid=run["valid"], resume_from=args.resume)
        trainer.adapter.close()
    if not main:
        return 130 if history.interrupted == "SIGINT" else 143 if history.interrupted else 0
    out = Path(training.output_dir)
    evals = history.evals
    summary = {"steps": history.global_step, "total_steps": history.total_steps,
               "final_loss": history.losses[-1] if history.losses else None,
               "val_loss_first": evals[0].get("val_loss") if evals else None,
               "val_loss_last": evals[-1].get("val_loss") if evals else None,
               "skipped_steps": history.skipped_steps,
               "adapter": str(history.adapter_path) if history.adapter_path else None,
               "checkpoint": str(history.checkpoint_path) if history.checkpoint_path else None,
               "output_dir": str(out)}
    if run["grpo"] is not None:          # GRPO evaluates the held-out reward, not a loss
        summary.update(val_reward_first=evals[0]["val_reward"] if evals else None,
                       val_reward_last=evals[-1]["val_reward"] if evals else None)
    print(json.dumps(summary))
    if history.interrupted:
        print(f"ggml-lora: {history.interrupted}: checkpoint written to {history.checkpoint_path}; continue with "
              f"ggml-lora train ... --resume", file=sys.stderr)
        return 130 if history.interrupted == "SIGINT" else 143
    return 0


def add_verb(sub) -> None:
    p = sub.add_parser("train", help="train a LoRA adapter (writes OUTPUT_DIR/adapter.gguf)",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for key, text in RUN_KEYS.items():
        p.add_argument(f"--{key}", dest=key, default=argparse.SUPPRESS, help=text,
                       **({"action": "append"} if key == "reward" else {}))
    p.add_argument("-c", "--config", help="YAML or TOML file with the same keys as the flags")
    p.add_argument("--resume", nargs="?", const=True, default=None,
                   help="continue from the newest checkpoint in --output-dir, or from the checkpoint PATH given")
    add_config_flags(p)
    p.set_defaults(func=_train)


__all__ = ["add_verb", "load_reward"]
