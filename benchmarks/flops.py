"""Floating-point work per trained token of bench_train.py's configurations, from a GGUF's shape, and what it
bounds: the tokens/s ratio of two configurations if every product ran at the same rate.

    python benchmarks/flops.py [--model PATH] [--config NAME ...] [--ratio LONG SHORT]

Counts the products only (2 flops per multiply-add), as ggml-lora's training graphs run them:
- a block's linear products (q, k, v, o, gate, up, down) once forward and once backward (dx = Wᵀ·dy: the
  frozen weights get no gradient; LoRA's rank-r products are left out, under 3% at r16);
- the LM head on every loss row (every position but the last of a row), forward and backward;
- attention, two products forward (q·kᵀ, p·v) and four backward (dq, dk, dv, dp), every query against the
  keys its chunk multiplies: the whole square up to 256 tokens (one mask), beyond that the keys up to the
  last query of its 256-query chunk (GLORA_ATTN_CHUNK, glora_graph.cpp);
- gradient checkpointing adds one more forward of every block (not of the head).
Softmax, norms, rope and the rest are left out: they are the overhead that a ratio of measured tokens/s
shows on top of this one.

stdout: one JSON object per configuration, then one for --ratio (default r8-qv-1x2048-gc against
r8-qv-4x512): the tokens/s ratio at equal rate for every product, and with attention free.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from bench_train import CONFIGS, default_model

from ggml_lora.gguf_header import read_header

CHUNK = 256   # GLORA_ATTN_CHUNK


def shape(path: Path) -> dict[str, int]:
    h = read_header(path)
    arch = h.get("general.architecture")
    get = lambda key, default=None: int(h.get(f"{arch}.{key}", default))   # noqa: E731
    n_embd, n_head = get("embedding_length"), get("attention.head_count")
    head_dim = get("attention.key_length", n_embd // n_head)
    vocab = h.tensors["token_embd.weight"].shape[1]
    return {"n_layer": get("block_count"), "n_embd": n_embd, "n_head": n_head,
            "n_head_kv": get("attention.head_count_kv", n_head), "head_dim": head_dim,
            "n_ff": get("feed_forward_length"), "n_vocab": int(vocab)}


def mean_keys(T: int) -> float:
    """Keys per query that the chunked attention multiplies, averaged over a row of T tokens."""
    if T <= CHUNK:
        return float(T)
    ends = [min(T, r0 + CHUNK) for r0 in range(0, T, CHUNK)]
    return sum(e * (e - r0) for r0, e in zip(range(0, T, CHUNK), ends)) / T


def per_token(s: dict[str, int], T: int, checkpointing: bool) -> dict[str, float]:
    """MFLOP per token of a training step on rows of T tokens."""
    d, hd = s["n_embd"], s["head_dim"]
    linear = 2 * s["n_layer"] * (d * s["n_head"] * hd * 2 + d * s["n_head_kv"] * hd * 2 + 3 * d * s["n_ff"])
    head = 2 * d * s["n_vocab"] * (T - 1) / T
    attn = 2 * s["n_layer"] * 2 * s["n_head"] * hd * mean_keys(T)
    parts = {"linear": 2 * linear, "head": 2 * head, "attention": 3 * attn}
    if checkpointing:
        parts = {"linear": parts["linear"] + linear, "head": parts["head"], "attention": parts["attention"] + attn}
    return {k: v / 1e6 for k, v in parts.items()} | {"total": sum(parts.values()) / 1e6}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path)
    ap.add_argument("--config", nargs="+", choices=sorted(CONFIGS))
    ap.add_argument("--ratio", nargs=2, metavar=("LONG", "SHORT"), choices=sorted(CONFIGS),
                    default=["r8-qv-1x2048-gc", "r8-qv-4x512"])
    args = ap.parse_args()
    path = args.model or default_model()
    s = shape(path)
    cost = {}
    for name in args.config or [c for c in CONFIGS if not CONFIGS[c].data]:
        cfg = CONFIGS[name]
        cost[name] = per_token(s, cfg.length, cfg.checkpointing)
        print(json.dumps({"config": name, "model": path.name, **s, "mean_keys": round(mean_keys(cfg.length), 1),
                          "mflop_per_token": {k: round(v, 1) for k, v in cost[name].items()}}))
    long, short = (cost.get(n) or per_token(s, CONFIGS[n].length, CONFIGS[n].checkpointing) for n in args.ratio)
    print(json.dumps({"ratio": f"{args.ratio[0]} / {args.ratio[1]}",
                      "equal_rate": round(short["total"] / long["total"], 3),
                      "attention_free": round((short["total"] - short["attention"]) / (long["total"] - long["attention"]), 3)}))


if __name__ == "__main__":
    main()
