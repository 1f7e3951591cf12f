"""GGUF models of real shape with seeded random weights, for measuring memory and speed at scale.

    python benchmarks/synthetic.py --shape smollm2-1.7b --type q4_k_m --out build/smollm2-1.7b.q4_k_m.gguf

Each shape has the tensor shapes and metadata of a real model (llama or qwen2 architecture) and a real
tokenizer from llama.cpp's vocab files (padded with unused tokens to the real vocabulary size), so
llama-cpp-python loads it. Weights are random, scaled so activations stay O(1) through every block
(projections with std 1/sqrt(n_in) as uniform int8 quants under one scale, norms near 1): good for
memory and speed, meaningless for quality (SmolLM2 stays the quality reference). Q8_0 is written directly, a block of rows at a time; other types are
made from that Q8_0 file by llama.cpp's own quantizer (`llama_model_quantize`, requantizing), so no F16
or F32 copy of the whole model is ever held or written (an 8B model's intermediate is 8.5 GB of Q8_0).
Prints one JSON line: path, shape, type, bytes, parameters, seconds.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from tinymodels import _vocab_fields  # noqa: E402  (the vocab files' tokenizer fields, exact types)

Q8 = gguf.GGMLQuantizationType.Q8_0


@dataclass(frozen=True)
class Shape:
    arch: str
    n_layers: int
    n_embd: int
    n_head: int
    n_head_kv: int
    n_ff: int
    n_vocab: int
    tied: bool
    vocab: str            # ggml-vocab-<vocab>.gguf
    n_ctx: int
    rope_base: float
    eps: float
    rope_freqs: bool = False


SHAPES = {
    # HuggingFaceTB/SmolLM2-135M-Instruct, the shape of the real model the tests use
    "smollm2-135m": Shape("llama", 30, 576, 9, 3, 1536, 49152, True, "llama-spm", 8192, 100000.0, 1e-5),
    # HuggingFaceTB/SmolLM2-1.7B
    "smollm2-1.7b": Shape("llama", 24, 2048, 32, 32, 8192, 49152, True, "llama-spm", 8192, 130000.0, 1e-5),
    # Qwen/Qwen2.5-1.5B: q/k/v biases, GQA 12/2
    "qwen2.5-1.5b": Shape("qwen2", 28, 1536, 12, 2, 8960, 151936, True, "qwen2", 32768, 1e6, 1e-6),
    # meta-llama/Llama-3.1-8B: GQA 32/8, untied, rope_freqs (context capped at 8192 here)
    "llama-3.1-8b": Shape("llama", 32, 4096, 32, 8, 14336, 128256, False, "llama-bpe", 8192, 500000.0, 1e-5,
                          rope_freqs=True),
}


def tokenizer_fields(shape: Shape):
    """The vocab file's tokenizer KVs, the token list padded with unused tokens to shape.n_vocab."""
    fields = []
    for key, value, vtype, sub in _vocab_fields(shape.vocab):
        if key in ("tokenizer.ggml.tokens", "tokenizer.ggml.scores", "tokenizer.ggml.token_type"):
            n_pad = shape.n_vocab - len(value)
            if n_pad < 0:
                raise ValueError(f"{shape.vocab} has {len(value)} tokens, more than n_vocab={shape.n_vocab}")
            pad = {"tokenizer.ggml.tokens": [f"<unused_{i}>".encode() for i in range(n_pad)],
                   "tokenizer.ggml.scores": [0.0] * n_pad,
                   "tokenizer.ggml.token_type": [int(gguf.TokenType.UNUSED)] * n_pad}[key]
            value = list(value) + pad
        fields.append((key, value, vtype, sub))
    return fields


