"""The causal chunk student: model, context, dual KV cache, per-chunk few-step sampling, student
folders (save/load), streaming generator."""

from __future__ import annotations

__all__ = ["CausalStudent", "StudentSettings", "Context", "KVCache", "ChunkStream", "save_student",
           "StreamingGenerator"]

_WHERE = {"CausalStudent": "student.model", "StudentSettings": "student.settings", "Context": "student.context",
          "KVCache": "student.cache", "ChunkStream": "student.sampling", "save_student": "student.export",
          "StreamingGenerator": "student.generator"}


def __getattr__(name: str):
    # Lazy so that importing `student` does not pay for importing diffusers models.
    if name in _WHERE:
        import importlib

        return getattr(importlib.import_module(_WHERE[name]), name)
    raise AttributeError(f"module 'student' has no attribute {name!r}")
