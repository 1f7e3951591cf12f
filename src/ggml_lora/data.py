"""Training data: files or lists of records -> tokenized samples with loss masks -> rows -> batches.

Sources: .txt and .jsonl files (either gzip-compressed), Parquet and Arrow files (pyarrow), a folder
holding {split}.<one of those>, a Hugging Face datasets.Dataset / IterableDataset / DatasetDict (or a
save_to_disk folder of one), or a list of strings or dicts.

Formats, detected from each record's keys (one format per source; anything else is an error that
names the file and line, or the list index):

  text        a .txt file, {"text": ...} records, or a list of strings
  completion  {"prompt": ..., "completion": ...}
  chat        {"messages": [{"role": ..., "content": ...}, ...]}, rendered with the GGUF's own
              tokenizer.chat_template or a template passed in (see chat.py)

Tokens: the GGUF's own tokenizer, with special-token strings parsed as llama.cpp parses prompts. BOS
is added where the model's tokenizer adds one (tokenizer.ggml.add_bos_token), except when the text
already begins with the BOS string, as chat templates often write it. An EOS is appended, and
supervised, after every {"text"} record and every completion; a chat turn ends with whatever the
template writes (ChatML's <|im_end|>, Llama-3's <|eot_id|>, ...).

Loss: text, every token; completion, the completion and its EOS (train_on_prompt: the prompt too);
chat, every assistant turn with its end-of-turn marker (train_on_prompt: everything). The text is
tokenized whole, once, and the spans are mapped onto its tokens by byte offsets, so a span boundary
never changes the tokenization; a token that straddles a boundary is supervised.

A .txt file is one stream, cut into windows of max_seq_length tokens: with a BOS, [BOS] + the next
max_seq_length-1 tokens; without one, consecutive windows share one token so that every token but
the file's first is a target exactly once. It is tokenized in blocks of about 1 MiB that end at a
line end, and no EOS is appended. Records longer than max_seq_length are truncated, or dropped with
truncation="drop".
"""

from __future__ import annotations

import gzip
import json
import os
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from ._handles import Batch
from .chat import ChatTemplate, Tokenizer, kind_of, check_messages, render_with_spans
from .errors import ContextLengthError, DatasetError, InvalidArgumentError

MAX_LINE_BYTES = 64 << 20      # a longer line is an error rather than an out-of-memory
TXT_BLOCK_BYTES = 1 << 20      # .txt files are tokenized in blocks of about this size
TRUNCATION = ("truncate", "drop")
SPLITS = ("train", "valid", "test")
_KEYS = {"text": ("text",), "completion": ("prompt", "completion"), "chat": ("messages",)}


@dataclass(frozen=True)
class Sample:
    """One training example after tokenization."""

    tokens: np.ndarray     # (T,) int32
    mask: np.ndarray       # (T,) bool: tokens[t] is a target, predicted from position t-1; mask[0] is False


@dataclass
class DataReport:
    """What loading did. For a split made with valid_fraction, n_records, n_truncated, n_dropped and
    skipped describe the whole source, the other counts the split."""

    source: str
    format: str                  # "text" | "completion" | "chat"
    n_records: int = 0           # records read (lines of a .txt file)
    n_samples: int = 0
    n_truncated: int = 0         # samples cut to max_seq_length
    n_dropped: int = 0           # samples removed for length (drop, or truncation left no target)
    n_tokens: int = 0
    n_supervised: int = 0        # tokens that carry loss
    skipped: dict[str, int] = field(default_factory=dict)   # reason -> records skipped

    def to_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        skipped = "".join(f", {n} skipped ({why})" for why, n in sorted(self.skipped.items()))
        return (f"{self.source}: {self.format}, {self.n_records} records -> {self.n_samples} samples "
                f"({self.n_truncated} truncated, {self.n_dropped} dropped{skipped}), {self.n_tokens} tokens, "
                f"{self.n_supervised} supervised")

    def _skip(self, why: str) -> None:
        self.skipped[why] = self.skipped.get(why, 0) + 1


@dataclass(frozen=True)
class Row:
    """One sequence of a micro-batch: one sample, or several packed ones."""

    tokens: np.ndarray                # (T,) int32
    mask: np.ndarray                  # (T,) bool
    segments: np.ndarray | None       # (T,) int32 sample ids 0,0,0,1,1,2,...; None for a single sample


# ---- reading sources --------------------------------------------------------------------------------

