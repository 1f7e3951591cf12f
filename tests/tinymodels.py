"""Tiny random GGUF base models that llama.cpp loads, for tests.

`write_tiny_model` writes a small, randomly initialised `llama`, `qwen2` or
`qwen3` model with a real tokenizer vocabulary copied from llama.cpp's
`models/ggml-vocab-*.gguf` files, so `llama_cpp.Llama(...).tokenize()` works.

Weight types: f32, f16, bf16 and the legacy block quants q8_0, q4_0, q4_1,
q5_0, q5_1 are written directly (gguf-py can quantize those). K-quants are not
quantizable in gguf-py, so write an f32 model and run `quantize_with_llama_cpp`
on it; for real K-quant blocks every matrix row length (n_embd, n_head*head_dim,
n_ff) must then be a multiple of 256, otherwise llama.cpp silently falls back
to other types (we raise instead).

Shapes: numpy arrays are (n_out, n_in); gguf-py reverses them, so the GGUF/ggml
`ne` is [n_in, n_out], which is what llama.cpp's `create_tensor` expects.
"""

from __future__ import annotations

import ctypes
import functools
import math
import pathlib
import struct
from typing import Any

import gguf
import numpy as np

VOCAB_DIR: pathlib.Path = (pathlib.Path(__file__).resolve().parent.parent / "vendor" / "llama.cpp" / "models")

ARCHS: tuple[str, ...] = ("llama", "qwen2", "qwen3", "gemma2", "gemma3", "phi3")
GEMMA = ("gemma2", "gemma3")
WEIGHT_TYPES: tuple[str, ...] = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1")

# Per-arch defaults that mirror the real model families.
_ARCH_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": {"vocab": "llama-spm", "rope_base": 10000.0, "eps": 1e-5},
    "qwen2": {"vocab": "qwen2", "rope_base": 1e6, "eps": 1e-6},
    "qwen3": {"vocab": "qwen2", "rope_base": 1e6, "eps": 1e-6},
    # gemma's tokenizer is SentencePiece too; the llama-spm vocabulary keeps the tiny models small
    "gemma2": {"vocab": "llama-spm", "rope_base": 10000.0, "eps": 1e-6},
    "gemma3": {"vocab": "llama-spm", "rope_base": 1e6, "eps": 1e-6},
    "phi3": {"vocab": "phi-3", "rope_base": 10000.0, "eps": 1e-5},
}

_QTYPE = gguf.GGMLQuantizationType
_FTYPE = gguf.LlamaFileType
# weight_type -> (ggml tensor type, general.file_type)
_WEIGHT_TYPES: dict[str, tuple[gguf.GGMLQuantizationType, gguf.LlamaFileType]] = {
    "f32": (_QTYPE.F32, _FTYPE.ALL_F32),
    "f16": (_QTYPE.F16, _FTYPE.MOSTLY_F16),
    "bf16": (_QTYPE.BF16, _FTYPE.MOSTLY_BF16),
    "q8_0": (_QTYPE.Q8_0, _FTYPE.MOSTLY_Q8_0),
    "q4_0": (_QTYPE.Q4_0, _FTYPE.MOSTLY_Q4_0),
    "q4_1": (_QTYPE.Q4_1, _FTYPE.MOSTLY_Q4_1),
    "q5_0": (_QTYPE.Q5_0, _FTYPE.MOSTLY_Q5_0),
    "q5_1": (_QTYPE.Q5_1, _FTYPE.MOSTLY_Q5_1),
}

# Target std of the final logits. The output projection has N(0, s^2) rows (s = 1
# untied, EMBD_STD tied) and its input is RMS-normed, so logits ~ N(0, g^2 s^2 n_embd)
# for output_norm weights g; g is chosen to give ~LOGIT_STD for any n_embd
# (with g = 1 the std would grow like sqrt(n_embd): 8 at n_embd=64).
LOGIT_STD = 2.5
# Token embeddings are N(0, EMBD_STD^2). With EMBD_STD < 1 each layer's O(1)
# output dominates the residual stream, so logits depend on context and a tied
# model does not degenerate into "predict the current token" (e . e >> e . x).
EMBD_STD = 0.5


