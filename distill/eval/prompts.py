"""The prompts an evaluation generates: a JSONL file's, or a prepared folder's records.

A JSONL line is {"id"?, "global_caption"?, "shots": [{"caption": ...}, ...], "facts"?}; `facts`, the
synthetic world's description of what the shots show (`cast` and one entry of `shots` per shot), lets
the fact metrics (distill/eval/metrics.py) score the video. `select_prompts` picks an evaluation's
prompts from the recipe's `eval` section.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from teacher.files import read_text


@dataclass(frozen=True)
class Prompt:
    """One multi-shot prompt: its captions and, for the synthetic world, the facts they come from."""

    id: str
    global_caption: str
    captions: list[str]
    facts: dict | None = None


def _prompt_line(raw: object, where: str) -> Prompt:
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: a prompt must be a JSON object")
    shots = raw.get("shots")
    if not isinstance(shots, list) or not shots:
        raise ValueError(f"{where}: 'shots' must be a non-empty list of {{\"caption\": ...}}")
    captions = [s.get("caption") if isinstance(s, dict) else None for s in shots]
    if not all(isinstance(c, str) and c.strip() for c in captions):
        raise ValueError(f"{where}: every shot needs a non-empty 'caption'")
    facts = raw.get("facts")
    if facts is not None and (not isinstance(facts, dict) or not isinstance(facts.get("shots"), list)
                              or len(facts["shots"]) < len(captions) or "cast" not in facts):
        raise ValueError(f"{where}: 'facts' must hold 'cast' and one entry of 'shots' per shot")
    glob = raw.get("global_caption", "")
    if not isinstance(glob, str):
        raise ValueError(f"{where}: 'global_caption' must be a string")
    return Prompt(str(raw.get("id", where)), glob, captions, facts)


def load_prompts(path: str | Path) -> list[Prompt]:
    """Prompts of a JSONL file (see module doc); a bad line fails naming file and line."""
    path = Path(path)
    lines = read_text(path, "prompts file").splitlines()  # one line naming the file: missing, a folder, not UTF-8
    prompts = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            raw = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n}: invalid JSON ({e.msg})") from None
        prompts.append(_prompt_line(raw, f"{path}:{n}"))
    if not prompts:
        raise ValueError(f"{path}: no prompts")
    return prompts


def prepared_prompts(folder: str | Path) -> list[Prompt]:
    """The captions (and facts) of a prepared folder's records, in index order."""
    from distill.data.datasets import PreparedData

    return [Prompt(r["id"], r["global_caption"], list(r["captions"]), r.get("facts"))
            for r in PreparedData(folder).records]


def select_prompts(ev, prepared: Path) -> list[Prompt]:
    """`eval.prompts` (JSONL) or the prepared records, the first `eval.videos` of them (0: all)."""
    prompts = load_prompts(ev.prompts) if ev.prompts else prepared_prompts(prepared)
    return first(prompts, ev.videos, ev.prompts or prepared)


def first(prompts: list[Prompt], count: int, source: str | Path) -> list[Prompt]:
    """The first `count` prompts (0: all); ValueError naming `source` when there are none."""
    if not prompts:
        raise ValueError(f"{source}: no prompts to evaluate")
    return prompts[:count] if count else prompts
