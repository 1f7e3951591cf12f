"""BaseModel: a GGUF base model loaded on a ggml device, its weights kept in their stored types."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
import numpy as np

from . import gguf_file, gguf_split, hardware, hub, planning
from .forward import evaluate
from ._handles import Batch, NativeHandle
from ._native import check, ffi, lib
from .arch import LM_HEAD, HParams
from .errors import ContextLengthError, GGMLLoRAError, InvalidArgumentError

# Adapter in annotations: adapter.py imports this module, so the name is not imported here

# ggml's GGML_MAX_N_THREADS: more threads trip an assert in its CPU backend
MAX_THREADS = 512


class _MappedFile:
    """The GGUF whose mapping holds a model's weights. Rewriting that file in place (truncating it,
    copying another over it) would make the next read of a weight kill the process with SIGBUS; an
    open descriptor sees such a change (size or modification time) and every native call of the
    model's family checks it first. Replacing the file by a rename is safe: the mapping keeps the old one."""

    def __init__(self, path: Path):
        self.path = path
        self.fd = os.open(path, os.O_RDONLY)
        st = os.fstat(self.fd)
        self.stamp = (st.st_size, st.st_mtime_ns)

    def check(self) -> None:
        if self.fd is None:
            return
        st = os.fstat(self.fd)
        if (st.st_size, st.st_mtime_ns) != self.stamp:
            raise GGMLLoRAError(
                f"{self.path} was modified in place after the model was loaded from it (its weights are "
                f"mapped from that file; size {self.stamp[0]} -> {st.st_size} bytes); load the model again, "
                "and replace model files by renaming a new file over them")

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


@dataclass(frozen=True)
class Placement:
    """Where a run's graph work went (:meth:`BaseModel.placement`). Work is estimated per node: 2·M·N·K for a
    matrix product, one per output value for other ops."""

    device: str                 # the model's device
    device_work: float
    cpu_work: float             # placed on the CPU as the fallback for ops the device lacks
    device_nodes: int
    cpu_nodes: int
    cpu_ops: tuple[str, ...]    # "OP xN", most work first

    @property
    def device_share(self) -> float:
        """The share of the work that ran on the model's device (1.0 when nothing ran yet)."""
        total = self.device_work + self.cpu_work
        return self.device_work / total if total else 1.0

    def line(self) -> str:
        """One line for the train log."""
        where = f"{self.device_share:.1%} of the step's work on {self.device}"
        if not self.cpu_nodes:
            return where
        return f"{where}; on the CPU fallback: {', '.join(self.cpu_ops)}"


def _renamed(old: str, new: str) -> None:
    import warnings

    warnings.warn(f"{old} is deprecated: use {new}", DeprecationWarning, stacklevel=3)


