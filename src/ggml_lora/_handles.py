"""Shared plumbing for objects that own a native handle, and for passing batches to C."""

from __future__ import annotations

import numpy as np

from ._native import ffi


class NativeHandle:
    """Owns one native pointer: idempotent close(), context manager, and a GC backstop."""

    _free = None          # the native free function, set by subclasses
    _ptr = ffi.NULL

    def _set_handle(self, ptr, free) -> None:
        self._ptr = ptr
        self._free = free

    @property
    def closed(self) -> bool:
        return self._ptr == ffi.NULL

    def _handle(self):
        if self._ptr == ffi.NULL:
            raise ValueError(f"{type(self).__name__} is closed")
        return self._ptr

    def close(self) -> None:
        ptr, self._ptr = self._ptr, ffi.NULL
        if ptr != ffi.NULL and self._free is not None:
            self._free(ptr)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


class Batch:
    """A glora_batch and the numpy arrays it points into (kept alive as long as this object)."""

    def __init__(self, tokens: np.ndarray, segments: np.ndarray | None = None,
                 loss_rows: np.ndarray | None = None, labels: np.ndarray | None = None):
        self.tokens = np.ascontiguousarray(tokens, dtype=np.int32)      # (n_seq, n_tokens)
        assert self.tokens.ndim == 2
        self.segments = None if segments is None else np.ascontiguousarray(segments, dtype=np.int32)
        self.loss_rows = None if loss_rows is None else np.ascontiguousarray(loss_rows, dtype=np.int32)
        self.labels = None if labels is None else np.ascontiguousarray(labels, dtype=np.int32)
        c = ffi.new("glora_batch *")
        c.tokens = ffi.cast("const int32_t *", ffi.from_buffer(self.tokens))
        c.n_seq, c.n_tokens = self.tokens.shape
        if self.segments is not None:
            c.segments = ffi.cast("const int32_t *", ffi.from_buffer(self.segments))
        if self.loss_rows is not None:
            c.loss_rows = ffi.cast("const int32_t *", ffi.from_buffer(self.loss_rows))
            c.labels = ffi.cast("const int32_t *", ffi.from_buffer(self.labels))
            c.n_loss = len(self.loss_rows)
        self.c = c

    @property
    def n_loss(self) -> int:
        return 0 if self.loss_rows is None else len(self.loss_rows)


def float_buffer(a: np.ndarray):
    return ffi.cast("float *", ffi.from_buffer(a))
