"""Recipe validation: typos, wrong types and missing values fail before compute, in one line."""

from __future__ import annotations


import pytest
import yaml

from conftest import shotdistill, write_recipe
from distill.config import ConfigError, key_docs, load_recipe
from distill.runner import plan
from launch.cli import main


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err  # one line, no traceback
    return err[0]


def _set(section, **values):
    return lambda data: data.setdefault(section, {}).update(values)


def _drop_run_name(data):
    del data["run"]["name"]


@pytest.mark.parametrize("edit, overrides, expected", [
    (_set("train", stpes=3), [],
     "{path}: train.stpes: Key 'stpes' not in 'TrainConfig'. Did you mean: 'steps'?"),
    (None, ["deepspeed.zero_stag=3"],
     "override 'deepspeed.zero_stag=3': deepspeed.zero_stag: Key 'zero_stag' not in "
     "'DeepSpeedConfig'. Did you mean: 'zero_stage'?"),
    (None, ["train.steps=abc"],
     "override 'train.steps=abc': train.steps: Value 'abc' of type 'str' could not be "
     "converted to Integer"),
    (_set("optim", critic={"lr": "fast"}), [],
     "{path}: optim.critic.lr: Value 'fast' of type 'str' could not be converted to Float"),
    (_drop_run_name, [], "{path}: missing mandatory value for run.name"),
    (_set("deepspeed", zero_stage=4), [], "{path}: deepspeed.zero_stage: 4 is not one of 0, 1, 2, 3"),
])
def test_bad_recipe_exits_before_compute(tmp_path, toy_recipe, capsys, edit, overrides, expected):
    path = toy_recipe(tmp_path)
    data = yaml.safe_load(path.read_text())
    if edit:
        edit(data)
    write_recipe(path, data)
    assert main(["run", str(path), *overrides]) == 1
    assert _error_line(capsys) == "shotdistill: error: " + expected.format(path=path)
    assert not (tmp_path / "runs").exists()  # nothing was computed or written


def test_cli_process_prints_one_line_and_exits_1(tmp_path, toy_recipe):
    path = toy_recipe(tmp_path)
    proc = shotdistill(["launch", str(path), "--nproc", "1", "train.stpes=3"], cwd=tmp_path)
    assert proc.returncode == 1
    assert proc.stderr.strip() == ("shotdistill: error: override 'train.stpes=3': train.stpes: "
                                   "Key 'stpes' not in 'TrainConfig'. Did you mean: 'steps'?")
    assert "Traceback" not in proc.stdout + proc.stderr


def test_needs_are_validated_with_the_invoking_overrides(tmp_path, toy_recipe):
    first = toy_recipe(tmp_path, "first")
    second = toy_recipe(tmp_path, "second", needs=["first.yaml"], stage="toy_stage:ToyStageB")
    write_recipe(tmp_path / "first.yaml",
                 {**yaml.safe_load(first.read_text()), "train": {"stpes": 1}})
    with pytest.raises(ConfigError, match=r"first.yaml: train.stpes: .*Did you mean: 'steps'\?"):
        plan(second, [])
    write_recipe(tmp_path / "first.yaml", {"stage": "toy_stage:ToyStage", "run": {"name": "own"}})
    node = plan(second, ["train.steps=3"])
    need = node.needs[0]
    assert (need.cfg.run.name, need.cfg.run.out) == ("second", node.cfg.run.out)
    assert need.cfg.train.steps == 3 and need.folder == "toy" and node.folder == "toy-b"


def test_need_cycle_and_unknown_stage(tmp_path, toy_recipe):
    a = toy_recipe(tmp_path, "a", needs=["b.yaml"])
    toy_recipe(tmp_path, "b", needs=["a.yaml"])
    with pytest.raises(ConfigError, match="recipe needs itself"):
        plan(a, [])
    bad = toy_recipe(tmp_path, "c", stage="no_such_stage")
    with pytest.raises(ConfigError, match=r"c.yaml: stage: unknown stage 'no_such_stage'"):
        plan(bad, [])


def test_every_key_has_a_one_line_doc(capsys):
    rows = key_docs()
    assert len(rows) > 20
    for full_key, _, doc in rows:
        assert doc.strip() and "\n" not in doc, full_key
    assert main(["config", "--docs"]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in printed] == [k for k, _, _ in rows]


def test_config_prints_resolved_recipe(tmp_path, toy_recipe, capsys):
    path = toy_recipe(tmp_path)
    assert main(["config", str(path), "train.steps=7"]) == 0
    out = capsys.readouterr().out
    cfg = load_recipe(path, ["train.steps=7"])
    assert "steps: 7" in out and cfg.train.steps == 7
    assert f"out: {tmp_path / 'runs'}" in out
