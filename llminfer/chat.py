"""Chat messages to a prompt string, through the tokenizer's Jinja chat template (as vLLM and transformers do).

The shipped models learned a play, so their template (`SHAKESPEARE_CHAT_TEMPLATE`) stages a conversation as a
scene: every message is a speech, `NAME:` on its own line, the text, then a blank line. The speakers are

    system, developer  ->  Chorus      (the one who sets the scene, in Romeo and Juliet)
    user               ->  ROMEO
    assistant          ->  JULIET

and a message's optional `name` replaces its role's speaker (upper-cased, `_` read as a space: "first_citizen"
speaks as "FIRST CITIZEN"). With `add_generation_prompt` the prompt ends with `JULIET:\\n` (or the name of the
last assistant message), so the model answers in that voice; a speech ends at a blank line, so pass
`SamplingParams(stop=["\\n\\n"])` to stop at the end of the reply rather than write the next speaker's lines.

Messages follow OpenAI's chat format: a dict with `role` ("system", "developer", "user" or "assistant";
"developer" is OpenAI's newer name for "system" and is read as one), `content` (a str, or a list of
`{"type": "text", "text": ...}` parts, joined with newlines), and optional `name`. Other keys are ignored;
tool calls and images are refused, since llminfer's models read text only. Any bad message raises ValueError
naming it (`messages[2]['role']`).
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Mapping, Sequence
from typing import Any

from jinja2 import TemplateError

ROLES = ("system", "developer", "user", "assistant")
MAX_NAME_CHARS = 64

# Newlines inside string literals are Jinja escapes ("\n"), so this is a raw string.
SHAKESPEARE_CHAT_TEMPLATE = r"""{#- A conversation staged as a scene: each message is a speech by its role's speaker -#}
{%- set speakers = {'system': 'Chorus', 'developer': 'Chorus', 'user': 'ROMEO', 'assistant': 'JULIET'} -%}
{%- set ns = namespace(reply='JULIET') -%}
{%- for message in messages -%}
    {%- if message['role'] not in speakers -%}
        {{- raise_exception('a message role must be system, developer, user or assistant, not ' ~ message['role']) -}}
    {%- endif -%}
    {%- if message['name'] is defined and message['name'] -%}
        {%- set speaker = message['name'] | replace('_', ' ') | upper -%}
    {%- else -%}
        {%- set speaker = speakers[message['role']] -%}
    {%- endif -%}
    {%- if message['role'] == 'assistant' -%}
        {%- set ns.reply = speaker -%}
    {%- endif -%}
    {%- if message['content'] is string -%}
        {%- set text = message['content'] -%}
    {%- else -%}
        {%- set parts = message['content'] | selectattr('type', 'equalto', 'text') -%}
        {%- set text = parts | map(attribute='text') | join('\n') -%}
    {%- endif -%}
    {{- speaker ~ ':\n' ~ text | trim('\r\n') ~ '\n\n' -}}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{- ns.reply ~ ':\n' -}}
{%- endif -%}"""

_BAD_NAME_CHARS = re.compile(r"[\x00-\x1f\x7f:]")


def _show(value: Any, limit: int = 60) -> str:
    """A value's repr, cut to `limit` characters so that a huge input makes a short message."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _check_text(text: str, where: str) -> None:
    """Refuse a str that is not valid Unicode (a lone surrogate such as "\\ud800" has no UTF-8 encoding)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"{where} is not valid Unicode text: {exc.reason} at index {exc.start} "
                         f"({text[exc.start:exc.end]!r})") from None


def _content_text(content: Any, where: str) -> str:
    """A message's content as one str: itself, or its text parts joined with newlines."""
    if isinstance(content, str):
        _check_text(content, where)
        return content
    if not isinstance(content, (list, tuple)):
        raise ValueError(f"{where} must be a str or a list of text parts, got {type(content).__name__}")
    texts = []
    for j, part in enumerate(content):
        at = f"{where}[{j}]"
        if not isinstance(part, Mapping):
            raise ValueError(f"{at} must be a dict like {{'type': 'text', 'text': ...}}, got {type(part).__name__}")
        if part.get("type") != "text":
            raise ValueError(f"{at}['type'] is {_show(part.get('type'))}; llminfer's models read text only "
                             "(parts of type 'text')")
        if not isinstance(part.get("text"), str):
            raise ValueError(f"{at}['text'] must be a str, got {type(part.get('text')).__name__}")
        _check_text(part["text"], f"{at}['text']")
        texts.append(part["text"])
    return "\n".join(texts)


def _check_name(name: Any, where: str) -> str:
    if not isinstance(name, str):
        raise ValueError(f"{where} must be a str, got {type(name).__name__}")
    _check_text(name, where)
    if not name.strip() or len(name) > MAX_NAME_CHARS or _BAD_NAME_CHARS.search(name):
        raise ValueError(f"{where} must be 1 to {MAX_NAME_CHARS} characters, not all blank, without line breaks, "
                         f"control characters or ':', got {_show(name)}")
    return name