def _read_lines(f, path: Path) -> Iterator[tuple[str, str]]:
    lineno = 0
    while raw := f.readline(MAX_LINE_BYTES + 1):
        lineno += 1
        where = f"{path}:{lineno}"
        if len(raw) > MAX_LINE_BYTES:
            raise DatasetError(f"{where}: the line is longer than {MAX_LINE_BYTES} bytes")
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise DatasetError(f"{where}: not valid UTF-8 (byte {e.start} of the line: {e.reason})") from None
        yield where, line[1:] if lineno == 1 and line.startswith("\ufeff") else line


def _lines(path: Path) -> Iterator[tuple[str, str]]:
    """(where, line) for each line of a UTF-8 file, gzip-compressed when its name ends in .gz, checked
    for size and encoding."""
    if path.suffix != ".gz":
        with open(path, "rb") as f:
            yield from _read_lines(f, path)
        return
    try:
        with gzip.open(path, "rb") as f:
            yield from _read_lines(f, path)
    except (OSError, EOFError, zlib.error) as e:           # gzip.BadGzipFile is an OSError
        raise DatasetError(f"{path}: not a readable gzip file ({e})") from None


SPLIT_SUFFIXES = (".jsonl", ".jsonl.gz", ".parquet", ".arrow")
RECORD_BATCH_ROWS = 1024       # Parquet and Arrow files are read this many rows at a time


def split_file(folder: Path, split: str) -> Path | None:
    """A dataset folder's file for ``split``: {split}.jsonl, .jsonl.gz, .parquet or .arrow, the first
    that exists; None if none does."""
    for suffix in SPLIT_SUFFIXES:
        if (folder / (split + suffix)).is_file():
            return folder / (split + suffix)
    return None


def _pyarrow(path: Path):
    try:
        import pyarrow
        import pyarrow.ipc  # noqa: F401
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        raise DatasetError(f"{path}: reading {path.suffix} files needs pyarrow: pip install 'ggml-lora[parquet]'") from None
    return pyarrow


def _table_records(path: Path) -> Iterator[tuple[str, Any]]:
    """(where, record) per row of a Parquet file or an Arrow IPC file or stream (what Hugging Face
    datasets' save_to_disk writes), read RECORD_BATCH_ROWS rows at a time."""
    pa = _pyarrow(path)
    try:
        if path.suffix == ".parquet":
            batches = pa.parquet.ParquetFile(path).iter_batches(batch_size=RECORD_BATCH_ROWS)
        else:
            source = pa.memory_map(str(path))
            try:
                reader = pa.ipc.open_file(source)
                batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
            except pa.ArrowInvalid:
                source.seek(0)
                batches = iter(pa.ipc.open_stream(source))
        row = 0
        for batch in batches:
            for record in batch.to_pylist():
                row += 1
                yield f"{path}: row {row}", record
    except (pa.ArrowException, OSError) as e:
        raise DatasetError(f"{path}: not a readable {path.suffix[1:]} file ({e})") from None


def _is_hf_dataset(source: Any) -> bool:
    return type(source).__module__.split(".")[0] == "datasets" and hasattr(source, "__iter__")


HF_SPLITS = {"train": ("train",), "valid": ("validation", "valid", "dev"), "test": ("test",)}


def _hf_split(source: Any, split: str):
    """The split of a datasets.DatasetDict / IterableDatasetDict (HF names: train, validation, test),
    or the Dataset itself; None when a dict has no such split."""
    if not isinstance(source, dict):
        return source if split == "train" else None
    for name in HF_SPLITS[split]:
        if name in source:
            return source[name]
    if split == "train":
        raise DatasetError(f"the DatasetDict has no train split (it has {', '.join(map(str, source))})")
    return None


def _hf_records(source: Any, label: str) -> Iterator[tuple[str, Any]]:
    for i, record in enumerate(source):
        yield f"{label}[{i}]", record


def _load_from_disk(path: Path):
    try:
        import datasets
    except ImportError:
        raise DatasetError(f"{path} is a Hugging Face datasets folder (save_to_disk); reading it needs "
                           "datasets: pip install 'ggml-lora[datasets]'") from None
    try:
        return datasets.load_from_disk(str(path))
    except Exception as e:                 # whatever datasets raises for a damaged folder
        raise DatasetError(f"{path}: cannot load the datasets folder ({type(e).__name__}: {e})") from None


