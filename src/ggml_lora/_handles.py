"""Shared plumbing for objects that own a native handle, and for passing batches to C."""

from __future__ import annotations

import contextlib
import math
import threading
import weakref

import numpy as np

from ._native import ffi
from .errors import InvalidArgumentError


class NativeHandle:
    """Owns one native pointer: idempotent close(), context manager, and a GC backstop.

    Handles form a tree: a BaseModel owns its Adapters, an Adapter its TrainingContexts. The native
    child points into its parent (an adapter's pairs name the model's weights, a trainer reads the
    adapter's tensors and the model's scheduler), so:

    - a child holds a strong reference to its parent: the GC never frees a parent under a live child;
    - closing a parent closes its live children first, and they then say why they are closed;
    - every native call goes through :meth:`_using`, which holds the family's one lock (the model's
      scheduler and graphs are shared) and raises ValueError on a closed handle, so no call ever
      reaches native code with a freed pointer, and close() waits for a call in another thread.
    """

    _free = None          # the native free function, set by subclasses
    _ptr = ffi.NULL
    _parent: NativeHandle | None = None
    _closed_because = ""

    def _set_handle(self, ptr, free, parent: NativeHandle | None = None) -> None:
        self._children: weakref.WeakSet[NativeHandle] = weakref.WeakSet()
        if parent is not None:
            self._parent = parent
            self._lock = parent._lock
            parent._children.add(self)
        else:
            self._lock = threading.RLock()
        self._ptr = ptr
        self._free = free

    @property
    def closed(self) -> bool:
        return self._ptr == ffi.NULL

    def _handle(self):
        if self._ptr == ffi.NULL:
            raise ValueError(f"{type(self).__name__} is closed{self._closed_because}")
        return self._ptr

    @contextlib.contextmanager
    def _using(self):
        """The native pointer, with the family's lock held for the whole block."""
        with self._lock:
            ptr = self._handle()
            root = self
            while root._parent is not None:
                root = root._parent
            root._check_source()
            yield ptr

    def _check_source(self) -> None:
        """Raise instead of letting native code read what is no longer there (the root's hook)."""

    def close(self) -> None:
        """Free the native object, and first every object made from it (idempotent)."""
        lock = getattr(self, "_lock", None)
        with lock if lock is not None else contextlib.nullcontext():
            if self._ptr == ffi.NULL:
                return
            for child in list(getattr(self, "_children", ())):
                child._closed_because = f" (closed with its {type(self).__name__})"
                child.close()
            ptr, self._ptr = self._ptr, ffi.NULL
            if self._free is not None:
                self._free(ptr)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        # Only reached when nothing refers to this object any more, children included (they hold
        # their parent); in a garbage cycle the order is arbitrary, which is safe because no native
        # free function reads its parent.
        try:
            self.close()
        except Exception:
            pass


def _int_array(name: str, value, ndim: int) -> np.ndarray:
    arr = np.asarray(value)
    if arr.ndim != ndim or (arr.size and not np.issubdtype(arr.dtype, np.integer)):
        raise InvalidArgumentError(f"Batch: {name} must be a {ndim}-D array of integers, got shape {arr.shape} "
                                   f"of {arr.dtype}")
    if arr.size and (arr.min() < np.iinfo(np.int32).min or arr.max() > np.iinfo(np.int32).max):
        raise InvalidArgumentError(f"Batch: {name} has values outside int32")
    return np.ascontiguousarray(arr, dtype=np.int32)


