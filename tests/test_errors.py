"""Bad input (missing, foreign or truncated files, unknown architectures and modules, out-of-range tokens,
over-long or ragged batches) raises a named Python exception and the process lives on."""

from __future__ import annotations

import numpy as np
import pytest

import gguf
from ggml_lora import (BaseModel, ContextLengthError, GGUFFormatError, InvalidArgumentError, LoRAConfig,
                       UnsupportedArchitectureError)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.gguf"):
        BaseModel.load(tmp_path / "nope.gguf")


def test_not_a_gguf(tmp_path):
    p = tmp_path / "model.gguf"
    p.write_text("this is a text file, not a model\n" * 10)
    with pytest.raises(GGUFFormatError, match="not a GGUF file"):
        BaseModel.load(p)


@pytest.mark.parametrize("keep", [0.3, 0.9, 0.999])
def test_truncated_gguf(tiny_model_file, tmp_path, keep):
    src = tiny_model_file("llama", "q8_0").read_bytes()
    p = tmp_path / "cut.gguf"
    p.write_bytes(src[: int(len(src) * keep)])
    with pytest.raises(GGUFFormatError, match="cut.gguf"):
        BaseModel.load(p)


def test_unsupported_architecture(tmp_path):
    p = tmp_path / "mamba.gguf"
    w = gguf.GGUFWriter(str(p), arch="mamba")
    w.add_tensor("token_embd.weight", np.zeros((8, 4), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(UnsupportedArchitectureError, match="'mamba'.*gemma2, gemma3, llama, phi3, qwen2, qwen3"):
        BaseModel.load(p)


def test_missing_tensor(tiny_model_file, tmp_path):
    src = gguf.GGUFReader(tiny_model_file("llama", "f32"))
    p = tmp_path / "missing.gguf"
    w = gguf.GGUFWriter(str(p), arch="llama")
    for name, f in src.fields.items():
        if name.startswith("llama.") :
            w.add_key_value(name, f.contents(), f.types[0])
    for t in src.tensors:
        if t.name != "blk.1.ffn_up.weight":
            w.add_tensor(t.name, np.array(t.data))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(GGUFFormatError, match="blk.1.ffn_up.weight"):
        BaseModel.load(p)


def test_unknown_target_module():
    with pytest.raises(InvalidArgumentError, match="target_modules.*'qq_proj'.*q_proj"):
        LoRAConfig(target_modules=("qq_proj",))


def test_token_out_of_range(tiny_model_file):
    with BaseModel.load(tiny_model_file("llama", "f32")) as model:
        with pytest.raises(InvalidArgumentError, match=f"id {model.n_vocab} at sequence 0, position 2"):
            model.logits([1, 2, model.n_vocab, 3])
        with pytest.raises(InvalidArgumentError, match="id -1"):
            model.logits([1, -1])
        assert np.isfinite(model.logits([1, 2, 3])).all()  # still alive and usable


def test_sequence_longer_than_context(tiny_model_file):
    with BaseModel.load(tiny_model_file("llama", "f32"), n_ctx=16) as model:
        with pytest.raises(ContextLengthError, match="17 tokens.*n_ctx=16"):
            model.logits(list(range(17)))
        assert model.logits(list(range(16))).shape == (16, model.n_vocab)


def test_ragged_batch(tiny_model_file):
    with BaseModel.load(tiny_model_file("llama", "f32")) as model:
        with pytest.raises(InvalidArgumentError, match="equal lengths"):
            model.logits([[1, 2, 3], [1, 2]])


def test_lm_head_on_tied_model_is_refused(tiny_model_file):
    from ggml_lora import Adapter

    with BaseModel.load(tiny_model_file("llama", "f32")) as model:
        assert model.tied_embeddings
        with pytest.raises(InvalidArgumentError, match="lm_head is tied"):
            Adapter.init(model, LoRAConfig(target_modules=("q_proj", "lm_head")))


def test_out_of_range_hparam(tiny_model_file):
    # found by the fuzz test: a context_length past int32 used to overflow in the native call
    from tinymodels import write_tiny_model

    path = write_tiny_model(tiny_model_file("llama", "f32").parent / "huge-ctx.gguf", "llama", "f32",
                            n_ctx_train=2**31 + 512)
    with pytest.raises(GGUFFormatError, match="context_length=2147484160 is out of range"):
        BaseModel.load(path)