def is_hf_folder(path: Path) -> bool:
    return (path / "dataset_dict.json").is_file() or (path / "state.json").is_file()


def _jsonl(path: Path) -> Iterator[tuple[str, Any]]:
    """(where, parsed object) per line; None for a blank line."""
    for where, line in _lines(path):
        if not line.strip():
            yield where, None
            continue
        try:
            yield where, json.loads(line)
        except json.JSONDecodeError as e:
            raise DatasetError(f"{where}: malformed JSON: {e.msg} (column {e.colno})") from None
        except RecursionError:
            raise DatasetError(f"{where}: the JSON is nested too deeply to read") from None


def open_source(source, split: str) -> tuple[str, str, Iterator[tuple[str, Any]]]:
    """(label, "txt" | "records", items): items are (where, line) for txt, (where, record) otherwise."""
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if path.is_dir() and is_hf_folder(path):
            source = _load_from_disk(path)
        elif path.is_dir():
            path = split_file(path, split)
            if path is None:
                raise DatasetError(f"{source}: the folder has no {split} file ({', '.join(split + x for x in SPLIT_SUFFIXES)})")
        elif not path.exists():
            raise FileNotFoundError(2, "no such dataset file", str(path))
        if isinstance(source, (str, os.PathLike)):
            kind = "".join(path.suffixes[-2:]) if path.suffix == ".gz" else path.suffix
            if kind in (".txt", ".txt.gz"):
                return str(path), "txt", _lines(path)
            if kind in (".jsonl", ".jsonl.gz"):
                return str(path), "records", _jsonl(path)
            if kind in (".parquet", ".arrow"):
                return str(path), "records", _table_records(path)
            raise DatasetError(f"{path}: unknown dataset file type '{kind}' (expected .txt, .jsonl, either "
                               "gzip-compressed (.gz), .parquet, .arrow, or a folder)")
        label = f"{path} ({split})"
        chosen = _hf_split(source, split)
        if chosen is None:
            raise DatasetError(f"{path}: the datasets folder has no {split} split")
        return label, "records", _hf_records(chosen, label)
    if _is_hf_dataset(source):
        chosen = _hf_split(source, split)
        if chosen is None:
            raise DatasetError(f"the DatasetDict has no {' or '.join(HF_SPLITS[split])} split")
        label = f"<{type(chosen).__name__}>" if split == "train" else f"<{type(chosen).__name__} {split}>"
        return label, "records", _hf_records(chosen, label)
    if isinstance(source, (list, tuple)):
        items = [(f"records[{i}]", {"text": r} if isinstance(r, str) else r) for i, r in enumerate(source)]
        return f"<list of {len(source)} records>", "records", iter(items)
    raise InvalidArgumentError(f"source: expected a path, a folder, a list of strings or dicts, or a Hugging Face "
                               f"datasets.Dataset, got {kind_of(source)}")


def _format_of(record: Any, where: str) -> str:
    if not isinstance(record, dict):
        raise DatasetError(f"{where}: expected an object (a dict), got {kind_of(record)}")
    # a null value counts as absent: a table (Parquet, Arrow, datasets) has every column in every row
    keys = sorted(str(k) for k, v in record.items() if v is not None)
    nulls = sorted(str(k) for k, v in record.items() if v is None)
    shown = f"keys {keys}" + (f", null {nulls}" if nulls else "")
    found = [fmt for fmt, names in _KEYS.items() if any(k in keys for k in names)]
    if not found:
        raise DatasetError(f"{where}: unknown record format, {shown}; expected 'text', "
                           "'prompt' and 'completion', or 'messages'")
    if len(found) > 1:
        raise DatasetError(f"{where}: the record mixes the {found[0]} and {found[1]} formats ({shown})")
    for key in _KEYS[found[0]]:
        if key not in keys:
            raise DatasetError(f"{where}: a {found[0]} record needs {' and '.join(map(repr, _KEYS[found[0]]))}; "
                               f"{key!r} is {'null' if key in nulls else 'missing'}")
        if found[0] != "chat" and not isinstance(record[key], str):
            raise DatasetError(f"{where}: '{key}' must be a string, got {kind_of(record[key])}")
    return found[0]


# ---- records -> samples -----------------------------------------------------------------------------

