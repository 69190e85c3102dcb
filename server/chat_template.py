"""Chat templates: which one a server uses, and a conversation rendered by it into a prompt's text.

Owns where the template comes from, in vLLM's order: `--chat-template` (a file, or the template's own
text), else the model directory's `chat_template.jinja`, else the `chat_template` of its
`tokenizer_config.json` (a string, or a list of named templates: "default"). BLT checkpoints are base
models and ship none; without one, chat requests are refused (chat.py). A template is Jinja, rendered
as transformers renders one: in a sandbox, with trim_blocks and lstrip_blocks, `raise_exception`,
`strftime_now` and a `tojson` that does not escape HTML. `bos_token` and `eos_token` are empty: the
engine begins every prompt with BOS itself, and EOS is not text. A template that does not compile
stops the server at start-up.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import Any

from jinja2 import TemplateError, TemplateSyntaxError
from jinja2.sandbox import ImmutableSandboxedEnvironment


class ChatTemplateError(ValueError):
    """A template that cannot be loaded (at start-up), or that refuses a conversation (a request's 400)."""


def _raise(message: str):
    raise TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None,
            sort_keys: bool = False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


RESERVED = ("messages", "tools", "add_generation_prompt")  # set by the request's own fields
MARK = "\ue000continue\ue000"  # in place of an empty message to continue (private-use characters)


@dataclass(frozen=True)
class Conversation:
    messages: list[dict[str, Any]]  # role, content (text) and whatever else a message carried
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    tools: list[dict[str, Any]] | None = None
    kwargs: dict[str, Any] | None = None  # chat_template_kwargs


class ChatTemplate:
    def __init__(self, source: str, origin: str):
        """`origin`: where the template came from, for messages."""
        self.source, self.origin = source, origin
        try:
            self._template = _environment().from_string(source)
        except TemplateSyntaxError as e:
            raise ChatTemplateError(f"the chat template from {origin} does not compile: {e.message} "
                                    f"(line {e.lineno})") from None

    def render(self, chat: Conversation) -> str:
        """The prompt's text; a ChatTemplateError says why the template refused the conversation."""
        final = chat.messages[-1] if chat.messages else {}
        if chat.continue_final_message and not (final.get("content") or "").strip():
            # nothing to find in the text: where a marker in its place lands is where the message is continued
            marked = self._render(replace(chat, messages=chat.messages[:-1] + [{**final, "content": MARK}]))
            if marked.count(MARK) == 1:
                return marked[:marked.index(MARK)] + (final.get("content") or "")
        text = self._render(chat)
        return _cut_after_final(text, final) if chat.continue_final_message else text

    def _render(self, chat: Conversation) -> str:
        variables = {k: v for k, v in (chat.kwargs or {}).items() if k not in RESERVED}
        variables.update(bos_token="", eos_token="")
        try:
            text = self._template.render(messages=chat.messages, tools=chat.tools,
                                         add_generation_prompt=chat.add_generation_prompt, **variables)
        except TemplateError as e:
            raise ChatTemplateError(f"the chat template refused the conversation: {e.message or e}") from None
        except Exception as e:  # noqa: BLE001 - a template's own error on this input (a None added to a string)
            raise ChatTemplateError(f"the chat template failed on the conversation: {type(e).__name__}: {e}") from None
        return text


def _cut_after_final(text: str, final: dict[str, Any]) -> str:
    """continue_final_message: the text up to the end of the last message's content (what the template adds
    after it, such as an end-of-turn marker, is cut), as transformers does."""
    content = final.get("content") or ""
    for needle in (content, content.strip()):
        if needle and needle in text:
            return text[:text.rindex(needle) + len(needle)]
    raise ChatTemplateError("continue_final_message: the last message's content does not appear in the prompt the "
                            "chat template makes of the conversation")


def _from_tokenizer_config(path: Path) -> str | None:
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ChatTemplateError(f"{path}: {e}") from None
    template = config.get("chat_template") if isinstance(config, dict) else None
    if isinstance(template, list):  # named templates: the default one
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    if template is not None and not isinstance(template, str):
        raise ChatTemplateError(f"{path}: chat_template is not a string or a list with a 'default' template")
    return template


def find_chat_template(flag: str | None, model_dir: str) -> ChatTemplate | None:
    """The template `--chat-template` names (a file, or a template's text), else the model directory's, else
    None."""
    if flag:
        path = Path(flag)
        if "{{" in flag or "{%" in flag:
            return ChatTemplate(flag, "--chat-template")
        try:
            return ChatTemplate(path.read_text(encoding="utf-8"), str(path))
        except OSError as e:
            raise ChatTemplateError(f"--chat-template {flag}: {e.strerror or e} (give a file, or the template "
                                    "itself)") from None
    directory = Path(model_dir)
    jinja = directory / "chat_template.jinja"
    if jinja.is_file():
        return ChatTemplate(jinja.read_text(encoding="utf-8"), str(jinja))
    config = directory / "tokenizer_config.json"
    if config.is_file():
        template = _from_tokenizer_config(config)
        if template is not None:
            return ChatTemplate(template, str(config))
    return None
