"""Sessions: one story each, sharing one loaded model and one worker thread.

The export is loaded once (`load_models`). A session owns a `StreamingGenerator` built on the shared
student, codec and text encoder, so what it holds of its own is its KV cache, its noise generator
and its history. Every use of the model is a step on the shared `ChunkWorker`: building the
generator, starting a shot, one chunk, closing an abandoned shot. A session's steps therefore run in
the order it queued them, and no two steps ever run at once.

Bounds: at most `max_sessions` sessions, `max_shots` finished shots each (their uint8 frames are
kept for the mp4: frames × height × width × 3 bytes per shot), prompts of at most
`max_prompt_chars` characters, and a session nobody touched for `idle_timeout` seconds (no request,
no message, no chunk) is removed by `reap`; an open WebSocket alone does not keep it.

Failures: a shot whose model step raises fails that shot only (`ShotFailed`); the session keeps its
history (an unfinished shot never joins it) and the other sessions never see the error.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import time
from dataclasses import dataclass
from typing import Awaitable, Callable, Sequence

import torch

from serve.limits import Limits
from serve.metrics import Metrics
from serve.worker import ChunkWorker
from student.generator import Reference, StreamingGenerator, VideoSettings, load_export
from student.model import CausalStudent
from teacher.encoders import Codec, T5TextEncoder


class ClientError(Exception):
    """A request the server refuses: the HTTP status, the offending field (or None) and one line."""

    def __init__(self, status: int, field: str | None, message: str) -> None:
        super().__init__(message)
        self.status, self.field, self.message = status, field, message


class ShotFailed(RuntimeError):
    """The model failed inside a shot; the session stays usable."""


@dataclass(frozen=True)
class Models:
    """The modules every session shares."""

    student: CausalStudent
    codec: Codec
    text_encoder: T5TextEncoder
    video: VideoSettings
    compile: str = "none"


def load_models(folder: str | os.PathLike, device: torch.device | str = "cpu",
                dtype: torch.dtype | None = None, compile: str = "none") -> Models:
    """Load an export (or any student folder) once; every session's generator runs its chunk passes the
    `compile` way (student/compiled.py)."""
    models = Models(*load_export(folder, device, dtype), compile=compile)
    new_generator(models)  # a student that does not fit its codec, text encoder or video fails here, not per session
    return models


def new_generator(models: Models, global_prompt: str = "", seed: int = 0,
                  references: Sequence[Reference] = ()) -> StreamingGenerator:
    """A session's generator: its own cache, noise and history over the shared modules."""
    return StreamingGenerator(models.student, models.codec, models.text_encoder, models.video,
                              global_prompt=global_prompt, seed=seed, references=references, compile=models.compile)


@dataclass(frozen=True)
class FinishedShot:
    prompt: str
    frames: torch.Tensor  # uint8 [F, H, W, 3]


@dataclass(frozen=True)
class Chunk:
    """One chunk handed to the client: frames, where they start in the shot, model and waiting time."""

    frames: torch.Tensor  # uint8 [f, H, W, 3]
    first_frame: int
    model_seconds: float
    latency_seconds: float  # from queueing the step to its frames being ready (queue wait + model time)


class Session:
    """One story. The `_`-methods run on the worker thread only; the rest on the event loop."""

    def __init__(self, id: str, generator: StreamingGenerator) -> None:
        self.id, self.generator = id, generator
        self.shots: list[FinishedShot] = []
        self.task: asyncio.Task | None = None  # the running shot (started by the WebSocket handler)
        self.ended = asyncio.Event()  # set when the session is deleted or reaped
        self.touched = time.monotonic()
        self._shot = None  # the running shot's python generator (worker thread)
        self._prompt, self._chunks = "", []

    @property
    def busy(self) -> bool:
        return self.task is not None and not self.task.done()

    @property
    def state(self) -> str:
        return "generating" if self.busy else "idle"

    def touch(self) -> None:
        self.touched = time.monotonic()

    def describe(self) -> dict:
        return {"session": self.id, "shots": [{"prompt": s.prompt, "frames": int(s.frames.shape[0])}
                                              for s in self.shots], "state": self.state}

    def story(self) -> torch.Tensor | None:
        """uint8 [F, H, W, 3] of every finished shot, or None before the first."""
        shots = list(self.shots)
        return torch.cat([s.frames for s in shots]) if shots else None

    # ---- worker thread -------------------------------------------------------------------
    def _begin(self, prompt: str) -> None:
        self._abandon()
        self._shot, self._prompt, self._chunks = self.generator.next_shot(prompt), prompt, []

    def _advance(self) -> tuple[torch.Tensor, float] | None:
        """The next chunk's frames and model seconds, or None when the shot has finished (and joined the story)."""
        start = time.perf_counter()
        try:
            frames = next(self._shot, None)
        except Exception:
            self._shot = None
            raise
        if frames is None:
            self.shots.append(FinishedShot(self._prompt, torch.cat(self._chunks)))
            self._shot, self._chunks = None, []
            return None
        self._chunks.append(frames)
        return frames, time.perf_counter() - start

    def _abandon(self) -> None:
        if self._shot is not None:
            self._shot.close()
        self._shot, self._chunks = None, []


