"""GRPO's rollouts: completions sampled by llama.cpp (llama-cpp-python's low-level API, the pinned tree)
from the base GGUF plus the adapter as it stands.

A generation batch is decoded together: each prompt is evaluated once with its ``num_generations`` sequence
ids on its tokens (one KV entry shared by all, ``kv_unified``), then each step decodes one token of every
unfinished sequence of every prompt in one batch. Sampling is ours, in NumPy, from llama.cpp's logits: seeded by
(seed, step, prompt) so a run, and a resumed run, draws the same tokens, with TRL/transformers' order of
filters (temperature, top_k, top_p, min_p). The log-probability of each drawn token under the unfiltered
distribution of logits / temperature is kept (the one our forward must reproduce, tests/test_grpo.py), and
that distribution's entropy (TRL's ``entropy`` metric, of the policy that sampled).

The adapter is refreshed before each generation batch by writing it to a file and loading that into the
context (llama.cpp has no call that replaces an adapter's tensors in place); ``refresh_s`` says what it cost.
"""

from __future__ import annotations

import ctypes
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import InvalidArgumentError


@dataclass
class Completion:
    ids: list[int]              # the sampled tokens, EOS included when one was drawn
    logprobs: list[float]       # llama.cpp's log-probability of each (logits / temperature, no filters)
    truncated: bool             # stopped at max_tokens without an end-of-generation token
    entropies: list[float] = field(default_factory=list)   # of the distribution each was drawn from, nats


def filter_logits(logits: np.ndarray, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                  min_p: float | None = None) -> np.ndarray:
    """Logits with the tokens the filters drop set to -inf, in transformers' order (its logits processors:
    temperature, top-k, top-p, min-p)."""
    x = logits.astype(np.float64) / temperature
    if top_k and top_k < x.size:
        kth = np.partition(x, -top_k)[-top_k]
        x = np.where(x < kth, -np.inf, x)
    if top_p < 1.0:
        order = np.argsort(-x, kind="stable")
        p = np.exp(x[order] - x[order[0]])
        p /= p.sum()
        # keep the smallest prefix whose mass reaches top_p (the token that crosses it included)
        keep = np.cumsum(p) - p < top_p
        x[order[~keep]] = -np.inf
    if min_p is not None and min_p > 0:
        p = np.exp(x - x.max())
        x = np.where(p < min_p * p.max(), -np.inf, x)
    return x


def _log_softmax(x: np.ndarray) -> np.ndarray:
    m = x.max()
    return x - m - np.log(np.exp(x - m).sum())