class SampleBuilder:
    def __init__(self, model, report: DataReport, max_seq_length: int, truncation: str, train_on_prompt: bool,
                 chat_template: str | None):
        self.model, self.report, self.tok = model, report, Tokenizer(model)
        self.max_seq_length, self.truncation, self.train_on_prompt = max_seq_length, truncation, train_on_prompt
        self.chat_template, self._template = chat_template, None
        self.samples: list[Sample] = []

    def template(self, where: str) -> ChatTemplate:
        if self._template is None:
            source, origin = self.chat_template, "the given chat template"
            if source is None:
                from .gguf_header import read_header

                source = read_header(self.model.path).get("tokenizer.chat_template")
                origin = f"the chat template of {Path(self.model.path).name}"
                if not isinstance(source, str) or not source:
                    raise DatasetError(f"{where}: chat data needs a chat template, and {self.model.path} has no "
                                       "tokenizer.chat_template; pass one (chat_template= / --chat-template: a "
                                       "file, Jinja text or a built-in: chatml, gemma, llama3), or use "
                                       "prompt/completion data")
            self._template = ChatTemplate(source, self.tok.bos_text, self.tok.eos_text, origin)
        return self._template

    def record(self, fmt: str, record: dict, where: str) -> None:
        tok = self.tok
        if fmt == "text":
            if not record["text"]:
                self.report._skip("empty text")
                return
            tokens, mask = tok.encode(record["text"], None, where)
            tokens, mask = tokens + tok.eos, np.concatenate([mask, np.ones(len(tok.eos), bool)])
        elif fmt == "completion":
            text = record["prompt"] + record["completion"]
            span = (0 if self.train_on_prompt else len(record["prompt"]), len(text))
            tokens, mask = tok.encode(text, [span], where)
            tokens, mask = tokens + tok.eos, np.concatenate([mask, np.ones(len(tok.eos), bool)])
        else:
            messages = check_messages(record["messages"], where)
            text, spans = render_with_spans(self.template(where), messages, where)
            tokens, mask = tok.encode(text, [(0, len(text))] if self.train_on_prompt else spans, where)
        self.add(tokens, mask)

    def add(self, tokens: Sequence[int], mask: np.ndarray) -> None:
        mask = mask.copy()
        mask[:1] = False
        if not mask.any():
            self.report._skip("no supervised token")
            return
        if len(tokens) > self.max_seq_length:
            tokens, mask = tokens[:self.max_seq_length], mask[:self.max_seq_length]
            if self.truncation == "drop" or not mask.any():
                self.report.n_dropped += 1
                return
            self.report.n_truncated += 1
        self.samples.append(Sample(np.asarray(tokens, dtype=np.int32), mask))

    def drain(self) -> list[Sample]:
        out, self.samples = self.samples, []
        return out

    def text_stream(self, lines: Iterator[tuple[str, str]]) -> Iterator[list[Sample]]:
        """Tokenize a .txt file block by block and cut the stream into windows; yields each block's
        windows as soon as they are complete, so a file larger than memory streams."""
        ids: list[int] = []
        block: list[str] = []
        size = 0
        where = ""
        first = True
        bos = self.tok.bos_prefix
        n = self.max_seq_length - 1   # targets per window; windows start every n tokens

        def tokenize() -> None:
            nonlocal ids, block, size, first
            new = self.tok.encode("".join(block), None, where, add_bos=False)[0]
            if first and new[:len(bos)] == bos:
                new = new[len(bos):]  # the text began with the BOS string; each window gets its own
            ids += new
            block, size, first = [], 0, False

        def windows(final: bool) -> None:
            nonlocal ids
            extra = 0 if bos else 1   # without a BOS, consecutive windows share one token
            i = 0
            while i < len(ids) - extra and (final or i + n + extra <= len(ids)):
                window = bos + ids[i:i + n] if bos else ids[i:i + n + 1]
                self.add(window, np.ones(len(window), dtype=bool))
                i += n
            ids = ids[i:]

        for where, line in lines:
            self.report.n_records += 1
            block.append(line)
            size += len(line)
            if size >= TXT_BLOCK_BYTES:
                tokenize()
                windows(False)
                yield self.drain()
        if block:
            tokenize()
        windows(True)
        yield self.drain()

    def records(self, items: Iterator[tuple[str, Any]]) -> Iterator[list[Sample]]:
        """Check and tokenize records one at a time; yields each record's sample (or none)."""
        first = None                  # (format, where) of the first record
        for where, record in items:
            if record is None:
                self.report._skip("blank line")
                continue
            fmt = _format_of(record, where)
            if first is None:
                first = (fmt, where)
                self.report.format = fmt
            elif fmt != first[0]:
                raise DatasetError(f"{where}: a {fmt} record, but {first[1]} is a {first[0]} record; "
                                   "a dataset holds one format")
            self.report.n_records += 1
            self.record(fmt, record, where)
            yield self.drain()