class SessionManager:
    """Creates, finds, runs, deletes and reaps sessions within `limits` (see module doc)."""

    def __init__(self, models: Models, limits: Limits, metrics: Metrics | None = None) -> None:
        self.models, self.limits = models, limits.check()
        self.metrics = metrics or Metrics()
        self.worker = ChunkWorker()
        self.sessions: dict[str, Session] = {}
        self._opening = 0  # sessions being built: they count against max_sessions already
        self.metrics.watch(lambda: len(self.sessions), self.worker.depth)

    # ---- lifecycle -----------------------------------------------------------------------
    async def create(self, global_prompt: str = "", seed: int = 0,
                     references: Sequence[Reference] = ()) -> Session:
        """A new session; ClientError 503 when `max_sessions` are open, 422 naming a bad field."""
        self.check_text("global_prompt", global_prompt)
        for i, ref in enumerate(references):
            self.check_text(f"references[{i}].caption", ref.caption)
        slots = self.models.student.settings.context_frames - 1  # one global-cache slot stays for the history
        if len(references) > slots:
            raise ClientError(422, "references", f"{len(references)} reference images; this model takes at most "
                              f"{slots} (its context_frames minus one)")
        if len(self.sessions) + self._opening >= self.limits.max_sessions:
            raise ClientError(503, None, f"the server is full: {self.limits.max_sessions} sessions are open "
                              "(--max-sessions); try again later")
        self._opening += 1
        try:
            generator = await self.worker.submit(lambda: new_generator(self.models, global_prompt, seed, references))
        except ValueError as e:  # the models load with a generator already: what is left is the references
            raise ClientError(422, "references", one_line(e)) from None
        finally:
            self._opening -= 1
        session = Session(secrets.token_hex(8), generator)
        self.sessions[session.id] = session
        self.metrics.sessions.inc()
        return session

    def get(self, session_id: str) -> Session:
        session = self.sessions.get(session_id)
        if session is None:
            raise ClientError(404, "session", f"no session {session_id!r} (never opened, deleted or idle too long)")
        session.touch()
        return session

    def remove(self, session_id: str) -> None:
        """Forget a session: its running shot is closed on the worker, its sockets are told it ended."""
        session = self.sessions.pop(session_id, None)
        if session is None:
            raise ClientError(404, "session", f"no session {session_id!r} (never opened, deleted or idle too long)")
        session.ended.set()
        if session.busy:
            session.task.cancel()
        # after every step it queued; the generator (cache, history) is freed with the session
        self.worker.post(session._abandon)

    def reap(self, now: float | None = None) -> list[str]:
        """Remove sessions idle for longer than `idle_timeout`; their ids."""
        now = time.monotonic() if now is None else now
        idle = [s.id for s in self.sessions.values()
                if not s.busy and now - s.touched > self.limits.idle_timeout]
        for session_id in idle:
            self.remove(session_id)
        return idle

    async def reap_forever(self) -> None:
        """Reap every quarter of the idle timeout (a session lives at most 1.25 × idle_timeout idle)."""
        while True:
            await asyncio.sleep(self.limits.idle_timeout / 4)
            self.reap()

    def close(self) -> None:
        for session_id in list(self.sessions):
            self.remove(session_id)
        self.worker.close(timeout=30)

    # ---- shots -------------------------------------------------------------------------------
    def check_text(self, field: str, text: str) -> None:
        if len(text) > self.limits.max_prompt_chars:
            raise ClientError(422, field, f"{len(text)} characters; the limit is {self.limits.max_prompt_chars} "
                              "(--max-prompt-chars)")

    def check_shot(self, session: Session, prompt) -> str:
        """The prompt of an acceptable shot request; ClientError (field 'prompt' or 'type') if refused.
        The caller starts the shot as `session.task` before it next awaits, so two requests never
        both pass."""
        if session.busy:
            raise ClientError(409, "type", "a shot is already generating; send the next one after its shot_end")
        if len(session.shots) >= self.limits.max_shots:
            raise ClientError(422, "type", f"this session has its {self.limits.max_shots} shots (--max-shots); "
                              "open a new session")
        if prompt is not None and not isinstance(prompt, str):
            raise ClientError(422, "prompt", f"must be a string, got {type(prompt).__name__}")
        if not prompt or not prompt.strip():
            raise ClientError(422, "prompt", "shot prompt is empty: every shot needs a description")
        self.check_text("prompt", prompt)
        return prompt.strip()

    async def run_shot(self, session: Session, prompt: str, on_chunk: Callable[[Chunk], Awaitable[None]]) -> int:
        """Generate a checked shot, awaiting `on_chunk` for each chunk while the next one is queued;
        the frame count. ShotFailed if the model fails; any other exception (a cancelled task, a
        closed socket in `on_chunk`) abandons the shot on the worker."""
        worker, made, step = self.worker, 0, None
        try:
            await worker.submit(lambda: session._begin(prompt))
            queued, step = time.perf_counter(), worker.submit(session._advance)
            while True:
                try:
                    result = await step
                except Exception as e:
                    self.metrics.session_errors.inc()
                    raise ShotFailed(f"shot {len(session.shots)} failed in the model: {one_line(e)}") from e
                if result is None:
                    return made
                frames, seconds = result
                latency = time.perf_counter() - queued
                self.metrics.chunk(seconds)
                session.touch()
                # the next chunk queues now: the worker never waits for this one's encoding and sending
                queued, step = time.perf_counter(), worker.submit(session._advance)
                await on_chunk(Chunk(frames, made, seconds, latency))
                made += frames.shape[0]
        except BaseException:
            if step is not None and not step.done():
                step.cancel()  # skipped by the worker unless already running
            worker.post(session._abandon)
            raise
        finally:
            session.touch()


def one_line(e: BaseException) -> str:
    """The first line of an error, with its type when it says nothing else."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
