"""The `{{item.x}}` / `{{sample.output_text}}` templates of evals: checking and rendering.

Deliberately tiny: a placeholder is a namespace (`item` or `sample`) and a dotted path of keys
(or list indexes, `item.tags.0`), nothing else. Values are looked up with `dict[key]` and
`list[index]` only, never attribute access or evaluation, so a dataset or a definition cannot
make the gateway run code (unlike a Jinja environment, whose expressions reach Python objects).

Strings render as they are; numbers, booleans, objects and lists render as JSON, which is what a
prompt author expects to see of them. A path missing from the data is an error, not an empty
string: a silent blank would grade the wrong thing.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator

NAMESPACES = ("item", "sample")
_PLACEHOLDER = re.compile(r"\{\{(.*?)\}\}", re.DOTALL)
_REFERENCE = re.compile(r"^(item|sample)((?:\.[A-Za-z0-9_\-]+)*)$")


class TemplateError(ValueError):
    """A template names something unsupported or missing."""


def references(template: str) -> Iterator[tuple[str, ...]]:
    """Each placeholder of `template` as a path, e.g. ("item", "answer"); raise TemplateError
    on a placeholder that is not a plain reference."""
    for match in _PLACEHOLDER.finditer(template):
        yield parse_reference(match.group(1))


def parse_reference(text: str) -> tuple[str, ...]:
    """`item.a.b` as ("item", "a", "b")."""
    found = _REFERENCE.match(text.strip())
    if found is None:
        raise TemplateError(
            f"'{{{{{text.strip()}}}}}' is not supported: a template may only refer to "
            "item.<field> or sample.<field> (dotted paths, no expressions)")
    return (found.group(1), *[part for part in found.group(2).split(".") if part])


def lookup(path: tuple[str, ...], context: dict):
    """The value at `path` in `context` ({"item": ..., "sample": ...}); TemplateError if absent."""
    value = context
    for depth, key in enumerate(path):
        if isinstance(value, dict) and key in value:
            value = value[key]
        elif isinstance(value, list) and key.isdigit() and int(key) < len(value):
            value = value[int(key)]
        else:
            raise TemplateError(f"'{'.'.join(path[:depth + 1])}' is missing from the data")
    return value


def to_text(value) -> str:
    if isinstance(value, str):
        return value
    if value is None:
        return ""
    return json.dumps(value, ensure_ascii=False)


def render(template: str, context: dict) -> str:
    """`template` with every placeholder replaced by its value in `context`."""
    return _PLACEHOLDER.sub(lambda m: to_text(lookup(parse_reference(m.group(1)), context)),
                            template)


def schema_allows(schema: dict, path: tuple[str, ...]) -> bool:
    """Whether a JSON schema for an object defines `path` (keys below the namespace).

    Where the schema declares `properties`, a key must be among them (unless it leaves
    `additionalProperties` open with a schema); an array is walked by index into `items`; a
    node that says nothing about its members (no properties, no type) accepts any deeper path.
    """
    node = schema
    for key in path:
        if not isinstance(node, dict):
            return True
        kinds = _types(node)
        properties = node.get("properties")
        if isinstance(properties, dict) and key in properties:
            node = properties[key]
        elif "array" in kinds or "items" in node:
            if not key.isdigit():
                return False
            node = node.get("items", {})
        elif kinds and "object" not in kinds:
            return False  # a string, a number...: nothing below it
        elif isinstance(properties, dict):
            # Listed properties: a typo must not pass, unless other keys are given a schema.
            extra = node.get("additionalProperties")
            if not isinstance(extra, dict):
                return False
            node = extra
        else:
            return True  # an object that lists no properties: anything may be in it
    return True


def _types(node: dict) -> set[str]:
    kind = node.get("type")
    if isinstance(kind, list):
        return {k for k in kind if isinstance(k, str)}
    return {kind} if isinstance(kind, str) else set()


# -- messages ------------------------------------------------------------------------------
# Evals write prompts as OpenAI "eval items": {role, content} where content is a string, a
# typed part ({"type": "input_text" | "output_text", "text"} or {"type": "input_image",
# "image_url"}) or a list of these. Engines want chat messages: text parts are joined into one
# string (every chat template takes that), and only a message with an image becomes a list.

ROLES = ("user", "assistant", "system", "developer")
TEXT_PARTS = ("input_text", "output_text")


def message_templates(message: dict) -> Iterator[str]:
    """Every template string of a message (its text, and image URLs)."""
    for part in _parts(message.get("content")):
        if isinstance(part, str):
            yield part
        elif part.get("type") in TEXT_PARTS:
            yield part.get("text", "")
        elif part.get("type") == "input_image":
            yield part.get("image_url", "")


def render_messages(messages: list[dict], context: dict | None) -> list[dict]:
    """Eval-item messages, rendered, as chat messages for an engine (taken as they are, with
    `context` None: messages that come from the data are not templates)."""
    return [render_message(message, context) for message in messages]


def render_message(message: dict, context: dict | None) -> dict:
    # Chat templates of open models know system, user and assistant; `developer` is OpenAI's
    # newer name for the system role.
    role = "system" if message["role"] == "developer" else message["role"]
    def fill(template: str) -> str:
        return template if context is None else render(template, context)

    texts: list[str] = []
    images: list[dict] = []
    for part in _parts(message.get("content")):
        if isinstance(part, str):
            texts.append(fill(part))
        elif part.get("type") in TEXT_PARTS or part.get("type") == "text":
            texts.append(fill(part.get("text", "")))
        elif part.get("type") == "input_image":
            url = {"url": fill(part.get("image_url", ""))}
            if part.get("detail"):
                url["detail"] = part["detail"]
            images.append({"type": "image_url", "image_url": url})
    text = "\n".join(texts)
    if not images:
        return {"role": role, "content": text}
    return {"role": role, "content": [{"type": "text", "text": text}, *images]}


def _parts(content) -> list:
    if isinstance(content, list):
        return [p for p in content if isinstance(p, str | dict)]
    if isinstance(content, str | dict):
        return [content]
    return []
