"""Adapter: LoRA pairs (A, B) on named weights of a BaseModel, held on the model's device."""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from ._handles import NativeHandle, float_buffer
from ._native import check, ffi, lib
from .arch import LM_HEAD, hf_module
from .config import LoRAConfig
from .errors import InvalidArgumentError
from .model import BaseModel


def target_weights(model: BaseModel, config: LoRAConfig) -> list[str]:
    """The GGUF names of the weights ``config`` adapts in ``model``, block by block."""
    layers = config.layers if config.layers is not None else tuple(range(model.n_layers))
    bad = [i for i in layers if i >= model.n_layers]
    if bad:
        raise InvalidArgumentError(f"LoRAConfig.layers: blocks {bad} do not exist; the model has {model.n_layers} "
                                   f"(0..{model.n_layers - 1})")
    modules = model.hparams.spec.modules
    missing = [m for m in config.target_modules if m != LM_HEAD and m not in modules]
    if missing:
        raise InvalidArgumentError(
            f"LoRAConfig.target_modules: {', '.join(missing)} {'does' if len(missing) == 1 else 'do'} not exist in "
            f"{model.arch} models; this model has {', '.join(model.target_modules)}"
            + (" (its Q/K/V and gate/up projections are fused: qkv_proj, gate_up_proj)"
               if model.hparams.spec.fused else ""))
    names = []
    for i in layers:
        for module in config.target_modules:
            if module != LM_HEAD:
                names.append(f"blk.{i}.{modules[module]}.weight")
    if LM_HEAD in config.target_modules:
        if model.tied_embeddings:
            raise InvalidArgumentError(
                "LoRAConfig.target_modules: lm_head is tied to token_embd.weight in this model (the GGUF has no "
                "output.weight); llama.cpp cannot apply a LoRA there, so it cannot be trained")
        names.append("output.weight")
    return names


def adaptable_weights(model: BaseModel) -> set[str]:
    """The GGUF names of every weight of ``model`` that llama.cpp applies a LoRA to."""
    stems = model.hparams.spec.modules.values()
    names = {f"blk.{i}.{stem}.weight" for i in range(model.n_layers) for stem in stems}
    if not model.tied_embeddings:
        names.add("output.weight")
    return names & set(model.tensors)