_VT = gguf.GGUFValueType
# struct formats of the fixed-size GGUF value types (little endian).
_SCALAR_FMT: dict[gguf.GGUFValueType, str] = {
    _VT.UINT8: "B", _VT.INT8: "b", _VT.UINT16: "H", _VT.INT16: "h", _VT.UINT32: "I", _VT.INT32: "i",
    _VT.FLOAT32: "f", _VT.BOOL: "?", _VT.UINT64: "Q", _VT.INT64: "q", _VT.FLOAT64: "d",
}


_GGUFKV = tuple[str, Any, gguf.GGUFValueType, gguf.GGUFValueType | None]  # key, value, type, array item type


def _read_gguf_meta(path: pathlib.Path) -> tuple[list[_GGUFKV], list[tuple[str, list[int], int]]]:
    """All KVs as (key, value, type, array sub-type) and tensor infos as (name, ne, ggml type).

    Parses the GGUF header directly: gguf.GGUFReader builds numpy views for every
    array item and takes ~10 s on the 151k-token qwen2 vocab; this takes ~0.1 s.
    String values are kept as bytes, which GGUFWriter writes back unchanged.
    """
    buf = path.read_bytes()
    magic, _version, n_tensors, n_kv = struct.unpack_from("<4sIQQ", buf, 0)
    if magic != b"GGUF":
        raise ValueError(f"{path}: not a GGUF file")
    off = 24

    def take(fmt: str) -> tuple[Any, ...]:
        nonlocal off
        vals = struct.unpack_from("<" + fmt, buf, off)
        off += struct.calcsize("<" + fmt)
        return vals

    def read_str() -> bytes:
        nonlocal off
        (n,) = take("Q")
        off += n
        return buf[off - n : off]

    kvs: list[_GGUFKV] = []
    for _ in range(n_kv):
        key = read_str().decode()
        vtype, sub = _VT(take("I")[0]), None
        value: Any
        if vtype == _VT.ARRAY:
            sub_i, n = take("IQ")
            sub = _VT(sub_i)
            if sub == _VT.STRING:
                value = [read_str() for _ in range(n)]
            else:  # fixed-size items: one vectorised read
                dt = np.dtype("<" + _SCALAR_FMT[sub])
                value = np.frombuffer(buf, dtype=dt, count=n, offset=off).tolist()
                off += n * dt.itemsize
        elif vtype == _VT.STRING:
            value = read_str()
        else:
            (value,) = take(_SCALAR_FMT[vtype])
        kvs.append((key, value, vtype, sub))
    tensors = []
    for _ in range(n_tensors):
        name = read_str().decode()
        (n_dims,) = take("I")
        ne = list(take("Q" * n_dims))
        ggml_type, _offset = take("IQ")
        tensors.append((name, ne, ggml_type))
    return kvs, tensors


@functools.lru_cache(maxsize=None)
def _vocab_fields(name: str) -> tuple[_GGUFKV, ...]:
    """Every `tokenizer.*` KV of ggml-vocab-<name>.gguf, with its exact GGUF type."""
    path = VOCAB_DIR / f"ggml-vocab-{name}.gguf"
    if not path.is_file():
        raise FileNotFoundError(f"vocab file not found: {path}")
    return tuple(kv for kv in _read_gguf_meta(path)[0] if kv[0].startswith("tokenizer."))


def vocab_size(name: str) -> int:
    """Number of tokens in ggml-vocab-<name>.gguf (= n_vocab of a model using it)."""
    for key, value, _, _ in _vocab_fields(name):
        if key == "tokenizer.ggml.tokens":
            return len(value)
    raise KeyError(f"{name}: no tokenizer.ggml.tokens")


def _check_dims(weight_type: str, dims: dict[str, int], block: int) -> None:
    for what, n in dims.items():
        if n % block:
            raise ValueError(f"{weight_type}: {what}={n} must be a multiple of the block size {block}")