class Batch:
    """A glora_batch and the numpy arrays it points into (kept alive as long as this object).

    Everything native code indexes by is checked here: ``segments`` has the shape of ``tokens``, and
    ``labels`` gives one label per entry of ``loss_rows`` (native code reads n_loss of each)."""

    def __init__(self, tokens: np.ndarray, segments: np.ndarray | None = None,
                 loss_rows: np.ndarray | None = None, labels: np.ndarray | None = None,
                 loss_weights: np.ndarray | None = None, seq_keys: np.ndarray | None = None,
                 logit_scale: float = 1.0):
        """``logit_scale``: the loss rows' logits are multiplied by it before the loss's softmax (GRPO:
        1 / temperature)."""
        if not (isinstance(logit_scale, (int, float)) and math.isfinite(logit_scale) and logit_scale > 0):
            raise InvalidArgumentError(f"Batch: logit_scale must be a finite number > 0, got {logit_scale!r}")
        self.logit_scale = float(logit_scale)
        self.tokens = _int_array("tokens", tokens, 2)                   # (n_seq, n_tokens)
        if self.tokens.size == 0:
            raise InvalidArgumentError(f"Batch: tokens is empty (shape {self.tokens.shape})")
        self.segments = None if segments is None else _int_array("segments", segments, 2)
        if self.segments is not None and self.segments.shape != self.tokens.shape:
            raise InvalidArgumentError(f"Batch: segments has shape {self.segments.shape}, tokens {self.tokens.shape}")
        if (loss_rows is None) != (labels is None):
            raise InvalidArgumentError("Batch: loss_rows and labels go together (one label per loss row)")
        self.loss_rows = None if loss_rows is None else _int_array("loss_rows", loss_rows, 1)
        self.labels = None if labels is None else _int_array("labels", labels, 1)
        if self.loss_rows is not None:
            if len(self.labels) != len(self.loss_rows):
                raise InvalidArgumentError(f"Batch: {len(self.labels)} labels for {len(self.loss_rows)} loss rows")
            n_rows = self.tokens.size
            if len(self.loss_rows) and (self.loss_rows.min() < 0 or self.loss_rows.max() >= n_rows):
                raise InvalidArgumentError(f"Batch: loss rows must lie in [0, n_seq*n_tokens={n_rows})")
            if np.any(np.diff(self.loss_rows) <= 0):
                raise InvalidArgumentError("Batch: loss rows must be strictly ascending")
        self.loss_weights = None
        if loss_weights is not None:
            w = np.ascontiguousarray(loss_weights, dtype=np.float32)
            if w.shape != (self.n_loss,) or not np.all(np.isfinite(w)):
                raise InvalidArgumentError(f"Batch: loss_weights must be {self.n_loss} finite numbers, one per loss "
                                           f"row; got shape {w.shape}")
            self.loss_weights = w
        self.seq_keys = None
        if seq_keys is not None:
            k = np.asarray(seq_keys)
            if k.shape != (self.tokens.shape[0],) or (k.size and not np.issubdtype(k.dtype, np.integer)) \
                    or (k.size and k.min() < 0):
                raise InvalidArgumentError(f"Batch: seq_keys must be {self.tokens.shape[0]} non-negative integers, "
                                           f"one per sequence; got shape {k.shape} of {k.dtype}")
            self.seq_keys = np.ascontiguousarray(k, dtype=np.uint64)
        c = ffi.new("glora_batch *")
        c.tokens = ffi.cast("const int32_t *", ffi.from_buffer(self.tokens))
        c.n_seq, c.n_tokens = self.tokens.shape
        c.logit_scale = self.logit_scale
        if self.segments is not None:
            c.segments = ffi.cast("const int32_t *", ffi.from_buffer(self.segments))
        if self.loss_rows is not None and len(self.loss_rows):
            c.loss_rows = ffi.cast("const int32_t *", ffi.from_buffer(self.loss_rows))
            c.labels = ffi.cast("const int32_t *", ffi.from_buffer(self.labels))
            c.n_loss = len(self.loss_rows)
            if self.loss_weights is not None:
                c.loss_weights = ffi.cast("const float *", ffi.from_buffer(self.loss_weights))
        if self.seq_keys is not None:
            c.seq_keys = ffi.cast("const uint64_t *", ffi.from_buffer(self.seq_keys))
        self.c = c

    @property
    def n_loss(self) -> int:
        return 0 if self.loss_rows is None else len(self.loss_rows)


def float_buffer(a: np.ndarray):
    return ffi.cast("float *", ffi.from_buffer(a))
