"""The WebSocket protocol of `/sessions/{id}/stream`: shot prompts in, JPEG frames out.

Client → server, text JSON: {"type": "shot", "prompt": "..."}.
Server → client, per shot k (0, 1, ... in the story):

    {"type": "shot_start", "shot": k}
    {"type": "chunk", "shot": k, "chunk": i, "frames": n, "first_frame": f, "latency_ms": ms}   then n binary
        messages, one JPEG frame each, in order (nothing else is sent between them)
    {"type": "shot_end", "shot": k, "frames": total, "seconds": s}

A refused message gets {"type": "error", "field": name, "message": one line} and the socket stays
open: binary or non-JSON data, an unknown type, an empty or too long prompt, a shot while one is
generating, a shot past --max-shots. A shot the model fails gets the same with field null; the story
keeps its finished shots. An unknown session is closed with code 4404, and so is an open socket
whose session is deleted or reaped. A disconnect mid-shot abandons the shot; the session stays, and
a new socket to it continues the story.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time

from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketState

from serve.frames import encode_jpegs
from serve.sessions import Chunk, ClientError, Session, SessionManager, ShotFailed

CLOSE_UNKNOWN_SESSION = 4404
log = logging.getLogger("shotdistill.serve")


class Sender:
    """Sends on one socket; a chunk's header and its frames go out together, never split by another message."""

    def __init__(self, ws: WebSocket) -> None:
        self.ws, self.lock = ws, asyncio.Lock()

    async def json(self, message: dict) -> None:
        async with self.lock:
            await self.ws.send_text(json.dumps(message))

    async def chunk(self, header: dict, frames: list[bytes]) -> None:
        async with self.lock:
            await self.ws.send_text(json.dumps(header))
            for frame in frames:
                await self.ws.send_bytes(frame)

    async def error(self, field: str | None, message: str) -> None:
        await self.json({"type": "error", "field": field, "message": message})


def parse_shot(message: dict, manager: SessionManager, session: Session) -> str:
    """The prompt of an acceptable `shot` message; ClientError naming the field otherwise."""
    if message.get("text") is None:
        raise ClientError(422, "message", "binary messages are not accepted; send text JSON like "
                          '{"type": "shot", "prompt": "..."}')
    try:
        data = json.loads(message["text"])
    except json.JSONDecodeError as e:
        raise ClientError(422, "message", f"not JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(data, dict):
        raise ClientError(422, "message", f"expected a JSON object, got {type(data).__name__}")
    if data.get("type") != "shot":
        raise ClientError(422, "type", f"unknown message type {data.get('type')!r}; the only type is 'shot'")
    return manager.check_shot(session, data.get("prompt"))


async def run_shot(sender: Sender, manager: SessionManager, session: Session, prompt: str) -> None:
    """One shot's messages, start to end; a model failure is reported as an error message."""
    shot, start, chunks = len(session.shots), time.perf_counter(), 0

    async def send(chunk: Chunk) -> None:
        nonlocal chunks
        frames = await asyncio.to_thread(encode_jpegs, chunk.frames)  # off the event loop
        await sender.chunk({"type": "chunk", "shot": shot, "chunk": chunks, "frames": len(frames),
                            "first_frame": chunk.first_frame, "latency_ms": round(chunk.latency_seconds * 1e3, 3)},
                           frames)
        chunks += 1

    await sender.json({"type": "shot_start", "shot": shot})
    try:
        total = await manager.run_shot(session, prompt, send)
    except ShotFailed as e:
        await sender.error(None, str(e))
        return
    await sender.json({"type": "shot_end", "shot": shot, "frames": total,
                       "seconds": round(time.perf_counter() - start, 4)})


def _log_failure(task: asyncio.Task) -> None:
    """A shot task that ended by an exception: a socket that closed mid-send is normal, the rest is logged."""
    if task.cancelled() or task.exception() is None:
        return
    error = task.exception()
    if not isinstance(error, WebSocketDisconnect):  # Starlette raises it for a send to a closed socket
        log.error("shot task failed: %s", error, exc_info=error)


async def stream(ws: WebSocket, manager: SessionManager, session_id: str) -> None:
    """Serve one socket of a session until the client leaves or the session ends (see module doc)."""
    await ws.accept()  # a close code reaches the client only on an accepted socket
    session = manager.sessions.get(session_id)
    if session is None:
        await ws.close(CLOSE_UNKNOWN_SESSION, "unknown session")
        return
    session.touch()
    sender, mine = Sender(ws), None
    ended = asyncio.ensure_future(session.ended.wait())
    try:
        while True:
            receive = asyncio.ensure_future(ws.receive())
            await asyncio.wait({receive, ended}, return_when=asyncio.FIRST_COMPLETED)
            if not receive.done():  # the session was deleted or reaped
                receive.cancel()
                with contextlib.suppress(Exception):  # the client may be gone already
                    await ws.close(CLOSE_UNKNOWN_SESSION, "session ended (deleted or idle)")
                return
            message = receive.result()
            if message["type"] == "websocket.disconnect":
                return
            session.touch()
            try:
                prompt = parse_shot(message, manager, session)
            except ClientError as e:
                await sender.error(e.field, e.message)
                continue
            mine = session.task = asyncio.create_task(run_shot(sender, manager, session, prompt))
            mine.add_done_callback(_log_failure)
    except WebSocketDisconnect:  # the client left while an error was being sent
        pass
    finally:
        ended.cancel()
        if mine is not None and not mine.done():  # this socket's shot dies with it; the session stays
            mine.cancel()
            with contextlib.suppress(BaseException):
                await mine
        if ws.application_state == WebSocketState.CONNECTED and ws.client_state == WebSocketState.CONNECTED:
            with contextlib.suppress(Exception):
                await ws.close()