def tensors(shape: Shape):
    """(name, numpy shape (n_out, n_in) or (n,), kind) in file order; kind: matrix, norm, bias, freqs."""
    head_dim = shape.n_embd // shape.n_head
    n_kv = shape.n_head_kv * head_dim
    out = [("token_embd.weight", (shape.n_vocab, shape.n_embd), "embd"),
           ("output_norm.weight", (shape.n_embd,), "norm")]
    if not shape.tied:
        out.append(("output.weight", (shape.n_vocab, shape.n_embd), "matrix"))
    if shape.rope_freqs:
        out.append(("rope_freqs.weight", (head_dim // 2,), "freqs"))
    for i in range(shape.n_layers):
        p = f"blk.{i}."
        out += [(p + "attn_norm.weight", (shape.n_embd,), "norm"),
                (p + "attn_q.weight", (shape.n_embd, shape.n_embd), "matrix"),
                (p + "attn_k.weight", (n_kv, shape.n_embd), "matrix"),
                (p + "attn_v.weight", (n_kv, shape.n_embd), "matrix")]
        if shape.arch == "qwen2":
            out += [(p + "attn_q.bias", (shape.n_embd,), "bias"), (p + "attn_k.bias", (n_kv,), "bias"),
                    (p + "attn_v.bias", (n_kv,), "bias")]
        out += [(p + "attn_output.weight", (shape.n_embd, shape.n_embd), "matrix"),
                (p + "ffn_norm.weight", (shape.n_embd,), "norm"),
                (p + "ffn_gate.weight", (shape.n_ff, shape.n_embd), "matrix"),
                (p + "ffn_up.weight", (shape.n_ff, shape.n_embd), "matrix"),
                (p + "ffn_down.weight", (shape.n_embd, shape.n_ff), "matrix")]
    return out


def q8_nbytes(rows: int, cols: int) -> int:
    block, size = gguf.GGML_QUANT_SIZES[Q8]
    return rows * cols // block * size


def q8_0_blocks(rng: np.random.Generator, rows: int, cols: int, std: float) -> np.ndarray:
    """Random Q8_0 rows with standard deviation `std`, drawn as blocks: one F16 scale per 32 weights and
    uniform int8 quants (uniform on [-a, a] has std a/sqrt(3)). Drawing the quants directly costs one
    random byte a weight, ~20x faster than drawing floats and quantizing them (8B: minutes, not half an hour)."""
    block, size = gguf.GGML_QUANT_SIZES[Q8]
    out = np.empty((rows * cols // block, size), dtype=np.uint8)
    out[:, :2] = np.frombuffer(np.float16(std * math.sqrt(3.0) / 127.0).tobytes(), dtype=np.uint8)
    out[:, 2:] = rng.integers(-127, 128, size=(out.shape[0], block), dtype=np.int8).view(np.uint8)
    return out.reshape(rows, cols // block * size)


def tensor_data(rng: np.random.Generator, shape: Shape, name: str, dims, kind: str):
    """The tensor's stored bytes: matrices Q8_0 in blocks of rows (bounded memory), the rest F32."""
    if kind in ("matrix", "embd"):
        n_out, n_in = dims
        # projections std 1/sqrt(n_in); embeddings std 0.5; a tied head is scaled by output_norm instead
        std = 0.5 if kind == "embd" else 1.0 / math.sqrt(n_in)
        rows_per_block = max(1, (256 << 20) // n_in)
        return np.concatenate([q8_0_blocks(rng, min(rows_per_block, n_out - r0), n_in, std)
                               for r0 in range(0, n_out, rows_per_block)])
    n = dims[0]
    if kind == "norm":
        scale = 1.0
        if name == "output_norm.weight":      # logits ~ N(0, 2.5^2) whatever n_embd (tinymodels' rule)
            scale = 2.5 / ((0.5 if shape.tied else 1.0) * math.sqrt(shape.n_embd))
        return (scale * (1.0 + 0.1 * rng.standard_normal(n, dtype=np.float32))).astype(np.float32)
    if kind == "bias":
        return 0.1 * rng.standard_normal(n, dtype=np.float32)
    return np.linspace(1.0, 8.0, n, dtype=np.float32)            # rope_freqs, as Llama 3's low/high split


def write_q8_0(shape: Shape, name: str, path: Path, seed: int) -> int:
    w = gguf.GGUFWriter(str(path), arch=shape.arch)
    w.add_name(name)
    w.add_file_type(int(gguf.LlamaFileType.MOSTLY_Q8_0))
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_context_length(shape.n_ctx)
    w.add_embedding_length(shape.n_embd)
    w.add_block_count(shape.n_layers)
    w.add_feed_forward_length(shape.n_ff)
    w.add_head_count(shape.n_head)
    w.add_head_count_kv(shape.n_head_kv)
    w.add_layer_norm_rms_eps(shape.eps)
    w.add_rope_freq_base(shape.rope_base)
    w.add_rope_dimension_count(shape.n_embd // shape.n_head)
    w.add_vocab_size(shape.n_vocab)
    for key, value, vtype, sub in tokenizer_fields(shape):
        w.add_key_value(key, value, vtype, sub)
    layout = tensors(shape)
    n_params = 0
    for tname, dims, kind in layout:
        if kind in ("matrix", "embd"):
            w.add_tensor_info(tname, (dims[0], q8_nbytes(1, dims[1])), np.dtype(np.uint8), q8_nbytes(*dims), raw_dtype=Q8)
        else:
            w.add_tensor_info(tname, dims, np.dtype(np.float32), 4 * dims[0])
        n_params += math.prod(dims)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    rng = np.random.default_rng(seed)
    for tname, dims, kind in layout:
        w.write_tensor_data(tensor_data(rng, shape, tname, dims, kind))
    w.close()
    return n_params


def quantize(src: Path, dst: Path, type_name: str, threads: int) -> None:
    import llama_cpp

    ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{type_name.upper()}", None)
    if ftype is None:
        raise SystemExit(f"unknown llama.cpp type {type_name!r} (e.g. q4_k_m, q4_0, q6_k)")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = threads
    params.allow_requantize = True        # from our Q8_0: no F16 intermediate of the whole model
    from llama_cpp._utils import suppress_stdout_stderr      # the quantizer prints a line per tensor

    with suppress_stdout_stderr(disable=False):
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if rc != 0:
        raise SystemExit(f"llama_model_quantize({src} -> {dst}, {type_name}) failed with {rc}")


def make(shape_name: str, type_name: str, out: Path, seed: int = 0, threads: int = 2) -> dict:
    shape = SHAPES[shape_name]
    t0 = time.perf_counter()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    q8 = out if type_name.lower() == "q8_0" else out.with_name(out.name + ".q8_0.tmp")
    n_params = write_q8_0(shape, f"synthetic-{shape_name}", q8, seed)
    if q8 != out:
        try:
            quantize(q8, out, type_name, threads)
        finally:
            q8.unlink(missing_ok=True)
    return {"path": str(out), "shape": shape_name, "type": type_name.lower(), "bytes": out.stat().st_size,
            "parameters": n_params, "seconds": round(time.perf_counter() - t0, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), required=True)
    ap.add_argument("--type", default="q4_k_m", help="q8_0 (written directly) or any llama.cpp ftype (requantized)")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    print(json.dumps(make(args.shape, args.type, args.out, args.seed, args.threads)))


if __name__ == "__main__":
    main()