def write_tiny_model(
    path: str | pathlib.Path,
    arch: str = "llama",
    weight_type: str = "f32",
    *,
    n_layers: int = 2,
    n_embd: int = 64,
    n_head: int = 4,
    n_head_kv: int = 2,
    head_dim: int | None = None,
    n_ff: int = 128,
    vocab: str | None = None,
    tied: bool = True,
    rope_freqs: bool = False,
    n_ctx_train: int = 512,
    seed: int = 0,
    dequantized: bool = False,
    n_swa: int | None = None,
    attn_softcap: float | None = None,
    final_softcap: float | None = None,
    rope_scale: float | None = None,
    n_rot: int | None = None,
    longrope: bool = False,
) -> pathlib.Path:
    """Write a random `arch` model to `path` and return it as a Path.

    Matrices (and token_embd / output) are stored as `weight_type`; norm weights,
    biases and rope_freqs stay F32. `vocab` names a models/ggml-vocab-<vocab>.gguf
    (default: llama-spm for llama, qwen2 for qwen2/qwen3). `head_dim` defaults to
    n_embd // n_head; llama and qwen3 accept any even value, qwen2 does not
    (llama.cpp sizes its Q and O projections as n_embd x n_embd).
    `rope_freqs=True` (llama only) adds a Llama-3 style `rope_freqs.weight`.
    `dequantized=True` writes the same model with every matrix quantized to `weight_type` and
    dequantized again, stored as F16 (token_embd as F32): the values that ggml-lora's F16 working
    copies and embedding lookups of the quantized model hold.

    gemma2/gemma3: sandwich norms, GEGLU, `n_swa` (attention.sliding_window; default 8 so that the
    window bites in short tests: gemma2's period 2 makes layer 1 global, gemma3's period 6 layer 5),
    `attn_softcap` (gemma2 only), `final_softcap` (gemma2 always: default 30; gemma3 only when given),
    `rope_scale` (gemma3: a linear rope.scaling.factor of the global layers; their base is 1e6, the
    sliding-window layers' 10000). gemma3 carries per-head q/k norms.
    phi3: fused attn_qkv and ffn_up = [gate; up], untied output by default is up to `tied`, and
    `n_rot` (rope.dimension_count) below head_dim for partial rotary; n_head * head_dim must be n_embd;
    `longrope` adds Phi-3.5-style rope_factors_long/short tensors (ne = [n_rot/2]).
    """
    if arch not in _ARCH_DEFAULTS:
        raise ValueError(f"unsupported arch {arch!r}; expected one of {ARCHS}")
    if weight_type not in _WEIGHT_TYPES:
        raise ValueError(f"unsupported weight_type {weight_type!r}; expected one of {WEIGHT_TYPES}")
    if rope_freqs and arch != "llama":
        raise ValueError("rope_freqs is only supported for arch='llama'")
    if head_dim is None:
        if n_embd % n_head:
            raise ValueError(f"n_embd={n_embd} is not divisible by n_head={n_head}; pass head_dim")
        head_dim = n_embd // n_head
    if arch in ("qwen2", "phi3") and head_dim * n_head != n_embd:
        raise ValueError(f"{arch} requires head_dim * n_head == n_embd")
    n_rot = head_dim if n_rot is None else n_rot
    if n_rot != head_dim and arch != "phi3":
        raise ValueError("n_rot < head_dim (partial rotary) is only written for phi3")
    if head_dim % 2:
        raise ValueError(f"head_dim={head_dim} must be even (RoPE rotates pairs)")
    if n_head % n_head_kv:
        raise ValueError(f"n_head={n_head} must be a multiple of n_head_kv={n_head_kv}")

    qtype, ftype = _WEIGHT_TYPES[weight_type]
    block, _ = gguf.GGML_QUANT_SIZES[qtype]
    # Quantization blocks run along ne[0] (= n_in) of every stored matrix.
    _check_dims(weight_type, {"n_embd": n_embd, "n_head*head_dim": n_head * head_dim, "n_ff": n_ff}, block)

    defaults = _ARCH_DEFAULTS[arch]
    vocab = vocab or defaults["vocab"]
    n_vocab = vocab_size(vocab)
    n_q = n_head * head_dim  # rows of Wq / columns of Wo
    n_kv = n_head_kv * head_dim  # rows of Wk, Wv

    rng = np.random.default_rng(seed)
    path = pathlib.Path(path)
    w = gguf.GGUFWriter(path, arch=arch)  # also writes general.architecture

    # --- metadata -------------------------------------------------------------
    w.add_name(f"tiny-{arch}-{weight_type}")
    w.add_file_type(int(ftype))
    if qtype not in (_QTYPE.F32, _QTYPE.F16, _QTYPE.BF16):
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_context_length(n_ctx_train)
    w.add_embedding_length(n_embd)
    w.add_block_count(n_layers)
    w.add_feed_forward_length(n_ff)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_head_kv)
    w.add_layer_norm_rms_eps(defaults["eps"])
    w.add_rope_freq_base(defaults["rope_base"])
    w.add_rope_dimension_count(n_rot)  # full rotary but phi3: llama/qwen3 assert n_rot == head_dim
    if arch in GEMMA:
        w.add_sliding_window(8 if n_swa is None else n_swa)
        if arch == "gemma2":
            w.add_attn_logit_softcapping(50.0 if attn_softcap is None else attn_softcap)
            w.add_final_logit_softcapping(30.0 if final_softcap is None else final_softcap)
        else:
            w.add_key_value(f"{arch}.rope.freq_base_swa", 10000.0, gguf.GGUFValueType.FLOAT32)
            if final_softcap is not None:
                w.add_final_logit_softcapping(final_softcap)
    if rope_scale is not None:
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(rope_scale)
    if head_dim * n_head != n_embd:
        # llama.cpp defaults head_dim to n_embd / n_head; override it explicitly.
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    w.add_vocab_size(n_vocab)  # optional (llama.cpp falls back to the token list length)
    for key, value, vtype, sub in _vocab_fields(vocab):
        w.add_key_value(key, value, vtype, sub)

    # --- tensors ---------------------------------------------------------------
    def f32(name: str, data: np.ndarray) -> None:
        w.add_tensor(name, np.ascontiguousarray(data, dtype=np.float32))

    def mat(name: str, data: np.ndarray) -> None:
        """Store a (n_out, n_in) matrix in weight_type (ggml ne = [n_in, n_out])."""
        data = np.ascontiguousarray(data, dtype=np.float32)
        if dequantized:
            data = gguf.quants.dequantize(gguf.quants.quantize(data, qtype), qtype).astype(np.float32)
            w.add_tensor(name, data if name == "token_embd.weight" else data.astype(np.float16))
        elif qtype == _QTYPE.F32:
            w.add_tensor(name, data)
        elif qtype == _QTYPE.F16:
            w.add_tensor(name, data.astype(np.float16))
        else:  # bf16 and block quants: uint8 bytes of shape (n_out, bytes_per_row)
            w.add_tensor(name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)

    def linear(n_out: int, n_in: int) -> np.ndarray:
        # N(0, 1/n_in): keeps activations O(1) through each projection.
        return rng.standard_normal((n_out, n_in), dtype=np.float32) / np.float32(math.sqrt(n_in))

    def norm(n: int, scale: float = 1.0) -> np.ndarray:
        # ~1 + small noise, so the norm weights are not a trivial all-ones vector.
        return scale * (1.0 + 0.1 * rng.standard_normal(n, dtype=np.float32))

    def small(n: int) -> np.ndarray:
        return 0.1 * rng.standard_normal(n, dtype=np.float32)

    mat("token_embd.weight", EMBD_STD * rng.standard_normal((n_vocab, n_embd), dtype=np.float32))
    if tied:
        # llama.cpp reuses token_embd (rows ~ N(0, EMBD_STD^2)) as the output projection.
        f32("output_norm.weight", norm(n_embd, LOGIT_STD / (EMBD_STD * math.sqrt(n_embd))))
    else:
        f32("output_norm.weight", norm(n_embd, LOGIT_STD / math.sqrt(n_embd)))
        mat("output.weight", rng.standard_normal((n_vocab, n_embd), dtype=np.float32))
    if longrope:
        if arch != "phi3":
            raise ValueError("longrope is only written for phi3")
        f32("rope_factors_long.weight", np.linspace(1.0, 4.0, n_rot // 2))
        f32("rope_factors_short.weight", np.ones(n_rot // 2))
    if rope_freqs:
        # One global tensor (no block index): llama.cpp loads it for layer 0 and
        # marks it TENSOR_DUPLICATED for the others. ne = [head_dim/2]; rope divides
        # theta_i by factor[i], Llama-3 uses 1 for high and 8 for low frequencies.
        f32("rope_freqs.weight", np.linspace(1.0, 8.0, head_dim // 2))

    for i in range(n_layers):
        p = f"blk.{i}."
        f32(p + "attn_norm.weight", norm(n_embd))
        if arch == "phi3":    # one matrix, rows [q; k; v] (src/models/phi3.cpp:46)
            mat(p + "attn_qkv.weight", linear(n_q + 2 * n_kv, n_embd))
        else:
            mat(p + "attn_q.weight", linear(n_q, n_embd))
            mat(p + "attn_k.weight", linear(n_kv, n_embd))
            mat(p + "attn_v.weight", linear(n_kv, n_embd))
        if arch == "qwen2":
            f32(p + "attn_q.bias", small(n_q))
            f32(p + "attn_k.bias", small(n_kv))
            f32(p + "attn_v.bias", small(n_kv))
        if arch in ("qwen3", "gemma3"):
            # Per-head RMS norms applied to Q and K before RoPE, ne = [head_dim].
            f32(p + "attn_q_norm.weight", norm(head_dim))
            f32(p + "attn_k_norm.weight", norm(head_dim))
        mat(p + "attn_output.weight", linear(n_embd, n_q))
        if arch in GEMMA:     # the sandwich: outputs normed before their residual adds
            f32(p + "post_attention_norm.weight", norm(n_embd))
        f32(p + "ffn_norm.weight", norm(n_embd))
        if arch == "phi3":    # rows [gate; up]
            mat(p + "ffn_up.weight", linear(2 * n_ff, n_embd))
        else:
            mat(p + "ffn_gate.weight", linear(n_ff, n_embd))
            mat(p + "ffn_up.weight", linear(n_ff, n_embd))
        mat(p + "ffn_down.weight", linear(n_embd, n_ff))
        if arch in GEMMA:
            f32(p + "post_ffw_norm.weight", norm(n_embd))

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def quantize_with_llama_cpp(src: str | pathlib.Path, dst: str | pathlib.Path, ftype_name: str) -> pathlib.Path:
    """Quantize `src` (an F32/F16 GGUF) to `dst` with llama.cpp, e.g. ftype_name="Q4_K_M".

    `ftype_name` is the suffix of a `LLAMA_FTYPE_MOSTLY_*` constant (Q4_K_M, Q6_K,
    Q2_K, Q8_0, ...). For K-quants every matrix row length must be a multiple
    of 256 (QK_K); llama.cpp would otherwise silently fall back to other types,
    so that case raises ValueError here.
    """
    import llama_cpp  # imported lazily: only this helper needs the native library

    src, dst = pathlib.Path(src), pathlib.Path(dst)
    name = ftype_name.upper()
    ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{name}", None)
    if ftype is None:
        raise ValueError(f"unknown llama.cpp ftype {ftype_name!r}")
    if "_K" in name:
        for tname, ne, _ in _read_gguf_meta(src)[1]:
            if len(ne) == 2 and ne[0] % 256:  # ne[0] = row length = quantization axis
                raise ValueError(f"{name}: {tname} has row length {ne[0]}, not a multiple of 256")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = 2
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize({src} -> {dst}, {name}) failed with {rc}")
    return dst


def split_model(src: str | pathlib.Path, dst: str | pathlib.Path, max_tensors: int) -> list[pathlib.Path]:
    """Write the model `src` again as llama.cpp's multi-part format, by gguf-py's own split writer (what
    `convert_hf_to_gguf.py --split-max-tensors` uses): at most `max_tensors` tensors a part, named
    `<dst stem>-0000i-of-0000N.gguf` beside `dst`, every metadata key in the first. Returns the parts in order."""
    src, dst = pathlib.Path(src), pathlib.Path(dst)
    kvs, _ = _read_gguf_meta(src)
    arch = next(v for k, v, _, _ in kvs if k == "general.architecture").decode()
    w = gguf.GGUFWriter(dst, arch=arch, split_max_tensors=max_tensors)
    for key, value, vtype, sub in kvs:
        if key != "general.architecture":          # the writer has written it
            w.add_key_value(key, value, vtype, sub)
    for t in gguf.GGUFReader(src).tensors:         # each tensor's stored bytes, unchanged
        w.add_tensor(t.name, t.data, raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    n = len(w.tensors)
    return [dst.with_name(f"{dst.stem}-{i:05d}-of-{n:05d}.gguf") for i in range(1, n + 1)]
