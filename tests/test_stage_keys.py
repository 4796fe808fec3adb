"""Protects "stages own their keys": a key set for a stage that cannot take effect there fails before any
compute, with one line naming the key and the stage (distill/keys.py)."""

import json

import pytest
import yaml
from conftest import REPO

from distill.config import ConfigError, to_yaml
from distill.runner import plan

TINY = REPO / "recipes" / "tiny"


def _recipe(tmp_path, name: str, data: dict) -> str:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return str(path)


def _extending(tmp_path, base: str, needs: list[str], data: dict) -> str:
    """A recipe in tmp_path extending a tiny one (its `needs:` given as absolute paths)."""
    return _recipe(tmp_path, f"my-{base}", {"base": str(TINY / base), "needs": [str(TINY / n) for n in needs], **data})


def test_a_recipe_key_its_stage_does_not_read_fails(tmp_path):
    recipe = _extending(tmp_path, "teacher.yaml", ["prepare.yaml"], {"ode": {"steps": 3}})
    with pytest.raises(ConfigError, match=r"my-teacher.yaml: ode.steps cannot take effect: stage "
                                          r"teacher does not read it \(it reads .*\)$"):
        plan(recipe, [f"run.out={tmp_path}"])


def test_an_override_no_stage_reads_fails(tmp_path):
    with pytest.raises(ConfigError, match=r"^override 'dmd.guidance=2': dmd.guidance cannot take effect: no stage "
                                          r"of this run reads it \(stages: prepare, teacher\)$"):
        plan(TINY / "teacher.yaml", [f"run.out={tmp_path}", "dmd.guidance=2"])


def test_a_pipeline_recipe_sets_only_run_keys(tmp_path):
    recipe = _recipe(tmp_path, "pipe.yaml", {"stage": "pipeline", "run": {"name": "p"},
                                             "pipeline": [str(TINY / "prepare.yaml")], "train": {"steps": 3}})
    with pytest.raises(ConfigError, match=r"pipe.yaml: train.steps cannot take effect: a pipeline recipe"):
        plan(recipe, [f"run.out={tmp_path}"])


def test_a_context_budget_other_than_the_students_fails(tmp_path):
    recipe = _extending(tmp_path, "dmd-intra.yaml", ["teacher.yaml", "causal-init.yaml"],
                        {"data": {"context": {"budget": 4}}})
    with pytest.raises(ConfigError, match=r"my-dmd-intra.yaml: data.context.budget=4 cannot take effect in "
                                          r"stage dmd-intra: its input dmd.generator_from='causal-init' is "
                                          r"planned with 3$"):
        plan(recipe, [f"run.out={tmp_path}"])


def test_a_student_key_a_finished_generator_was_not_built_with_fails(tmp_path):
    """`student.local_chunks=5` reaches every stage of the tree, but causal-init already finished with
    another value: it will not run again, and the DMD generator it made keeps its own."""
    run = tmp_path / "tiny" / "causal-init"
    run.mkdir(parents=True)
    built = plan(TINY / "causal-init.yaml", [f"run.out={tmp_path}"]).cfg
    (run / "config.yaml").write_text(to_yaml(built))
    (run / "DONE").write_text(json.dumps({"metrics": {}, "produces": "student"}))
    plan(TINY / "dmd-intra.yaml", [f"run.out={tmp_path}"])  # unchanged: fine
    assert built.student.local_chunks != 5
    with pytest.raises(ConfigError, match=r"dmd-intra.yaml: student.local_chunks=5 cannot take effect in stage "
                                          r"dmd-intra: its input dmd.generator_from='causal-init' was built with "
                                          rf"{built.student.local_chunks}$"):
        plan(TINY / "dmd-intra.yaml", [f"run.out={tmp_path}", "student.local_chunks=5"])


def test_a_source_outside_needs_fails(tmp_path):
    with pytest.raises(ConfigError, match=r"dmd.generator_from='teacher-x' is not among the stages in `needs:`"):
        plan(TINY / "dmd-intra.yaml", [f"run.out={tmp_path}", "dmd.generator_from=teacher-x"])
