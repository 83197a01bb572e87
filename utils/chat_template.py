"""Chat templates: render a model's Jinja chat template the way Hugging Face does, sandboxed
(a template ships with a downloaded model and is untrusted), and find the token that ends an
assistant turn so generation can stop there."""
from __future__ import annotations

import json
import re
from datetime import datetime
from functools import lru_cache

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

_SENTINEL = "\x00LLAMA_TRITON_REPLY\x00"
_SPECIAL_TOKEN = re.compile(r"\s*(<[^<>\s]+>|\[/?[A-Za-z_]+\])")


class ChatTemplateError(ValueError):
    """No template, an invalid one, bad messages, or the template's own raise_exception()."""


def _raise_exception(message: str):
    raise ChatTemplateError(f"chat template refused the messages: {message}")


def _tojson(value, indent=None, ensure_ascii=False, sort_keys=False):
    return json.dumps(value, indent=indent, ensure_ascii=ensure_ascii, sort_keys=sort_keys)


@lru_cache(maxsize=16)
def _compile(template: str) -> jinja2.Template:
    # trim_blocks/lstrip_blocks and loopcontrols: the settings transformers renders with
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as e:
        raise ChatTemplateError(f"chat template is invalid (line {e.lineno}): {e.message}") from None


def _check_messages(messages) -> None:
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ChatTemplateError("messages must be a non-empty list of {'role', 'content'} dicts")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or "content" not in m:
            raise ChatTemplateError(f"message {i} must be a dict with 'role' and 'content'")


def render_chat(template: str | None, messages: list[dict], *, bos_token: str = "",
                eos_token: str = "", add_generation_prompt: bool = True, **extra) -> str:
    """The prompt text for messages; encode it without adding another BOS (the template
    writes bos_token itself when the model wants one; Tokenizer.encode will not double it)."""
    if not template:
        raise ChatTemplateError("this model has no chat template (tokenizer_config.json "
                                "'chat_template' or GGUF 'tokenizer.chat_template')")
    _check_messages(messages)
    try:
        return _compile(template).render(messages=list(messages), bos_token=bos_token or "",
                                         eos_token=eos_token or "",
                                         add_generation_prompt=add_generation_prompt, **extra)
    except ChatTemplateError:
        raise
    except jinja2.exceptions.SecurityError as e:
        raise ChatTemplateError(f"chat template tried something unsafe: {e}") from None
    except (jinja2.TemplateError, TypeError, ValueError, KeyError, AttributeError) as e:
        raise ChatTemplateError(f"chat template failed to render: {e}") from None


def end_of_turn_text(template: str, *, bos_token: str = "", eos_token: str = "") -> str | None:
    """The special token the template writes right after an assistant reply, e.g.
    '<|im_end|>' (ChatML), '<|eot_id|>' (Llama 3), '</s>' (Llama 2); None if it writes none."""
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": _SENTINEL}]
    try:
        text = render_chat(template, messages, bos_token=bos_token, eos_token=eos_token,
                           add_generation_prompt=False)
    except ChatTemplateError:
        return None
    _, found, after = text.partition(_SENTINEL)
    match = _SPECIAL_TOKEN.match(after) if found else None
    return match.group(1) if match else None


def end_of_turn_ids(tokenizer) -> list[int]:
    """Ids that stop a chat reply: the tokenizer's EOS ids plus the template's end-of-turn
    token when it is a single token of the vocabulary."""
    ids = list(tokenizer.eos_ids)
    if tokenizer.chat_template:
        piece = end_of_turn_text(tokenizer.chat_template,
                                 bos_token=_piece(tokenizer, tokenizer.bos_id),
                                 eos_token=_piece(tokenizer, (tokenizer.eos_ids or [None])[0]))
        token = tokenizer.token_to_id(piece) if piece else None
        if token is not None and token not in ids:
            ids.append(token)
    return ids


def _piece(tokenizer, token_id: int | None) -> str:
    return "" if token_id is None else tokenizer.id_to_token(token_id) or ""


def render_for_tokenizer(tokenizer, messages: list[dict], add_generation_prompt: bool = True) -> str:
    """render_chat with the tokenizer's own template and BOS/EOS strings."""
    return render_chat(tokenizer.chat_template, messages,
                       bos_token=_piece(tokenizer, tokenizer.bos_id),
                       eos_token=_piece(tokenizer, (tokenizer.eos_ids or [None])[0]),
                       add_generation_prompt=add_generation_prompt)


__all__ = ["ChatTemplateError", "render_chat", "render_for_tokenizer", "end_of_turn_text",
           "end_of_turn_ids"]
