"""Text <-> token ids and chat rendering for a Hugging Face checkpoint directory.

Built on the ``tokenizers`` library and a sandboxed jinja2 environment, without
transformers. Encoding, decoding and chat rendering give the same results as
transformers' ``AutoTokenizer`` on the same directory (tests compare them):

- tokenizer.json is the whole encoding pipeline, its post-processor included.
  ``add_bos_token`` in tokenizer_config.json is ignored, as transformers >= 5
  ignores it whenever tokenizer.json exists.
- The chat template comes from chat_template.jinja if present (it wins, as in
  transformers), else from tokenizer_config.json's ``chat_template``.
- Decoding does no "clean up tokenization spaces" pass (transformers skips it
  for BPE tokenizers too), so decoding is plain concatenation of token bytes.
- ``eos_token_ids`` are the engine's stop ids: generation_config.json's
  ``eos_token_id``, else config.json's (what transformers' ``generate`` stops on),
  plus the tokenizer's eos token.
"""

from __future__ import annotations

import json
import pathlib
import re
from datetime import datetime
from typing import Any, Iterable, Optional, Sequence, Union

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken
from tokenizers import Tokenizer as _Backend

from raymoe.actors.engine.request import first_invalid_token_id

_NAMED_SPECIALS = ("bos_token", "eos_token", "unk_token", "pad_token")
_LONG_TEXT = 16384  # characters
_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")  # SentencePiece's byte-fallback tokens


def _byte_level_alphabet() -> dict[str, int]:
    """Byte-level BPE's character for each byte (GPT-2's table): printable Latin-1 bytes stand
    for themselves, the others for U+0100 onwards in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{chr(b): b for b in printable}, **{chr(256 + n): b for n, b in enumerate(others)}}


_BYTE_OF_CHAR = _byte_level_alphabet()


class Tokenizer:
    """A checkpoint's tokenizer: encode, decode, eos ids and chat template."""

    def __init__(
        self,
        backend: _Backend,
        *,
        special_tokens: dict[str, Optional[str]],
        eos_token_ids: Iterable[int],
        chat_template: Optional[str],
        source: str = "<memory>",
    ) -> None:
        self._backend = backend
        self._specials = dict(special_tokens)
        self.eos_token_ids: frozenset[int] = frozenset(eos_token_ids)
        self.chat_template = chat_template
        self.source = source
        self._compiled_template: Optional[jinja2.Template] = None
        self._kind: Optional[str] = None  # token_bytes' reading of the vocabulary, found at first use
        self._added: Optional[frozenset[int]] = None
        self._special_ids: Optional[frozenset[int]] = None

    @classmethod
    def from_dir(cls, path: Union[str, pathlib.Path]) -> "Tokenizer":
        """Load from a checkpoint directory holding tokenizer.json (+ optional configs)."""
        d = pathlib.Path(path)
        tok_file = d / "tokenizer.json"
        if not tok_file.is_file():
            raise ValueError(
                f"tokenizer directory {str(d)!r} has no tokenizer.json; point model.path at a "
                "Hugging Face checkpoint directory that includes tokenizer.json"
            )
        backend = _Backend.from_file(str(tok_file))
        tok_cfg = _read_json(d / "tokenizer_config.json")
        specials_map = _read_json(d / "special_tokens_map.json")
        specials = {k: _token_str(tok_cfg.get(k, specials_map.get(k))) for k in _NAMED_SPECIALS}
        # transformers registers named special tokens missing from the vocabulary.
        missing = [t for t in specials.values() if t is not None and backend.token_to_id(t) is None]
        if missing:
            backend.add_special_tokens([AddedToken(t, special=True) for t in missing])
        eos_ids = set(_id_list(_eos_from_configs(d)))
        if specials["eos_token"] is not None:
            eos_ids.add(backend.token_to_id(specials["eos_token"]))
        return cls(
            backend,
            special_tokens=specials,
            eos_token_ids=eos_ids,
            chat_template=_find_chat_template(d, tok_cfg),
            source=str(d),
        )

    def __getstate__(self) -> dict:
        # Picklable (Ray ships it to actors): drop the compiled template, rebuilt on use.
        return {**self.__dict__, "_compiled_template": None}

    # ---- encode / decode -------------------------------------------------
    @property
    def backend(self) -> _Backend:
        """The ``tokenizers.Tokenizer`` underneath (structured output builds its vocabulary from it)."""
        return self._backend

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``; special-token strings in it map to their ids. A long text is
        encoded with the GIL released (the batch API), so other threads run meanwhile."""
        if len(text) > _LONG_TEXT:
            return self._backend.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids
        return self._backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        """Text of ``ids``; incomplete UTF-8 sequences decode to U+FFFD."""
        return self._backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes ``token_id`` stands for on its own. A token can hold part of a UTF-8
        character (``decode`` shows U+FFFD), and a SentencePiece piece's leading space is
        stripped when it is decoded alone; so a vocabulary piece's bytes come from its own
        alphabet: byte-level BPE's characters, or SentencePiece's "▁" and <0xNN> bytes.
        Added tokens (and other vocabularies) give their decoded text."""
        piece = self._backend.id_to_token(token_id)
        kind = self._piece_kind()
        if piece is not None and token_id not in self._added_ids():
            if kind == "byte_level" and all(c in _BYTE_OF_CHAR for c in piece):
                return bytes(_BYTE_OF_CHAR[c] for c in piece)
            if kind == "sentencepiece":
                if _BYTE_TOKEN.fullmatch(piece):
                    return bytes([int(piece[3:5], 16)])
                return piece.replace("▁", " ").encode("utf-8")
        return self.decode([token_id], skip_special_tokens=False).encode("utf-8")

    def _piece_kind(self) -> str:
        """How the decoder reads vocabulary pieces: "byte_level", "sentencepiece" or "text"."""
        if self._kind is None:
            state = json.loads(self._backend.decoder.__getstate__()) if self._backend.decoder is not None else {}
            types = {d.get("type") for d in [state, *state.get("decoders", [])]}
            if "ByteLevel" in types:
                self._kind = "byte_level"
            elif types & {"ByteFallback", "Metaspace"}:
                self._kind = "sentencepiece"
            else:
                self._kind = "text"
        return self._kind

    def decodes_to_nothing(self, token_id: int, skip_special_tokens: bool = True) -> bool:
        """Whether ``decode`` drops ``token_id`` wherever it stands: an id with no token, or a
        special token while special tokens are skipped (tokenizers filters both out before its
        decoder runs, so they join no bytes on either side)."""
        if self._special_ids is None:
            added = self._backend.get_added_tokens_decoder()
            self._special_ids = frozenset(i for i, t in added.items() if t.special)
        if skip_special_tokens and token_id in self._special_ids:
            return True
        return self._backend.id_to_token(token_id) is None

    def _added_ids(self) -> frozenset[int]:
        if self._added is None:
            self._added = frozenset(self._backend.get_added_tokens_decoder())
        return self._added

    def token_to_id(self, token: str) -> Optional[int]:
        return self._backend.token_to_id(token)

    @property
    def vocab_size(self) -> int:
        """Number of token ids, added tokens included (may be below the model's embedding rows)."""
        return self._backend.get_vocab_size(with_added_tokens=True)

    @property
    def bos_token(self) -> Optional[str]:
        return self._specials["bos_token"]

    @property
    def eos_token(self) -> Optional[str]:
        return self._specials["eos_token"]

    @property
    def pad_token(self) -> Optional[str]:
        return self._specials["pad_token"]

    # ---- chat ------------------------------------------------------------
    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        tools: Optional[list[dict]] = None,
        **template_kwargs: Any,
    ) -> str:
        """Render ``messages`` ([{"role", "content"}, ...]) into the prompt string."""
        if self.chat_template is None:
            raise ValueError(
                f"the tokenizer at {self.source!r} has no chat template (neither chat_template.jinja "
                "nor tokenizer_config.json's chat_template); send a plain prompt instead of chat messages"
            )
        if self._compiled_template is None:
            self._compiled_template = _chat_environment().from_string(self.chat_template)
        variables = {k: v for k, v in self._specials.items() if v is not None}
        variables["documents"] = None
        variables.update(template_kwargs)
        variables.update(messages=messages, tools=tools, add_generation_prompt=add_generation_prompt)
        return self._compiled_template.render(variables)  # one mapping: any name is a variable, "self" too


