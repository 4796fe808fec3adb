"""Protects the eval's HParams session (distill/eval/hparams.py): it carries the keys of the stages
the eval scores, so the HParams tab sorts eval metrics by the axes the stages trained with."""

from __future__ import annotations

import json

import pytest
# the eval tests' run "s": hand-made stages (a teacher with its own sampler, 32x32 students) that
# the eval stage scores with a recipe of its own (the schema's 64x64 and 50 sampler steps)
from test_eval_compare import run, staged  # noqa: F401
from test_tensorboard import Board

from conftest import REPO
from distill.config import load_recipe, to_yaml
from distill.eval.hparams import evaluated_hparams, scored_stages
from distill.logging import RUN_INFO_SUFFIX, write_run_info

EVAL = REPO / "recipes/tiny/eval.yaml"
ALL = "eval.stages=[teacher,causal-init,dmd-intra,dmd-inter]"


def _stage(run, name: str, recipe: str, produces: str | None, finished: float | None, *overrides: str):
    """A stage folder as the runner leaves it: its resolved recipe and, when finished, DONE."""
    folder = run / name
    folder.mkdir(parents=True)
    cfg = load_recipe(REPO / "recipes/tiny" / recipe, [f"run.out={run.parent}", *overrides])
    (folder / "config.yaml").write_text(to_yaml(cfg))
    if finished is not None:
        (folder / "DONE").write_text(json.dumps({"metrics": {}, "produces": produces, "finished": finished}))


@pytest.fixture
def fake_run(tmp_path):
    """Stages differing in student.indicator and data.context.strategy; dmd-inter has not finished."""
    run = tmp_path / "tiny"
    _stage(run, "teacher", "teacher.yaml", "teacher", 1.0)
    _stage(run, "causal-init", "causal-init.yaml", "student", 2.0, "student.indicator=learnable")
    _stage(run, "dmd-intra", "dmd-intra.yaml", "student", 3.0, "student.indicator=none",
           "data.context.strategy=first", "eval.videos=9")
    _stage(run, "dmd-inter", "dmd-inter.yaml", None, None, "student.indicator=rope_offset")
    return run


def _eval(run, *overrides: str):
    return load_recipe(EVAL, [f"run.out={run.parent}", *overrides])


def test_the_newest_scored_stage_wins_and_the_eval_keeps_its_own_section(fake_run):
    cfg = _eval(fake_run, ALL)
    assert [p.name for p in scored_stages(cfg, fake_run)] == ["teacher", "causal-init", "dmd-intra"]
    hparams = evaluated_hparams(cfg, fake_run)
    assert cfg.student.indicator == "auto" and hparams["student.indicator"] == "none"  # dmd-intra's
    assert cfg.data.context.strategy == "dynamic" and hparams["data.context.strategy"] == "first"
    assert hparams["stage"] == "eval" and hparams["eval.videos"] == cfg.eval.videos
    assert json.loads(hparams["eval.stages"]) == ["teacher", "causal-init", "dmd-intra", "dmd-inter"]


def test_the_final_student_counts_unless_the_export_is_named(fake_run):
    cfg = _eval(fake_run, "eval.stages=[teacher,causal-init]")
    assert evaluated_hparams(cfg, fake_run)["student.indicator"] == "none"  # the newest student, scored as final
    named = _eval(fake_run, "eval.stages=[teacher,causal-init]", "eval.export=/elsewhere")
    assert evaluated_hparams(named, fake_run)["student.indicator"] == "learnable"


def test_the_replaced_session_is_the_one_tensorboard_shows(fake_run):
    cfg = _eval(fake_run, ALL)
    tb = fake_run / "tb" / "eval"
    write_run_info(tb, cfg, main=True)  # as the runner does at stage start
    write_run_info(tb, cfg, main=True, hparams=evaluated_hparams(cfg, fake_run), replace=True)
    assert len(list(tb.glob(f"*{RUN_INFO_SUFFIX}"))) == 1
    hparams, _ = Board(fake_run.parent).sessions()["tiny/tb/eval"]
    assert hparams["student.indicator"] == "none" and hparams["data.context.strategy"] == "first"


def test_the_eval_stage_session_carries_the_scored_stages_keys(staged):
    ev = staged[0]
    sessions = Board(ev.parent.parent).sessions()
    hparams, metrics = sessions["s/tb/eval"]
    assert hparams["data.height"] == 32 and hparams["sampler.steps"] == 2  # the stages', not the eval recipe's
    assert hparams["eval.videos"] == 2 and hparams["stage"] == "eval"
    assert "eval/teacher/cut_accuracy" in metrics  # the session's metrics sort by those keys


def test_cli_eval_of_a_run_writes_the_same_session(staged, tmp_path):
    from launch.cli import main

    ev = staged[0]
    out = tmp_path / "cli"
    assert main(["eval", str(ev.parent), "--out", str(out), "eval.stages=[teacher]"]) == 0
    hparams, _ = Board(tmp_path).sessions()["cli/tb"]
    assert hparams["data.height"] == 32 and hparams["sampler.steps"] == 2
