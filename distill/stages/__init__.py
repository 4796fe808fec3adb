"""The stage registry: recipe `stage:` names → "module:Class", imported only when used.

A recipe may also name a class directly as "package.module:Class" (the tests' toy stage is
`toy_stage:ToyStage`). Register a stage with one line below.
"""

from __future__ import annotations

import importlib

REGISTRY: dict[str, str] = {
    "prepare": "distill.stages.prepare:PrepareStage",
    "teacher": "distill.stages.teacher:TeacherStage",
    "dpo": "distill.stages.dpo:DPOStage",
    "dpo_student": "distill.stages.dpo:StudentDPOStage",
    "ode_pairs": "distill.stages.ode_pairs:OdePairsStage",
    "causal_init": "distill.stages.causal_init:CausalInitStage",
    "dmd_intra": "distill.stages.dmd:DMDIntraStage",
    "dmd_inter": "distill.stages.dmd:DMDInterStage",
    "export": "distill.stages.export:ExportStage",
    "eval": "distill.stages.eval:EvalStage",
}


def resolve(name: str) -> type:
    """The stage class a recipe's `stage:` value names; ValueError with the choices if unknown."""
    path = REGISTRY.get(name, name)
    if ":" not in path:
        known = ", ".join(sorted(REGISTRY)) or "none registered"
        raise ValueError(f"stage: unknown stage '{name}' (registered: {known}; or give "
                         "'package.module:Class')")
    module, attr = path.split(":", 1)
    try:
        cls = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"stage: cannot import '{path}': {e}") from None
    return cls


def folder_name(name: str, cls: type) -> str:
    """The stage's folder in the run: its `folder` attribute, else its name with '_' → '-'."""
    folder = getattr(cls, "folder", None)
    if folder:
        return folder
    base = name.split(":")[0].rsplit(".", 1)[-1] if ":" in name else name
    return base.replace("_", "-")
