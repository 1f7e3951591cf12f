"""Reading and checking a GGUF base model's metadata in Python, before ggml sees the file.

ggml asserts (and kills the process) on some malformed inputs, so everything the native loader relies
on is checked here first, with errors that name the file, the key or the tensor.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

from .arch import ARCHITECTURES, FFN_GEGLU, ArchSpec, HParams, supported_list
from .errors import GGUFFormatError, UnsupportedArchitectureError, UnsupportedError
from .gguf_header import TYPE_NAMES, Header
from .gguf_split import read_model_header


@dataclass(frozen=True)
class TensorMeta:
    name: str
    shape: tuple[int, ...]   # ggml order: ne[0] first
    type_name: str
    n_bytes: int


def open_reader(path: str | os.PathLike[str]) -> Header:
    """The checked header of a GGUF model, every part's tensors for a split one; FileNotFoundError (a
    MissingPartError for a part) or GGUFFormatError otherwise."""
    return read_model_header(path)


def field(reader: Header, key: str, kind: type, default: Any = None, *, path: str = "") -> Any:
    """The value of metadata ``key`` checked to be ``kind`` (int, float, str); ``default`` if absent."""
    f = reader.fields.get(key)
    if f is None:
        if default is None:
            raise GGUFFormatError(f"{path}: metadata key '{key}' is missing")
        return default
    value = f.value
    if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if kind is int and isinstance(value, int) and not isinstance(value, bool):
        return int(value)
    if kind is str and isinstance(value, str):
        return value
    raise GGUFFormatError(f"{path}: metadata key '{key}' is {TYPE_NAMES.get(f.type, f.type)} {value!r}, "
                          f"expected {kind.__name__}")


def tensor_metas(reader: Header) -> dict[str, TensorMeta]:
    return {t.name: TensorMeta(t.name, t.shape, t.type_name, t.n_bytes) for t in reader.tensors.values()}


def read_hparams(reader, path: str) -> tuple[HParams, dict[str, TensorMeta]]:
    arch = field(reader, "general.architecture", str, path=path)
    spec = ARCHITECTURES.get(arch)
    if spec is None:
        raise UnsupportedArchitectureError(
            f"{path}: architecture '{arch}' is not supported; supported: {supported_list()}")
    tensors = tensor_metas(reader)

    def key(name: str, kind: type, default: Any = None) -> Any:
        return field(reader, f"{arch}.{name}", kind, default, path=path)

    n_embd = key("embedding_length", int)
    n_head = key("attention.head_count", int)
    n_head_kv = key("attention.head_count_kv", int, n_head)
    if n_head <= 0 or n_head_kv <= 0 or n_head % n_head_kv:
        raise GGUFFormatError(f"{path}: head counts n_head={n_head}, n_head_kv={n_head_kv} are inconsistent")
    head_dim = key("attention.key_length", int, n_embd // n_head)
    if key("attention.value_length", int, head_dim) != head_dim:
        raise UnsupportedError(f"{path}: key_length != value_length is not supported")
    n_rot = key("rope.dimension_count", int, head_dim)
    scaling = key("rope.scaling.type", str, "none")
    freq_scale = 1.0
    if scaling == "linear":
        factor = key("rope.scaling.factor", float, 1.0)
        if not (math.isfinite(factor) and factor > 0):
            raise GGUFFormatError(f"{path}: {arch}.rope.scaling.factor={factor} must be positive and finite")
        freq_scale = 1.0 / factor
    elif scaling not in ("none", ""):
        raise UnsupportedError(f"{path}: rope scaling '{scaling}' is not supported (only none and linear)")

    embd = tensors.get("token_embd.weight")
    if embd is None or len(embd.shape) != 2 or embd.shape[0] != n_embd:
        got = "missing" if embd is None else f"shape {list(embd.shape)}"
        raise GGUFFormatError(f"{path}: tensor 'token_embd.weight' is {got}, expected [{n_embd}, n_vocab]")
    hp = HParams(
        arch=arch,
        n_layers=key("block_count", int),
        n_embd=n_embd,
        n_head=n_head,
        n_head_kv=n_head_kv,
        head_dim=head_dim,
        n_rot=n_rot,
        n_ff=key("feed_forward_length", int),
        n_vocab=embd.shape[1],
        n_ctx_train=key("context_length", int),
        rms_eps=key("attention.layer_norm_rms_epsilon", float),
        rope_freq_base=key("rope.freq_base", float, spec.rope_freq_base),
        rope_freq_scale=freq_scale,
        rope_type=spec.rope_type,
        **_arch_hparams(spec, reader, tensors, key, path, n_layers=key("block_count", int), freq_scale=freq_scale),
    )
    # the native side takes these as int32/float: out-of-range values are format errors, not overflows
    for key_name, value in (("block_count", hp.n_layers), ("embedding_length", hp.n_embd),
                            ("attention.head_count", hp.n_head), ("attention.head_count_kv", hp.n_head_kv),
                            ("attention.key_length", hp.head_dim), ("rope.dimension_count", hp.n_rot),
                            ("feed_forward_length", hp.n_ff), ("context_length", hp.n_ctx_train)):
        if not 0 < value < 2**31:
            raise GGUFFormatError(f"{path}: {arch}.{key_name}={value} is out of range")
    for key_name, value in (("attention.layer_norm_rms_epsilon", hp.rms_eps), ("rope.freq_base", hp.rope_freq_base),
                            ("rope.scaling.factor", 1.0 / hp.rope_freq_scale if hp.rope_freq_scale else 0.0)):
        if not (math.isfinite(value) and 0.0 < value < 3.0e38):
            raise GGUFFormatError(f"{path}: {arch}.{key_name}={value} must be positive and finite")
    if hp.n_layers <= 0 or hp.n_rot <= 0 or hp.n_rot > hp.head_dim or hp.n_rot % 2:
        raise GGUFFormatError(f"{path}: block_count={hp.n_layers}, rope.dimension_count={hp.n_rot} "
                              f"(head_dim {hp.head_dim}) are not valid")
    # every block has 9+ tensors: a block_count beyond the tensor count is corrupt, and must be refused
    # before anything is sized by it (a fuzzed block_count of 8M made the name table below take 24 GB)
    if hp.n_layers > len(tensors):
        raise GGUFFormatError(f"{path}: {arch}.block_count={hp.n_layers} but the file holds only "
                              f"{len(tensors)} tensors")
    check_tensors(hp, tensors, path, qk_norm=spec.qk_norm)
    return hp, tensors


def _arch_hparams(spec: ArchSpec, reader, tensors: dict[str, TensorMeta], key, path: str,
                  n_layers: int, freq_scale: float) -> dict[str, Any]:
    """Softcaps, sliding window and its rope, as llama.cpp's loaders of gemma2/gemma3/phi3 read them;
    what we cannot compute (LongRoPE) is refused here, by name."""
    arch = spec.name
    out: dict[str, Any] = {}
    if spec.attn_softcap:
        out["attn_softcap"] = key("attn_logit_softcapping", float, spec.attn_softcap)
    if spec.ffn_act == FFN_GEGLU:    # gemma2: default 30; gemma3: 0 unless the key is there
        out["final_softcap"] = key("final_logit_softcapping", float, spec.final_softcap or -1.0)
        out["final_softcap"] = max(out["final_softcap"], 0.0)
    for name in ("attn_softcap", "final_softcap"):
        if not (math.isfinite(out.get(name, 0.0)) and 0.0 <= out.get(name, 0.0) < 3.0e38):
            raise GGUFFormatError(f"{path}: {arch} {name}={out[name]} must be finite and >= 0")
    if spec.fused:
        # phi3: llama.cpp turns the window off whatever the file says (src/models/phi3.cpp:13-24)
        longrope = sorted(n for n in tensors if n.startswith(("rope_factors_long", "rope_factors_short"))
                          or ".rope_factors_" in n)
        attn_factor = key("rope.scaling.attn_factor", float, 1.0)
        if longrope or attn_factor != 1.0:
            raise UnsupportedError(
                f"{path}: LongRoPE (per-dimension rope factors {longrope[:2]}, rope.scaling.attn_factor="
                f"{attn_factor}; Phi-3 128k, Phi-3.5, Phi-4-mini) is not supported yet; the 4k-context "
                "Phi-3 models, which have none, are")
        if "output.bias" in tensors:
            raise UnsupportedError(f"{path}: an output.bias (phi2-style LM head) is not supported for phi3")
    if not spec.swa_period:
        return out
    n_swa = key("attention.sliding_window", int, spec.swa_window or -1)
    if n_swa <= 0:          # gemma3 without a window: every layer global (src/models/gemma3.cpp:4-12)
        return out
    pattern = reader.fields.get(f"{arch}.attention.sliding_window_pattern")
    if pattern is not None and isinstance(pattern.value, list):       # per-layer flags (llama-model.cpp:3434-3441)
        flags = tuple(bool(v) for v in pattern.value)
        if len(flags) < n_layers:
            raise GGUFFormatError(f"{path}: {arch}.attention.sliding_window_pattern has {len(flags)} entries for "
                                  f"{n_layers} layers")
        flags = flags[:n_layers]
    else:
        period = key("attention.sliding_window_pattern", int, spec.swa_period)
        if period < 0:
            raise GGUFFormatError(f"{path}: {arch}.attention.sliding_window_pattern={period} must be >= 0")
        # llama_hparams::set_swa_pattern (src/llama-hparams.cpp:8-16): the last layer of each period is global
        flags = tuple(period == 0 or il % period < period - 1 for il in range(n_layers))
    out.update(n_swa=n_swa, swa_layers=flags)
    if n_swa >= 2**31:
        raise GGUFFormatError(f"{path}: {arch}.attention.sliding_window={n_swa} is out of range")
    # gemma2 gives its local layers the global base and scale unless the file has a local base; gemma3
    # gives them base 10000 (or the file's) and scale 1 (gemma2.cpp:8-11, gemma3.cpp:9, llama-hparams.h:151-153)
    default_base = key("rope.freq_base", float, spec.rope_freq_base) if arch == "gemma2" else 10000.0
    out["rope_freq_base_swa"] = key("rope.freq_base_swa", float, default_base)
    out["rope_freq_scale_swa"] = freq_scale if arch == "gemma2" else 1.0
    if not (math.isfinite(out["rope_freq_base_swa"]) and 0.0 < out["rope_freq_base_swa"] < 3.0e38):
        raise GGUFFormatError(f"{path}: {arch}.rope.freq_base_swa={out['rope_freq_base_swa']} must be positive")
    return out


def check_tensors(hp: HParams, tensors: dict[str, TensorMeta], path: str, *, qk_norm: bool) -> None:
    """Every tensor the forward pass needs exists with the shape the hyperparameters imply."""
    n_q, n_kv = hp.n_head * hp.head_dim, hp.n_head_kv * hp.head_dim
    spec = ARCHITECTURES[hp.arch]
    want: dict[str, tuple[int, ...]] = {"output_norm.weight": (hp.n_embd,)}
    optional: dict[str, tuple[int, ...]] = {"output.weight": (hp.n_embd, hp.n_vocab),
                                            "rope_freqs.weight": (hp.n_rot // 2,)}
    for i in range(hp.n_layers):
        b = f"blk.{i}."
        want |= {
            b + "attn_norm.weight": (hp.n_embd,),
            b + "attn_output.weight": (n_q, hp.n_embd),
            b + "ffn_norm.weight": (hp.n_embd,),
            b + "ffn_down.weight": (hp.n_ff, hp.n_embd),
        }
        if spec.fused:
            want |= {b + "attn_qkv.weight": (hp.n_embd, n_q + 2 * n_kv),
                     b + "ffn_up.weight": (hp.n_embd, 2 * hp.n_ff)}
        else:
            want |= {b + "attn_q.weight": (hp.n_embd, n_q), b + "attn_k.weight": (hp.n_embd, n_kv),
                     b + "attn_v.weight": (hp.n_embd, n_kv), b + "ffn_gate.weight": (hp.n_embd, hp.n_ff),
                     b + "ffn_up.weight": (hp.n_embd, hp.n_ff)}
        if spec.post_norms:
            want |= {b + "post_attention_norm.weight": (hp.n_embd,), b + "post_ffw_norm.weight": (hp.n_embd,)}
        norms = {b + "attn_q_norm.weight": (hp.head_dim,), b + "attn_k_norm.weight": (hp.head_dim,)}
        if qk_norm:
            want |= norms
        else:
            optional |= norms
        optional |= {b + "attn_q.bias": (n_q,), b + "attn_k.bias": (n_kv,), b + "attn_v.bias": (n_kv,),
                     b + "attn_output.bias": (hp.n_embd,)}
    for name, shape in want.items():
        if name not in tensors:
            raise GGUFFormatError(f"{path}: tensor '{name}' is missing")
    for name, shape in (want | optional).items():
        t = tensors.get(name)
        if t is not None and t.shape != shape:
            raise GGUFFormatError(f"{path}: tensor '{name}' has shape {list(t.shape)}, expected {list(shape)}")
    for name, t in tensors.items():
        if name.endswith(("_norm.weight", ".bias", "rope_freqs.weight")) and t.type_name != "F32":
            raise GGUFFormatError(f"{path}: tensor '{name}' is {t.type_name}; norms and biases must be F32")
