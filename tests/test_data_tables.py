"""Data where users keep it: Parquet and Arrow files, Hugging Face datasets objects and save_to_disk
folders give the very samples the same records give as .jsonl; their errors name file and row."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from ggml_lora.data import load_dataset, load_splits
from ggml_lora.errors import DatasetError, InvalidArgumentError

pa = pytest.importorskip("pyarrow")
import pyarrow.ipc  # noqa: E402
import pyarrow.parquet  # noqa: E402

FACTS = Path(__file__).resolve().parent.parent / "examples" / "data" / "facts"
KW = dict(max_seq_length=256)


def records(split: str) -> list[dict]:
    return [json.loads(line) for line in (FACTS / f"{split}.jsonl").read_text().splitlines() if line.strip()]


def tokens(samples) -> list[tuple[list[int], list[bool]]]:
    return [(s.tokens.tolist(), s.mask.tolist()) for s in samples]


@pytest.fixture(scope="module")
def reference(smollm2):
    train, valid, _ = load_splits(FACTS, smollm2, **KW)
    assert train and valid
    return tokens(train), tokens(valid)


def write_table(path: Path, rows: list[dict], how: str) -> Path:
    table = pa.Table.from_pylist(rows)
    if how == "parquet":
        pa.parquet.write_table(table, path, row_group_size=3)      # several row groups
    else:
        writer = pa.ipc.new_file if how == "arrow-file" else pa.ipc.new_stream
        with pa.OSFile(str(path), "wb") as sink, writer(sink, table.schema) as w:
            for batch in table.to_batches(max_chunksize=5):
                w.write_batch(batch)
    return path


@pytest.mark.parametrize("how", ["parquet", "arrow-file", "arrow-stream"])
def test_table_files_give_the_jsonl_samples(smollm2, reference, tmp_path, how):
    """Chat records (a list of structs per row) through Parquet, Arrow IPC files and streams; a folder
    of {split}.parquet/.arrow files gives both splits."""
    suffix = ".parquet" if how == "parquet" else ".arrow"
    for split in ("train", "valid"):
        write_table(tmp_path / f"{split}{suffix}", records(split), how)
    samples, report = load_dataset(tmp_path / f"train{suffix}", smollm2, **KW)
    assert tokens(samples) == reference[0] and report.format == "chat"
    train, valid, reports = load_splits(tmp_path, smollm2, **KW)
    assert (tokens(train), tokens(valid)) == reference and set(reports) == {"train", "valid"}


def test_table_file_errors_name_file_and_row(smollm2, tmp_path):
    rows = [{"prompt": "The capital is", "completion": " Vastrell."}] * 4
    rows[2] = {"prompt": "Broken", "completion": None}
    path = write_table(tmp_path / "c.parquet", rows, "parquet")
    with pytest.raises(DatasetError, match=r"c.parquet: row 3: a completion record needs 'prompt' and 'completion'; 'completion' is null"):
        load_dataset(path, smollm2, **KW)
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 not really parquet")
    with pytest.raises(DatasetError, match="bad.parquet: not a readable parquet file"):
        load_dataset(tmp_path / "bad.parquet", smollm2, **KW)
    (tmp_path / "bad.arrow").write_bytes(b"\x00" * 64)
    with pytest.raises(DatasetError, match="bad.arrow: not a readable arrow file"):
        load_dataset(tmp_path / "bad.arrow", smollm2, **KW)


def test_missing_pyarrow_is_named(smollm2, tmp_path, monkeypatch):
    import builtins

    path = write_table(tmp_path / "t.parquet", [{"text": "hello"}], "parquet")
    real = builtins.__import__

    def no_pyarrow(name, *a, **k):
        if name.split(".")[0] == "pyarrow":
            raise ImportError("No module named 'pyarrow'")
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_pyarrow)
    with pytest.raises(DatasetError, match=r"t.parquet: reading .parquet files needs pyarrow.*ggml-lora\[parquet\]"):
        load_dataset(path, smollm2, **KW)


def test_hf_datasets_give_the_jsonl_samples(smollm2, reference, tmp_path):
    datasets = pytest.importorskip("datasets")
    train, valid = datasets.Dataset.from_list(records("train")), datasets.Dataset.from_list(records("valid"))
    samples, report = load_dataset(train, smollm2, **KW)
    assert tokens(samples) == reference[0] and report.source == "<Dataset>"
    streamed, _ = load_dataset(train.to_iterable_dataset(), smollm2, **KW)
    assert tokens(streamed) == reference[0]
    dd = datasets.DatasetDict({"train": train, "validation": valid})
    t, v, reports = load_splits(dd, smollm2, **KW)
    assert (tokens(t), tokens(v)) == reference and set(reports) == {"train", "valid"}
    dd.save_to_disk(str(tmp_path / "saved"))
    t, v, _ = load_splits(tmp_path / "saved", smollm2, **KW)
    assert (tokens(t), tokens(v)) == reference
    train.save_to_disk(str(tmp_path / "one"))          # a single Dataset folder: its rows are the train split
    assert tokens(load_dataset(tmp_path / "one", smollm2, **KW)[0]) == reference[0]
    with pytest.raises(InvalidArgumentError, match="validation data is given twice"):
        load_splits(dd, smollm2, valid=valid, **KW)
    with pytest.raises(DatasetError, match="has no train split"):
        load_dataset(datasets.DatasetDict({"validation": valid}), smollm2, **KW)
    bad = datasets.Dataset.from_dict({"text": ["fine", "also fine", None], "txt": [None, None, "typo"]})
    with pytest.raises(DatasetError, match=r"<Dataset>\[2\]: unknown record format, keys \['txt'\], null \['text'\]"):
        load_dataset(bad, smollm2, **KW)


def test_trainer_takes_a_dataset(tmp_path, tiny_model_file):
    """Training on a datasets.Dataset is training on its records: the same losses, step for step."""
    datasets = pytest.importorskip("datasets")
    from conftest import N_THREADS

    from ggml_lora import BaseModel, LoRAConfig, LoRATrainer, TrainingConfig

    rng = np.random.default_rng(0)
    words = ["north", "river", "stone", "the", "of", "town", "bell", "mill"]
    rows = [{"prompt": " ".join(rng.choice(words, 6)), "completion": " " + " ".join(rng.choice(words, 4))}
            for _ in range(12)]
    with BaseModel.load(tiny_model_file("llama", "f32"), n_threads=N_THREADS) as model:
        def run(data, name):
            cfg = TrainingConfig(max_steps=3, batch_size=4, learning_rate=1e-2, max_seq_length=32, eval_every=0,
                                 save_every=0, progress=False, output_dir=str(tmp_path / name))
            return LoRATrainer(model, LoRAConfig(rank=2), cfg).train(data).losses
        assert run(datasets.Dataset.from_list(rows), "ds") == run(rows, "list")


# ---- streaming ---------------------------------------------------------------------------------------

def test_stream_reads_the_samples_of_load_dataset(smollm2, reference, tmp_path):
    from ggml_lora.data import stream_rows, stream_samples

    write_table(tmp_path / "train.parquet", records("train"), "parquet")
    report, samples = stream_samples(tmp_path / "train.parquet", smollm2, **KW)
    assert report.n_records == 0                     # nothing read yet
    assert tokens(samples) == reference[0] and report.n_records == len(reference[0])
    # one epoch of stream_rows is a permutation of the samples; epochs differ; a window of 1 keeps the order
    rows = stream_rows(tmp_path / "train.parquet", smollm2, seed=0, shuffle_buffer=16, **KW)
    n = len(reference[0])
    first = [next(rows) for _ in range(2 * n)]
    assert [e for e, _ in first] == [0] * n + [1] * n
    one = [(r.tokens.tolist(), r.mask.tolist()) for _, r in first[:n]]
    two = [(r.tokens.tolist(), r.mask.tolist()) for _, r in first[n:]]
    assert sorted(one) == sorted(reference[0]) == sorted(two) and one != reference[0] and one != two
    plain = stream_rows(tmp_path / "train.parquet", smollm2, seed=0, shuffle_buffer=1, **KW)
    assert [(r.tokens.tolist(), r.mask.tolist()) for _, r in (next(plain) for _ in range(n))] == reference[0]


def test_streamed_training_resumes_exactly(tmp_path, tiny_model_file):
    """streaming=True trains from a .txt read block by block (TXT_BLOCK_BYTES small) and a resumed run
    ends with the same adapter bytes; what is streamed is what the same data gives unstreamed."""
    import os
    import signal

    from conftest import N_THREADS

    import ggml_lora.data as data
    from ggml_lora import BaseModel, LoRAConfig, LoRATrainer, TrainingConfig

    rng = np.random.default_rng(0)
    words = ["north", "river", "stone", "the", "of", "town", "bell", "mill"]
    path = tmp_path / "big.txt"
    path.write_text("\n".join(" ".join(rng.choice(words, 12)) for _ in range(12)) + "\n")
    valid = [" ".join(rng.choice(words, 12)) for _ in range(4)]
    old = data.TXT_BLOCK_BYTES
    data.TXT_BLOCK_BYTES = 200
    try:
        with BaseModel.load(tiny_model_file("llama", "f32"), n_threads=N_THREADS) as model:
            def cfg(name, **kw):
                return TrainingConfig(**{**dict(max_steps=8, batch_size=2, learning_rate=1e-2, max_seq_length=24,
                                                eval_every=4, save_every=3, progress=False, seed=2, streaming=True,
                                                shuffle_buffer=5, output_dir=str(tmp_path / name)), **kw})
            lora = LoRAConfig(rank=2, dropout=0.1)
            straight = LoRATrainer(model, lora, cfg("straight")).train(path, valid=valid)
            assert straight.global_step == 8 and straight.losses[-1] < straight.losses[0]
            assert straight.steps[-1]["epoch"] >= 1            # the stream wrapped around at least once

            class InterruptAt:
                def on_step(self, trainer, rec):
                    if rec["step"] == 5:
                        os.kill(os.getpid(), signal.SIGINT)

            first = LoRATrainer(model, lora, cfg("resumed")).train(path, valid=valid, callbacks=[InterruptAt()])
            second = LoRATrainer(model, lora, cfg("resumed")).train(path, valid=valid, resume_from=True)
            assert first.losses + second.losses == straight.losses
            assert second.adapter_path.read_bytes() == straight.adapter_path.read_bytes()
            # streaming without shuffling sees the rows load_dataset gives, in order
            unshuffled = LoRATrainer(model, lora, cfg("w1", shuffle_buffer=1, max_steps=2, eval_every=0))
            rows_seen = []

            class Spy:
                def on_step(self, trainer, rec):
                    rows_seen.append(rec["supervised_tokens"])
            unshuffled.train(path, callbacks=[Spy()])
            samples, _ = data.load_dataset(path, model, max_seq_length=24)
            assert rows_seen == [int(sum(s.mask.sum() for s in samples[i:i + 2])) for i in (0, 2)]
    finally:
        data.TXT_BLOCK_BYTES = old
    with pytest.raises(InvalidArgumentError, match="needs max_steps"):
        TrainingConfig(streaming=True)
