"""What every HTTP route shares: bodies read under a size cap (413 past it, checked against ``Content-Length``
first and while streaming) as strict JSON, errors answered as JSON naming the problem, and the API key."""

from __future__ import annotations

import base64
import binascii
import hmac
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse

from stablekit.serve.wire import ApiError, loads


def error_response(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message, "status": status}, status_code=status, headers=headers)


async def read_json(request: Request, max_bytes: int) -> Any:
    """The request body as JSON: 413 over ``max_bytes``, 400 for anything that is not strict JSON."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise ApiError(413, f"the body is {int(declared):,} bytes, over the limit of {max_bytes:,} (--max-body-bytes)")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise ApiError(413, f"the body is over the limit of {max_bytes:,} bytes (--max-body-bytes)")
        chunks.append(chunk)
    body = b"".join(chunks)
    try:
        # Decoded as UTF-8 first: json.loads would guess UTF-16/32 from the first bytes.
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ApiError(400, f"the body is not UTF-8 text: {e.reason}") from e
    return loads(text)


def check_api_key(request: Request, key: str | None) -> None:
    """With a key set, a request must carry it: ``Authorization: Bearer KEY``, or HTTP Basic with KEY as the
    password (what A1111 clients send). Compared in constant time."""
    if key is None:
        return
    header = request.headers.get("authorization", "")
    scheme, _, value = header.partition(" ")
    given = ""
    if scheme.lower() == "bearer":
        given = value.strip()
    elif scheme.lower() == "basic":
        try:
            given = base64.b64decode(value.strip(), validate=True).decode("utf-8").partition(":")[2]
        except (binascii.Error, UnicodeDecodeError):
            given = ""
    if not hmac.compare_digest(given.encode("utf-8"), key.encode("utf-8")):
        raise ApiError(401, "a valid API key is required", {"WWW-Authenticate": 'Bearer realm="stablekit"'})