def check_lengths(max_seq_length: int, truncation: str, model) -> None:
    if isinstance(max_seq_length, bool) or not isinstance(max_seq_length, int) or max_seq_length < 2:
        raise InvalidArgumentError(f"max_seq_length={max_seq_length!r}: must be an integer >= 2")
    n_ctx = getattr(model, "n_ctx", None)
    if n_ctx is not None and max_seq_length > n_ctx:
        raise ContextLengthError(f"max_seq_length={max_seq_length} is longer than the model's n_ctx={n_ctx} "
                                 "(pass n_ctx= to BaseModel.load)")
    if truncation not in TRUNCATION:
        raise InvalidArgumentError(f"truncation={truncation!r}: must be one of {', '.join(TRUNCATION)}")


def load_dataset(source, model, *, max_seq_length: int, truncation: str = "truncate", train_on_prompt: bool = False,
                 chat_template: str | None = None, split: str = "train") -> tuple[list[Sample], DataReport]:
    """Read and tokenize ``source`` (see the module docstring; a folder or a DatasetDict gives its
    ``split``). Errors are DatasetError naming the file and line or row, or the list index."""
    check_lengths(max_seq_length, truncation, model)
    if split not in SPLITS:
        raise InvalidArgumentError(f"split={split!r}: must be one of {', '.join(SPLITS)}")
    if chat_template is not None and not isinstance(chat_template, str):
        raise InvalidArgumentError(f"chat_template: expected a Jinja template string, got {kind_of(chat_template)}")
    report, chunks = _sample_chunks(source, model, max_seq_length, truncation, train_on_prompt, chat_template, split)
    samples = [s for chunk in chunks for s in chunk]
    if not samples:
        raise _empty(report)
    _count(report, samples)
    return samples, report


def _empty(report: DataReport) -> DatasetError:
    why = "no records" if report.n_records == 0 else f"none of its {report.n_records} records gave a sample"
    return DatasetError(f"{report.source}: empty dataset ({why}; dropped {report.n_dropped}, skipped {report.skipped})")


def _sample_chunks(source, model, max_seq_length, truncation, train_on_prompt, chat_template, split):
    """(report, lazy iterator of sample lists): the report fills in as the iterator is consumed."""
    label, kind, items = open_source(source, split)
    report = DataReport(label, "text")
    loader = SampleBuilder(model, report, max_seq_length, truncation, bool(train_on_prompt), chat_template)
    return report, (loader.text_stream(items) if kind == "txt" else loader.records(items))


def stream_samples(source, model, *, max_seq_length: int, truncation: str = "truncate",
                   train_on_prompt: bool = False, chat_template: str | None = None) -> tuple[DataReport, Iterator[Sample]]:
    """``source``'s samples one at a time, read and tokenized as they are consumed (load_dataset's
    samples, in order, without holding them all); the report counts what has been read so far."""
    check_lengths(max_seq_length, truncation, model)
    report, chunks = _sample_chunks(source, model, max_seq_length, truncation, train_on_prompt, chat_template, "train")
    return report, (s for chunk in chunks for s in chunk)


def _count(report: DataReport, samples: list[Sample]) -> DataReport:
    report.n_samples = len(samples)
    report.n_tokens = sum(len(s.tokens) for s in samples)
    report.n_supervised = int(sum(int(s.mask.sum()) for s in samples))
    return report


def _has_valid_split(source) -> bool:
    """A folder with a valid.* file, a save_to_disk DatasetDict with a validation split, or such a
    DatasetDict in memory."""
    if isinstance(source, (str, os.PathLike)) and Path(source).is_dir():
        folder = Path(source)
        if (folder / "dataset_dict.json").is_file():
            try:
                splits = json.loads((folder / "dataset_dict.json").read_text()).get("splits", [])
            except (ValueError, OSError, AttributeError):
                return False
            return any(name in splits for name in HF_SPLITS["valid"])
        return split_file(folder, "valid") is not None
    return _is_hf_dataset(source) and isinstance(source, dict) and any(n in source for n in HF_SPLITS["valid"])


