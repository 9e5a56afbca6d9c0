"""How deep client JSON may nest, checked the same way for API bodies and batch file lines.

Python's parser answers very deep nesting with a RecursionError, and what comes after it
(marshmallow, jsonschema, json.dumps to the engine) recurses too: anything deeper than
`MAX_DEPTH` is refused before use. Deep enough for any real request (tool and response-format
JSON schemas nest a dozen levels).
"""

from __future__ import annotations

import json

MAX_DEPTH = 64
_CONTAINERS = (dict, list)


class TooDeep(ValueError):
    def __init__(self, limit: int = MAX_DEPTH):
        super().__init__(f"nests deeper than {limit} levels")
        self.limit = limit


def nests_deeper_than(value, limit: int = MAX_DEPTH) -> bool:
    """Whether `value` (parsed JSON) has containers more than `limit` levels deep."""
    if type(value) not in _CONTAINERS:
        return False
    stack = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > limit:
            return True
        for child in node.values() if type(node) is dict else node:
            if type(child) in _CONTAINERS:
                stack.append((child, depth + 1))
    return False


def loads(raw: bytes | str, limit: int = MAX_DEPTH):
    """`json.loads`, raising TooDeep (a ValueError) past `limit` levels."""
    try:
        value = json.loads(raw)
    except RecursionError:  # past what the parser can follow: past the limit too
        raise TooDeep(limit) from None
    if nests_deeper_than(value, limit):
        raise TooDeep(limit)
    return value