# ---- helpers --------------------------------------------------------------
def _read_json(path: pathlib.Path) -> dict:
    if not path.is_file():
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _token_str(value: Any) -> Optional[str]:
    """A special token as written in configs: a string or an AddedToken dict."""
    if isinstance(value, dict):
        return value.get("content")
    return value


def _id_list(value: Any) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]


def _eos_from_configs(d: pathlib.Path) -> Any:
    """eos_token_id of generation_config.json, else config.json (int, list or None)."""
    for name in ("generation_config.json", "config.json"):
        value = _read_json(d / name).get("eos_token_id")
        if value is not None:
            return value
    return None


def _find_chat_template(d: pathlib.Path, tok_cfg: dict) -> Optional[str]:
    jinja_file = d / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    template = tok_cfg.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": ..., "template": ...}]
        named = {t["name"]: t["template"] for t in template}
        template = named.get("default")
    return template


class _GenerationTag(jinja2.ext.Extension):
    """Accept ``{% generation %}...{% endgeneration %}`` (assistant-mask markers); render the body."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller) -> str:
        return caller()


def _raise_exception(message: str):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    # Unlike jinja's own tojson, no HTML escaping: templates emit JSON for the model to read.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _chat_environment() -> ImmutableSandboxedEnvironment:
    """The jinja2 environment chat templates expect (same options and helpers as HF's)."""
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


def encode_prompt(
    tokenizer: Tokenizer, prompt: Union[str, Sequence[int]], vocab_size: int, param: str = "prompt"
) -> list[int]:
    """A prompt as token ids: text is encoded (special tokens as the tokenizer adds them);
    token ids pass through, checked against the model's vocabulary (ValueError naming ``param``)."""
    if isinstance(prompt, str):
        return tokenizer.encode(prompt)
    bad = first_invalid_token_id(prompt, vocab_size)
    if bad is not None:
        raise ValueError(f"{param}: token id {bad!r} is outside the vocabulary [0, {vocab_size})")
    return list(prompt)


def encode_chat(tokenizer: Tokenizer, messages: list[dict[str, Any]], **template_kwargs: Any) -> list[int]:
    """A conversation rendered with the chat template (plus the generation prompt) and
    encoded as is: the template already holds the special tokens."""
    return tokenizer.encode(
        tokenizer.apply_chat_template(messages, add_generation_prompt=True, **template_kwargs), add_special_tokens=False
    )