def own_validation(source, valid, valid_fraction: float) -> bool:
    """Whether ``source`` has its own validation split; at most one of that, ``valid`` and
    ``valid_fraction`` may give validation data."""
    if isinstance(valid_fraction, bool) or not isinstance(valid_fraction, (int, float)) or not 0 <= valid_fraction < 1:
        raise InvalidArgumentError(f"valid_fraction={valid_fraction!r}: must be in [0, 1)")
    own = _has_valid_split(source)
    given = [name for name, on in (("the source's own validation split", own), ("valid=", valid is not None),
                                   ("valid_fraction=", valid_fraction > 0)) if on]
    if len(given) > 1:
        raise InvalidArgumentError(f"validation data is given twice: {' and '.join(given)}; keep one")
    return own


def hold_out(items: list, fraction: float, seed: int, source: str) -> tuple[list, list]:
    """(the rest, a seeded ``fraction`` of ``items``), each in the original order."""
    n_valid = max(1, round(len(items) * fraction))
    if n_valid >= len(items):
        raise DatasetError(f"{source}: {len(items)} samples are too few to hold out valid_fraction={fraction}")
    held = set(np.random.default_rng(seed).permutation(len(items))[:n_valid].tolist())
    return [s for i, s in enumerate(items) if i not in held], [s for i, s in enumerate(items) if i in held]


def load_splits(source, model, *, valid=None, valid_fraction: float = 0.0, seed: int = 0,
                **kw) -> tuple[list[Sample], list[Sample], dict[str, DataReport]]:
    """(train samples, validation samples, {"train": report, "valid": report}).

    The validation set is the folder's valid file (valid.jsonl, .jsonl.gz, .parquet, .arrow) or a
    DatasetDict's validation split, or ``valid`` (any source load_dataset takes), or a
    seeded ``valid_fraction`` of the samples (each split keeps the source's order); at most one of
    them. Without any, it is empty and the reports have no "valid". A folder's test.jsonl is not read
    here: load_dataset(folder, split="test").
    """
    folder_valid = own_validation(source, valid, valid_fraction)
    train, report = load_dataset(source, model, **kw)
    reports = {"train": report}
    if folder_valid:
        valid_samples, reports["valid"] = load_dataset(source, model, split="valid", **kw)
    elif valid is not None:
        valid_samples, reports["valid"] = load_dataset(valid, model, **kw)
    elif valid_fraction > 0:
        train, valid_samples = hold_out(train, valid_fraction, seed, report.source)
        note = f" (held out {valid_fraction:g}, seed {seed})"
        reports = {"train": _count(replace(report, source=report.source + note, skipped=dict(report.skipped)), train),
                   "valid": _count(replace(report, source=report.source + note, skipped=dict(report.skipped)),
                                   valid_samples)}
    else:
        valid_samples = []
    return train, valid_samples, reports


def stream_rows(source, model, *, seed: int, shuffle_buffer: int, **kw) -> Iterator[tuple[int, Row]]:
    """(epoch, row) without end: each epoch reads ``source`` again (stream_samples) and shuffles its
    rows within a window of ``shuffle_buffer``, seeded by (seed, epoch), as datasets' IterableDataset
    shuffles. Deterministic, so skipping the rows of finished steps resumes exactly."""
    epoch = 0
    while True:
        report, samples = stream_samples(source, model, **kw)
        rng = np.random.default_rng([seed, epoch])
        window: list[Row] = []
        n = 0
        for s in samples:
            row = Row(s.tokens, s.mask, None)
            if len(window) < shuffle_buffer:
                window.append(row)
                continue
            i = int(rng.integers(len(window)))
            yield epoch, window[i]
            window[i] = row
            n += 1
        for i in rng.permutation(len(window)):
            yield epoch, window[i]
            n += 1
        if n == 0:
            raise _empty(report)
        epoch += 1


# ---- samples -> rows -> batches ---------------------------------------------------------------------

