"""The ggml-lora command line: train, eval, generate, info, merge, export-peft, import-peft.

The flags of ``train`` are derived from the fields of LoRAConfig and TrainingConfig (their help text
included); ``-c config.yaml`` / ``.toml`` takes the same keys. Precedence: command line > config file >
defaults. LoRAConfig.seed is ``--init-seed`` / ``init_seed`` (``--seed`` is the training seed).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from .errors import GGMLLoRAError


def adapter_info(path: str | Path) -> dict:
    """What a GGUF LoRA adapter holds, read from its header alone (no base model needed)."""
    from .adapter_file import KEY_PREFIX
    from .gguf_header import read_header

    h = read_header(path)
    if h.get("general.type") != "adapter" or h.get("adapter.type") != "lora":
        raise GGMLLoRAError(f"{path}: not a GGUF LoRA adapter (general.type={h.get('general.type')!r}, "
                            f"adapter.type={h.get('adapter.type')!r})")
    pairs: dict[str, dict] = {}
    for name, t in h.tensors.items():
        if name.endswith((".lora_a", ".lora_b")):
            pairs.setdefault(name[:-7], {})[name[-6:]] = t
    ranks = sorted({p["lora_b"].shape[0] for p in pairs.values() if "lora_b" in p})
    types = sorted({t.type_name for t in h.tensors.values()})
    params = sum(t.shape[0] * t.shape[1] for t in h.tensors.values() if len(t.shape) == 2)
    return {
        "path": str(path),
        "architecture": h.get("general.architecture"),
        "alpha": h.get("adapter.lora.alpha"),
        "rank": ranks[0] if len(ranks) == 1 else ranks,
        "pairs": len(pairs),
        "parameters": params,
        "tensor_types": types,
        "size_bytes": h.file_size,
        "targets": sorted(pairs),
        "metadata": {k[len(KEY_PREFIX):]: v.value for k, v in h.fields.items() if k.startswith(KEY_PREFIX)},
    }


def _info(args: argparse.Namespace) -> int:
    info = adapter_info(args.adapter)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    for key in ("path", "architecture", "alpha", "rank", "pairs", "parameters", "tensor_types", "size_bytes"):
        print(f"{key:13s} {info[key]}")
    print(f"{'targets':13s} {', '.join(info['targets'][:6])}{' ...' if len(info['targets']) > 6 else ''}")
    for key, value in info["metadata"].items():
        print(f"  ggml_lora.{key} = {value}")
    return 0


def _export_peft(args: argparse.Namespace) -> int:
    from .adapter import Adapter
    from .model import BaseModel
    from .peft import export_peft

    with BaseModel.load(args.model) as model, Adapter.load(model, args.adapter) as adapter:
        out = export_peft(adapter, args.out)
    print(f"wrote {out}/adapter_config.json and adapter_model.safetensors")
    return 0


def _import_peft(args: argparse.Namespace) -> int:
    from .model import BaseModel
    from .peft import import_peft

    with BaseModel.load(args.model) as model, import_peft(args.peft_dir, model) as adapter:
        out = adapter.save(args.out)
    print(f"wrote {out} ({len(adapter.targets)} pairs, alpha {adapter.alpha:g})")
    return 0


_HF_REF = "or a Hugging Face reference owner/repo[:QUANT] or owner/repo/file.gguf"


def _merge(args: argparse.Namespace) -> int:
    from .cli_eval import parse_adapter_arg
    from .hub import resolve
    from .merge import merge_adapters

    def progress(done: int, total: int) -> None:
        if done == total or done % max(1, total // 10) == 0:
            print(f"merged {done}/{total} tensors", flush=True)

    adapters = [parse_adapter_arg(a) for a in args.adapter]
    out = merge_adapters(resolve(args.model), adapters, args.out, type=args.type, n_threads=args.n_threads,
                         progress=progress)
    print(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB, {args.type})")
    return 0


def main(argv: list[str] | None = None) -> int:
    from . import cli_eval, cli_train

    ap = argparse.ArgumentParser(prog="ggml-lora", description="Train and inspect LoRA adapters for GGUF models.")
    sub = ap.add_subparsers(dest="verb", required=True)
    cli_train.add_verb(sub)
    cli_eval.add_verbs(sub)
    p = sub.add_parser("info", help="describe a GGUF LoRA adapter: metadata, tensors, rank, alpha, size")
    p.add_argument("adapter", type=Path)
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_info)
    p = sub.add_parser("export-peft", help="write a GGUF adapter as a PEFT folder (adapter_config.json + safetensors)")
    p.add_argument("adapter", type=Path)
    p.add_argument("--model", required=True, help=f"the base GGUF the adapter belongs to; {_HF_REF}")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.set_defaults(func=_export_peft)
    p = sub.add_parser("import-peft", help="turn a PEFT LoRA folder into a llama.cpp GGUF adapter")
    p.add_argument("peft_dir", type=Path)
    p.add_argument("--model", required=True, help=f"the base GGUF (converted from the PEFT base model); {_HF_REF}")
    p.add_argument("--out", type=Path, required=True, help="output .gguf")
    p.set_defaults(func=_import_peft)
    p = sub.add_parser("merge", help="merge GGUF LoRA adapters into the base model's weights, as a new GGUF")
    p.add_argument("--model", required=True, help=f"the base GGUF; {_HF_REF}")
    p.add_argument("--adapter", action="append", required=True, metavar="PATH[:SCALE]",
                   help="a GGUF LoRA adapter, with its scale (default 1); repeat for several")
    p.add_argument("--out", type=Path, required=True, help="output .gguf (written atomically)")
    p.add_argument("--type", default="same",
                   help="same (each tensor keeps its type; default), a ggml type for every matrix (f16, bf16, "
                        "q8_0, q4_0, q4_k, ...), or a llama.cpp mix (q4_k_m, q5_k_m, ...) made by its quantizer")
    p.add_argument("--n-threads", type=int, help="threads (default: the CPUs this process may use)")
    p.set_defaults(func=_merge)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("ggml_lora.ggml").setLevel(logging.WARNING)
    logging.getLogger("gguf").setLevel(logging.WARNING)
    try:
        return args.func(args)
    except (GGMLLoRAError, OSError) as e:
        print(f"ggml-lora: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("ggml-lora: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
