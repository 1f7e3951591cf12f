"""Loss spans: chat templates rendered as llama-cpp-python renders them, the assistant turns found in
them, and character spans of a text mapped onto its tokens.

Turns are found by rendering, never by searching for a format's marker strings, so any template works:
for assistant message ``i``, the text that ``messages[:i+1]`` adds to ``messages[:i]`` rendered with
``add_generation_prompt=True`` is that turn. Its trailing whitespace (ChatML's and Gemma's newline
after the end-of-turn marker) is left out, because at inference the model stops at the marker and
the template, not the model, writes what follows; the whitespace is kept only when the turn has no
marker at all, since it is then the only end-of-turn signal there is.

Spans become token masks through the byte offsets of the tokens of the whole text: each token's
piece is matched against the text's UTF-8 bytes, so the text is tokenized once, as it will be at
inference, and a span boundary never changes the tokenization.
"""

from __future__ import annotations

import ctypes
import json
from datetime import datetime
from typing import Any

import numpy as np

from .errors import DatasetError, InvalidArgumentError

ROLES = ("system", "user", "assistant", "tool")

# Templates by name, for models whose GGUF has none (Gemma 3 270M, base models): --chat-template gemma.
# Gemma has no system role; its own template puts the system text before the first user turn
# (Gemma 3's tokenizer_config.json), as here.
BUILTIN_TEMPLATES: dict[str, str] = {
    "chatml": (
        "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
        "'<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"),
    "gemma": (
        "{{ bos_token }}{% if messages and messages[0]['role'] == 'system' %}"
        "{% set prefix = messages[0]['content'] + '\n\n' %}{% set turns = messages[1:] %}"
        "{% else %}{% set prefix = '' %}{% set turns = messages %}{% endif %}"
        "{% for message in turns %}{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
        "{{ '<start_of_turn>' + role + '\n' + (prefix if loop.first else '') + message['content'] + "
        "'<end_of_turn>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"),
    "llama3": (
        "{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + "
        "'<|end_header_id|>\n\n' + message['content'] + '<|eot_id|>' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"),
}
MAX_TEXT_CHARS = 64 << 20   # a longer text to tokenize is an error rather than an out-of-memory


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None,
            sort_keys: bool = False) -> str:
    # transformers' (and llama-cpp-python's) tojson: unicode kept as is
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


class ChatTemplate:
    """A compiled Jinja chat template with the variables llama-cpp-python's Jinja2ChatFormatter passes:
    ``messages``, ``add_generation_prompt``, ``bos_token``, ``eos_token``, ``raise_exception``,
    ``strftime_now`` (frozen at construction so every prefix renders the same date) and
    ``tools``/``tool_choice``/``functions``/``function_call`` (None)."""

    def __init__(self, source: str, bos_token: str, eos_token: str, origin: str = "chat template"):
        import jinja2
        import jinja2.ext
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        class IgnoreGenerationTags(jinja2.ext.Extension):
            # HuggingFace's {% generation %} ... {% endgeneration %}: rendered as plain content
            tags = frozenset({"generation"})

            def parse(self, parser):
                parser.stream.skip(1)
                return parser.parse_statements(("name:endgeneration",), drop_needle=True)

        env = ImmutableSandboxedEnvironment(loader=jinja2.BaseLoader(), trim_blocks=True, lstrip_blocks=True,
                                            extensions=[IgnoreGenerationTags, jinja2.ext.loopcontrols])
        env.filters["tojson"] = _tojson
        try:
            self._template = env.from_string(source)
        except jinja2.TemplateError as e:
            raise DatasetError(f"{origin}: not a valid Jinja template ({e})") from None
        self.source, self.origin = source, origin
        self.bos_token, self.eos_token = bos_token, eos_token
        self._now = datetime.now()

    def render(self, messages: list[dict], add_generation_prompt: bool) -> str:
        def raise_exception(message: str):
            raise ValueError(message)

        return self._template.render(
            messages=messages, add_generation_prompt=add_generation_prompt, bos_token=self.bos_token,
            eos_token=self.eos_token, raise_exception=raise_exception, strftime_now=self._now.strftime,
            tools=None, tool_choice=None, functions=None, function_call=None)


def check_messages(messages: Any, where: str) -> list[dict]:
    """The ``messages`` field: a list of {role, content} dicts with a known role and string content,
    at least one of them from the assistant."""
    if not isinstance(messages, list) or not messages:
        raise DatasetError(f"{where}: 'messages' must be a non-empty list, got {kind_of(messages)}")
    for j, m in enumerate(messages):
        if not isinstance(m, dict):
            raise DatasetError(f"{where}: messages[{j}] must be an object, got {kind_of(m)}")
        role, content = m.get("role"), m.get("content")
        if not isinstance(role, str):
            raise DatasetError(f"{where}: messages[{j}].role must be a string, got {kind_of(role)}")
        if role not in ROLES:
            raise DatasetError(f"{where}: messages[{j}] has unknown role {role!r} (expected one of {', '.join(ROLES)})")
        if not isinstance(content, str):
            raise DatasetError(f"{where}: messages[{j}].content must be a string, got {kind_of(content)}")
    if not any(m["role"] == "assistant" for m in messages):
        raise DatasetError(f"{where}: the conversation has no assistant turn, so nothing to train on")
    return messages


