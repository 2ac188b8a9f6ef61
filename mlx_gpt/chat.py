"""Chat templates: a conversation as the text a model was trained to read, rendered as Hugging Face does.

A template is Jinja source, as ``tokenizer_config.json``'s ``chat_template`` holds it. It is
rendered in a sandboxed environment set up as transformers' ``apply_chat_template`` sets up its
own (blocks trimmed, ``tojson`` without HTML escaping, ``raise_exception``, ``strftime_now``, loop
controls, the ``{% generation %}`` tag), with ``messages``, ``add_generation_prompt`` and the
tokenizer's special tokens (``bos_token``, ``eos_token``) in scope, so the same template and
messages give the same text, byte for byte.

A checkpoint's tokenizer carries its template (``tokenizer.with_chat_template``: imported from
Hugging Face by ``convert``, kept through fine-tuning and export). Models without one (GPT-2,
our own tokenizers) use ``DEFAULT_TEMPLATE``, ChatML's layout in plain text.

The API other modules use::

    template = template_of(tokenizer)                    # its own, else DEFAULT_TEMPLATE
    text = render(template, messages, add_generation_prompt=True, **special_tokens(tokenizer))
    ids = encode(tokenizer, text)                        # its special tokens as their ids
    stop = end_of_turn(template, **special_tokens(tokenizer))   # where an assistant's turn ends
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from typing import Any, Sequence

from .errors import UserError

# ChatML's layout: <|im_start|>ROLE\nCONTENT<|im_end|>\n per message; the generation prompt opens
# the assistant's turn, which ends at <|im_end|>
DEFAULT_TEMPLATE = ("{% for message in messages %}"
                    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
                    "{% endfor %}"
                    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
ROLES = ("system", "user", "assistant")
_SENTINEL = "\x00END-OF-TURN\x00"


@lru_cache(maxsize=16)
def _compiled(template: str):
    """The template compiled in a sandbox (templates come with downloaded models: untrusted code)."""
    import jinja2
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(Extension):
        """``{% generation %}...{% endgeneration %}`` marks assistant text; rendered as its body."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller) -> str:
            return caller()

    def raise_exception(message: str):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[Generation, loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(template)
    except jinja2.TemplateError as e:
        raise UserError(f"the chat template does not parse: {_one_line(e)}") from None


def render(template: str, messages: Sequence[dict], add_generation_prompt: bool = False, **tokens: Any) -> str:
    """The conversation ``messages`` ({"role", "content"} dicts) as ``template`` lays it out;
    ``add_generation_prompt`` ends it with the opening of the assistant's turn. ``tokens``: the
    special tokens the template may name (``bos_token``, ``eos_token``; see ``special_tokens``)."""
    import jinja2

    try:
        return _compiled(template).render(messages=[dict(m) for m in messages], tools=None, documents=None,
                                          add_generation_prompt=add_generation_prompt, **tokens)
    except (jinja2.TemplateError, TypeError, ValueError, KeyError, AttributeError, IndexError) as e:
        raise UserError(f"the chat template fails to render: {_one_line(e)}") from None


def _one_line(e: Exception) -> str:
    return " ".join(str(e).split())[:200] or type(e).__name__


def template_of(tokenizer) -> str:
    """The chat template ``tokenizer`` carries (a checkpoint's, from Hugging Face), else DEFAULT_TEMPLATE."""
    return getattr(tokenizer, "chat_template", None) or DEFAULT_TEMPLATE


def special_tokens(tokenizer) -> dict[str, str]:
    """The special tokens a template may name: end-of-text as ``eos_token`` and ``bos_token`` (GPT-2's
    ``<|endoftext|>`` is both), none for a tokenizer without one."""
    eot = getattr(tokenizer, "eot_id", None)
    if eot is None:
        return {}
    text = tokenizer.decode([eot])
    return {"bos_token": text, "eos_token": text}


def encode(tokenizer, text: str) -> list[int]:
    """The ids of rendered text, its end-of-text token's text (a template's ``eos_token``, GPT-2's
    ``<|endoftext|>``) read as that one token, as Hugging Face's tokenizers read a special token."""
    marker = special_tokens(tokenizer).get("eos_token")
    if not marker:
        return tokenizer.encode(text)
    ids: list[int] = []
    for i, part in enumerate(text.split(marker)):
        ids += ([tokenizer.eot_id] if i else []) + (tokenizer.encode(part) if part else [])
    return ids


def end_of_turn(template: str, **tokens: Any) -> str:
    """The text the template writes right after an assistant's words (``<|im_end|>``): where a
    generated reply ends. Empty when the template writes nothing there (end-of-text ends it)."""
    probe = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": _SENTINEL}]
    text = render(template, probe, **tokens)
    after = text.split(_SENTINEL, 1)[1] if _SENTINEL in text else ""
    return after.strip()


def check_roles(messages: object) -> str | None:
    """What is wrong with a conversation, or None: a list of {"role", "content"} string dicts, an
    optional system message first, then user and assistant in turn from a user."""
    if not isinstance(messages, list) or not messages:
        return "messages must be a non-empty list"
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            return f"message {i} must be an object with string role and content"
        if m["role"] not in ROLES:
            return f"message {i} has role {m['role']!r:.40}; roles are {', '.join(ROLES)}"
    turns = messages[1:] if messages[0]["role"] == "system" else messages
    for i, m in enumerate(turns):
        expected = "user" if i % 2 == 0 else "assistant"
        if m["role"] != expected:
            return f"roles out of order: message {i + len(messages) - len(turns)} is {m['role']}, {expected} expected"
    return None