class BaseModel(NativeHandle):
    """A frozen base model. Create with :meth:`load`."""

    def __init__(self, *_, **__):
        raise TypeError("use BaseModel.load(path)")

    @classmethod
    def load(cls, path: str | os.PathLike[str], device: str = "auto", n_threads: int | None = None,
             n_ctx: int | None = None, use_mmap: bool = True) -> BaseModel:
        """Load ``path`` onto ``device`` (a name from :func:`ggml_lora.devices` or ``"auto"``).

        ``path``: a GGUF file (of a split model, its first part ``...-00001-of-0000N.gguf``, the others
        beside it), or a Hugging Face reference ``owner/repo[:QUANT]`` / ``owner/repo/file.gguf`` fetched
        into huggingface_hub's cache (:func:`ggml_lora.hub.resolve`); a path that exists wins.

        ``n_ctx`` is the longest sequence this model will be asked to process (default: the
        model's training context). On the CPU the weights are the memory-mapped file itself
        (``use_mmap``, as llama.cpp's default): pages cost memory only once read, so an untied model's
        embedding table costs the rows of the tokens seen. Replace the file atomically (a rename, as
        every writer of ggml-lora does) rather than rewriting it in place while it is loaded.
        """
        path = hub.resolve(path)
        reader = gguf_file.open_reader(path)
        hp, tensors = gguf_file.read_hparams(reader, str(path))
        name = reader.get("general.name")
        if n_threads is not None and (isinstance(n_threads, bool) or not isinstance(n_threads, int)
                                      or not 0 < n_threads <= MAX_THREADS):
            raise InvalidArgumentError(f"n_threads={n_threads!r} must be an integer in [1, {MAX_THREADS}] or None "
                                       f"(ggml's GGML_MAX_N_THREADS; this machine has {os.cpu_count()} CPUs)")
        if n_ctx is not None and (isinstance(n_ctx, bool) or not isinstance(n_ctx, int) or n_ctx <= 0):
            raise InvalidArgumentError(f"n_ctx={n_ctx!r} must be a positive integer or None")

        params = ffi.new("glora_model_params *")
        device_c = ffi.new("char[]", device.encode())
        params.device = device_c
        if n_threads is None:       # under an MPI launch: the machine's cores shared among its ranks
            n_threads = hardware.default_threads()
        params.n_threads = n_threads or 0
        params.n_layer = hp.n_layers
        params.n_head = hp.n_head
        params.n_head_kv = hp.n_head_kv
        params.head_dim = hp.head_dim
        params.n_rot = hp.n_rot
        params.rope_type = hp.rope_type
        params.n_ctx_orig = hp.n_ctx_train
        params.rope_freq_base = hp.rope_freq_base
        params.rope_freq_scale = hp.rope_freq_scale
        params.rms_eps = hp.rms_eps
        params.kq_scale = hp.kq_scale
        params.use_mmap = 1 if use_mmap else 0
        spec = hp.spec
        params.embd_scale = hp.embd_scale
        params.ffn_act = spec.ffn_act
        params.scale_q = 1 if spec.scale_q else 0
        params.attn_softcap = hp.attn_softcap
        params.final_softcap = hp.final_softcap
        params.n_swa = hp.n_swa
        swa_layers = ffi.new("uint8_t[]", [1 if f else 0 for f in hp.swa_layers] or [0])  # alive for the call
        params.swa_layers = swa_layers if hp.n_swa > 0 else ffi.NULL
        params.rope_freq_base_swa = hp.rope_freq_base_swa
        params.rope_freq_scale_swa = hp.rope_freq_scale_swa
        out = ffi.new("glora_model **")
        check(lib.glora_model_load(str(path).encode(), params, out), f"loading {path}")

        self = object.__new__(cls)
        self._set_handle(out[0], lib.glora_model_free)
        self.path = path
        self.hparams: HParams = hp
        self.tensors = tensors
        self.n_ctx = n_ctx or hp.n_ctx_train
        self.n_threads = n_threads
        self._vocab = None
        self._name = name if isinstance(name, str) else None
        self._sha256 = None
        self._parts = tuple(reader.parts or (path,))       # the files of a split model, first part first
        self._source = None
        if use_mmap and planning.is_cpu(self.device):    # the weights are views of the mapped file(s)
            self._source = gguf_split.EachPart(_MappedFile(p) for p in self._parts)
        # self._lock (from _set_handle): one native call at a time for the model and everything made
        # from it, since graphs and the scheduler are per model; trainers or threads sharing the model
        # take turns, and close() waits for a call in progress
        return self

    def _check_source(self) -> None:
        if self._source is not None:
            self._source.check()

    def close(self) -> None:
        super().close()
        if getattr(self, "_source", None) is not None:
            self._source.close()
        if getattr(self, "_vocab", None) is not None:
            self._vocab.close()
            self._vocab = None

    # ---- properties -------------------------------------------------------------------------------

    arch = property(lambda self: self.hparams.arch)
    n_layers = property(lambda self: self.hparams.n_layers)
    n_embd = property(lambda self: self.hparams.n_embd)
    n_vocab = property(lambda self: self.hparams.n_vocab)
    n_ctx_train = property(lambda self: self.hparams.n_ctx_train)

    @property
    def device(self) -> str:
        with self._using() as ptr:
            return ffi.string(lib.glora_model_device(ptr)).decode()

    def placement(self, reset: bool = False) -> Placement:
        """Where the work of this model's graphs ran since the last reset: on its device, or on the CPU where
        ggml's scheduler placed an op the device lacks. ``reset`` starts a new tally after reading."""
        out = ffi.new("glora_placement *")
        with self._using() as ptr:
            check(lib.glora_model_placement(ptr, 1 if reset else 0, out), "reading the placement tally")
        ops = ffi.string(out.cpu_ops).decode()
        return Placement(device=self.device, device_work=out.device_work, cpu_work=out.cpu_work,
                         device_nodes=out.device_nodes, cpu_nodes=out.cpu_nodes,
                         cpu_ops=tuple(o for o in ops.split(", ") if o))

    @property
    def amx_bf16(self) -> bool:
        """Whether the products through the frozen weights run on AMX tiles in bfloat16 (set_amx_bf16)."""
        return getattr(self, "_amx_bf16", False)

    @property
    def bf16(self) -> bool:
        """Deprecated name of :attr:`amx_bf16` (until the next release)."""
        _renamed("BaseModel.bf16", "BaseModel.amx_bf16")
        return self.amx_bf16

    def set_bf16(self, on: bool) -> None:
        """Deprecated name of :meth:`set_amx_bf16` (until the next release)."""
        _renamed("BaseModel.set_bf16", "BaseModel.set_amx_bf16")
        self.set_amx_bf16(on)

    def set_amx_bf16(self, on: bool) -> None:
        """Run the products through the frozen weights on the CPU's AMX tiles in bfloat16 (activations
        rounded to bfloat16, sums in float32, as PyTorch's bf16 autocast): the forward of ``f16_weights``
        reads the stored blocks (no copies), the backward's transposed copies are BF16, the attention of
        those graphs runs there too; or F16 copies and ggml's kernels again. Forward passes through the
        stored weights (evaluation's default, llama.cpp's arithmetic) are not affected. Needs a CPU with AMX-BF16 (:func:`cpu_has_amx_bf16`);
        raises UnsupportedError elsewhere."""
        if not isinstance(on, bool):
            raise InvalidArgumentError(f"amx_bf16={on!r}: must be True or False")
        with self._using() as ptr:
            check(lib.glora_model_set_bf16(ptr, int(on)), "AMX bf16 products")
        self._amx_bf16 = on

    @property
    def tied_embeddings(self) -> bool:
        """True when the LM head reuses token_embd.weight (the GGUF has no output.weight)."""
        return "output.weight" not in self.tensors

    @property
    def target_modules(self) -> tuple[str, ...]:
        """The PEFT names of the modules that can carry LoRA in this model."""
        return tuple(self.hparams.spec.modules) + (() if self.tied_embeddings else (LM_HEAD,))

    def weight_shape(self, name: str) -> tuple[int, int]:
        """(n_in, n_out) of a 2-D weight: ggml ne = [n_in, n_out]."""
        t = self.tensors.get(name)
        if t is None or len(t.shape) != 2:
            raise InvalidArgumentError(f"{self.path}: no 2-D weight named '{name}'")
        return t.shape[0], t.shape[1]

    def read_tensor(self, name: str) -> bytes:
        """The stored bytes of a weight, as they sit on the device."""
        t = self.tensors.get(name)
        if t is None:
            raise InvalidArgumentError(f"{self.path}: no tensor named '{name}'")
        buf = bytearray(t.n_bytes)
        with self._using() as ptr:
            check(lib.glora_model_read_tensor(ptr, name.encode(), ffi.from_buffer(buf), len(buf)))
        return bytes(buf)

    @property
    def name(self) -> str:
        """general.name from the GGUF, or the file name."""
        return self._name or self.path.name

    @property
    def sha256(self) -> str:
        """sha256 of the base GGUF file (computed once), recorded in adapters for provenance; of a split
        model, of its parts' bytes in order (resume and MPI ranks compare it: every part counts)."""
        if self._sha256 is None:
            import hashlib

            digest = hashlib.sha256()
            for part in self._parts:
                with open(part, "rb") as f:
                    for block in iter(lambda: f.read(1 << 22), b""):
                        digest.update(block)
            self._sha256 = digest.hexdigest()
        return self._sha256

    # ---- tokenizer --------------------------------------------------------------------------------

    def _llama_vocab(self):
        if self._vocab is None:
            from .llama_cpp_python import load_vocab

            self._vocab = load_vocab(self.path)
        return self._vocab

    def tokenize(self, text: str, add_special: bool = True, parse_special: bool = False) -> list[int]:
        """Token ids from the GGUF's own tokenizer (llama.cpp's, through llama-cpp-python)."""
        return self._llama_vocab().tokenize(text.encode("utf-8"), add_bos=add_special, special=parse_special)

    def detokenize(self, ids: Sequence[int]) -> str:
        return self._llama_vocab().detokenize(list(ids)).decode("utf-8", errors="replace")

    # ---- forward ----------------------------------------------------------------------------------

    def as_tokens(self, tokens) -> tuple[np.ndarray, bool]:
        """(n_seq, n_tokens) int32 and whether the input was a single sequence; checks ids and length."""
        try:
            arr = np.asarray(tokens)
        except ValueError as e:
            raise InvalidArgumentError(f"tokens: sequences must have equal lengths ({e})") from None
        if arr.dtype == object:
            raise InvalidArgumentError("tokens: sequences must have equal lengths")
        single = arr.ndim == 1
        if single:
            arr = arr[None, :]
        if arr.ndim != 2 or arr.shape[1] == 0 or arr.shape[0] == 0:
            raise InvalidArgumentError(f"tokens: expected a non-empty sequence or list of sequences, got shape {arr.shape}")
        if not np.issubdtype(arr.dtype, np.integer):
            raise InvalidArgumentError(f"tokens: expected integer ids, got {arr.dtype}")
        bad = (arr < 0) | (arr >= self.n_vocab)
        if bad.any():
            s, t = map(int, np.argwhere(bad)[0])
            raise InvalidArgumentError(f"tokens: id {int(arr[s, t])} at sequence {s}, position {t} is outside "
                                       f"[0, n_vocab={self.n_vocab})")
        if arr.shape[1] > self.n_ctx:
            raise ContextLengthError(f"tokens: a sequence of {arr.shape[1]} tokens is longer than n_ctx={self.n_ctx} "
                                     "(pass n_ctx= to BaseModel.load for longer sequences)")
        return np.ascontiguousarray(arr, dtype=np.int32), single

    def _adapter_list(self, adapter, scale: float) -> list[tuple[Adapter, float]]:
        if adapter is None:
            return []
        pairs = [(adapter, scale)] if not isinstance(adapter, (list, tuple)) else list(adapter)
        for a, _ in pairs:
            if a.model is not self:
                raise InvalidArgumentError("the adapter was made for another BaseModel")
        return pairs

    def logits(self, tokens, adapter: Adapter | Sequence[tuple[Adapter, float]] | None = None,
               scale: float = 1.0) -> np.ndarray:
        """Float32 logits: [T, n_vocab] for one sequence, [B, T, n_vocab] for a list of equal-length ones.

        ``adapter`` is an :class:`Adapter` (applied with ``scale``) or a list of ``(adapter, scale)``.
        Attention is causal and positions start at 0, as in llama.cpp.
        """
        arr, single = self.as_tokens(tokens)
        pairs = self._adapter_list(adapter, scale)
        batch = Batch(arr)
        n = len(pairs)
        self._follow_llama_cpp()
        scales = ffi.new("float[]", [float(s) for _, s in pairs] or [0.0])
        out = np.empty((arr.shape[0], arr.shape[1], self.n_vocab), dtype=np.float32)
        with self._using() as ptr:
            handles = ffi.new("glora_adapter *[]", [a._handle() for a, _ in pairs] or [ffi.NULL])
            check(lib.glora_logits(ptr, handles, scales, n, batch.c, ffi.cast("float *", ffi.from_buffer(out))))
        return out[0] if single else out

    def _follow_llama_cpp(self) -> None:
        """Run the kernels llama-cpp-python in this process runs: with its default use_extra_bufts (off
        where ggml_lora.llama_cpp_python.protect_llama_cpp turned it off) it stores some quantized weights repacked
        for kernels of their own, whose sums round differently (up to 4 in a logit of Gemma 3 270M)."""
        from .llama_cpp_python import llama_uses_extra_buffers

        on = llama_uses_extra_buffers()
        if getattr(self, "_llama_weights", None) != on:
            with self._using() as ptr:
                check(lib.glora_model_set_llama_weights(ptr, int(on)))
            self._llama_weights = on

    def evaluate(self, tokens, adapter: Adapter | None = None, loss_mask=None, scale: float = 1.0,
                 f16_weights: bool = False) -> tuple[float, int]:
        """(mean next-token cross-entropy, supervised token count) of ``tokens``, with ``adapter`` if given.
        ``f16_weights`` as in :func:`ggml_lora.forward.loss_sum` (default: the stored weights)."""
        return evaluate(self, adapter, tokens, loss_mask, scale, f16_weights)

    def __repr__(self) -> str:
        state = "closed" if self.closed else self.device
        return f"BaseModel({str(self.path)!r}, arch={self.arch}, n_layers={self.n_layers}, {state})"
