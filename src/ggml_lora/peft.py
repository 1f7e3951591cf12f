"""PEFT interop: export an adapter as a Hugging Face PEFT LoRA folder, and import one.

Files: ``adapter_config.json`` and ``adapter_model.safetensors`` (the ``safetensors`` package, extra
``[peft]``). Module names are Hugging Face's (``base_model.model.model.layers.N.self_attn.q_proj``);
``lora_A.weight`` is (r, n_in) and ``lora_B.weight`` (n_out, r), as in the GGUF adapter.

Two conversions happen on the way:
- llama's HF -> GGUF conversion permutes the rows of q_proj and k_proj (so that llama.cpp's NORM rope
  works on them); a LoRA's output rows live in B, so B's rows of q/k are permuted on import and
  un-permuted on export (llama architecture only: qwen2/qwen3 keep HF's order).
- llama.cpp has one alpha per file and scales each pair by alpha / rank. PEFT's per-module scale
  (``rank_pattern``/``alpha_pattern``, rsLoRA's alpha/sqrt(r)) is folded into B on import.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import numpy as np

from .adapter import Adapter
from .adapter_file import atomic_path
from .arch import ARCHITECTURES, LM_HEAD, TARGET_MODULES, hf_module
from .config import pattern_value
from .errors import InvalidArgumentError, UnsupportedError
from .model import BaseModel

_META_KEY = "ggml_lora"          # safetensors metadata: our GGUF metadata and target order, as JSON


def gguf_weight(module: str, arch: str = "llama") -> str:
    """The inverse of hf_module; KeyError for modules llama.cpp cannot carry. Gemma 3's multimodal
    checkpoints name the text model model.language_model.layers.N (stripped as llama.cpp's converter
    does, conversion/base.py:596-597)."""
    if module == LM_HEAD:
        return "output.weight"
    module = module.replace("model.language_model.", "model.", 1)
    parts = module.split(".")
    if len(parts) != 5 or parts[:2] != ["model", "layers"] or parts[3] not in ("self_attn", "mlp"):
        raise KeyError(module)
    modules = ARCHITECTURES[arch].modules if arch in ARCHITECTURES else TARGET_MODULES
    if parts[4] not in modules:
        raise KeyError(module)
    return f"blk.{int(parts[2])}.{modules[parts[4]]}.weight"


def _rope_rows(model: BaseModel, gguf_name: str) -> int | None:
    """Heads whose rows llama's converter permuted for this weight, or None."""
    if model.arch != "llama":
        return None
    if gguf_name.endswith("attn_q.weight"):
        return model.hparams.n_head
    if gguf_name.endswith("attn_k.weight"):
        return model.hparams.n_head_kv
    return None


