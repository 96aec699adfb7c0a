"""Text around a decoder: a bundle model folder's tokenizer, its chat template, and streamed detokenization
with stop strings. Shared by ``edgeft ship`` (golden prompts), ``edgeft verify`` and ``edgeft serve``.

- :class:`DecoderTokenizer` reads ``tokenizer.json`` with the ``tokenizers`` library (no transformers
  import: a server starts fast) and the special tokens and chat template from ``tokenizer_config.json``,
  ``chat_template.jinja`` or ``chat_template.json``. The template is rendered as transformers'
  ``apply_chat_template`` does (a sandboxed Jinja environment, ``trim_blocks``/``lstrip_blocks``, the
  same helpers), then tokenized without special tokens added (the template writes them).
- :class:`TextStream` turns token ids into text deltas: a token can end inside a UTF-8 character (byte-level
  BPE), so text is released only once it decodes cleanly, and text that could be the start of a stop
  string is held back until it is known not to be one. The deltas concatenate to the decoded text.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

from edgeft.errors import DataError, ModelError

TOKENIZER_CONFIG = "tokenizer_config.json"
CHAT_TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json")
REPLACEMENT = "\ufffd"  # what a decoder writes for bytes that do not (yet) form a character


class ChatTemplateError(DataError):
    """The chat template cannot render these messages (it raised, or is not valid Jinja)."""


def _token_text(value: Any) -> str | None:
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelError(f"{path} is not valid JSON ({type(e).__name__})", "re-ship the bundle") from None
    return data if isinstance(data, dict) else {}


def find_chat_template(folder: Path, tok_config: dict[str, Any]) -> str | None:
    """The folder's chat template: ``chat_template.jinja`` (what transformers >= 4.43 writes), else
    ``chat_template.json``, else tokenizer_config.json's ``chat_template`` (a string, or a list of named
    templates: the one named "default")."""
    jinja = folder / CHAT_TEMPLATE_FILES[0]
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    js = _read_json(folder / CHAT_TEMPLATE_FILES[1]).get("chat_template")
    for cand in (js, tok_config.get("chat_template")):
        if isinstance(cand, str) and cand.strip():
            return cand
        if isinstance(cand, list):
            named = {t.get("name"): t.get("template") for t in cand if isinstance(t, dict)}
            if isinstance(named.get("default"), str):
                return named["default"]
    return None


def _compile(template: str):
    import jinja2
    from jinja2 import nodes
    from jinja2.ext import Extension
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationTag(Extension):
        # transformers marks assistant turns with {% generation %}...{% endgeneration %}: render the body as is
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template)


class DecoderTokenizer:
    """A decoder model folder's tokenizer (see the module docstring). ``eos_token_ids``: every id that
    ends a generation (generation_config.json, config.json and the tokenizer's eos token)."""

    def __init__(self, folder: str | Path):
        from edgeft.safeio import load_fast_tokenizer

        self.folder = Path(folder)
        self.tokenizer = load_fast_tokenizer(self.folder)
        cfg = _read_json(self.folder / TOKENIZER_CONFIG)
        special = {**_read_json(self.folder / "special_tokens_map.json"), **cfg}
        self.special_tokens = {k: _token_text(special.get(k)) for k in ("bos_token", "eos_token", "unk_token", "pad_token")}
        self.chat_template = find_chat_template(self.folder, cfg)
        self._template = None
        eos: list[int] = []
        for name in ("generation_config.json", "config.json"):
            value = _read_json(self.folder / name).get("eos_token_id")
            eos += [value] if isinstance(value, int) else [v for v in value if isinstance(v, int)] \
                if isinstance(value, list) else []
        tok_eos = self.special_tokens["eos_token"]
        if tok_eos is not None and self.tokenizer.token_to_id(tok_eos) is not None:
            eos.append(self.tokenizer.token_to_id(tok_eos))
        self.eos_token_ids: list[int] = sorted(set(eos))

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids)

    def decode(self, ids: list[int]) -> str:
        """Text of ``ids`` without special tokens (eos, chat markers)."""
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def render_chat(self, messages: list[dict[str, Any]], *, add_generation_prompt: bool = True) -> str:
        """The chat template applied to ``messages``; ChatTemplateError (one line) when it raises."""
        if self.chat_template is None:
            raise ChatTemplateError("this model has no chat template", "use /v1/completions with a plain prompt")
        import jinja2

        try:
            if self._template is None:
                self._template = _compile(self.chat_template)
            return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                         tools=None, documents=None,
                                         **{k: v for k, v in self.special_tokens.items() if v is not None})
        except jinja2.exceptions.TemplateError as e:
            raise ChatTemplateError(f"the chat template cannot render these messages: {' '.join(str(e).split())[:200]}",
                                    "check the roles and their order") from None

    def encode_chat(self, messages: list[dict[str, Any]]) -> list[int]:
        return self.encode(self.render_chat(messages), add_special_tokens=False)

    def text_stream(self, stop: list[str] | tuple[str, ...] = ()) -> TextStream:
        return TextStream(self, stop)


class TextStream:
    """Token ids in, text deltas out (see the module docstring). ``push`` returns (delta, stopped):
    ``stopped`` when the text reached one of ``stop`` (the delta then ends right before it, and the
    stop string itself is never emitted). ``flush`` at the end returns what was held back."""

    def __init__(self, tokenizer: DecoderTokenizer, stop: list[str] | tuple[str, ...] = ()):
        self.tok = tokenizer
        self.stop = [s for s in stop if s]
        self.ids: list[int] = []
        self._prefix = self._read = 0  # decode window: text is the diff of ids[prefix:] over ids[prefix:read]
        self._held = ""               # decoded text not emitted yet (it may start a stop string)
        self.text = ""                # everything emitted
        self.stopped = False

    def _decoded(self, final: bool) -> str:
        before = self.tok.decode(self.ids[self._prefix:self._read])
        after = self.tok.decode(self.ids[self._prefix:])
        if len(after) > len(before) and (final or not after.endswith(REPLACEMENT)):
            self._prefix, self._read = self._read, len(self.ids)
            return after[len(before):]
        return ""

    def _release(self, final: bool) -> str:
        held = self._held
        hits = [i for i in (held.find(s) for s in self.stop) if i >= 0]
        if hits:
            out, self._held, self.stopped = held[:min(hits)], "", True
        else:
            keep = 0 if final else max((k for s in self.stop for k in range(min(len(s) - 1, len(held)), 0, -1)
                                        if held.endswith(s[:k])), default=0)
            out, self._held = held[:len(held) - keep], held[len(held) - keep:]
        self.text += out
        return out

    def push(self, token_id: int) -> tuple[str, bool]:
        if self.stopped:
            return "", True
        self.ids.append(int(token_id))
        self._held += self._decoded(final=False)
        return self._release(final=False), self.stopped

    def flush(self) -> str:
        """At the end of the generation: the rest (an unfinished character as U+FFFD, a held stop prefix)."""
        if self.stopped:
            return ""
        self._held += self._decoded(final=True)
        return self._release(final=True)
