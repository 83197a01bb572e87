"""Text <-> token ids: tokenizer.json (tokenizers) or tokenizer.model (sentencepiece).

BOS is always added here, never by a tokenizer.json post-processor, so it cannot be doubled.
Streaming follows vLLM's incremental detokenisation: decode a short window of recent ids and
emit only the new suffix, holding back while it ends in U+FFFD (half a UTF-8 character).
"""
from __future__ import annotations

import json
import os
import re

from graph.config import LlamaConfig

TOKENIZER_JSON = "tokenizer.json"
TOKENIZER_MODEL = "tokenizer.model"
TOKENIZER_CONFIG = "tokenizer_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
GENERATION_CONFIG = "generation_config.json"


class TokenizerError(ValueError):
    """A tokenizer that cannot be loaded or used; the message names the file or folder."""


class _HFBackend:
    """tokenizers.Tokenizer; special tokens in the text (e.g. <|im_start|>) are kept whole."""

    def __init__(self, path: str):
        from tokenizers import Tokenizer as HFTokenizer
        try:
            self.tok = HFTokenizer.from_file(path)
        except Exception as e:  # tokenizers raises bare Exception on bad JSON
            raise TokenizerError(f"cannot read {path}: {_first_line(e)}") from None

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=False)

    def token_to_id(self, piece: str) -> int | None:
        return self.tok.token_to_id(piece)

    def id_to_token(self, token_id: int) -> str | None:
        return self.tok.id_to_token(token_id)

    def post_processor_adds(self, token_id: int) -> bool:
        with_special = self.tok.encode("a", add_special_tokens=True).ids
        return bool(with_special) and with_special[0] == token_id

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)


class _SPBackend:
    """sentencepiece; it cannot see special tokens in text, so split on them first (as HF's
    slow LlamaTokenizer does) to let a chat template's literal "<s>" become the BOS id."""

    def __init__(self, path: str):
        import sentencepiece as spm
        try:
            self.sp = spm.SentencePieceProcessor(model_file=path)
        except (OSError, RuntimeError) as e:
            raise TokenizerError(f"cannot read {path}: {_first_line(e)}") from None
        self.specials: dict[str, int] = {}

    def encode(self, text: str) -> list[int]:
        ids: list[int] = []
        for chunk, special_id in _split_specials(text, self.specials):
            ids.extend([special_id] if special_id is not None else self.sp.encode(chunk))
        return ids

    def decode(self, ids: list[int]) -> str:
        return self.sp.decode(ids)

    def token_to_id(self, piece: str) -> int | None:
        i = self.sp.piece_to_id(piece)
        return i if self.sp.id_to_piece(i) == piece else None

    def id_to_token(self, token_id: int) -> str | None:
        return self.sp.id_to_piece(token_id) if 0 <= token_id < self.vocab_size else None

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()


class Tokenizer:
    def __init__(self, backend, *, bos_id: int | None, eos_ids: list[int], add_bos: bool,
                 chat_template: str | None = None, name: str = "tokenizer"):
        self._backend = backend
        self.bos_id = bos_id
        self.eos_ids = list(eos_ids)
        self.add_bos = add_bos
        self.chat_template = chat_template
        self.name = name
        self._skip = {i for i in [bos_id, *self.eos_ids] if i is not None}

    @classmethod
    def from_dir(cls, model_dir: str, config: LlamaConfig | None = None) -> "Tokenizer":
        json_path = os.path.join(model_dir, TOKENIZER_JSON)
        model_path = os.path.join(model_dir, TOKENIZER_MODEL)
        if os.path.isfile(json_path):
            backend, sentencepiece = _HFBackend(json_path), False
        elif os.path.isfile(model_path):
            backend, sentencepiece = _SPBackend(model_path), True
        else:
            raise TokenizerError(f"no tokenizer in {model_dir} (expected {TOKENIZER_JSON} "
                                 f"or {TOKENIZER_MODEL})")
        tok_cfg = _read_json(os.path.join(model_dir, TOKENIZER_CONFIG))
        bos_id = _bos_id(backend, config, tok_cfg)
        eos_ids = _eos_ids(backend, config, tok_cfg,
                           _read_json(os.path.join(model_dir, GENERATION_CONFIG)))
        if sentencepiece:
            backend.specials = {s: i for s, i in _special_strings(backend, tok_cfg).items()}
        if isinstance(tok_cfg.get("add_bos_token"), bool):
            add_bos = tok_cfg["add_bos_token"]
        elif sentencepiece:
            add_bos = True  # Llama/Mistral sentencepiece vocabularies expect <s>
        else:
            add_bos = bos_id is not None and backend.post_processor_adds(bos_id)
        return cls(backend, bos_id=bos_id, eos_ids=eos_ids, add_bos=add_bos and bos_id is not None,
                   chat_template=_chat_template(model_dir, tok_cfg), name=model_dir)

    # ---- encoding -------------------------------------------------------------------
    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        if not isinstance(text, str):
            raise TokenizerError(f"encode() takes a str, got {type(text).__name__}")
        ids = self._backend.encode(text)
        want_bos = self.add_bos if add_bos is None else add_bos
        # a chat template may already have written the BOS token into the text
        if want_bos and self.bos_id is not None and (not ids or ids[0] != self.bos_id):
            ids = [self.bos_id, *ids]
        return ids

    def decode(self, ids: list[int]) -> str:
        return self._backend.decode([int(i) for i in ids if int(i) not in self._skip])

    def token_to_id(self, piece: str) -> int | None:
        return self._backend.token_to_id(piece)

    def id_to_token(self, token_id: int) -> str | None:
        """The vocabulary entry (e.g. '<|im_end|>', 'ĠParis'), not decoded text."""
        return self._backend.id_to_token(int(token_id))

    @property
    def vocab_size(self) -> int:
        return self._backend.vocab_size

    def stream_decoder(self, context_ids: list[int] | None = None) -> "StreamDecoder":
        """context_ids (e.g. the prompt's last ids) are never emitted; they only give the first
        new token its leading space, which sentencepiece drops at the start of a decode."""
        return StreamDecoder(self, context_ids)


