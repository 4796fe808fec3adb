"""The command line: overrides after options, --stages, one-line errors for bad invocations."""

from __future__ import annotations

import pytest

from distill.stages import REGISTRY
from launch.cli import build_parser, main


def test_overrides_may_follow_options(tmp_path, toy_recipe, capsys):
    path = toy_recipe(tmp_path)
    assert main(["config", str(path), "train.steps=3", "logging.every=2"]) == 0
    out = capsys.readouterr().out
    assert "steps: 3" in out and "every: 2" in out
    with pytest.raises(SystemExit):
        main(["slurm", str(path), "--nodes", "1", "--gpus-per-node", "1", "--bogus"])
    assert "unrecognized arguments: --bogus" in capsys.readouterr().err


def test_stages_listing(capsys):
    assert main(["config", "--stages"]) == 0
    listed = dict(line.split() for line in capsys.readouterr().out.splitlines())
    assert listed == REGISTRY


def test_config_without_recipe_is_one_line(capsys):
    assert main(["config"]) == 1
    assert capsys.readouterr().err == ("shotdistill: error: config: give a RECIPE to resolve, "
                                       "--docs or --stages\n")


def test_run_launch_slurm_config_name_importable_handlers():
    import importlib
    sub = build_parser()._subparsers._group_actions[0]
    for name in ("run", "launch", "slurm", "config"):
        module, attr = sub.choices[name].get_default("handler").split(":")
        assert callable(getattr(importlib.import_module(module), attr)), name