def check_messages(messages: Any) -> list[dict[str, str]]:
    """Validate one conversation; return it as plain `{'role', 'content'[, 'name']}` dicts with str content."""
    if not isinstance(messages, (list, tuple)):
        raise ValueError(f"messages must be a list of message dicts, got {type(messages).__name__}")
    if not messages:
        raise ValueError("messages is empty: a conversation needs at least one message")
    plain = []
    for i, message in enumerate(messages):
        at = f"messages[{i}]"
        if not isinstance(message, Mapping):
            raise ValueError(f"{at} must be a dict with 'role' and 'content', got {type(message).__name__}")
        for key in ("role", "content"):
            if key not in message:
                raise ValueError(f"{at} has no {key!r}")
        role = message["role"]
        if not isinstance(role, str) or role not in ROLES:
            raise ValueError(f"{at}['role'] must be one of {', '.join(map(repr, ROLES))}, got {_show(role)}")
        one = {"role": role, "content": _content_text(message["content"], f"{at}['content']")}
        if message.get("name") is not None:
            one["name"] = _check_name(message["name"], f"{at}['name']")
        plain.append(one)
    return plain


def _check_options(tokenizer, chat_template: str | None, add_generation_prompt: bool, continue_final_message: bool,
                   chat_template_kwargs: Mapping[str, Any] | None) -> str:
    """The template to use, after checking the rendering options; ValueError says what is wrong."""
    if tokenizer is None:
        raise ValueError("rendering a chat needs a tokenizer, and there is none (skip_tokenizer_init=True?)")
    for name, value in (("add_generation_prompt", add_generation_prompt),
                        ("continue_final_message", continue_final_message)):
        if not isinstance(value, bool):
            raise ValueError(f"{name} must be a bool, got {_show(value)}")
    if add_generation_prompt and continue_final_message:
        raise ValueError("continue_final_message=True continues the last message, and add_generation_prompt=True "
                         "starts a new one: pass add_generation_prompt=False with it")
    if chat_template_kwargs is not None:
        if not isinstance(chat_template_kwargs, Mapping):
            raise ValueError(f"chat_template_kwargs must be a dict, got {type(chat_template_kwargs).__name__}")
        reserved = set(inspect.signature(tokenizer.apply_chat_template).parameters) | {"messages"}
        for key in chat_template_kwargs:
            if not isinstance(key, str) or key in reserved:
                raise ValueError(f"chat_template_kwargs cannot set {_show(key)}: it is not a template variable "
                                 "of its own (pass the argument of that name instead)")
    if chat_template is not None:
        if not isinstance(chat_template, str) or not chat_template.strip():
            raise ValueError(f"chat_template must be a non-empty str (a Jinja template), got {_show(chat_template)}")
        return chat_template
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        raise ValueError(f"the tokenizer {name!r} has no chat template: pass chat_template= (a Jinja string), or add "
                         "'chat_template' to its tokenizer_config.json")
    return template


def render_chat(tokenizer, messages: Sequence[Mapping[str, Any]], *, chat_template: str | None = None,
                add_generation_prompt: bool = True, continue_final_message: bool = False,
                chat_template_kwargs: Mapping[str, Any] | None = None) -> str:
    """One OpenAI-style conversation as a prompt string, rendered by the tokenizer's (or the given) chat template.

    Options mean what they mean in vLLM's `LLM.chat` and transformers' `apply_chat_template`."""
    template = _check_options(tokenizer, chat_template, add_generation_prompt, continue_final_message,
                              chat_template_kwargs)
    plain = check_messages(messages)
    try:
        return tokenizer.apply_chat_template(plain, chat_template=template, tokenize=False,
                                             add_generation_prompt=add_generation_prompt,
                                             continue_final_message=continue_final_message,
                                             **dict(chat_template_kwargs or {}))
    except TemplateError as exc:
        raise ValueError(f"the chat template failed: {type(exc).__name__}: {exc}") from exc


def render_conversations(tokenizer, messages: Sequence[Any], **options: Any) -> list[str]:
    """One conversation (a list of messages) or a list of them, as one prompt string per conversation.

    A list whose first item is itself a list is a batch, as in vLLM; errors then name the conversation."""
    if isinstance(messages, (list, tuple)) and messages and isinstance(messages[0], (list, tuple)):
        prompts = []
        for c, conversation in enumerate(messages):
            try:
                prompts.append(render_chat(tokenizer, conversation, **options))
            except ValueError as exc:
                raise ValueError(f"conversation {c}: {exc}") from exc
        return prompts
    return [render_chat(tokenizer, messages, **options)]
