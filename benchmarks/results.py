"""benchmarks/RESULTS.md: each benchmark owns one `## ` section and replaces it in place."""

from __future__ import annotations

from pathlib import Path

from teacher.files import write_atomic

RESULTS = Path(__file__).with_name("RESULTS.md")


def write_section(text: str, path: Path = RESULTS) -> None:
    """Replace (or append) the section whose `## ` title is the first line of `text`, atomically."""
    title = text.splitlines()[0]
    old = path.read_text() if path.exists() else "# Benchmark results\n\n"
    start = old.find(title + "\n")
    if start < 0:
        new = old.rstrip("\n") + "\n\n" + text
    else:
        end = old.find("\n## ", start + len(title))
        new = old[:start] + text + ("" if end < 0 else "\n" + old[end + 1:])
    write_atomic(path, new)
