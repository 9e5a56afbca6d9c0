"""Request fields as vLLM reads them: pydantic's lax coercion, and the two error shapes it answers.

vLLM's OpenAI server parses bodies with pydantic models in lax mode, so it accepts more than the
OpenAI spec says (`"max_tokens": "5"`, `"stream": "yes"`, `"n": 2.0`) and refuses a value of the
wrong type with a *validation* error: type `Bad Request`, `param` the field's location
(`body.stream`), and a message listing pydantic's error dicts. Checks made after parsing (limits,
combinations) are `BadRequestError`s with the field's name, or none, as `param`. The sim answers
both the same way (measured on vLLM 0.32.0), so the gateway meets here what it will meet there.
"""

from __future__ import annotations

from aiohttp import web

_TRUE = frozenset(("1", "on", "t", "true", "y", "yes"))
_FALSE = frozenset(("0", "off", "f", "false", "n", "no"))


class ApiError(Exception):
    """A request the engine refuses, carrying vLLM's error body fields."""

    def __init__(self, status: int, message: str, error_type: str, param: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.error_type = error_type
        self.param = param

    def response(self) -> web.Response:
        body = {
            "error": {
                "message": self.message,
                "type": self.error_type,
                "param": self.param,
                "code": self.status,
            }
        }
        return web.json_response(body, status=self.status)


def bad_request(message: str, param: str | None = None) -> ApiError:
    """A refusal after parsing: vLLM's `BadRequestError`."""
    return ApiError(400, message, "BadRequestError", param)


def _shown(value: object) -> str:
    if isinstance(value, dict | list):
        kind = "dict" if isinstance(value, dict) else "list"
        return f"<{kind} of {len(value)} items>"
    return str(value)


def validation_error(loc: str, kind: str, msg: str, value: object,
                     *more: tuple[str, str, str], ctx: str | None = None) -> ApiError:
    """A value of the wrong type: pydantic's error, as vLLM's server words it. `more` holds
    further (loc, type, msg) errors about the same value: a field of a union type (`stop`: a
    string or a list) fails once per member. `ctx`, when given, is the first error's context
    as pydantic prints it (`{'error': ValueError('...')}`)."""
    errors = [(loc, kind, msg), *more]
    count = f"{len(errors)} validation error{'s' if len(errors) > 1 else ''}"
    lines = [f"  {{'type': '{k}', 'loc': '{where}', 'msg': {text!r}, 'input': {_shown(value)!r}}}"
             for where, k, text in errors]
    if ctx is not None:
        lines[0] = f"{lines[0][:-1]}, 'ctx': {ctx}}}"
    return ApiError(400, "\n".join([f"{count}:", *lines]), "Bad Request", loc)


def lax_int(body: dict, field: str, default: int | None = None) -> int | None:
    """An integer field: ints, integral floats and numeric strings, as pydantic's lax mode."""
    value = body.get(field)
    if value is None:
        return default
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        if value.is_integer():
            return int(value)
        raise validation_error(f"body.{field}", "int_from_float",
                               "Input should be a valid integer, got a number with a fractional "
                               "part", value)
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            pass
        raise validation_error(f"body.{field}", "int_parsing",
                               "Input should be a valid integer, unable to parse string as an "
                               "integer", value)
    raise validation_error(f"body.{field}", "int_type", "Input should be a valid integer", value)


def lax_float(body: dict, field: str, default: float | None = None) -> float | None:
    value = body.get(field)
    if value is None:
        return default
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value.strip())
        except ValueError:
            pass
        raise validation_error(f"body.{field}", "float_parsing",
                               "Input should be a valid number, unable to parse string as a "
                               "number", value)
    raise validation_error(f"body.{field}", "float_type", "Input should be a valid number", value)


def lax_bool(body: dict, field: str, default: bool = False) -> bool:
    """A boolean field: true/false, 0/1 and pydantic's words ("yes", "off", ...)."""
    value = body.get(field)
    if value is None:
        return default
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    raise validation_error(f"body.{field}", "bool_parsing",
                           "Input should be a valid boolean, unable to interpret input", value)