def to_gguf_rows(b: np.ndarray, n_head: int) -> np.ndarray:
    """HF row order -> GGUF row order for q/k (llama's converter permutation), on the rows of B."""
    n_out = b.shape[0]
    return b.reshape(n_head, 2, n_out // n_head // 2, *b.shape[1:]).swapaxes(1, 2).reshape(b.shape)


def to_hf_rows(b: np.ndarray, n_head: int) -> np.ndarray:
    n_out = b.shape[0]
    return b.reshape(n_head, n_out // n_head // 2, 2, *b.shape[1:]).swapaxes(1, 2).reshape(b.shape)


def export_peft(adapter: Adapter, directory: str | os.PathLike[str]) -> Path:
    """Write ``adapter`` as a PEFT LoRA folder (adapter_config.json + adapter_model.safetensors)."""
    from safetensors.numpy import save_file

    model = adapter.model
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors, ranks, alphas, modules = {}, {}, {}, set()
    for name in adapter.targets:
        a, b = adapter.get(name)
        heads = _rope_rows(model, name)
        if heads is not None:
            b = to_hf_rows(b, heads)
        module = hf_module(name, model.arch)
        tensors[f"base_model.model.{module}.lora_A.weight"] = np.ascontiguousarray(a)
        tensors[f"base_model.model.{module}.lora_B.weight"] = np.ascontiguousarray(b)
        ranks[module] = adapter.ranks[name]
        if name in adapter.pair_scales:       # PEFT's scale is lora_alpha / r per module
            alphas[module] = adapter.pair_scales[name] * adapter.ranks[name]
        modules.add(module.split(".")[-1])
    r = max(set(ranks.values()), key=list(ranks.values()).count)
    # module stems cover every block's module of that kind; a subset of blocks (layers=, AdaLoRA
    # pruning a module away) needs the exact names, which PEFT takes as one regex it full-matches
    stems = model.hparams.spec.modules
    every = {hf_module(f"blk.{i}.{stems[m]}.weight", model.arch) for i in range(model.n_layers)
             for m in modules if m != LM_HEAD} | ({LM_HEAD} & modules)
    targets = sorted(modules) if every == set(ranks) else "|".join(re.escape(m) for m in sorted(ranks))
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": adapter.alpha,
        "target_modules": targets, "lora_dropout": 0.0, "bias": "none", "use_rslora": False,
        "use_dora": False, "fan_in_fan_out": False, "modules_to_save": None, "init_lora_weights": True,
        # llama.cpp scales every pair by alpha / its rank: one alpha, ranks per module; a pair with a
        # scale of its own (trained with rank/alpha patterns) gets its alpha in alpha_pattern
        "rank_pattern": {m: k for m, k in ranks.items() if k != r}, "alpha_pattern": alphas,
        "base_model_name_or_path": model.name,
    }
    meta = {_META_KEY: json.dumps({"targets": adapter.targets, "metadata": adapter.metadata})}
    with atomic_path(directory / "adapter_model.safetensors") as tmp:
        save_file(tensors, str(tmp), metadata=meta)
    with atomic_path(directory / "adapter_config.json") as tmp:
        tmp.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return directory


def import_peft(directory: str | os.PathLike[str], model: BaseModel) -> Adapter:
    """Turn a PEFT LoRA folder into an adapter for ``model`` (see the module docstring)."""
    from safetensors import safe_open

    directory = Path(directory)
    cfg_path, st_path = directory / "adapter_config.json", directory / "adapter_model.safetensors"
    for p in (cfg_path, st_path):
        if not p.exists():
            raise FileNotFoundError(2, "PEFT adapter file missing", str(p))
    cfg = json.loads(cfg_path.read_text())
    if cfg.get("peft_type", "LORA") != "LORA":
        raise UnsupportedError(f"{cfg_path}: peft_type {cfg.get('peft_type')!r}; only LORA maps to a llama.cpp adapter")
    refusals = {
        "use_dora": "DoRA rescales W by a learned magnitude, which llama.cpp's LoRA cannot express",
        "modules_to_save": "modules_to_save replaces whole weights, which a LoRA adapter cannot carry",
        "fan_in_fan_out": "fan_in_fan_out (GPT-2 Conv1D layout) is not a llama-family layout",
    }
    for key, why in refusals.items():
        if cfg.get(key):
            raise UnsupportedError(f"{cfg_path}: {key}={cfg[key]!r} is not supported: {why}")
    if cfg.get("bias", "none") != "none":
        raise UnsupportedError(f"{cfg_path}: bias={cfg['bias']!r}: LoRA bias terms have no llama.cpp equivalent")
    r0, alpha0 = int(cfg["r"]), float(cfg["lora_alpha"])
    rslora = bool(cfg.get("use_rslora", False))

    def scale(r: int, alpha: float) -> float:
        return alpha / (math.sqrt(r) if rslora else r)

    file_alpha = scale(r0, alpha0) * r0
    pairs: dict[str, dict[str, np.ndarray]] = {}
    with safe_open(str(st_path), framework="numpy") as f:
        meta = json.loads((f.metadata() or {}).get(_META_KEY, "{}"))
        for key in f.keys():
            stem = key.removeprefix("base_model.model.")
            for half in ("lora_A", "lora_B"):
                suffix = f".{half}.weight"
                if stem.endswith(suffix):
                    module = stem[: -len(suffix)]
                    break
            else:
                raise UnsupportedError(f"{st_path}: tensor '{key}' is not a LoRA A/B weight (embedding LoRA, "
                                       "magnitude vectors and biases are not supported)")
            try:
                name = gguf_weight(module, model.arch)
            except (KeyError, ValueError):
                raise UnsupportedError(f"{st_path}: module '{module}' has no llama.cpp LoRA target") from None
            if name not in model.tensors:
                raise InvalidArgumentError(f"{st_path}: '{module}' maps to '{name}', which {model.path} does not have")
            pairs.setdefault(name, {})[half] = f.get_tensor(key).astype(np.float32)
    tensors = {}
    order = [t for t in meta.get("targets", []) if t in pairs] + sorted(set(pairs) - set(meta.get("targets", [])))
    for name in order:
        halves = pairs[name]
        if set(halves) != {"lora_A", "lora_B"}:
            raise InvalidArgumentError(f"{st_path}: '{hf_module(name, model.arch)}' lacks one of lora_A/lora_B")
        a, b = halves["lora_A"], halves["lora_B"]
        module = hf_module(name, model.arch)
        r = pattern_value(cfg.get("rank_pattern"), module, r0)
        alpha = pattern_value(cfg.get("alpha_pattern"), module, alpha0)
        if a.shape[0] != r or b.shape[1] != r:
            raise InvalidArgumentError(f"{st_path}: '{module}' has rank {a.shape[0]}, config says {r}")
        fold = scale(r, alpha) * r / file_alpha         # llama.cpp will apply file_alpha / r
        if abs(fold - 1.0) > 1e-12:
            b = (b.astype(np.float64) * fold).astype(np.float32)
        heads = _rope_rows(model, name)
        if heads is not None:
            b = to_gguf_rows(b, heads)
        tensors[name] = (a, b)
    if not tensors:
        raise InvalidArgumentError(f"{st_path}: no LoRA tensors")
    adapter = Adapter.from_tensors(model, tensors, file_alpha)
    adapter.metadata = dict(meta.get("metadata", {}))
    return adapter
