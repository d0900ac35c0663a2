"""What every API shares that needs no web framework (the Azure ML entry script runs without one): the error
type, strict JSON, request validation, and images in and out as base64.

Python's ``json`` accepts ``NaN`` and ``Infinity``, which are not JSON; they are refused. Image fields hold base64
or a ``data:image/...;base64,`` URL; a URL of any other kind is refused, never fetched.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import re
from typing import Any, TypeVar

from PIL import Image, PngImagePlugin
from pydantic import BaseModel, ValidationError

from stablekit.images import ImageError, decode_image

M = TypeVar("M", bound=BaseModel)

_DATA_URL = re.compile(r"data:(?P<type>[\w.+/-]*)(?:;[\w=.-]+)*;base64,", re.IGNORECASE)
_IMAGE_TYPES = {"image/png", "image/jpeg", "image/jpg", "image/webp"}


class ApiError(Exception):
    """Answered as ``{"error": message}`` with ``status``."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def loads(text: str) -> Any:
    """Strict JSON: a 400 :class:`ApiError` for anything else (NaN, Infinity, bad syntax, absurd nesting)."""
    if not text.strip():
        raise ApiError(400, "the body is empty; send a JSON object")
    try:
        return json.loads(text, parse_constant=_no_constants)
    except json.JSONDecodeError as e:
        raise ApiError(400, f"the body is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") from e
    except ValueError as e:  # NaN / Infinity, or an integer of more digits than Python converts
        raise ApiError(400, f"the body is not valid JSON: {e}") from e
    except RecursionError as e:
        raise ApiError(400, "the body is nested too deeply") from e


def _where(loc: tuple[Any, ...]) -> str:
    return ".".join(str(p) for p in loc) or "body"


def validate(model: type[M], data: Any) -> M:
    """``data`` as ``model``; a 400 naming the first bad field (and how many more there are)."""
    try:
        return model.model_validate(data)
    except ValidationError as e:
        errors = e.errors(include_url=False)
        first = errors[0]
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        raise ApiError(400, f"{_where(first['loc'])}: {first['msg']}{more}") from e


def image_field(value: str, field: str, max_pixels: int) -> Image.Image:
    """A base64 image field, decoded under the input rules (PNG, JPEG or WebP; the pixel limit)."""
    if not isinstance(value, str) or not value:
        raise ApiError(400, f"{field}: expected a base64-encoded image")
    text = value.strip()
    if re.match(r"[a-z][a-z0-9+.-]*://", text, re.IGNORECASE):
        raise ApiError(400, f"{field}: URLs are not fetched; send the image itself, base64-encoded")
    if text[:5].lower() == "data:":
        m = _DATA_URL.match(text)
        if m is None:
            raise ApiError(400, f"{field}: a data URL must be data:image/png|jpeg|webp;base64,...")
        if m.group("type").lower() not in _IMAGE_TYPES:
            raise ApiError(400, f"{field}: data URL of type {m.group('type')!r}; send image/png, jpeg or webp")
        text = text[m.end() :]
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as e:
        raise ApiError(400, f"{field}: not valid base64 ({e})") from e
    try:
        return decode_image(data, what=field, max_pixels=max_pixels)
    except ImageError as e:
        raise ApiError(400, str(e)) from e


def png_base64(image: Image.Image, parameters: str | None = None) -> str:
    """A PNG (with its ``parameters`` text chunk) as base64: how every route returns images."""
    buf = io.BytesIO()
    info = None
    if parameters is not None:
        info = PngImagePlugin.PngInfo()
        info.add_text("parameters", parameters)
    image.save(buf, format="PNG", pnginfo=info)
    return base64.b64encode(buf.getvalue()).decode("ascii")
