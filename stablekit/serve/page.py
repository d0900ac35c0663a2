"""The web page at ``/``: plain HTML, CSS and JavaScript shipped in the package (no build step, nothing fetched
from elsewhere), driving the job API (``/v1/jobs``) like any other client.

The page and its files need no API key: they hold no secret, and the page asks for the key itself (kept in the
tab's sessionStorage, sent as ``Authorization: Bearer``). Every file is answered with its content type,
``X-Content-Type-Options: nosniff`` and a Content-Security-Policy that allows scripts, styles and connections
to this origin only (no inline script or style), and images from it, ``data:`` and ``blob:`` URLs.
"""

from __future__ import annotations

from importlib.resources import files

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response

from stablekit.diffusion.sampling import SAMPLERS
from stablekit.serve.wire import ApiError

CSP = (
    "default-src 'self'; img-src 'self' data: blob:; object-src 'none'; base-uri 'none'; "
    "form-action 'none'; frame-ancestors 'none'"
)
HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",  # revalidate, so an upgraded server never runs last version's script
}
# The only files served, by name: nothing the request names is ever joined to a path.
STATIC = {
    "app.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
}


def _read(name: str) -> bytes:
    return (files("stablekit.serve") / "static" / name).read_bytes()


def router() -> APIRouter:
    page = APIRouter()
    index = _read("index.html")
    static = {name: (_read(name), kind) for name, kind in STATIC.items()}
    # The samplers the job API accepts, by the names the model's own settings use; for the page's menu.
    samplers = [{"name": name, "label": info.aliases[0] if info.aliases else name} for name, info in SAMPLERS.items()]

    @page.get("/", include_in_schema=False)
    async def root() -> Response:
        return Response(index, media_type="text/html; charset=utf-8", headers=HEADERS)

    @page.get("/static/samplers.json", include_in_schema=False)
    async def sampler_names() -> JSONResponse:
        return JSONResponse(samplers, headers=HEADERS)

    @page.get("/static/{name}", include_in_schema=False)
    async def asset(name: str) -> Response:
        if name not in static:
            raise ApiError(404, f"no static file {name!r}")
        body, kind = static[name]
        return Response(body, media_type=kind, headers=HEADERS)

    return page