def read_weight_f32(model: BaseModel, name: str) -> np.ndarray:
    """A F32/F16/BF16 weight as float32 numpy, shape (n_out, n_in)."""
    n_in, n_out = model.weight_shape(name)
    raw = model.read_tensor(name)
    kind = model.tensors[name].type_name
    if kind == "F32":
        w = np.frombuffer(raw, dtype=np.float32)
    elif kind == "F16":
        w = np.frombuffer(raw, dtype=np.float16).astype(np.float32)
    elif kind == "BF16":
        w = (np.frombuffer(raw, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)
    else:
        raise InvalidArgumentError(f"'{name}' is {kind}; only F32, F16 and BF16 weights can be read as floats")
    return w.reshape(n_out, n_in)


class Adapter(NativeHandle):
    """LoRA pairs for a :class:`BaseModel`. Create with :meth:`init` or :meth:`from_tensors`.

    ``lora_a`` of a target has numpy shape (rank, n_in) and ``lora_b`` (n_out, rank): PEFT's layout and
    the GGUF adapter's (ggml ne = [n_in, rank] and [rank, n_out]).
    """

    def __init__(self, *_, **__):
        raise TypeError("use Adapter.init(model, LoRAConfig(...)) or Adapter.from_tensors(...)")

    @classmethod
    def _create(cls, model: BaseModel, targets: list[str], ranks: list[int], alpha: float,
                config: LoRAConfig | None) -> Adapter:
        allowed = adaptable_weights(model)
        for name in targets:
            if name not in model.tensors:
                raise InvalidArgumentError(f"LoRA target '{name}' is not a tensor of {model.path}")
            if name not in allowed:
                raise InvalidArgumentError(
                    f"'{name}' cannot carry a LoRA: llama.cpp applies adapters to the projections of the blocks "
                    f"(blk.N.{{{','.join(model.hparams.spec.modules.values())}}}.weight)"
                    + (" and to output.weight" if not model.tied_embeddings else "")
                    + " of this model, and never to token embeddings or norms")
        for name, r in zip(targets, ranks):
            n_in, n_out = model.weight_shape(name)
            if not 0 < r <= min(n_in, n_out):
                raise InvalidArgumentError(f"rank {r} for '{name}' must be in [1, min(n_in={n_in}, n_out={n_out})]")
        names = [ffi.new("char[]", t.encode()) for t in targets]
        out = ffi.new("glora_adapter **")
        with model._using() as model_ptr:
            check(lib.glora_adapter_new(model_ptr, len(targets), ffi.new("char *[]", names),
                                        ffi.new("int32_t[]", ranks), float(alpha), out))
            self = object.__new__(cls)
            self._set_handle(out[0], lib.glora_adapter_free, parent=model)
        self.model = model
        self.targets = list(targets)
        self.ranks = dict(zip(targets, ranks))
        self.alpha = float(alpha)
        self.config = config
        self.metadata: dict = {}
        # name -> (rows r: of lora_a, columns r: of lora_b) that training must leave as they are (PiSSA)
        self.frozen: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self._index = {t: i for i, t in enumerate(targets)}
        # name -> the pair's own factor on B·A·x where it is not alpha / rank (rank/alpha patterns)
        self.pair_scales: dict[str, float] = {}
        return self

    def _set_pair_scale(self, name: str, scale: float) -> None:
        with self._using() as ptr:
            check(lib.glora_adapter_set_pair_scale(ptr, self.target_index(name), float(scale)))
        self.pair_scales[name] = float(scale)

    def fold(self, name: str) -> float:
        """What B of ``name`` is multiplied by in a llama.cpp file, whose one alpha gives every pair
        alpha / rank: the pair's own scale over that (1 for an ordinary pair)."""
        scale = self.pair_scales.get(name)
        return 1.0 if scale is None else scale / (self.alpha / self.ranks[name])

    @classmethod
    def init(cls, model: BaseModel, config: LoRAConfig) -> Adapter:
        """A fresh adapter: A by ``config.init`` (seeded), B = 0, so it starts as exactly the base model.

        - ``"kaiming"``: PEFT's default, A ~ U(-1/sqrt(n_in), 1/sqrt(n_in)) (Kaiming-uniform with a=sqrt(5)).
          Use it unless you have a reason not to.
        - ``"gaussian"``: A ~ N(0, (1/r)^2), PEFT's ``init_lora_weights="gaussian"``; a scale that does not
          depend on n_in, for comparing with runs that used it.
        - ``"pissa"``: PiSSA, for F32/F16/BF16 targets. With W = U S Vᵀ, the trainable pair starts at the
          top-r singular directions, scale·B₀A₀ = U_r S_r V_rᵀ, and PiSSA's base is the residual
          W - scale·B₀A₀. We keep the stored W unchanged and carry the residual's correction as a
          frozen second half of the pair: the adapter is ``[B, -B₀]·[A; A₀]``, an ordinary LoRA of rank
          2r that llama.cpp applies to the unchanged base exactly as trained (the file's alpha is
          scale·2r). It starts as the base model (up to float rounding of B₀A₀ - B₀A₀) and learns
          faster on the principal directions; the cost is twice the rank in the file and at inference.
        """
        targets = target_weights(model, config)
        if config.init == "pissa":
            return cls._init_pissa(model, config, targets)
        ranks = [config.rank_for(hf_module(t, model.arch)) for t in targets]
        self = cls._create(model, targets, ranks, config.file_alpha, config)
        for name, r in zip(targets, ranks):
            scale = config.scale_for(hf_module(name, model.arch))
            if not math.isclose(scale, config.file_alpha / r, rel_tol=1e-12):
                self._set_pair_scale(name, scale)
        rng = np.random.default_rng(config.seed)
        for name, r in zip(targets, ranks):
            n_in, _ = model.weight_shape(name)
            shape = (r, n_in)
            if config.init == "kaiming":
                bound = 1.0 / math.sqrt(n_in)
                a = rng.uniform(-bound, bound, size=shape)
            else:
                a = rng.normal(0.0, 1.0 / r, size=shape)
            self.set(name, lora_a=a)
        return self

    @classmethod
    def _init_pissa(cls, model: BaseModel, config: LoRAConfig, targets: list[str]) -> Adapter:
        r, scale = config.rank, config.scale
        weights = {}
        for name in targets:
            t = model.tensors[name]
            if t.type_name not in ("F32", "F16", "BF16"):
                raise InvalidArgumentError(f"LoRAConfig.init='pissa' needs F32, F16 or BF16 targets; '{name}' is "
                                           f"{t.type_name} (use 'kaiming' on quantized bases)")
            weights[name] = read_weight_f32(model, name)                      # (n_out, n_in)
        self = cls._create(model, targets, [2 * r] * len(targets), scale * 2 * r, config)
        self.frozen = {}
        for name, w in weights.items():
            u, s, vt = np.linalg.svd(w.astype(np.float64), full_matrices=False)
            root = np.sqrt(s[:r] / scale)
            a0 = (root[:, None] * vt[:r]).astype(np.float32)                   # (r, n_in)
            b0 = (u[:, :r] * root[None, :]).astype(np.float32)                 # (n_out, r)
            self.set(name, lora_a=np.concatenate([a0, a0]), lora_b=np.concatenate([b0, -b0], axis=1))
            self.frozen[name] = (a0, -b0)
        return self

    @classmethod
    def from_tensors(cls, model: BaseModel, tensors: Mapping[str, tuple[np.ndarray, np.ndarray]],
                     alpha: float) -> Adapter:
        """An adapter with given pairs: ``{weight name: (lora_a (r, n_in), lora_b (n_out, r))}``.

        ``alpha`` is llama.cpp's: each pair is scaled by alpha / its rank.
        """
        if not tensors:
            raise InvalidArgumentError("from_tensors: no tensors")
        targets = list(tensors)
        ranks = [int(np.shape(tensors[t][0])[0]) for t in targets]
        self = cls._create(model, targets, ranks, alpha, None)
        for t, (a, b) in tensors.items():
            self.set(t, lora_a=a, lora_b=b)
        return self

    # ---- tensors ----------------------------------------------------------------------------------

    def pair_shape(self, name: str, which: int) -> tuple[int, int]:
        """The shape of ``name``'s lora_a (which=0: rank x n_in) or lora_b (which=1: n_out x rank)."""
        n_in, n_out = self.model.weight_shape(name)
        r = self.ranks[name]
        return (r, n_in) if which == 0 else (n_out, r)

    def target_index(self, name: str) -> int:
        """The index of ``name``'s pair in the native adapter (InvalidArgumentError if it has none)."""
        try:
            return self._index[name]
        except KeyError:
            raise InvalidArgumentError(f"adapter has no pair on '{name}'; its targets: {', '.join(self.targets)}") from None

    def get(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """(lora_a, lora_b) of one target as float32 numpy arrays (copies)."""
        i = self.target_index(name)
        out = []
        for which in (0, 1):
            arr = np.empty(self.pair_shape(name, which), dtype=np.float32)
            with self._using() as ptr:
                check(lib.glora_adapter_get(ptr, i, which, float_buffer(arr), arr.size))
            out.append(arr)
        return out[0], out[1]

    def set(self, name: str, lora_a: np.ndarray | None = None, lora_b: np.ndarray | None = None) -> None:
        i = self.target_index(name)
        for which, value in ((0, lora_a), (1, lora_b)):
            if value is None:
                continue
            arr = np.ascontiguousarray(value, dtype=np.float32)
            want = self.pair_shape(name, which)
            if arr.shape != want:
                half = "lora_a" if which == 0 else "lora_b"
                raise InvalidArgumentError(f"{name}.{half}: shape {arr.shape}, expected {want}")
            if not np.isfinite(arr).all():
                raise InvalidArgumentError(f"{name}: {'lora_a' if which == 0 else 'lora_b'} has non-finite values")
            with self._using() as ptr:
                check(lib.glora_adapter_set(ptr, i, which, float_buffer(arr), arr.size))

    def tensors(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        return {t: self.get(t) for t in self.targets}

    def file_tensors(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """The pairs as a llama.cpp file holds them: B times :meth:`fold`, so that the file's one
        alpha / rank gives each pair its own scale."""
        out = {}
        for t in self.targets:
            a, b = self.get(t)
            f = self.fold(t)
            out[t] = (a, b if f == 1.0 else (b.astype(np.float64) * f).astype(np.float32))
        return out

    @property
    def n_parameters(self) -> int:
        """Trainable parameters: the sum of r·(n_in + n_out) over the targets."""
        total = 0
        for t in self.targets:
            n_in, n_out = self.model.weight_shape(t)
            total += self.ranks[t] * (n_in + n_out)
        return total

    @classmethod
    def load(cls, model: BaseModel, path) -> Adapter:
        """Read a GGUF LoRA adapter (ours, or llama.cpp's convert_lora_to_gguf.py output) for ``model``.

        The file is checked against the model first: architecture, every tensor's name and shape,
        complete pairs, alpha stored as FLOAT32. Each problem is a GGUFFormatError naming it.
        """
        from .adapter_file import read_lora_gguf

        shapes = {name: t.shape for name, t in model.tensors.items()}
        alpha, pairs, meta = read_lora_gguf(path, model.arch, shapes)
        self = cls.from_tensors(model, pairs, alpha)
        self.metadata = meta
        return self

    def describe(self) -> dict:
        """The ggml_lora.* metadata this adapter is saved with (besides anything passed to save)."""
        import json

        from . import __version__

        ranks = sorted(set(self.ranks.values()))
        info = {
            "version": __version__,
            "base_model": self.model.name,
            "base_sha256": self.model.sha256,
            "rank": ranks[0] if len(ranks) == 1 else -1,
            "target_modules": ",".join(sorted({t.split(".")[-2] if t.startswith("blk.") else t.split(".")[0]
                                                for t in self.targets})),
        }
        if self.config is not None:
            info["lora_config"] = json.dumps(self.config.to_dict(), sort_keys=True)
        return info

    def save(self, path, metadata=None):
        """Write this adapter as a llama.cpp GGUF LoRA file (atomically: temporary file, then rename).

        ``metadata`` (str/int/float/bool values) is stored under the ``ggml_lora.`` key prefix, after
        the library's own keys (version, base model name and sha256, rank, target modules, config).
        """
        from .adapter_file import write_lora_gguf

        meta = dict(getattr(self, "metadata", None) or {})
        meta.update(self.describe())
        meta.update(metadata or {})
        return write_lora_gguf(path, self.model.arch, self.alpha, self.file_tensors(), meta,
                               tied_embeddings=self.model.tied_embeddings)

    def __repr__(self) -> str:
        return f"Adapter({len(self.targets)} targets, alpha={self.alpha:g}, {self.n_parameters} parameters)"