def render_with_spans(template: ChatTemplate, messages: list[dict], where: str) -> tuple[str, list[tuple[int, int]]]:
    """(rendered conversation, [(start, end) character span of each assistant turn])."""
    try:
        full = template.render(messages, add_generation_prompt=False)
        spans = []
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            before = template.render(messages[:i], add_generation_prompt=True)
            upto = template.render(messages[:i + 1], add_generation_prompt=False)
            if not (upto.startswith(before) and full.startswith(upto)):
                raise DatasetError(
                    f"{where}: {template.origin} does not render messages[{i}] as an extension of the earlier "
                    "messages (it changes earlier text depending on what follows), so the assistant turns "
                    "cannot be located")
            turn = upto[len(before):]
            body = turn.rstrip()
            content = m["content"].strip()
            no_marker = body.endswith(content) if content else not body
            end = len(turn) if no_marker else len(body)   # no marker: the whitespace ends the turn
            if end:
                spans.append((len(before), len(before) + end))
    except DatasetError:
        raise
    except Exception as e:    # raise_exception(), undefined attributes, sandbox violations
        raise DatasetError(f"{where}: {template.origin} failed to render the conversation: {e}") from None
    return full, spans


def kind_of(value: Any) -> str:
    return "null" if value is None else type(value).__name__


# ---- text spans -> token masks ---------------------------------------------------------------------

class Tokenizer:
    """The model's tokenizer with what loading needs: the BOS rule, EOS, and byte offsets of tokens."""

    def __init__(self, model):
        import llama_cpp

        self.model = model
        vocab = model._llama_vocab()
        self._vocab = vocab._model.vocab
        self._buf = ctypes.create_string_buffer(256)
        self._to_piece = llama_cpp.llama_token_to_piece
        bos, eos = vocab.token_bos(), vocab.token_eos()
        # [BOS] when the tokenizer adds one (tokenizer.ggml.add_bos_token), else []
        self.bos_prefix = [bos] if bos >= 0 and model.tokenize("", add_special=True)[:1] == [bos] else []
        self.bos_text = vocab._model.token_get_text(bos) if bos >= 0 else ""
        self.eos_text = vocab._model.token_get_text(eos) if eos >= 0 else ""
        self.eos = [eos] if eos >= 0 else []
        self._pieces: dict[int, bytes] = {}

    def piece(self, token: int) -> bytes:
        """The bytes a token stands for, special tokens as their text."""
        p = self._pieces.get(token)
        if p is None:
            n = self._to_piece(self._vocab, token, self._buf, len(self._buf), 0, True)
            if n < 0:       # the buffer is too small: -n bytes are needed
                self._buf = ctypes.create_string_buffer(-n)
                n = self._to_piece(self._vocab, token, self._buf, len(self._buf), 0, True)
            p = self._pieces[token] = self._buf.raw[:n]
        return p

    def encode(self, text: str, spans: list[tuple[int, int]] | None, where: str,
               add_bos: bool = True) -> tuple[list[int], np.ndarray]:
        """Tokens of ``text`` and whether each lies in one of the character ``spans`` (None: all do)."""
        if len(text) > MAX_TEXT_CHARS:
            raise DatasetError(f"{where}: {len(text)} characters of text is more than the limit of {MAX_TEXT_CHARS}")
        try:
            ids = self.model.tokenize(text, add_special=False, parse_special=True)
        except UnicodeEncodeError as e:
            raise DatasetError(f"{where}: the text is not valid Unicode ({e.reason} at character {e.start})") from None
        bos = self.bos_prefix if add_bos and self.bos_prefix and not text.startswith(self.bos_text) else []
        if spans is None:
            return bos + ids, np.ones(len(bos) + len(ids), dtype=bool)
        start, end = self._offsets(ids, text.encode("utf-8"), where)
        start = np.concatenate([np.zeros(len(bos), np.int64), start])
        end = np.concatenate([np.zeros(len(bos), np.int64), end])
        mask = np.zeros(len(start), dtype=bool)
        for s_char, e_char in spans:
            s, e = len(text[:s_char].encode("utf-8")), len(text[:e_char].encode("utf-8"))
            # a token overlapping the span; a token of no text (an inserted space) if it sits inside it
            mask |= ((start < e) & (end > s)) | ((start == end) & (start >= s) & (start < e))
        return bos + ids, mask

    def _offsets(self, ids: list[int], data: bytes, where: str) -> tuple[np.ndarray, np.ndarray]:
        """[start, end) byte offsets of each token in ``data``. SentencePiece inserts a space before the
        first text and after each special token that the text does not have; those are skipped."""
        start, end = np.empty(len(ids), np.int64), np.empty(len(ids), np.int64)
        pos = 0
        for k, t in enumerate(ids):
            p = self.piece(t)
            start[k] = pos
            if data.startswith(p, pos):
                pos += len(p)
            else:
                for c in p:
                    if pos < len(data) and data[pos] == c:
                        pos += 1
                    elif c != 0x20:
                        raise DatasetError(f"{where}: the tokenizer's pieces do not spell the text at byte {pos} "
                                           f"(token {t} = {p!r}); cannot locate the loss spans")
            end[k] = pos
        if pos != len(data):
            raise DatasetError(f"{where}: the tokenizer's pieces spell {pos} of the {len(data)} bytes of the text")
        return start, end


def resolve_chat_template(value: str | None) -> str | None:
    """A chat template given as Jinja text, the path of a file holding it, or a built-in's name
    (BUILTIN_TEMPLATES: chatml, gemma, llama3)."""
    from pathlib import Path

    if value is None or "{" in value:
        return value
    if value in BUILTIN_TEMPLATES:
        return BUILTIN_TEMPLATES[value]
    path = Path(value)
    if not path.is_file():
        raise InvalidArgumentError(f"chat_template={value!r} is neither a Jinja template, a file nor a built-in "
                                   f"({', '.join(BUILTIN_TEMPLATES)})")
    return path.read_text()
