"""Training data: every format parses, loss masks cover exactly the supervised tokens under three chat
templates, packing leaves losses unchanged, truncation and splits are counted, errors name file and row."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import N_THREADS

from ggml_lora import Adapter, BaseModel, InvalidArgumentError, LoRAConfig
from ggml_lora._handles import Batch
from ggml_lora._native import check, ffi, lib
from ggml_lora.chat import ChatTemplate
from ggml_lora.data import Row, Sample, collate, load_dataset, load_splits, make_rows, n_targets
from ggml_lora.errors import DatasetError
from ggml_lora.step import TrainingContext

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
sys.path.insert(0, str(EXAMPLES))
from textgen import english_text  # noqa: E402

# Written from the formats' documented structure; role 'assistant' is 'model' in Gemma, which has no
# system role and puts the system text at the top of the first user turn.
LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
GEMMA_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{% set prefix = messages[0]['content'] + '\n\n' %}"
    "{% set loop_messages = messages[1:] %}{% else %}{% set prefix = '' %}{% set loop_messages = messages %}{% endif %}"
    "{% for message in loop_messages %}{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\n' + (prefix if loop.first else '') + message['content'] | trim }}"
    "{{ '<end_of_turn>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}")
CONVERSATION = [
    {"role": "system", "content": "You answer briefly."},
    {"role": "user", "content": "What is the capital of the island of Vastrell?"},
    {"role": "assistant", "content": "The capital of Vastrell is Quennick."},
    {"role": "user", "content": "And its flag? Use unicode: é, 😀."},
    {"role": "assistant", "content": "Teal and silver, with a 😀 in the corner."},
    {"role": "user", "content": "Thanks!"},
    {"role": "assistant", "content": "You're welcome.\n\nAsk again any time."},
]
ASSISTANT = [m["content"] for m in CONVERSATION if m["role"] == "assistant"]


@pytest.fixture(scope="module")
def tiny(tiny_model_file):
    """A llama model with the llama-spm vocabulary: it adds BOS, and has no chat template."""
    with BaseModel.load(tiny_model_file("llama", "f32"), n_threads=N_THREADS) as model:
        yield model


def detok(model, ids) -> str:
    return model._llama_vocab().detokenize([int(i) for i in ids], special=True).decode("utf-8")


def supervised_runs(model, sample: Sample) -> list[str]:
    """The decoded text of each maximal run of supervised tokens."""
    runs, cur = [], []
    for tok, on in zip(sample.tokens, sample.mask):
        if on:
            cur.append(tok)
        elif cur:
            runs, cur = runs + [cur], []
    return [detok(model, r) for r in runs + ([cur] if cur else [])]


def write_jsonl(path: Path, records) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


# ---- formats ----------------------------------------------------------------------------------------

TEXTS = ["The town of Avenmoor lies on the Silverrun river.", "Kestrel Bay is known for its saffron."]
PAIRS = [{"prompt": "Question: Which river runs past Avenmoor?\nAnswer:", "completion": " The Silverrun."},
         {"prompt": "Q: 2+2?\nA:", "completion": " 4"}]
CHATS = [{"messages": CONVERSATION[1:3]}, {"messages": CONVERSATION}]


def _source(kind: str, tmp: Path):
    if kind == "txt":
        (tmp / "a.txt").write_text(" ".join(TEXTS))
        return tmp / "a.txt"
    if kind == "folder":
        return write_jsonl(tmp / "d" / "train.jsonl", CHATS).parent
    records = {"jsonl text": [{"text": t} for t in TEXTS], "completion": PAIRS, "chat": CHATS,
               "list[str]": TEXTS, "list[dict]": PAIRS}[kind]
    return write_jsonl(tmp / "r.jsonl", records) if kind in ("jsonl text", "completion", "chat") else list(records)


EOS = "<|im_end|>"   # SmolLM2's EOS, also its ChatML end-of-turn
TEXT_DOCS = [t + EOS for t in TEXTS]
ASSISTANT_RUNS = [[a + EOS for a in ASSISTANT[:1]], [a + EOS for a in ASSISTANT]]


@pytest.mark.parametrize("kind, fmt, documents, runs", [
    # text: one supervised run, everything but the first token (nothing predicts it); no EOS in .txt
    ("txt", "text", [" ".join(TEXTS)], None),
    ("jsonl text", "text", TEXT_DOCS, None),
    ("list[str]", "text", TEXT_DOCS, None),
    ("completion", "completion", [p["prompt"] + p["completion"] + EOS for p in PAIRS],
     [[p["completion"] + EOS] for p in PAIRS]),
    ("list[dict]", "completion", [p["prompt"] + p["completion"] + EOS for p in PAIRS],
     [[p["completion"] + EOS] for p in PAIRS]),
    ("chat", "chat", None, ASSISTANT_RUNS),
    ("folder", "chat", None, ASSISTANT_RUNS),
])
def test_each_format_parses(smollm2, tmp_path, kind, fmt, documents, runs):
    samples, report = load_dataset(_source(kind, tmp_path), smollm2, max_seq_length=256)
    assert report.format == fmt and report.n_records == (1 if kind == "txt" else 2)
    assert report.n_samples == len(samples) == (1 if kind == "txt" else 2)
    assert report.n_supervised == sum(int(s.mask.sum()) for s in samples)
    assert report.n_tokens == sum(len(s.tokens) for s in samples)
    for i, s in enumerate(samples):
        assert s.tokens.dtype == np.int32 and s.mask.dtype == bool and not s.mask[0]
        if documents is not None:
            assert detok(smollm2, s.tokens) == documents[i]
        if runs is None:
            assert s.mask[1:].all()
        else:
            assert supervised_runs(smollm2, s) == runs[i]
    assert json.loads(json.dumps(report.to_dict()))["format"] == fmt


def test_completion_train_on_prompt(smollm2):
    (s,), _ = load_dataset(PAIRS[:1], smollm2, max_seq_length=256, train_on_prompt=True)
    assert s.mask[1:].all()
    assert detok(smollm2, s.tokens) == PAIRS[0]["prompt"] + PAIRS[0]["completion"] + "<|im_end|>"


@pytest.mark.parametrize("model_name", ["smollm2", "tiny"])
@pytest.mark.parametrize("lines", [2, 9])
def test_txt_windows_cover_the_stream_once(request, tmp_path, monkeypatch, model_name, lines):
    """With 9 lines every line is a block of its own (TXT_BLOCK_BYTES=1): windows are cut as blocks
    arrive, and still cover the stream once."""
    import ggml_lora.data as data

    model = request.getfixturevalue(model_name)
    text = english_text(40, seed=3)
    cuts = [len(text) * i // lines for i in range(lines + 1)]
    parts = [text[a:b] + ("\n" if i < lines - 1 else "") for i, (a, b) in enumerate(zip(cuts, cuts[1:]))]
    path = tmp_path / "towns.txt"
    path.write_text("".join(parts))
    if lines == 2:
        stream = model.tokenize(path.read_text(), add_special=False, parse_special=True)
    else:
        monkeypatch.setattr(data, "TXT_BLOCK_BYTES", 1)
        stream = [t for p in parts for t in model.tokenize(p, add_special=False, parse_special=True)]
    samples, report = load_dataset(path, model, max_seq_length=48)
    bos = model.tokenize("", add_special=True)
    assert report.n_records == lines and report.n_samples == len(samples) > 3
    assert all(len(s.tokens) <= 48 and s.mask[1:].all() and not s.mask[0] for s in samples)
    if bos:   # SPM: each window is [BOS] + 47 new tokens
        assert all(list(s.tokens[:1]) == bos for s in samples)
        assert np.concatenate([s.tokens[1:] for s in samples]).tolist() == stream
    else:     # windows share one token: every token but the first is a target exactly once
        assert all(a.tokens[-1] == b.tokens[0] for a, b in zip(samples, samples[1:]))
        assert np.concatenate([samples[0].tokens[:1]] + [s.tokens[1:] for s in samples]).tolist() == stream
        assert report.n_supervised == len(stream) - 1


# ---- chat templates ---------------------------------------------------------------------------------

def gguf_template(model) -> str:
    from ggml_lora.gguf_header import read_header

    return read_header(model.path).get("tokenizer.chat_template")


@pytest.mark.parametrize("template, marker, user_header", [
    (None, "<|im_end|>", "<|im_start|>user\n"),                                     # SmolLM2's ChatML, from the GGUF
    (LLAMA3_TEMPLATE, "<|eot_id|>", "<|start_header_id|>user<|end_header_id|>\n\n"),
    (GEMMA_TEMPLATE, "<end_of_turn>", "<start_of_turn>user\n"),
])
def test_chat_masks_every_assistant_turn_and_nothing_else(smollm2, template, marker, user_header):
    (s,), report = load_dataset([{"messages": CONVERSATION}], smollm2, max_seq_length=512, chat_template=template)
    expected = [a + marker for a in ASSISTANT]
    if template == LLAMA3_TEMPLATE:
        # <|eot_id|> is plain text to SmolLM2, and its BPE makes one token of the '><' where a turn's
        # <|eot_id|> meets the next <|start_header_id|>: a token straddling the end of a turn holds
        # the marker's last character, so it is supervised (the last turn ends the text: no straddle)
        assert [detok(smollm2, [t]) for t in smollm2.tokenize("|><|start", add_special=False)][1] == "><"
        expected = [e + "<" for e in expected[:-1]] + expected[-1:]
    assert supervised_runs(smollm2, s) == expected
    text = detok(smollm2, s.tokens)
    assert text.count(user_header) == 3 and "You answer briefly." in text
    if template == GEMMA_TEMPLATE:
        assert "<start_of_turn>model\n" in text and "assistant" not in text
    # the whole rendering is tokenized once: the same ids as tokenizing it directly
    rendered = ChatTemplate(template or gguf_template(smollm2), "<|im_start|>", "<|im_end|>").render(
        CONVERSATION, add_generation_prompt=False)
    assert s.tokens.tolist() == smollm2.tokenize(rendered, add_special=True, parse_special=True)
    assert report.n_supervised == int(s.mask.sum())


def test_rendering_matches_llama_cpp_python(smollm2):
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    source = gguf_template(smollm2)
    ours = ChatTemplate(source, "<|im_start|>", "<|im_end|>")
    for gen in (False, True):
        theirs = Jinja2ChatFormatter(source, "<|im_end|>", "<|im_start|>", add_generation_prompt=gen)
        assert ours.render(CONVERSATION, gen) == theirs(messages=CONVERSATION).prompt


def test_span_boundary_inside_a_token(smollm2):
    """The generation prompt ends mid-word: tokenizing the whole text puts 'Answer' in one token that
    straddles the boundary; it is supervised (it holds assistant text), and the ids are the
    tokenization of the whole text, never of pieces glued together."""
    template = ("{% for m in messages %}{% if m['role'] == 'user' %}{{ m['content'] }}\n{% else %}Ans{{ m['content'] }}"
                "{{ eos_token }}\n{% endif %}{% endfor %}{% if add_generation_prompt %}Ans{% endif %}")
    messages = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "wer: 4"}]
    (s,), _ = load_dataset([{"messages": messages}], smollm2, max_seq_length=64, chat_template=template)
    assert s.tokens.tolist() == smollm2.tokenize("2+2?\nAnswer: 4<|im_end|>\n", add_special=False, parse_special=True)
    assert supervised_runs(smollm2, s) == ["Answer: 4<|im_end|>"]


def test_one_bos_on_a_tokenizer_that_adds_it(tiny):
    """tiny's SentencePiece tokenizer adds BOS; the Llama-3 template writes it itself: never two."""
    (s,), _ = load_dataset([{"messages": CONVERSATION[1:5]}], tiny, max_seq_length=512, chat_template=LLAMA3_TEMPLATE)
    bos = tiny.tokenize("", add_special=True)
    assert bos == [1] and s.tokens[0] == 1 and s.tokens[1] != 1
    # a template without bos_token: the tokenizer's BOS is added, once
    template = ("{% for m in messages %}<|{{ m.role }}|>{{ m.content }}</s>{% endfor %}"
                "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    (s,), _ = load_dataset([{"messages": CONVERSATION[1:5]}], tiny, max_seq_length=512, chat_template=template)
    assert s.tokens[0] == 1 and s.tokens[1] != 1
    # </s> is EOS, a special token: supervised; SentencePiece puts a space before the text that
    # follows a special token, which is not part of the content and not supervised
    assert [r.strip() for r in supervised_runs(tiny, s)] == [a + "</s>" for a in ASSISTANT[:2]]
    assert s.tokens[s.mask][-1] == 2


# ---- packing and batches ----------------------------------------------------------------------------

def loss_sum(model, batch) -> float:
    out = ffi.new("double *")
    check(lib.glora_loss(model._handle(), ffi.NULL, 1.0, 0, batch.c, out))
    return out[0]


def test_packed_loss_equals_the_samples_alone(tiny):
    texts = [english_text(n, seed=n) for n in (1, 2, 1, 3, 1, 2, 1)]
    pairs = [{"prompt": english_text(1, seed=10 + i), "completion": english_text(1, seed=20 + i)} for i in range(4)]
    samples = load_dataset(texts, tiny, max_seq_length=128)[0] + load_dataset(pairs, tiny, max_seq_length=128)[0]
    rows = make_rows(samples, max_seq_length=128, packing=True, seed=1)
    assert len(rows) < len(samples) and any(r.segments is not None and r.segments.max() >= 2 for r in rows)
    assert len({len(r.tokens) for r in rows}) > 1                       # so collate pads
    assert sum(len(r.tokens) for r in rows) == sum(len(s.tokens) for s in samples)
    batch = collate(rows, tiny)
    assert batch.segments is not None and batch.n_loss == sum(int(s.mask.sum()) for s in samples)
    alone = sum(loss_sum(tiny, collate([Row(s.tokens, s.mask, None)])) for s in samples)
    # same kernels, other shapes: float32 sums in another order, ~1e-6 relative per token here
    assert loss_sum(tiny, batch) == pytest.approx(alone, rel=1e-4)
    # unpacked, padded rows give the same sum as well
    unpacked = collate(make_rows(samples, max_seq_length=128, packing=False), tiny)
    assert loss_sum(tiny, unpacked) == pytest.approx(alone, rel=1e-4)


def test_collate_packs_short_rows_with_the_padded_gradients(tiny_model_file):
    """pack=True puts the rows end to end in one sequence, each its own segment (the attention runs one
    chunk per sample, and a sample longer than a chunk in several): no padding, the same targets, and
    the loss and LoRA gradients of the padded batch, already-packed rows and gradient checkpointing
    included."""
    path = tiny_model_file("llama", "f32", tied=False)
    lengths = (300, 9, 12, 17, 8, 25, 5)      # 300: longer than the attention's query chunk (256)
    rng = np.random.default_rng(2)
    with BaseModel.load(path, n_threads=N_THREADS) as model:
        rows = []
        for n in lengths:
            mask = np.ones(n, bool)
            mask[: n // 3] = False
            rows.append(Row(rng.integers(0, model.n_vocab, n).astype(np.int32), mask, None))
        rows[3] = Row(rows[3].tokens, rows[3].mask, np.repeat(np.array([0, 1], np.int32), [7, 10]))  # two samples
        padded, packed = collate(rows, model), collate(rows, model, pack=True)
        assert padded.tokens.shape == (7, 300) and packed.tokens.shape == (1, sum(lengths))
        assert packed.n_loss == padded.n_loss == sum(n_targets(r) for r in rows)
        assert packed.labels.tolist() == padded.labels.tolist()
        # row 3's two samples stay two segments: eight in all
        assert len(set(packed.segments[0].tolist())) == 8

        def run(batch, checkpointing):
            with Adapter.init(model, LoRAConfig(rank=4, target_modules=("q_proj", "v_proj", "down_proj", "lm_head"))) as ad:
                r2 = np.random.default_rng(3)
                for t in ad.targets:
                    a, b = ad.get(t)
                    ad.set(t, lora_a=r2.normal(0, 0.2, a.shape), lora_b=r2.normal(0, 0.1, b.shape))
                with TrainingContext(ad, gradient_checkpointing=checkpointing) as ctx:
                    loss = ctx.accumulate(batch, batch.n_loss)
                    return loss, ctx.gradients()

        for checkpointing in (False, True):
            (l0, g0), (l1, g1) = run(padded, checkpointing), run(packed, checkpointing)
            assert l1 == pytest.approx(l0, rel=1e-5)      # float32 sums in another order
            for t in g0:
                for x, y in zip(g0[t], g1[t]):
                    scale = np.abs(x).max()
                    assert scale > 0
                    assert np.abs(x - y).max() <= 1e-5 * scale, t
        # without segments the packed rows would attend to each other: the check can fail
        leaky = Batch(packed.tokens, None, packed.loss_rows, packed.labels)
        assert run(leaky, False)[0] != pytest.approx(run(padded, False)[0], rel=1e-3)
        with pytest.raises(InvalidArgumentError, match="seq_keys"):
            collate(rows, model, seq_keys=np.arange(7), pack=True)


def test_packed_loss_on_smollm2(smollm2):
    chat = [{"role": "system", "content": "Be brief."}] + CONVERSATION[1:3]
    samples = (load_dataset([{"messages": chat}], smollm2, max_seq_length=128)[0]
               + load_dataset(["Kestrel Bay is known for its saffron."], smollm2, max_seq_length=128)[0])
    (row,) = make_rows(samples, max_seq_length=256, packing=True, seed=0)
    assert row.tokens[row.segments == 1].tolist() == samples[1].tokens.tolist()    # the text comes second
    batch = collate([row], smollm2)
    alone = sum(loss_sum(smollm2, collate([Row(s.tokens, s.mask, None)])) for s in samples)
    leaky = loss_sum(smollm2, Batch(batch.tokens, None, batch.loss_rows, batch.labels))  # attends across samples
    # Unlike the tiny F32/Q8_0/Q4_1 models (exact to 1e-7), Q4_1 SmolLM2 gives the same tokens a CE
    # that moves by up to 0.7% with the sequence length and their offset in it, with or without
    # segments (measured; 0.2% here), so the bound is 2%. Letting the text see the conversation
    # before it moves the sum by ~15%, which the bound catches.
    assert loss_sum(smollm2, batch) == pytest.approx(alone, rel=2e-2)
    assert leaky != pytest.approx(alone, rel=5e-2)


def test_collate_padding_is_never_a_target():
    rows = [Row(np.arange(1, 6, dtype=np.int32), np.array([0, 1, 1, 1, 1], bool), None),
            Row(np.arange(10, 19, dtype=np.int32), np.array([0, 1, 1, 0, 1, 1, 1, 0, 1], bool),
                np.array([0, 0, 0, 1, 1, 1, 2, 2, 2], np.int32)),
            Row(np.arange(30, 33, dtype=np.int32), np.ones(3, bool), None)]
    b = collate(rows)
    T = 9
    assert b.tokens.shape == (3, T) and (b.tokens[0, 5:] == 0).all() and (b.tokens[2, 3:] == 0).all()
    assert b.segments[0].tolist() == [0] * 5 + [1] * 4 and b.segments[2].tolist() == [0] * 3 + [1] * 6
    assert (np.diff(b.loss_rows) > 0).all()
    targets = b.loss_rows + 1
    seq, pos = targets // T, targets % T
    assert [(int(s), int(p)) for s, p in zip(seq, pos)] == (
        [(0, t) for t in range(1, 5)] + [(1, t) for t in (1, 2, 4, 5, 8)] + [(2, t) for t in (1, 2)])
    assert b.labels.tolist() == b.tokens[seq, pos].tolist()
    assert collate(rows[:1]).segments is None          # one unpadded, unpacked row: plain causal attention


def test_collate_pads_with_eos(smollm2):
    b = collate([Row(np.array([5, 6, 7], np.int32), np.array([0, 1, 1], bool), None),
                 Row(np.array([5, 6], np.int32), np.array([0, 1], bool), None)], smollm2)
    assert b.tokens[1, 2] == smollm2._llama_vocab().token_eos()


# ---- truncation and splits --------------------------------------------------------------------------

def test_truncate_and_drop_are_counted(smollm2):
    texts = ["short one.", english_text(6, seed=1), "two words", english_text(5, seed=2), english_text(4, seed=3)]
    lengths = [len(smollm2.tokenize(t, add_special=True, parse_special=True)) + 1 for t in texts]   # + EOS
    n_long = sum(n > 24 for n in lengths)
    assert n_long == 3
    kept, rep = load_dataset(texts, smollm2, max_seq_length=24)
    assert (rep.n_samples, rep.n_truncated, rep.n_dropped) == (5, 3, 0)
    assert max(len(s.tokens) for s in kept) == 24 and rep.n_records == 5
    assert kept[1].tokens[-1] != smollm2._llama_vocab().token_eos()       # cut before the EOS
    kept, rep = load_dataset(texts, smollm2, max_seq_length=24, truncation="drop")
    assert (rep.n_samples, rep.n_truncated, rep.n_dropped) == (2, 0, 3)
    # a long prompt leaves no completion token within the limit: dropped, even when truncating
    pair = [{"prompt": english_text(5, seed=4), "completion": " yes"}, PAIRS[1]]
    _, rep = load_dataset(pair, smollm2, max_seq_length=24)
    assert (rep.n_samples, rep.n_truncated, rep.n_dropped) == (1, 0, 1)


def test_seeded_split_is_deterministic(smollm2):
    texts = [f"Record number {i} is about {english_text(1, seed=i)}" for i in range(20)]
    a_train, a_valid, reps = load_splits(texts, smollm2, max_seq_length=64, valid_fraction=0.25, seed=3)
    b_train, b_valid, _ = load_splits(texts, smollm2, max_seq_length=64, valid_fraction=0.25, seed=3)
    _, c_valid, _ = load_splits(texts, smollm2, max_seq_length=64, valid_fraction=0.25, seed=4)
    key = lambda ss: [s.tokens.tobytes() for s in ss]  # noqa: E731
    assert len(a_valid) == 5 and len(a_train) == 15
    assert key(a_train) == key(b_train) and key(a_valid) == key(b_valid)
    assert key(a_valid) != key(c_valid)
    assert sorted(key(a_train) + key(a_valid)) == sorted(key(load_dataset(texts, smollm2, max_seq_length=64)[0]))
    assert reps["valid"].n_samples == 5 and reps["train"].n_samples == 15


def test_folder_splits(smollm2, tmp_path):
    train, valid, reps = load_splits(EXAMPLES / "data" / "facts", smollm2, max_seq_length=256)
    assert reps["train"].format == reps["valid"].format == "chat"
    assert len(train) == reps["train"].n_records and len(valid) == reps["valid"].n_records > 0
    _, valid2, reps2 = load_splits(EXAMPLES / "data" / "completion.jsonl", smollm2, max_seq_length=64)
    assert valid2 == [] and "valid" not in reps2
    with pytest.raises(InvalidArgumentError, match="given twice"):
        load_splits(EXAMPLES / "data" / "facts", smollm2, max_seq_length=256, valid_fraction=0.1)
    folder = write_jsonl(tmp_path / "d" / "train.jsonl", PAIRS).parent
    write_jsonl(folder / "test.jsonl", PAIRS[:1])
    train, valid, reps = load_splits(folder, smollm2, max_seq_length=64, valid=TEXTS)
    assert len(train) == 2 and reps["valid"].format == "text" and len(valid) == len(TEXTS)
    test, rep = load_dataset(folder, smollm2, max_seq_length=64, split="test")
    assert len(test) == 1 and rep.source.endswith("test.jsonl")


def test_example_data_is_small_and_loads(smollm2):
    for path in (EXAMPLES / "data").rglob("*.*"):
        assert path.stat().st_size < 200_000, path
    _, rep = load_dataset(EXAMPLES / "data" / "towns.txt", smollm2, max_seq_length=256)
    assert rep.format == "text" and rep.n_samples >= 20


# ---- errors -----------------------------------------------------------------------------------------

GOOD = json.dumps({"messages": CONVERSATION[1:3]})

# (file name, lines of the file (str or bytes), line the error names, words the message has)
FILE_ERRORS = [
    ("bad.jsonl", [GOOD, '{"messages": [}'], 2, "malformed JSON"),
    ("role.jsonl", [json.dumps({"messages": [{"role": "wizard", "content": "hi"}]})], 1, "unknown role"),
    ("noasst.jsonl", [GOOD, json.dumps({"messages": CONVERSATION[:2]})], 2, "no assistant turn"),
    ("content.jsonl", [json.dumps({"messages": [{"role": "user", "content": ["a", "b"]}]})], 1, "must be a string"),
    ("nullcontent.jsonl", [json.dumps({"messages": [{"role": "assistant", "content": None}]})], 1, "must be a string"),
    ("utf8.jsonl", [GOOD, GOOD, b'{"text": "caf\xe9"}'], 3, "not valid UTF-8"),
    ("utf8.txt", ["fine", b"not \xff fine"], 2, "not valid UTF-8"),
    ("deep.jsonl", [GOOD, "[" * 100_000 + "]" * 100_000], 2, "nested too deeply"),
    ("deeptext.jsonl", ['{"text": ' + "[" * 100_000 + "]" * 100_000 + "}"], 1, "nested too deeply"),
    ("texttype.jsonl", [json.dumps({"text": 5})], 1, "'text' must be a string"),
    ("prompttype.jsonl", [json.dumps({"prompt": "a", "completion": None})], 1, "'completion' is null"),
    ("messagestype.jsonl", [json.dumps({"messages": "hello"})], 1, "must be a non-empty list"),
    ("msgtype.jsonl", [json.dumps({"messages": ["hello"]})], 1, "must be an object"),
    ("roletype.jsonl", [json.dumps({"messages": [{"role": 1, "content": "x"}]})], 1, "role must be a string"),
    ("mixed.jsonl", [json.dumps({"text": "a"}), json.dumps({"text": "b"}), GOOD], 3, "a dataset holds one format"),
    ("ambiguous.jsonl", [json.dumps({"text": "a", "messages": []})], 1, "mixes the text and chat formats"),
    ("unknown.jsonl", [json.dumps({"input": "a", "output": "b"})], 1, "unknown record format"),
    ("missing.jsonl", [json.dumps({"prompt": "a"})], 1, "'completion' is missing"),
    ("array.jsonl", ["[1, 2]"], 1, "expected an object"),
    ("surrogate.jsonl", ['{"text": "bad \\ud800 half"}'], 1, "not valid Unicode"),
    ("raise.jsonl", [json.dumps({"messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "b"},
                                              {"role": "user", "content": "c"}]})], 1, "failed to render"),
]


@pytest.mark.parametrize("name, lines, line, words", FILE_ERRORS, ids=[c[0] for c in FILE_ERRORS])
def test_file_errors_name_file_and_line(smollm2, tmp_path, name, lines, line, words):
    path = tmp_path / name
    path.write_bytes(b"".join((x if isinstance(x, bytes) else x.encode()) + b"\n" for x in lines))
    # 'raise.jsonl' uses a template that rejects non-alternating roles with raise_exception()
    template = ("{% for m in messages %}{% if loop.index0 > 0 and m['role'] == messages[loop.index0 - 1]['role'] %}"
                "{{ raise_exception('roles must alternate') }}{% endif %}{{ m['content'] }}{% endfor %}")
    with pytest.raises(DatasetError, match=re.escape(f"{path}:{line}: ")) as e:
        load_dataset(path, smollm2, max_seq_length=256, chat_template=template if name == "raise.jsonl" else None)
    assert words in str(e.value)


def test_huge_line(smollm2, tmp_path, monkeypatch):
    from ggml_lora import data

    monkeypatch.setattr(data, "MAX_LINE_BYTES", 1000)   # stands for 64 MiB without writing it
    path = tmp_path / "huge.jsonl"
    path.write_text(GOOD + "\n" + json.dumps({"text": "x" * 2000}) + "\n")
    with pytest.raises(DatasetError, match=re.escape(f"{path}:2: the line is longer than 1000 bytes")):
        load_dataset(path, smollm2, max_seq_length=256)


def test_empty_dataset(smollm2, tmp_path):
    for content in ("", "\n\n", json.dumps({"text": ""}) + "\n"):
        path = tmp_path / "empty.jsonl"
        path.write_text(content)
        with pytest.raises(DatasetError, match=re.escape(f"{path}: empty dataset")):
            load_dataset(path, smollm2, max_seq_length=256)
    with pytest.raises(DatasetError, match="empty dataset"):
        load_dataset([], smollm2, max_seq_length=256)


def test_chat_without_template(tiny, tmp_path):
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": CONVERSATION[1:3]}])
    with pytest.raises(DatasetError, match=re.escape(f"{path}:1: chat data needs a chat template")):
        load_dataset(path, tiny, max_seq_length=256)


def test_template_that_rewrites_earlier_turns(smollm2):
    template = "{% for m in messages %}{{ m['content'] }}{% if loop.last %}<end>{% endif %}\n{% endfor %}"
    with pytest.raises(DatasetError, match=r"records\[0\]: .* cannot be located"):
        load_dataset([{"messages": CONVERSATION[1:3]}], smollm2, max_seq_length=256, chat_template=template)


@pytest.mark.parametrize("records, where, words", [
    ([{"text": "a"}, {"messages": CONVERSATION[1:3]}], "records[1]", "a dataset holds one format"),
    ([{"messages": CONVERSATION[1:3]}, {"messages": [{"role": "bot", "content": "x"}]}], "records[1]", "unknown role"),
    (["fine", 7], "records[1]", "expected an object"),
    ([{"prompt": "a", "completion": 3}], "records[0]", "must be a string"),
])
def test_list_errors_name_the_index(smollm2, records, where, words):
    with pytest.raises(DatasetError, match=re.escape(f"{where}: ")) as e:
        load_dataset(records, smollm2, max_seq_length=256)
    assert words in str(e.value)


@pytest.mark.parametrize("kw, exc", [
    ({"max_seq_length": 1}, InvalidArgumentError),
    ({"max_seq_length": 256, "truncation": "cut"}, InvalidArgumentError),
    ({"max_seq_length": 10**9}, InvalidArgumentError),            # over n_ctx
])
def test_bad_arguments(smollm2, kw, exc):
    with pytest.raises(exc):
        load_dataset(TEXTS, smollm2, **kw)


def test_unknown_file_type_and_missing_folder_split(smollm2, tmp_path):
    (tmp_path / "data.csv").write_text("a,b\n")
    with pytest.raises(DatasetError, match="unknown dataset file type"):
        load_dataset(tmp_path / "data.csv", smollm2, max_seq_length=64)
    with pytest.raises(DatasetError, match="has no train file"):
        load_dataset(tmp_path, smollm2, max_seq_length=64)


def test_gzip_files_read_as_the_plain_ones(smollm2, tmp_path):
    """.jsonl.gz and .txt.gz (files and a folder's splits) give the same samples as the plain files;
    a corrupt .gz is a DatasetError naming the file."""
    import gzip
    import shutil

    facts = EXAMPLES / "data" / "facts"
    folder = tmp_path / "facts"
    folder.mkdir()
    for split in ("train", "valid"):
        with open(facts / f"{split}.jsonl", "rb") as src, gzip.open(folder / f"{split}.jsonl.gz", "wb") as dst:
            shutil.copyfileobj(src, dst)
    plain = load_splits(facts, smollm2, max_seq_length=256)
    packed = load_splits(folder, smollm2, max_seq_length=256)
    assert [s.tokens.tolist() for s in plain[0]] == [s.tokens.tolist() for s in packed[0]]
    assert [s.tokens.tolist() for s in plain[1]] == [s.tokens.tolist() for s in packed[1]] and plain[1]
    text = "A plain text file.\nIts second line, and a third.\n" * 40
    (tmp_path / "t.txt").write_text(text)
    with gzip.open(tmp_path / "t.txt.gz", "wt") as f:
        f.write(text)
    a, _ = load_dataset(tmp_path / "t.txt", smollm2, max_seq_length=64)
    b, _ = load_dataset(tmp_path / "t.txt.gz", smollm2, max_seq_length=64)
    assert [s.tokens.tolist() for s in a] == [s.tokens.tolist() for s in b] and a
    (tmp_path / "bad.jsonl.gz").write_bytes(b"\x1f\x8b\x08\x00 not really gzip")
    with pytest.raises(DatasetError, match="bad.jsonl.gz: not a readable gzip file"):
        load_dataset(tmp_path / "bad.jsonl.gz", smollm2, max_seq_length=64)
