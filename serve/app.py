"""The ASGI app of `shotdistill serve`: routes, request bodies and the one error shape.

    GET  /                          the page (serve/page/index.html)
    GET  /health                    {"status": "ok", "sessions": n, "queue": depth}
    GET  /metrics                   Prometheus text (serve/metrics.py)
    POST /sessions                  {"global_prompt", "seed", "references": [{"image": base64, "caption"}]}
                                    -> 201 {"session", "video": {...}, "limits": {...}}
    GET  /sessions/{id}             {"session", "shots": [{"prompt", "frames"}], "state": "idle" | "generating"}
    GET  /sessions/{id}/video.mp4   the finished shots as one mp4
    DELETE /sessions/{id}           204
    WS   /sessions/{id}/stream      shots in, frames out (serve/stream.py)

Every HTTP error is {"error": {"field": name or null, "message": one line}} with a 4xx status (422
for a bad field, naming it as `references[0].image`); an unexpected server error is a 500 of the
same shape. Nothing a client sends can stop the server.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import tempfile
from importlib import resources
from pathlib import Path

from fastapi import FastAPI, Request, WebSocket
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from serve.frames import ImageError, decode_reference
from serve.metrics import Metrics
from serve.limits import Limits
from serve.sessions import ClientError, Models, SessionManager, one_line
from serve.stream import stream
from student.generator import Reference
from student.video import write_mp4

log = logging.getLogger("shotdistill.serve")
PAGE = ("page", "index.html")  # package data of `serve`


class ReferenceBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    image: StrictStr = Field(description="base64 PNG or JPEG at the video's size")
    caption: StrictStr = ""


class SessionBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    global_prompt: StrictStr = ""
    seed: StrictInt = Field(0, ge=0, lt=2 ** 63)
    references: list[ReferenceBody] = []


def error(status: int, field: str | None, message: str) -> JSONResponse:
    return JSONResponse({"error": {"field": field, "message": message}}, status_code=status)


def field_name(loc: tuple) -> str:
    """A pydantic location as the client wrote it: ('body', 'references', 0, 'image') -> references[0].image."""
    parts = list(loc[1:] if loc and loc[0] in ("body", "query", "path") else loc) or list(loc[:1])
    name = ""
    for part in parts:
        name += f"[{part}]" if isinstance(part, int) else (f".{part}" if name else str(part))
    return name


def install_errors(app: FastAPI) -> None:
    @app.exception_handler(ClientError)
    async def client_error(request: Request, e: ClientError) -> JSONResponse:
        return error(e.status, e.field, e.message)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError) -> JSONResponse:
        first = e.errors()[0]
        if first.get("type") == "json_invalid":  # its location is a character offset, not a field
            return error(422, "body", f"not JSON ({first.get('ctx', {}).get('error', 'decode error')})")
        return error(422, field_name(tuple(first.get("loc", ()))), first.get("msg", "invalid value"))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        return error(e.status_code, None, str(e.detail))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, e: Exception) -> JSONResponse:
        log.error("%s %s failed", request.method, request.url.path, exc_info=e)
        return error(500, None, f"internal error: {one_line(e)}")


def references_of(body: SessionBody, models: Models) -> list[Reference]:
    video = models.video
    refs = []
    for i, ref in enumerate(body.references):
        try:
            image = decode_reference(ref.image, video.height, video.width)
        except ImageError as e:
            raise ClientError(422, f"references[{i}].image", f"references[{i}].image {e}") from None
        refs.append(Reference(image, ref.caption))
    return refs


def mp4_bytes(frames, fps: float) -> bytes:
    """The frames as an mp4 file's bytes (yuv420p plays everywhere; an odd frame size needs yuv444p)."""
    pix_fmt = "yuv420p" if frames.shape[1] % 2 == 0 and frames.shape[2] % 2 == 0 else "yuv444p"
    with tempfile.TemporaryDirectory(prefix="shotdistill-serve-") as folder:
        path = Path(folder) / "story.mp4"
        write_mp4(path, frames.numpy(), fps, pix_fmt=pix_fmt)
        return path.read_bytes()


def create_app(models: Models, limits: Limits = Limits()) -> FastAPI:
    """The server over loaded models: its own session manager, worker thread and metrics registry."""
    metrics = Metrics()
    manager = SessionManager(models, limits, metrics)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        reaper = asyncio.create_task(manager.reap_forever())
        try:
            yield
        finally:
            reaper.cancel()
            manager.close()

    # every route is async: the manager and its sessions live on the event loop's thread
    app = FastAPI(title="shotdistill serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.manager = manager
    install_errors(app)

    @app.get("/")
    async def page() -> Response:
        page = resources.files("serve").joinpath(*PAGE)
        if not page.is_file():
            return error(404, None, "the page is not installed (serve/page/index.html)")
        return HTMLResponse(page.read_text(encoding="utf-8"))

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "sessions": len(manager.sessions), "queue": manager.worker.depth()}

    @app.get("/metrics")
    async def metrics_text() -> Response:
        return Response(metrics.exposition(), media_type=metrics.content_type)

    @app.post("/sessions", status_code=201)
    async def open_session(body: SessionBody) -> dict:
        references = await run_in_threadpool(references_of, body, models)  # image decoding: off the event loop
        session = await manager.create(body.global_prompt, body.seed, references)
        video = models.video
        return {"session": session.id, "video": {"height": video.height, "width": video.width, "fps": video.fps,
                                                 "frames": video.frames}, "limits": manager.limits.as_json()}

    @app.get("/sessions/{session_id}")
    async def describe(session_id: str) -> dict:
        return manager.get(session_id).describe()

    @app.delete("/sessions/{session_id}", status_code=204)
    async def delete(session_id: str) -> Response:
        manager.remove(session_id)
        return Response(status_code=204)

    @app.get("/sessions/{session_id}/video.mp4")
    async def video(session_id: str) -> Response:
        frames = manager.get(session_id).story()
        if frames is None:
            raise ClientError(409, "session", "no finished shot yet: the mp4 exists after the first shot_end")
        data = await run_in_threadpool(mp4_bytes, frames, models.video.fps)
        return Response(data, media_type="video/mp4",
                        headers={"Content-Disposition": f'attachment; filename="story-{session_id}.mp4"'})

    @app.websocket("/sessions/{session_id}/stream")
    async def websocket(ws: WebSocket, session_id: str) -> None:
        await stream(ws, manager, session_id)

    return app
