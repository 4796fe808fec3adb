"""Protects the tiny ablation recipes: each plans without compute, has its own run and really changes its axis."""

import functools
from pathlib import Path

import pytest
from omegaconf import OmegaConf

import distill.runner
from distill.config import load_recipe
from distill.runner import Node, plan

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
ABLATIONS = sorted((RECIPES / "tiny" / "ablations").glob("*.yaml"))
# the stage that reads an overridden section, where the ablation must differ from the default pipeline
READ_BY = {"teacher": "teacher", "data": "teacher", "student": "causal-init"}
# Stage 1 only is the default run's own dmd-intra stage (its per-stage eval row), by design
SHARED_STAGE = {"stage1-only.yaml": "dmd-intra"}


@pytest.fixture(scope="module", autouse=True)
def away_from_runs(tmp_path_factory):
    """Plan from an empty folder: run.out is relative, and the planner checks finished stages it finds
    there (a developer's own runs/ would make these tests depend on what they last trained)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(tmp_path_factory.mktemp("plans"))
        yield


@pytest.fixture(scope="module", autouse=True)
def loaded_once():
    """A planned tree loads a shared need (teacher.yaml, prepare.yaml) once per path that reaches it;
    the same (recipe, overrides) resolves to the same config, so the test loads each only once."""
    cached = functools.lru_cache(maxsize=None)(lambda path, overrides: load_recipe(path, list(overrides)))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(distill.runner, "load_recipe", lambda path, overrides=(): cached(path, tuple(overrides)))
        yield


def _nodes(node: Node) -> list[Node]:
    """Every stage node of a planned tree."""
    below = [n for child in node.needs + node.steps for n in _nodes(child)]
    return below + ([node] if node.folder else [])


def _settings(node: Node, run: bool = True) -> tuple:
    """A planned stage as what it computes: its resolved keys (`needs` as the folders they name;
    without `run` when run=False) and its stage."""
    keys = OmegaConf.to_container(node.cfg)
    keys["needs"] = sorted(n.folder for n in node.needs)
    if not run:
        keys.pop("run")
    return node.folder, keys


@pytest.fixture(scope="module")
def default() -> dict[str, Node]:
    """The default pipeline's stages, by folder."""
    return {n.folder: n for n in _nodes(plan(RECIPES / "tiny.yaml", []))}


def test_there_is_an_ablation_per_table3_axis():
    axes = {tuple(OmegaConf.load(p).get("overrides", [])) for p in ABLATIONS}
    for axis in ("data.context.strategy=first", "data.context.strategy=first_last", "teacher.captions=target_only",
                 "teacher.injection=channel_concat", "teacher.trainable=self_attention"):
        assert (axis,) in axes


@pytest.mark.parametrize("path", ABLATIONS, ids=lambda p: p.stem)
def test_ablation_plans_in_its_own_run_and_changes_its_axis(path, default):
    root = plan(path, [])
    nodes = _nodes(root)
    name = root.cfg.run.name
    assert {n.cfg.run.name for n in nodes} == {name}  # the whole tree writes into one run folder
    if path.name in SHARED_STAGE:
        shared = default[SHARED_STAGE[path.name]]
        assert name == shared.cfg.run.name and root.folder == shared.folder
        assert _settings(root) == _settings(shared)
        return
    assert name == f"{default['teacher'].cfg.run.name}-{path.stem}"  # the run folder names the axis
    changed = []
    for override in root.cfg.overrides:
        key, value = override.split("=", 1)
        assert {str(OmegaConf.select(n.cfg, key)) for n in nodes} == {value}, f"{override} not applied tree-wide"
        reader = READ_BY[key.split(".")[0]]
        assert str(OmegaConf.select(default[reader].cfg, key)) != value, f"{override} is the default: a no-op"
        changed.append(key)
    if not changed:  # a stage ablation: some stage of its tree is configured differently from the default's
        differs = [n.folder for n in nodes if n.folder not in default  # a stage the default has not (dpo)
                   or _settings(n, run=False) != _settings(default[n.folder], run=False)]
        assert differs, f"{path.name} plans the default pipeline under another name"
