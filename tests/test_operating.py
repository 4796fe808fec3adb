"""Operating a run safely (issue 16): nothing a command did not create is deleted, one writer per run
folder, fingerprinted stages, inputs that cannot escape, honest exit codes, validation before compute."""

from __future__ import annotations

import argparse

import pytest

from conftest import write_recipe
from distill.config import ConfigError, load_recipe
from launch.cli import main


# --------------------------------------------------------------------------- item 8: inputs that could escape


@pytest.mark.parametrize("name", ["../../x", "a/b", "/tmp/abs", "..", ".", "x\ny", ""])
def test_run_name_must_be_one_path_component(tmp_path, toy_recipe, name):
    recipe = toy_recipe(tmp_path, run={"name": name})             # in the recipe file (a newline survives)
    with pytest.raises(ConfigError, match="run.name"):
        load_recipe(recipe)
    if name and "\n" not in name:                                # (a dotlist turns a newline into a space)
        with pytest.raises(ConfigError, match="run.name"):            # and as an override
            load_recipe(toy_recipe(tmp_path), [f"run.name={name}"])


@pytest.mark.parametrize("flag, value", [("--partition", "gpu\n#SBATCH --wrap=evil"), ("--time", "1:00 x"),
                                         ("--account", "a;rm -rf ~"), ("--partition", "")])
def test_slurm_values_take_a_strict_character_set(tmp_path, toy_recipe, capsys, flag, value):
    recipe = toy_recipe(tmp_path)
    out = tmp_path / "job.sh"
    assert main(["slurm", str(recipe), "--nodes", "1", "--gpus-per-node", "1", flag, value, "--out", str(out)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"shotdistill: error: slurm: {flag} ") and not out.exists(), err
    assert main(["slurm", str(recipe), "--nodes", "1", "--gpus-per-node", "1", "--partition", "gpu,gpu-long",
                 "--time", "2-00:00:00", "--account", "proj_1.x", "--out", str(out)]) == 0
