"""The HTTP application: routes from each API module over one :class:`~stablekit.serve.service.Service`.

``GET /`` (the web page, :mod:`stablekit.serve.page`, and its ``/static/`` files) and ``GET /health`` answer
without a key (load balancers and Azure's probes call them); every other route requires the API key when one is
set. No CORS headers are sent unless origins are configured.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from stablekit.serve import a1111, native, page, score
from stablekit.serve.http import check_api_key, error_response
from stablekit.serve.service import Service
from stablekit.serve.wire import ApiError


def create_app(service: Service) -> FastAPI:
    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        service.worker.start()
        try:
            yield
        finally:
            service.worker.stop()

    app = FastAPI(title="stablekit", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.service = service
    if service.settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(service.settings.cors_origins),
            allow_methods=["GET", "POST", "DELETE"],
            allow_headers=["Authorization", "Content-Type"],
        )

    @app.exception_handler(ApiError)
    async def api_error(_request: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc.status, exc.message, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        where = ".".join(str(p) for p in first.get("loc", ())) or "request"
        return error_response(400, f"{where}: {first.get('msg')}")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(exc.status_code, str(exc.detail), dict(exc.headers or {}))

    async def authorized(request: Request) -> None:
        check_api_key(request, service.settings.api_key)

    @app.get("/health")
    async def health() -> dict[str, object]:
        worker = service.worker
        return {"status": "ok", "model": service.model_name, "queued": worker.queued(), "running": len(worker.running)}

    app.include_router(page.router())  # `GET /`: the page asks for the key itself; its files hold no secret
    guarded = [Depends(authorized)]
    app.include_router(score.router(service), dependencies=guarded)
    app.include_router(native.router(service), dependencies=guarded)
    app.include_router(a1111.router(service), dependencies=guarded)
    return app