class Sampler:
    """A llama.cpp context on ``model_path`` for sampling ``n_seq`` completions of a prompt at once."""

    def __init__(self, model_path, *, n_seq: int, n_ctx: int, n_threads: int | None = None, seed: int = 0):
        """``n_ctx``: KV cells for a prompt and all ``n_seq`` completions together (the cache is unified)."""
        import llama_cpp

        from . import llama_cpp_python  # noqa: F401  (importing it keeps llama.cpp off the AMX crash)

        from llama_cpp._logger import set_verbose

        set_verbose(False)          # as the vocab-only Llama of BaseModel.tokenize does: errors only
        self._api = llama_cpp
        self.n_seq, self.n_ctx, self.seed = n_seq, n_ctx, seed
        mparams = llama_cpp.llama_model_default_params()
        self._model = llama_cpp.llama_model_load_from_file(str(model_path).encode(), mparams)
        if not self._model:
            raise InvalidArgumentError(f"llama.cpp could not load {model_path}")
        self.model_path = str(model_path)
        cparams = llama_cpp.llama_context_default_params()
        cparams.n_ctx = n_ctx
        cparams.n_batch = max(n_seq, min(n_ctx, 512))
        cparams.n_ubatch = min(512, cparams.n_batch)
        cparams.n_seq_max = n_seq
        cparams.kv_unified = True          # the prompt's cells are shared by every sequence
        # the policy that samples must be the one we train: an F32 cache (not llama.cpp's default F16; 2 x
        # n_layers x n_embd_kv x 4 bytes per cell) and no flash attention (the CPU kernel accumulates in F16):
        # on an F32 model the sampled tokens' log-probabilities then match our forward's to ~2e-6, with
        # llama.cpp's defaults only to ~6e-3 (measured, tests/test_grpo.py)
        cparams.type_k = cparams.type_v = 0                # GGML_TYPE_F32
        cparams.flash_attn_type = 0                        # LLAMA_FLASH_ATTN_TYPE_DISABLED
        threads = n_threads or max(1, os.cpu_count() or 1)
        cparams.n_threads = cparams.n_threads_batch = threads
        self._ctx = llama_cpp.llama_init_from_model(self._model, cparams)
        if not self._ctx:
            llama_cpp.llama_model_free(self._model)
            raise InvalidArgumentError(f"llama.cpp could not make a context of {n_ctx} tokens x {n_seq} sequences")
        self._vocab = llama_cpp.llama_model_get_vocab(self._model)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(self._vocab)
        self._batch = llama_cpp.llama_batch_init(cparams.n_batch, 0, n_seq)
        self._n_batch = cparams.n_batch
        self._adapter = None
        self._dir = tempfile.TemporaryDirectory(prefix="ggml_lora_rollout.")
        self.refresh_s = 0.0

    def close(self) -> None:
        api = getattr(self, "_api", None)
        if api is None:
            return
        api.llama_batch_free(self._batch)
        api.llama_free(self._ctx)
        if self._adapter is not None:
            api.llama_adapter_lora_free(self._adapter)
        api.llama_model_free(self._model)
        self._dir.cleanup()
        self._api = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    def is_eog(self, token: int) -> bool:
        return bool(self._api.llama_vocab_is_eog(self._vocab, token))

    # ---- adapter ---------------------------------------------------------------------------------

    def set_adapter(self, adapter, scale: float = 1.0) -> float:
        """Generate through ``adapter`` (an ggml_lora Adapter, as it is now) from here on; returns seconds."""
        api = self._api
        t0 = time.perf_counter()
        path = Path(self._dir.name) / "live.gguf"
        adapter.save(path)
        handle = api.llama_adapter_lora_init(self._model, str(path).encode())
        if not handle:
            raise RuntimeError(f"llama.cpp could not load the adapter written to {path}")
        arr = (api.llama_adapter_lora_p_ctypes * 1)(handle)
        scales = (ctypes.c_float * 1)(float(scale))
        api.llama_set_adapters_lora(self._ctx, arr, 1, scales)
        if self._adapter is not None:
            api.llama_adapter_lora_free(self._adapter)
        self._adapter = handle
        self.refresh_s = time.perf_counter() - t0
        return self.refresh_s

    # ---- decoding --------------------------------------------------------------------------------

    def _decode(self, entries) -> None:
        """entries: (token, pos, seq ids, want logits); llama_decode in chunks of n_batch."""
        api, b = self._api, self._batch
        for at in range(0, len(entries), self._n_batch):
            chunk = entries[at:at + self._n_batch]
            for i, (tok, pos, seqs, logits) in enumerate(chunk):
                b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = tok, pos, len(seqs), int(logits)
                for j, s in enumerate(seqs):
                    b.seq_id[i][j] = s
            b.n_tokens = len(chunk)
            rc = api.llama_decode(self._ctx, b)
            if rc != 0:
                raise RuntimeError(f"llama_decode returned {rc} (context {self.n_ctx} tokens)")

    def _logits(self, i: int) -> np.ndarray:
        ptr = self._api.llama_get_logits_ith(self._ctx, i)
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).copy()

    def sample(self, prompt: list[int], n: int, max_tokens: int, rng: np.random.Generator,
               **filters) -> list[Completion]:
        """``n`` (<= n_seq) completions of ``prompt``, decoded together (see :meth:`sample_many`)."""
        return self.sample_many([prompt], n, max_tokens, [rng], **filters)[0]

    def sample_many(self, prompts: list[list[int]], n: int, max_tokens: int, rngs: list[np.random.Generator], *,
                    temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                    min_p: float | None = None) -> list[list[Completion]]:
        """``n`` completions of each prompt, all ``len(prompts) x n`` sequences decoded together: each prompt is
        evaluated once for its ``n`` sequence ids, then every step decodes one token of every unfinished
        sequence in one batch (the weights are read once per step for all of them). Prompt i's tokens are
        drawn from ``rngs[i]`` in a fixed order, so they do not depend on which prompts share the batch."""
        total = len(prompts) * n
        if total > self.n_seq:
            raise InvalidArgumentError(f"{len(prompts)} prompts x {n} sequences, the context holds {self.n_seq}")
        cells = sum(len(p) for p in prompts) + total * max_tokens
        if cells > self.n_ctx:
            raise InvalidArgumentError(f"{len(prompts)} prompts of {sum(len(p) for p in prompts)} tokens + {total} x "
                                       f"{max_tokens} completion tokens do not fit the {self.n_ctx} KV cells")
        api = self._api
        api.llama_memory_clear(api.llama_get_memory(self._ctx), True)
        logits, start = {}, []
        for j, prompt in enumerate(prompts):        # one decode per prompt: its last logits are read right after
            seqs = list(range(j * n, (j + 1) * n))
            self._decode([(t, q, seqs, q == len(prompt) - 1) for q, t in enumerate(prompt)])
            last = self._logits(-1)
            logits.update({s: last for s in seqs})
            start += [len(prompt)] * n
        outs = [Completion([], [], True) for _ in range(total)]
        live = list(range(total))
        filtered = bool(top_k) or top_p < 1.0 or bool(min_p)
        for k in range(max_tokens):
            entries = []
            # every live sequence at once, in float64: x = logits / T, e = exp(x - max), Z = Σe
            x = np.stack([logits[s] for s in live]).astype(np.float64) / temperature      # (S, V)
            x -= x.max(axis=1, keepdims=True)
            e = np.exp(x)
            z = e.sum(axis=1)
            log_z = np.log(z)
            entropy = log_z - (e * x).sum(axis=1) / z              # -Σ p log p with p = e / Z
            # inverse CDF with one uniform draw per token, as Generator.choice(p=...) draws
            cdf = np.cumsum(e if not filtered else np.stack(
                [np.exp(f - f.max()) for f in (filter_logits(logits[s], temperature, top_k, top_p, min_p)
                                               for s in live)]), axis=1)
            for i, s in enumerate(live):
                u = rngs[s // n].random()
                tok = min(int(np.searchsorted(cdf[i], u * cdf[i, -1], side="right")), self.n_vocab - 1)
                outs[s].ids.append(tok)
                outs[s].logprobs.append(float(x[i, tok] - log_z[i]))
                outs[s].entropies.append(float(entropy[i]))
                if self.is_eog(tok):
                    outs[s].truncated = False
                else:
                    entries.append((tok, start[s] + k, [s], True))
            live = [e[2][0] for e in entries]
            if not live or k == max_tokens - 1:
                break
            self._decode(entries)
            logits = {s: self._logits(i) for i, s in enumerate(live)}
        return [outs[j * n:(j + 1) * n] for j in range(len(prompts))]


__all__ = ["Completion", "Sampler", "filter_logits"]
