"""Mutated GGUF files (a tiny model and an adapter) never take the process down.

Every case either loads (and runs a forward pass) or raises one of our exceptions (or OSError); a crash
in ggml would kill pytest and fail CI. The default run is 2,000 cases per target; set GGML_LORA_FUZZ_CASES for
longer runs.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402

from conftest import N_THREADS  # noqa: E402

from ggml_lora import Adapter, BaseModel, GGMLLoRAError, LoRAConfig  # noqa: E402

CASES = int(os.environ.get("GGML_LORA_FUZZ_CASES", "2000"))
EXPECTED = (GGMLLoRAError, OSError)


@pytest.fixture(scope="module")
def seeds(tmp_path_factory):
    """A tiny base model (small vocabulary, quantized) and an adapter for it, as bytes."""
    from tinymodels import write_tiny_model

    root = tmp_path_factory.mktemp("fuzz")
    base = write_tiny_model(root / "base.gguf", "llama", "q8_0", n_layers=1, n_embd=32, n_head=2, n_head_kv=1,
                            n_ff=64, vocab="llama-spm")
    with BaseModel.load(base, n_threads=N_THREADS) as model:
        with Adapter.init(model, LoRAConfig(rank=2, target_modules=("q_proj", "v_proj"))) as ad:
            adapter = ad.save(root / "adapter.gguf")
    return base.read_bytes(), adapter.read_bytes(), base


def mutations(size: int):
    """Byte flips and 8-byte overwrites mostly in the header, plus truncations."""
    header = min(size, 4096)
    flip = st.tuples(st.just("flip"), st.integers(0, header - 1), st.integers(1, 255))
    word = st.tuples(st.just("word"), st.integers(0, header - 8),
                     st.sampled_from([0, 1, 2**31 - 1, 2**32 - 1, 2**63 - 1, 2**64 - 1, 0xFFFF, 12, 30]))
    anywhere = st.tuples(st.just("flip"), st.integers(0, size - 1), st.integers(1, 255))
    cut = st.tuples(st.just("cut"), st.integers(0, size - 1), st.just(0))
    return st.lists(st.one_of(flip, word, anywhere, cut), min_size=1, max_size=4)


def mutate(data: bytes, ops) -> bytes:
    buf = bytearray(data)
    for kind, pos, val in ops:
        if kind == "flip" and pos < len(buf):
            buf[pos] ^= val
        elif kind == "word" and pos + 8 <= len(buf):
            buf[pos:pos + 8] = int(val).to_bytes(8, "little")
        elif kind == "cut":
            del buf[pos:]
    return bytes(buf)


def test_fuzz_base_model(seeds, tmp_path_factory):
    base, _, _ = seeds
    path = tmp_path_factory.mktemp("fz") / "m.gguf"
    outcomes = {"loaded": 0, "rejected": 0}

    @settings(max_examples=CASES, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(mutations(len(base)))
    def run(ops):
        path.write_bytes(mutate(base, ops))
        try:
            with BaseModel.load(path, n_threads=1) as model:
                model.logits([1, 2, 3])
            outcomes["loaded"] += 1
        except EXPECTED:
            outcomes["rejected"] += 1

    run()
    print(f"fuzzed base model: {outcomes}")
    assert sum(outcomes.values()) >= CASES


def test_fuzz_adapter(seeds, tmp_path_factory):
    _, adapter, base_path = seeds
    path = tmp_path_factory.mktemp("fz") / "a.gguf"
    # a mutated alpha or weight can be huge yet finite: the logits may overflow, which is not a crash
    outcomes = {"loaded": 0, "rejected": 0, "non-finite logits": 0}
    with BaseModel.load(base_path, n_threads=1) as model:

        @settings(max_examples=CASES, deadline=None, database=None, derandomize=True,
                  suppress_health_check=list(HealthCheck))
        @given(mutations(len(adapter)))
        def run(ops):
            path.write_bytes(mutate(adapter, ops))
            try:
                with Adapter.load(model, path) as ad:
                    finite = np.isfinite(model.logits([1, 2, 3], ad)).all()
                outcomes["loaded" if finite else "non-finite logits"] += 1
            except EXPECTED:
                outcomes["rejected"] += 1

        run()
    print(f"fuzzed adapter: {outcomes}")
    assert sum(outcomes.values()) >= CASES


def test_huge_block_count_is_refused_before_anything_is_sized_by_it(seeds, tmp_path):
    """Found by the 50,000-case run: a flipped bit made block_count 8,388,609 and the Python-side table
    of expected tensor names grew to 24 GB before the kernel killed the process."""
    base, _, _ = seeds
    key = b"llama.block_count"
    at = base.index(key) + len(key) + 4               # after the key: uint32 value type, then the value
    assert int.from_bytes(base[at:at + 4], "little") == 1
    path = tmp_path / "huge.gguf"
    path.write_bytes(base[:at] + (8_388_609).to_bytes(4, "little") + base[at + 4:])
    with pytest.raises(GGMLLoRAError, match="block_count=8388609 but the file holds only"):
        BaseModel.load(path, n_threads=1)
