"""Protects `shotdistill export` / `generate`: newest finished student, export round trip, mp4 output, one-line errors."""

import io
import json
import shutil

import pytest
import torch
import yaml
from conftest import shotdistill
from helpers import make_tiny_wan

from omegaconf import OmegaConf

from distill.config import schema
from distill.export import find_student
from distill.models import student_components
from launch.cli import main
from student.export import save_student
from student.model import CausalStudent
from teacher import NextShotTeacher

RECIPE = {"stage": "causal_init", "run": {"name": "r"}, "codec": {"kind": "patch", "patch": 2},
          "text_encoder": {"kind": "tiny_t5", "dim": 24, "layers": 1, "heads": 2, "max_tokens": 8},
          "data": {"height": 16, "width": 16, "fps": 8, "shot_frames": 6}}
SHOTS = ["wide: a red circle moves", "close-up: a blue square stays still"]


pytestmark = pytest.mark.usefixtures("one_thread")


def _stage(run, name, student, done=True, finished=0.0):
    folder = run / name
    save_student(student, folder / "student", student_components(OmegaConf.merge(schema(), RECIPE)))
    (folder / "config.yaml").write_text(yaml.safe_dump(RECIPE))
    if done:
        (folder / "DONE").write_text(json.dumps({"metrics": {}, "produces": "student", "finished": finished}))
    return folder


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A run with a finished causal-init student and an unfinished dmd-intra one."""
    run = tmp_path_factory.mktemp("serve") / "run"
    teacher = NextShotTeacher(make_tiny_wan(in_channels=12, out_channels=12, text_dim=24))
    _stage(run, "causal-init", CausalStudent.from_teacher(teacher, chunk_frames=3, local_chunks=2,
                                                          context_frames=4))
    _stage(run, "dmd-intra", CausalStudent.from_teacher(teacher, chunk_frames=2), done=False)
    return run


@pytest.fixture(scope="module")
def exported(run_dir):
    out = run_dir.parent / "serving" / "export"  # a parent that does not exist yet
    assert main(["export", str(run_dir), "--out", str(out)]) == 0
    return out


def test_newest_finished_stage_is_chosen(run_dir, tmp_path):
    assert find_student(run_dir) == run_dir / "causal-init"
    assert find_student(run_dir / "causal-init") == run_dir / "causal-init"
    run = tmp_path / "run"
    student = CausalStudent.from_pretrained(run_dir / "causal-init" / "student")
    for finished, name in enumerate(("causal-init", "my-own-stage", "dmd-intra")):  # any stage that produces one
        _stage(run, name, student, finished=float(finished))
    assert find_student(run) == run / "dmd-intra"
    (run / "dmd-intra" / "DONE").unlink()
    assert find_student(run) == run / "my-own-stage"


def test_export_round_trip_is_exact(run_dir, exported):
    from student.generator import StreamingGenerator

    source = CausalStudent.from_pretrained(run_dir / "causal-init" / "student")
    gen = StreamingGenerator.from_export(exported)
    assert gen.student.settings == source.settings and gen.video.frames == 6
    for name, tensor in source.state_dict().items():
        assert torch.equal(tensor, gen.student.state_dict()[name]), name
    assert (exported / "text_encoder").is_dir() and (exported / "tokenizer").is_dir()


def test_generate_writes_the_video(exported, tmp_path, capsys):
    from distill.data.video import decode_all

    shots = tmp_path / "shots.txt"
    shots.write_text(SHOTS[1] + "\n")
    assert main(["generate", str(exported), "--shot", SHOTS[0], "--shots", str(shots), "--frames", "9",
                 "--out", str(tmp_path / "v.mp4")]) == 0
    assert decode_all(tmp_path / "v.mp4").shape == (18, 16, 16, 3)
    assert capsys.readouterr().out == f"wrote {tmp_path / 'v.mp4'} (18 frames)\n"


def test_interactive_reads_prompts_from_stdin(exported, tmp_path, monkeypatch, capsys):
    from distill.data.video import decode_all

    monkeypatch.setattr("sys.stdin", io.StringIO(SHOTS[1] + "\n" + SHOTS[0] + "\n\n"))
    assert main(["generate", str(exported), "--shot", SHOTS[0], "--interactive", "--out", str(tmp_path / "v.mp4")]) == 0
    assert decode_all(tmp_path / "v.mp4").shape[0] == 3 * 6
    assert capsys.readouterr().err.count("next shot") == 3


def _fails(capsys, argv, message):
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err == f"shotdistill: error: {message}\n"


def test_errors_are_one_line(exported, tmp_path, capsys):
    out = tmp_path / "v.mp4"
    base = ["generate", str(exported), "--out", str(out)]
    _fails(capsys, base + ["--shot", SHOTS[0], "--shot", " "],
           "shot 2: shot prompt is empty: every shot needs a description")
    shots = tmp_path / "shots.txt"
    shots.write_text(f"{SHOTS[0]}\n\n{SHOTS[1]}\n")
    _fails(capsys, base + ["--shots", str(shots)],
           f"{shots}:2: shot prompt is empty: every shot needs a description")
    _fails(capsys, base + ["--shot", SHOTS[0], "--frames", "7"],
           "num_frames 7 is not a whole number of chunks (3 latent frames each); valid frame counts: 3, 6, 9, ...")
    broken = tmp_path / "broken"
    shutil.copytree(exported, broken)
    (broken / "transformer" / "causal_config.json").unlink()
    _fails(capsys, ["generate", str(broken), "--shot", SHOTS[0], "--out", str(out)],
           f"{broken}: student folder is missing transformer/causal_config.json")
    _fails(capsys, ["export", str(tmp_path), "--out", str(tmp_path / "x")],
           f"{tmp_path}: no finished student (no stage folder whose DONE says it produces a student)")
    assert not out.exists()


@pytest.mark.slow
def test_cli_error_has_no_traceback(exported, tmp_path):
    done = shotdistill(["generate", str(exported), "--shot", "", "--out", str(tmp_path / "v.mp4")], tmp_path)
    assert done.returncode == 1
    assert done.stderr == "shotdistill: error: shot 1: shot prompt is empty: every shot needs a description\n"


def test_export_stage_writes_beside_the_runner_files(run_dir):
    from distill.distributed import DistEnv
    from distill.stages import resolve
    from distill.stages.base import StageContext
    from student.generator import StreamingGenerator

    stage_dir = run_dir / "export"
    stage_dir.mkdir()
    (stage_dir / "config.yaml").write_text("stage: export\n")
    env = DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), backend="gloo")
    ctx = StageContext(run_dir=run_dir, stage_dir=stage_dir, tb_dir=run_dir / "tb" / "export", env=env,
                       recipe=run_dir / "export.yaml")
    resolve("export")(None, ctx).run()
    assert (stage_dir / "config.yaml").read_text() == "stage: export\n"
    assert len(list(StreamingGenerator.from_export(stage_dir).next_shot(SHOTS[0]))) == 2
    assert sorted(p.name for p in run_dir.iterdir() if p.name.startswith(".")) == []
    shutil.rmtree(stage_dir)
