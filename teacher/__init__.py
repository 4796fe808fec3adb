"""The Wan model family: backbone adapter, next-shot teacher, flow math and sampler."""

from __future__ import annotations

__all__ = ["NextShotTeacher"]


def __getattr__(name: str):
    # Lazy so that `import teacher.encoders` / `teacher.flow` does not pay for importing diffusers models.
    if name == "NextShotTeacher":
        from teacher.model import NextShotTeacher

        return NextShotTeacher
    raise AttributeError(f"module 'teacher' has no attribute {name!r}")