class StreamDecoder:
    """push(id) -> new text; the window [prefix, read) is text already emitted, kept only so
    the next decode sees its left context (spaces, multi-byte merges)."""

    _CONTEXT = 6  # vLLM's INITIAL_INCREMENTAL_DETOKENIZATION_OFFSET-like window

    def __init__(self, tokenizer: Tokenizer, context_ids: list[int] | None = None):
        self._tok = tokenizer
        self._ids = [int(i) for i in (context_ids or [])][-self._CONTEXT:]
        self._prefix = 0
        self._read = len(self._ids)

    def push(self, token_id: int) -> str:
        self._ids.append(int(token_id))
        prefix_text = self._tok.decode(self._ids[self._prefix:self._read])
        new_text = self._tok.decode(self._ids[self._prefix:])
        if len(new_text) <= len(prefix_text) or new_text.endswith("\ufffd"):
            return ""
        self._prefix, self._read = self._read, len(self._ids)
        return new_text[len(prefix_text):]

    def flush(self) -> str:
        """Whatever is still held back (e.g. an unfinished character at the very end)."""
        prefix_text = self._tok.decode(self._ids[self._prefix:self._read])
        new_text = self._tok.decode(self._ids[self._prefix:])
        self._prefix = self._read = len(self._ids)
        return new_text[len(prefix_text):]


# ---- tokenizer_config.json and friends -----------------------------------------------
def _read_json(path: str) -> dict:
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TokenizerError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise TokenizerError(f"{path} must hold a JSON object")
    return data


def _token_str(value) -> str | None:
    """tokenizer_config.json writes special tokens as "<s>" or {"content": "<s>", ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _lookup(backend, value) -> int | None:
    piece = _token_str(value)
    return None if piece is None else backend.token_to_id(piece)


def _bos_id(backend, config, tok_cfg: dict) -> int | None:
    if config is not None and config.bos_token_id is not None:
        return config.bos_token_id
    bos = _lookup(backend, tok_cfg.get("bos_token"))
    if bos is None and isinstance(backend, _SPBackend) and backend.sp.bos_id() >= 0:
        bos = backend.sp.bos_id()
    return bos


def _eos_ids(backend, config, tok_cfg: dict, gen_cfg: dict) -> list[int]:
    ids = list(config.eos_token_id) if config is not None else []
    if not ids:
        eos = _lookup(backend, tok_cfg.get("eos_token"))
        if eos is None and isinstance(backend, _SPBackend) and backend.sp.eos_id() >= 0:
            eos = backend.sp.eos_id()
        ids = [] if eos is None else [eos]
    gen = gen_cfg.get("eos_token_id")
    for i in ([gen] if isinstance(gen, int) else gen or []):
        if isinstance(i, int) and i not in ids:
            ids.append(i)
    return ids


def _special_strings(backend: _SPBackend, tok_cfg: dict) -> dict[str, int]:
    specials = {}
    for key in ("bos_token", "eos_token", "unk_token"):
        piece = _token_str(tok_cfg.get(key))
        if piece and backend.token_to_id(piece) is not None:
            specials[piece] = backend.token_to_id(piece)
    for i in (backend.sp.bos_id(), backend.sp.eos_id()):
        if i >= 0:
            specials[backend.sp.id_to_piece(i)] = i
    return specials


def _split_specials(text: str, specials: dict[str, int]):
    """Yield (chunk, None) for plain text and ("", id) for each special token string."""
    if not specials:
        yield text, None
        return
    pattern = "(" + "|".join(re.escape(s) for s in sorted(specials, key=len, reverse=True)) + ")"
    for k, part in enumerate(re.split(pattern, text)):
        if k % 2:
            yield "", specials[part]
        elif part or k == 0:
            yield part, None


def _chat_template(model_dir: str, tok_cfg: dict) -> str | None:
    path = os.path.join(model_dir, CHAT_TEMPLATE_FILE)
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            return f.read()
    template = tok_cfg.get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default") or next(iter(named.values()), None)
    return template if isinstance(template, str) else None


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


__all__ = ["Tokenizer", "StreamDecoder", "TokenizerError"]
