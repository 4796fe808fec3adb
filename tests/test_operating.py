"""Operating a run safely (issue 16): nothing a command did not create is deleted, one writer per run
folder, fingerprinted stages, inputs that cannot escape, honest exit codes, validation before compute."""

from __future__ import annotations

import json

import pytest
import yaml

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


# --------------------------------------------------------------------------- item 1: nothing we did not create is deleted


def test_atomic_folder_replaces_only_a_folder_it_wrote(tmp_path):
    from teacher.files import FOLDER_MARKER, atomic_folder

    mine = tmp_path / "mine"
    with atomic_folder(mine) as tmp:
        (tmp / "a").write_text("1")
    assert (mine / FOLDER_MARKER).is_file()
    with atomic_folder(mine) as tmp:                              # ours: replaced
        (tmp / "b").write_text("2")
    assert sorted(p.name for p in mine.iterdir()) == sorted(["b", FOLDER_MARKER])
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "thesis.tex").write_text("years of work")
    with pytest.raises(FileExistsError, match=f"{theirs}: not empty and not written by shotdistill"):
        with atomic_folder(theirs) as tmp:
            (tmp / "x").write_text("3")
    assert sorted(p.name for p in theirs.iterdir()) == ["thesis.tex"]
    legacy = tmp_path / "legacy"                                  # a file the caller names as its own
    legacy.mkdir()
    (legacy / "generator.json").write_text("{}")
    with atomic_folder(legacy, ours=("generator.json",)) as tmp:
        (tmp / "c").write_text("4")
    empty = tmp_path / "empty"
    empty.mkdir()
    with atomic_folder(empty) as tmp:
        (tmp / "d").write_text("5")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "legacy", "mine", "theirs"]  # no temporaries


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A run folder with one finished causal-init student stage (tiny, no training)."""
    import json

    import yaml
    from omegaconf import OmegaConf

    from distill.config import schema
    from distill.models import student_components
    from helpers import make_tiny_wan
    from student.export import save_student
    from student.model import CausalStudent
    from teacher import NextShotTeacher

    recipe = {"stage": "causal_init", "run": {"name": "r"}, "codec": {"kind": "patch", "patch": 2},
              "text_encoder": {"kind": "tiny_t5", "dim": 24, "layers": 1, "heads": 2, "max_tokens": 8},
              "data": {"height": 16, "width": 16, "fps": 8, "shot_frames": 6}}
    run = tmp_path_factory.mktemp("finished") / "run"
    stage = run / "causal-init"
    teacher = NextShotTeacher(make_tiny_wan(in_channels=12, out_channels=12, text_dim=24))
    save_student(CausalStudent.from_teacher(teacher, chunk_frames=3), stage / "student",
                 student_components(OmegaConf.merge(schema(), recipe)))
    (stage / "config.yaml").write_text(yaml.safe_dump(recipe))
    (stage / "DONE").write_text(json.dumps({"metrics": {}, "produces": "student", "finished": 0.0}))
    (run / "config.yaml").write_text(yaml.safe_dump(recipe))
    return run


def _tree(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def test_export_never_replaces_its_source_or_a_folder_it_did_not_write(finished_run, tmp_path, capsys, one_thread):
    before = _tree(finished_run)
    for out in (finished_run, finished_run / "causal-init", finished_run / "causal-init" / "student"):
        assert main(["export", str(finished_run), "--out", str(out)]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "refusing to replace it" in err[0], err
        assert _tree(finished_run) == before
    unrelated = tmp_path / "photos"
    unrelated.mkdir()
    (unrelated / "cat.jpg").write_bytes(b"meow")
    assert main(["export", str(finished_run), "--out", str(unrelated)]) == 1
    assert "not written by shotdistill" in capsys.readouterr().err
    assert _tree(unrelated) == ["cat.jpg"]
    out = tmp_path / "export"
    assert main(["export", str(finished_run), "--out", str(out)]) == 0
    assert main(["export", str(finished_run), "--out", str(out)]) == 0   # our own export: replaced
    assert (out / "generator.json").is_file()


# --------------------------------------------------------------------------- item 2: one run folder, one writer


def test_second_run_into_a_locked_folder_fails_at_once_naming_the_holder(tmp_path, toy_recipe, capsys):
    import os
    import socket

    from distill import layout
    from distill.runner import lock_run

    recipe = toy_recipe(tmp_path, train={"steps": 2, "checkpoint_every": 2})
    run = tmp_path / "runs" / "toy"
    holder = lock_run(run)                       # another run is writing the folder
    try:
        assert main(["run", str(recipe)]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert err == [f"shotdistill: error: {run}: another run is writing this folder (host "
                       f"{socket.gethostname()}, pid {os.getpid()}); wait for it to end or choose another run.name"]
        assert sorted(p.name for p in run.iterdir()) == [layout.LOCK]   # nothing written
    finally:
        os.close(holder)
    assert main(["run", str(recipe)]) == 0       # released: the run goes ahead, and releases it in turn
    os.close(lock_run(run))


# --------------------------------------------------------------------------- item 11: validation that matches the keys' meaning


def _one_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


@pytest.mark.parametrize("override, named", [
    ("train.steps=0", "train.steps=0 must be >= 1: stage toy trains"),
    ("train.max_bad_steps=0", "train.max_bad_steps=0 must be >= 1"),
    ("optim.critic.lr=-1", "optim.critic.lr=-1.0 must be >= 0"),
    ("data.height=0", "data.height=0 must be >= 1"),
    ("data.width=-4", "data.width=-4 must be >= 1"),
    ("data.fps=0", "data.fps=0.0 must be > 0"),
])
def test_values_outside_their_meaning_fail_before_compute_naming_the_key(tmp_path, toy_recipe, capsys, override,
                                                                        named):
    recipe = toy_recipe(tmp_path)
    assert main(["run", str(recipe), override]) == 1
    assert _one_error(capsys) == f"shotdistill: error: {recipe}: {named}" + (
        " (with 0 steps it would finish an untrained model)" if override == "train.steps=0" else "")
    assert not (tmp_path / "runs").exists()


def test_yaml_errors_keep_line_and_column(tmp_path, capsys):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("stage: toy_stage:ToyStage\ntrain:\n  steps: [1, 2\n  micro_batch: 3\n")
    assert main(["run", str(recipe)]) == 1
    assert _one_error(capsys).startswith(f"shotdistill: error: {recipe}:4:14: invalid YAML: ")


def test_unreadable_text_files_name_the_file(tmp_path, capsys):
    from distill.eval.prompts import load_prompts
    from launch.serve import read_shots_file

    latin1 = tmp_path / "prompts.txt"
    latin1.write_bytes("wide: the café at night\n".encode("latin-1"))
    with pytest.raises(ValueError, match=f"{latin1}: shots file is not UTF-8 text"):
        read_shots_file(str(latin1))
    with pytest.raises(ValueError, match=f"{latin1}: prompts file is not UTF-8 text"):
        load_prompts(latin1)
    assert main(["run", str(latin1)]) == 1
    assert _one_error(capsys).startswith(f"shotdistill: error: {latin1}: recipe is not UTF-8 text")
    folder = tmp_path / "videos"
    folder.mkdir()
    assert main(["data", "prepare", str(folder), "--out", str(tmp_path / "prepared")]) == 1
    assert f"data.manifest={str(folder)!r} is a folder" in _one_error(capsys)
    assert not (tmp_path / "prepared").exists()


def test_disk_full_names_the_path_and_leaves_no_temporary(tmp_path, monkeypatch):
    import errno
    import os

    from teacher import files

    def full(*_):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with monkeypatch.context() as m:
        m.setattr(files.os, "fsync", full)
        with pytest.raises(OSError, match=f"No space left on device: '{tmp_path / 'a.json'}'"):
            files.write_atomic(tmp_path / "a.json", "{}")
    with pytest.raises(OSError, match=f"No space left on device: '{tmp_path / 'model'}'"):
        with files.atomic_folder(tmp_path / "model"):
            full()
    assert list(tmp_path.iterdir()) == []


def test_resume_never_says_what_it_discards(tmp_path, toy_recipe, capsys):
    recipe = toy_recipe(tmp_path, train={"steps": 2, "checkpoint_every": 1})
    assert main(["run", str(recipe)]) == 0
    stage = tmp_path / "runs" / "toy" / "toy"
    (stage / "DONE").unlink()                                      # as if it had stopped after step 2
    capsys.readouterr()
    assert main(["run", str(recipe), "resume=never"]) == 0
    assert (f"shotdistill: resume=never: stage toy starts over, discarding 2 committed checkpoint(s) (steps 1, 2) "
            f"in {stage / 'checkpoints'}") in capsys.readouterr().err.splitlines()


# --------------------------------------------------------------------------- item 9: honest exit codes, one-line failures


@pytest.mark.slow
@pytest.mark.parametrize("name, code", [("TERM", 143), ("INT", 130)])
def test_stop_signal_saves_a_checkpoint_then_exits_non_zero(tmp_path, toy_recipe, name, code):
    from conftest import shotdistill
    from distill import checkpoint

    recipe = toy_recipe(tmp_path, train={"steps": 8, "checkpoint_every": 4})
    stopped = shotdistill(["run", str(recipe)], tmp_path,
                          {"SHOTDISTILL_TOY_SIGNAL_AT": "5", "SHOTDISTILL_TOY_SIGNAL": name})
    assert stopped.returncode == code, stopped.stderr[-2000:]
    assert stopped.stderr.strip().splitlines()[-1] == (
        "shotdistill: stopped by signal at step 6; checkpoint saved, resume=auto continues from it")
    run = tmp_path / "runs" / "toy"
    assert [s for s, _ in checkpoint.committed(run / "toy/checkpoints")] == [4, 6]
    assert not (run / "toy/DONE").exists()


@pytest.mark.slow
def test_launch_failure_ends_in_one_line_naming_the_rank(tmp_path, toy_recipe):
    from conftest import free_port, shotdistill

    recipe = toy_recipe(tmp_path, train={"steps": 6, "checkpoint_every": 6})
    failed = shotdistill(["launch", str(recipe), "--nproc", "2", "--master", f"127.0.0.1:{free_port()}"], tmp_path,
                         {"SHOTDISTILL_TOY_RAISE_AT": "2", "SHOTDISTILL_TOY_KILL_RANK": "1"})
    assert failed.returncode == 1, failed.stderr[-3000:]
    lines = failed.stderr.strip().splitlines()
    assert lines[-1] == "shotdistill: error: rank 1 failed (exit 1): toy failure at step 2", lines[-30:]
    assert "Traceback" not in failed.stderr and "ChildFailedError" not in failed.stderr, failed.stderr[-3000:]


def _fake_slurm(tmp_path, srun_body: str):
    """A PATH where `srun` runs `srun_body` and `scontrol` records a requeue (hostnames: localhost)."""
    import stat

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "srun").write_text(f"#!/bin/bash\n{srun_body}\n")
    (bin_dir / "scontrol").write_text(f'#!/bin/bash\nif [ "$1" = requeue ]; then echo "$@" >> {tmp_path}/requeued; '
                                      'else echo localhost; fi\n')
    for tool in ("srun", "scontrol"):
        (bin_dir / tool).chmod(stat.S_IRWXU)
    return bin_dir


@pytest.mark.parametrize("srun_body, code, requeued", [
    ("exit 143", 143, True),                 # the ranks checkpointed after SLURM's SIGTERM: requeue
    ("exit 1", 1, False),                    # a failure: no requeue, the job fails
    ("exit 0", 0, False),
])
def test_sbatch_script_requeues_on_a_checkpointed_stop(tmp_path, toy_recipe, capsys, srun_body, code, requeued):
    import os
    import subprocess

    recipe = toy_recipe(tmp_path, "big")
    script = tmp_path / "job.sh"
    assert main(["slurm", str(recipe), "--nodes", "1", "--gpus-per-node", "1", "--out", str(script)]) == 0
    env = {**os.environ, "PATH": f"{_fake_slurm(tmp_path, srun_body)}:{os.environ['PATH']}",
           "SLURM_JOB_ID": "42", "SLURM_JOB_NODELIST": "localhost"}
    done = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == code, done.stderr
    assert (tmp_path / "requeued").is_file() == requeued
    if requeued:
        assert (tmp_path / "requeued").read_text() == "requeue 42\n"


def test_sbatch_script_passes_a_preemption_signal_on_and_requeues(tmp_path, toy_recipe, capsys):
    import os
    import signal
    import subprocess
    import time

    recipe = toy_recipe(tmp_path, "big")
    script = tmp_path / "job.sh"
    assert main(["slurm", str(recipe), "--nodes", "1", "--gpus-per-node", "1", "--out", str(script)]) == 0
    srun = (f"trap 'kill $S; echo stopping >> {tmp_path}/srun.log; exit 143' TERM\n"
            f"sleep 30 &\nS=$!\necho started > {tmp_path}/srun.log\nwait $S")
    env = {**os.environ, "PATH": f"{_fake_slurm(tmp_path, srun)}:{os.environ['PATH']}",
           "SLURM_JOB_ID": "7", "SLURM_JOB_NODELIST": "localhost"}
    job = subprocess.Popen(["bash", str(script)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 30
    while not (tmp_path / "srun.log").exists() and time.time() < deadline:
        time.sleep(0.1)
    job.send_signal(signal.SIGUSR1)                # SLURM: the time limit is near
    _, err = job.communicate(timeout=30)
    assert job.returncode == 143, err
    assert (tmp_path / "srun.log").read_text() == "started\nstopping\n"
    assert (tmp_path / "requeued").read_text() == "requeue 7\n"


@pytest.mark.slow
def test_launch_passes_sigterm_on_and_exits_143_after_the_checkpoint(tmp_path, toy_recipe):
    import signal
    import subprocess
    import sys
    import time

    from conftest import free_port, subprocess_env
    from distill import checkpoint

    recipe = toy_recipe(tmp_path, train={"steps": 100000, "checkpoint_every": 100000},
                        logging={"tensorboard": False})
    job = subprocess.Popen([sys.executable, "-m", "launch.cli", "launch", str(recipe), "--nproc", "2",
                            "--master", f"127.0.0.1:{free_port()}"], cwd=tmp_path, env=subprocess_env(),
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stage = tmp_path / "runs" / "toy" / "toy"
    deadline = time.time() + 180
    while not (stage / "deepspeed.generator.json").exists() and time.time() < deadline:
        time.sleep(0.2)
    time.sleep(2)                                    # training
    job.send_signal(signal.SIGTERM)                  # a scheduler stops the launcher
    _, err = job.communicate(timeout=180)
    assert job.returncode == 143, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("shotdistill: stopped by signal at step ") and last.endswith("checkpoint saved, "
                                                                                        "resume=auto continues from it")
    assert checkpoint.committed(stage / "checkpoints") and not (stage / "DONE").exists()


# --------------------------------------------------------------------------- item 3: fingerprints in DONE and COMMITTED


def test_finished_need_made_with_other_keys_is_not_reused(tmp_path, toy_recipe, capsys):
    toy_recipe(tmp_path, "first", train={"steps": 2})                    # a 'prepare' at 64x64
    second = toy_recipe(tmp_path, "second", stage="toy_stage:ToyStageB", needs=["first.yaml"], train={"steps": 2})
    assert main(["run", str(second)]) == 0
    run = tmp_path / "runs" / "second"
    config, done = (run / "config.yaml").read_text(), (run / "toy" / "DONE").read_text()
    (run / "toy-b" / "DONE").unlink()                                    # the consumer runs again ...
    capsys.readouterr()
    assert main(["run", str(second), "data.height=32", "optim.critic.lr=0.5"]) == 1   # ... asked for 32x32
    assert _one_error(capsys) == (
        f"shotdistill: error: {run / 'toy'}: finished stage toy was made with other settings: data.height: 64 → 32; "
        "optim.critic.lr: 0.0001 → 0.5. Run with those values, choose another run.name, or set resume=force to use "
        "it anyway")
    assert (run / "config.yaml").read_text() == config                  # nothing ran: nothing rewritten
    assert yaml.safe_load((run / "toy-b" / "config.yaml").read_text())["data"]["height"] == 64
    assert main(["run", str(second), "logging.every=3", "train.keep_checkpoints=1"]) == 0   # cannot change a result
    assert (run / "toy" / "DONE").read_text() == done


def test_a_run_that_only_finds_finished_stages_leaves_config_yaml_alone(tmp_path, toy_recipe, capsys):
    recipe = toy_recipe(tmp_path, train={"steps": 2})
    assert main(["run", str(recipe)]) == 0
    run = tmp_path / "runs" / "toy"
    config = (run / "config.yaml").read_text()
    assert main(["run", str(recipe), "logging.every=7"]) == 0            # done earlier: nothing ran
    assert (run / "config.yaml").read_text() == config
    capsys.readouterr()
    assert main(["run", str(recipe), "optim.critic.lr=0.5", "resume=force"]) == 0
    assert (f"shotdistill: resume=force: using {run / 'toy'}: finished stage toy although it was made with other "
            "settings: optim.critic.lr: 0.0001 → 0.5") in capsys.readouterr().err.splitlines()
    assert (run / "config.yaml").read_text() == config


def test_checkpoint_made_with_other_keys_is_not_resumed(tmp_path, toy_recipe, capsys):
    from distill import checkpoint

    recipe = toy_recipe(tmp_path, train={"steps": 4, "checkpoint_every": 2})
    assert main(["run", str(recipe)]) == 0
    stage = tmp_path / "runs" / "toy" / "toy"
    (stage / "DONE").unlink()                                            # as if stopped after step 4
    marker = checkpoint.read_marker(stage / "checkpoints" / "step-000004")
    assert marker["fingerprint"]["keys"]["optim.critic.lr"] == 0.0001 and "train.steps" not in marker["fingerprint"]["keys"]
    config = (stage / "config.yaml").read_text()
    capsys.readouterr()
    assert main(["run", str(recipe), "train.micro_batch=1", "train.checkpoint_every=3"]) == 1  # auto: before compute
    assert _one_error(capsys) == (
        f"shotdistill: error: checkpoint {stage / 'checkpoints' / 'step-000004'} was made with other settings: "
        "train.micro_batch: 2 → 1. Run with those values, choose another run.name, or set resume=force to use it anyway")
    assert (stage / "config.yaml").read_text() == config
    older = stage / "checkpoints" / "step-000002"                         # a named folder: the trainer checks
    assert main(["run", str(recipe), f"resume={older}", "optim.generator.lr=0.5"]) == 1
    assert _one_error(capsys) == (
        f"shotdistill: error: checkpoint {older} was made with other settings: optim.generator.lr: 0.0001 → 0.5. "
        "Run with those values, choose another run.name, or set resume=force to use it anyway")
    assert main(["run", str(recipe), "train.steps=6"]) == 0              # training on longer is the same run
    assert json.loads((stage / "DONE").read_text())["metrics"]["steps"] == 6


def test_resume_force_resumes_a_changed_checkpoint_and_says_so(tmp_path, toy_recipe, capsys):
    recipe = toy_recipe(tmp_path, train={"steps": 4, "checkpoint_every": 2})
    assert main(["run", str(recipe)]) == 0
    stage = tmp_path / "runs" / "toy" / "toy"
    (stage / "DONE").unlink()
    capsys.readouterr()
    assert main(["run", str(recipe), "resume=force", "optim.critic.lr=0.001", "train.steps=6"]) == 0
    assert (f"shotdistill: resume=force: using checkpoint {stage / 'checkpoints' / 'step-000004'} although it was "
            "made with other settings: optim.critic.lr: 0.0001 → 0.001") in capsys.readouterr().err.splitlines()
    done = json.loads((stage / "DONE").read_text())
    assert done["metrics"]["steps"] == 6 and done["fingerprint"]["keys"]["optim.critic.lr"] == 0.001