def make_rows(samples: Sequence[Sample], *, max_seq_length: int, packing: bool, seed: int = 0) -> list[Row]:
    """One row per sample (in order), or with ``packing`` samples packed greedily, in a seeded shuffled
    order, into rows of at most max_seq_length tokens; attention stays inside each sample."""
    for i, s in enumerate(samples):
        if len(s.tokens) > max_seq_length:
            raise InvalidArgumentError(f"samples[{i}] has {len(s.tokens)} tokens, more than "
                                       f"max_seq_length={max_seq_length}")
    if not packing:
        return [Row(s.tokens, s.mask, None) for s in samples]
    rows: list[Row] = []
    group: list[Sample] = []
    length = 0
    for i in np.random.default_rng(seed).permutation(len(samples)):
        s = samples[i]
        if group and length + len(s.tokens) > max_seq_length:
            rows.append(_pack(group))
            group, length = [], 0
        group.append(s)
        length += len(s.tokens)
    if group:
        rows.append(_pack(group))
    return rows


def _pack(group: list[Sample]) -> Row:
    if len(group) == 1:
        return Row(group[0].tokens, group[0].mask, None)
    segments = np.repeat(np.arange(len(group), dtype=np.int32), [len(s.tokens) for s in group])
    return Row(np.concatenate([s.tokens for s in group]), np.concatenate([s.mask for s in group]), segments)


def n_targets(row: Row) -> int:
    """The supervised tokens ``collate`` makes of ``row`` (whatever it is batched with): masked tokens that
    are not the first of their segment."""
    keep = np.asarray(row.mask[1:], dtype=bool)
    if row.segments is not None:
        keep = keep & (row.segments[1:] == row.segments[:-1])
    return int(keep.sum())


def _joined(rows: Sequence[Row]) -> Row:
    """``rows`` end to end as one row, each keeping its own segments (renumbered to stay distinct)."""
    if len(rows) == 1:
        return rows[0]
    segs, first = [], 0
    for r in rows:
        seg = np.zeros(len(r.tokens), np.int32) if r.segments is None else np.asarray(r.segments, np.int32)
        segs.append(seg + first)
        first += int(seg.max()) + 1 if len(seg) else 0
    return Row(np.concatenate([r.tokens for r in rows]), np.concatenate([r.mask for r in rows]), np.concatenate(segs))


def collate(rows: Sequence[Row], model=None, seq_keys=None, pack: bool = False) -> Batch:
    """A Batch of ``rows`` padded to the longest, with the model's EOS (token 0 without a model).
    ``seq_keys``: one dropout key per row (see Batch), so a row's dropout mask does not depend on
    which micro-batch or process it lands in.

    ``pack``: the rows end to end in one sequence, each its own segment, so the batch holds no padding;
    the training and loss graphs run each segment's attention against its own keys only (one chunk per
    sample), so a packed batch costs the linear layers its real tokens and the attention the sum of its
    rows' squares. Loss and gradients are those of the padded batch up to float summation order.
    Dropout masks are keyed by sequence and position, so a packed batch cannot keep ``seq_keys``'
    per-row masks: ``pack`` refuses them (pack only without dropout).

    Padding is a segment of its own and never a target, nor is the first token of any segment.
    loss_rows are the flattened positions (row * T + t - 1) that predict the targets t, ascending.
    """
    if not rows:
        raise InvalidArgumentError("collate: no rows")
    if pack:
        if seq_keys is not None:
            raise InvalidArgumentError("collate: pack=True cannot keep per-row dropout keys (seq_keys)")
        rows = [_joined(rows)]
    n, T = len(rows), max(len(r.tokens) for r in rows)
    pad = 0
    if model is not None:
        eos = model._llama_vocab().token_eos()
        pad = max(eos, 0)
    tokens = np.full((n, T), pad, dtype=np.int32)        # (n_seq, n_tokens)
    mask = np.zeros((n, T), dtype=bool)
    need_segments = any(r.segments is not None or len(r.tokens) < T for r in rows)
    segments = np.zeros((n, T), dtype=np.int32) if need_segments else None
    for i, r in enumerate(rows):
        L = len(r.tokens)
        tokens[i, :L], mask[i, :L] = r.tokens, r.mask
        if segments is not None:
            seg = np.zeros(L, np.int32) if r.segments is None else r.segments
            segments[i, :L] = seg
            segments[i, L:] = int(seg.max()) + 1 if L else 0
    mask[:, 0] = False
    if segments is not None:
        mask[:, 1:] &= segments[:, 1:] == segments[:, :-1]
    seq, pos = np.nonzero(mask)
    if len(seq) == 0:
        raise InvalidArgumentError("collate: the rows have no supervised token")
    return Batch(tokens, segments, loss_rows=seq * T + pos - 1, labels=tokens[seq, pos], seq_keys=seq_keys)
