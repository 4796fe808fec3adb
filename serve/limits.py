"""What one server allows: the `shotdistill serve` flags' values (light: the CLI reads its defaults)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Limits:
    max_sessions: int = 4  # sessions open at once; one more gets 503
    idle_timeout: float = 600.0  # seconds without a request, message or chunk before a session is removed
    max_prompt_chars: int = 1000  # longest shot prompt, global prompt or reference caption
    max_shots: int = 32  # finished shots per session (their frames are kept for the mp4)

    def check(self) -> "Limits":
        for name in ("max_sessions", "idle_timeout", "max_prompt_chars", "max_shots"):
            if not getattr(self, name) > 0:
                raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        return self

    def as_json(self) -> dict:
        return {"max_shots": self.max_shots, "max_prompt_chars": self.max_prompt_chars,
                "idle_timeout": self.idle_timeout}
