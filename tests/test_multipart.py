"""Multi-part GGUF models (llama.cpp's gguf-split format, written here by gguf-py's split writer): the first
part loads the whole model, with logits identical to the single file's, trains the same, llama.cpp loads the
same parts, and a missing or wrong part is named."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import N_THREADS
from reference import assert_parity, llama_logits
from tinymodels import split_model

from ggml_lora import Adapter, BaseModel, InvalidArgumentError, LoRAConfig, UnsupportedError, gguf_file
from ggml_lora.errors import GGMLLoRAError, MissingPartError, NativeIOError
from ggml_lora.forward import loss_batch
from ggml_lora.step import TrainingContext

# gemma3 at q8_0: the newest architecture, quantized blocks and F32 norms spread over the parts
MODEL = ("gemma3", "q8_0", {"n_layers": 2})
MAX_TENSORS = 7           # 28 tensors: 4 parts, the first holding token_embd and the metadata


@pytest.fixture(scope="module")
def single_and_parts(tiny_model_file, tmp_path_factory):
    arch, weight_type, kw = MODEL
    single = tiny_model_file(arch, weight_type, **kw)
    parts = split_model(single, tmp_path_factory.mktemp("split") / "tiny.gguf", MAX_TENSORS)
    assert len(parts) == 4 and all(p.exists() for p in parts)
    return single, parts


@pytest.mark.parametrize("use_mmap", [True, False], ids=["mapped", "read"])
def test_split_model_equals_single_file(single_and_parts, use_mmap):
    """Same bytes, same graph: the logits are bit-identical, whether the parts are mapped or read."""
    single, parts = single_and_parts
    tokens = np.random.default_rng(0).integers(0, 32000, 24)
    with BaseModel.load(single, n_threads=N_THREADS) as one, \
            BaseModel.load(parts[0], n_threads=N_THREADS, use_mmap=use_mmap) as split:
        assert split.tensors == one.tensors and split.hparams == one.hparams
        assert {n: split.read_tensor(n) for n in split.tensors} == {n: one.read_tensor(n) for n in one.tensors}
        np.testing.assert_array_equal(split.logits(tokens), one.logits(tokens))


def test_sha256_covers_every_part(single_and_parts):
    """The base model's sha256 (checked on resume and across MPI ranks) is that of all the parts' bytes in
    order, not of the first part alone: a checkpoint on other later parts is another model."""
    import hashlib

    _, parts = single_and_parts
    with BaseModel.load(parts[0], n_threads=N_THREADS) as split:
        assert split.sha256 == hashlib.sha256(b"".join(p.read_bytes() for p in parts)).hexdigest()
        assert split.sha256 != hashlib.sha256(parts[0].read_bytes()).hexdigest()


def test_split_model_trains_as_single_file(single_and_parts):
    """Three optimizer steps from the same initial adapter give the same losses and the same adapter."""
    single, parts = single_and_parts
    results = []
    for path in (single, parts[0]):
        with BaseModel.load(path, n_threads=N_THREADS) as model:
            tokens = np.random.default_rng(1).integers(0, model.n_vocab, (2, 16))
            with Adapter.init(model, LoRAConfig(rank=4, target_modules=model.target_modules, seed=3)) as ad, TrainingContext(ad) as ctx:
                losses = [ctx.step([loss_batch(model, tokens)], learning_rate=1e-2, step=s).loss for s in (1, 2, 3)]
                results.append((losses, ad.tensors()))
    (losses_one, tensors_one), (losses_split, tensors_split) = results
    assert losses_split == losses_one and losses_one[-1] < losses_one[0]
    for name, (a, b) in tensors_one.items():
        np.testing.assert_array_equal(tensors_split[name][0], a)
        np.testing.assert_array_equal(tensors_split[name][1], b)


def test_llama_cpp_loads_the_parts(single_and_parts):
    single, parts = single_and_parts
    tokens = np.random.default_rng(2).integers(0, 32000, 24)
    with BaseModel.load(single, n_threads=N_THREADS) as model:
        assert_parity(model.logits(tokens), llama_logits(parts[0], tokens, n_threads=N_THREADS), "split")


def test_missing_or_wrong_part_is_named(single_and_parts, tmp_path, monkeypatch):
    _, parts = single_and_parts
    copies = [tmp_path / p.name for p in parts]
    for p, c in zip(parts, copies):
        c.write_bytes(p.read_bytes())
    with pytest.raises(InvalidArgumentError, match="part 2 of 4 of a split model; load the first part"):
        BaseModel.load(copies[1])
    header = gguf_file.open_reader(copies[0])
    copies[2].unlink()
    with pytest.raises(MissingPartError, match="tiny-00003-of-00004.gguf: part 3 of 4 .* is missing"):
        BaseModel.load(copies[0])
    # the native loader's own check, behind the Python one
    monkeypatch.setattr(gguf_file, "read_model_header", lambda path: header)
    with pytest.raises(NativeIOError, match="tiny-00003-of-00004.gguf: part 3 of 4 of the model is missing"):
        BaseModel.load(copies[0])


def test_every_mapped_part_is_watched(single_and_parts, tmp_path):
    """The weights are views of every part's mapping: a later part rewritten in place is refused by the next
    call, as the single file is, before a read of the shrunken mapping could kill the process (SIGBUS)."""
    _, parts = single_and_parts
    copies = [tmp_path / p.name for p in parts]
    for p, c in zip(parts, copies):
        c.write_bytes(p.read_bytes())
    with BaseModel.load(copies[0], n_threads=N_THREADS) as model:
        model.logits([1, 2, 3])
        with open(copies[3], "r+b") as f:
            f.truncate(64)
        with pytest.raises(GGMLLoRAError, match="tiny-00004-of-00004.gguf was modified in place"):
            model.logits([1, 2, 3])


def test_merge_refuses_a_split_model(single_and_parts, tmp_path):
    from ggml_lora.merge import merge_adapters

    _, parts = single_and_parts
    with pytest.raises(UnsupportedError, match="first part of a split model.*llama-gguf-split --merge"):
        merge_adapters(parts[0], [], tmp_path / "merged.gguf")
