"""Protects the eval stage (final student and per stage), `shotdistill eval` / `compare` and the feature metrics."""

import json
import shutil

import pytest
import torch
import yaml
from helpers import make_tiny_wan

from distill.config import load_recipe
from distill.eval.compare import comparison_table, format_cell, run_axes, variants
from distill.eval.features import FeatureExtractor, feature_consistency
from distill.eval.stages import EMPTY_STAGES
from distill.logging import read_scalars
from distill.models import student_components
from distill.runner import format_summary, run_recipe
from distill.stages.prepare import prepare
from launch.cli import main
from student.export import save_student
from student.model import CausalStudent
from teacher import NextShotTeacher

SIZE = 32
RECIPE = {"run": {"name": "r"}, "codec": {"kind": "patch", "patch": 2},
          "text_encoder": {"kind": "tiny_t5", "dim": 24, "layers": 1, "heads": 2, "max_tokens": 32},
          "data": {"height": SIZE, "width": SIZE, "fps": 8, "shot_frames": 6,
                   "synth": {"videos": 3, "seed": 1, "height": SIZE, "width": SIZE, "min_shots": 2,
                             "max_shots": 2, "min_frames": 6, "max_frames": 6}},
          "logging": {"progress": False}}
# and intra_identity, when a character is seen at all (the tiny random student paints none)
SCENE_METRICS = {"intra_change", "cut_accuracy", "cut_count_accuracy", "fps", "latency_s"}
FACT_METRICS = {"identity_match", "inter_identity", "motion_adherence", "colour_consistency"}


pytestmark = pytest.mark.usefixtures("one_thread")


def _recipe(path, stage, **extra):
    """A flat recipe of `stage`; an eval recipe sets only what the eval stage reads."""
    shared = {k: v for k, v in RECIPE.items() if stage != "eval" or k == "logging"}
    data = {**shared, "stage": stage, "run": {"name": "r", "out": str(path.parent)}, **extra}
    path.write_text(yaml.safe_dump(data))
    return path


def _finished(stage, cfg: dict, produces: str):
    """Mark a hand-made stage folder finished, as the runner does: its recipe, a DONE saying what it produces."""
    (stage / "config.yaml").write_text(yaml.safe_dump(cfg))
    (stage / "DONE").write_text(json.dumps({"metrics": {}, "produces": produces}))
    return stage


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A run folder holding prepared synthetic records and a finished causal-init student (no export)."""
    root = tmp_path_factory.mktemp("evalrun")
    run = root / "r"
    recipe = _recipe(root / "causal-init.yaml", "causal_init")
    cfg = load_recipe(recipe)
    prepare(cfg, None, run / "prepare", progress=False)
    stage = run / "causal-init"
    teacher = NextShotTeacher(make_tiny_wan(in_channels=12, out_channels=12, text_dim=24))
    save_student(CausalStudent.from_teacher(teacher, chunk_frames=3, local_chunks=2, context_frames=4),
                 stage / "student", student_components(cfg))
    _finished(stage, {**RECIPE, "stage": "causal_init"}, "student")
    (stage / "metrics.json").write_text(json.dumps({"student/loss": 0.25, "student/lr": 1e-4, "steps": 2.0}))
    return run


@pytest.fixture(scope="module")
def evaluated(run):
    """The eval stage run through the runner (it exports the student itself)."""
    run_recipe(_recipe(run.parent / "eval.yaml", "eval", eval={"videos": 2}))
    return run / "eval"


def test_eval_stage_writes_metrics_samples_report_and_tensorboard(evaluated):
    metrics = json.loads((evaluated / "metrics.json").read_text())
    assert set(metrics) - {"intra_identity"} == SCENE_METRICS | FACT_METRICS
    assert all(0.0 <= metrics[k] <= 1.0 for k in (SCENE_METRICS | FACT_METRICS) - {"fps", "latency_s"})
    assert metrics["fps"] > 0 and metrics["latency_s"] > 0
    assert sorted(p.name for p in (evaluated / "samples").iterdir()) == ["0000.mp4", "0001.mp4"]
    report = json.loads((evaluated / "report.json").read_text())
    assert [v["shot_frames"] for v in report["videos"]] == [[6, 6], [6, 6]]
    videos = report["videos"]
    for name, value in metrics.items():
        if name not in ("fps", "latency_s"):
            values = [v["metrics"][name] for v in videos if name in v["metrics"]]
            assert value == pytest.approx(sum(values) / len(values))
    assert metrics["fps"] == pytest.approx(24 / sum(v["seconds"] for v in videos))
    assert all(0 < v["first_chunk_s"] < v["seconds"] for v in videos)
    assert report["skipped"] == {"features": "eval.features.kind is none",
                                 **({} if "intra_identity" in metrics else
                                    {"intra_identity": "no character was seen in any video"})}
    assert report["stages"] == {"evaluated": {}, "skipped": {"*": EMPTY_STAGES}}
    assert (evaluated / "stages.md").read_text() == EMPTY_STAGES + "\n"
    assert (evaluated / "export" / "generator.json").is_file()
    tb = evaluated.parent / "tb" / "eval"
    assert read_scalars(tb, "eval/cut_accuracy") == {1: pytest.approx(metrics["cut_accuracy"])}


STAGES = ["teacher", "causal-init", "dmd-intra", "dmd-inter", "ode-pairs"]
TEACHER_SAMPLER = {"steps": 2, "shift": 3.0, "guidance_scale": 1.0}


@pytest.fixture(scope="module")
def staged(run):
    """Run "s": the fixture run's prepare and causal-init, a finished teacher, a finished dmd-intra
    holding the same student as causal-init, an unfinished dmd-inter; evaluated per stage. Run "t":
    prepare and the teacher only (no student), evaluated per stage."""
    root = run.parent
    s, t = root / "s", root / "t"
    for name in ("prepare", "causal-init"):
        shutil.copytree(run / name, s / name)
    shutil.copytree(run / "prepare", t / "prepare")
    teacher = NextShotTeacher(make_tiny_wan(in_channels=12, out_channels=12, text_dim=24, seed=1))
    for r in (s, t):
        teacher.save_pretrained(r / "teacher" / "model")
        _finished(r / "teacher", {**RECIPE, "stage": "teacher", "sampler": TEACHER_SAMPLER}, "teacher")
    shutil.copytree(run / "causal-init", s / "dmd-intra")
    _finished(s / "dmd-intra", {**RECIPE, "stage": "dmd_intra"}, "student")
    shutil.copytree(run / "causal-init" / "student", s / "dmd-inter" / "student")
    for name, stages in (("s", STAGES), ("t", ["teacher", "causal-init"])):
        data = {"stage": "eval", "run": {"name": name, "out": str(root)}, "logging": RECIPE["logging"],
                "eval": {"videos": 2, "stages": stages}}
        (root / f"eval-{name}.yaml").write_text(yaml.safe_dump(data))
        run_recipe(root / f"eval-{name}.yaml")
    return s / "eval", t / "eval"


def _scores(metrics: dict, prefix: str = "") -> dict:
    """The metrics under `prefix` without it, timings left out (they differ from run to run)."""
    return {k[len(prefix):]: v for k, v in metrics.items() if k.startswith(prefix) and "/" not in k[len(prefix):]
            and k[len(prefix):] not in ("fps", "latency_s")}


def test_eval_per_stage_rows_skips_and_final_names(staged):
    ev = staged[0]
    run = ev.parent
    metrics = json.loads((ev / "metrics.json").read_text())
    assert {k.split("/")[0] for k in metrics if "/" in k} == {"teacher", "causal-init", "dmd-intra"}
    final = _scores(metrics)
    assert set(final) - {"intra_identity"} == (SCENE_METRICS | FACT_METRICS) - {"fps", "latency_s"}
    # dmd-intra is the final student (scored once); causal-init holds the same weights, exported and
    # generated again with the same prompts and seeds: the same scores
    assert _scores(metrics, "dmd-intra/") == final
    assert _scores(metrics, "causal-init/") == final
    assert (ev / "exports" / "causal-init" / "generator.json").is_file()
    teacher = _scores(metrics, "teacher/")
    assert set(teacher) - {"intra_identity"} == set(final) - {"intra_identity"}
    assert metrics["teacher/fps"] > 0 and metrics["teacher/latency_s"] > 0
    report = json.loads((ev / "report.json").read_text())
    assert report["stages"] == {
        "evaluated": {"teacher": "stages/teacher/report.json", "causal-init": "stages/causal-init/report.json",
                      "dmd-intra": "report.json"},
        "skipped": {"dmd-inter": f"{run / 'dmd-inter'} has not finished (no DONE marker)",
                    "ode-pairs": f"no stage folder {run / 'ode-pairs'}"}}
    teacher_report = json.loads((ev / "stages" / "teacher" / "report.json").read_text())
    assert [v["shot_frames"] for v in teacher_report["videos"]] == [[6, 6], [6, 6]]
    assert all(0 < v["first_chunk_s"] < v["seconds"] for v in teacher_report["videos"])
    assert sorted(p.name for p in (ev / "stages" / "teacher" / "samples").iterdir()) == ["0000.mp4", "0001.mp4"]
    assert read_scalars(run / "tb" / "eval", "eval/teacher/cut_accuracy") == \
        {1: pytest.approx(metrics["teacher/cut_accuracy"])}


def test_eval_per_stage_table_in_stages_md_and_the_run_summary(staged):
    ev = staged[0]
    table = (ev / "stages.md").read_text()
    lines = table.splitlines()
    columns = lines[0].strip("| ").split(" | ")
    assert columns[0] == "stage" and "cut_accuracy" in columns and "fps" in columns
    assert [line.split(" | ")[0] for line in lines[2:5]] == ["| teacher", "| causal-init", "| dmd-intra"]
    metrics = json.loads((ev / "metrics.json").read_text())
    cell = lines[2].strip("| ").split(" | ")[columns.index("cut_accuracy")]
    assert cell == format_cell(metrics["teacher/cut_accuracy"])
    assert lines[-2:] == [f"Skipped dmd-inter: {ev.parent / 'dmd-inter'} has not finished (no DONE marker).",
                          f"Skipped ode-pairs: no stage folder {ev.parent / 'ode-pairs'}."]
    record = json.loads((ev / "DONE").read_text())
    assert record["table"] == table
    assert table.rstrip("\n") in format_summary({"eval": {**record, "status": "ran"}})


def test_eval_of_a_run_without_student_scores_its_teacher(staged):
    ev = staged[1]
    metrics = json.loads((ev / "metrics.json").read_text())
    assert {k.split("/")[0] for k in metrics} == {"teacher"}
    report = json.loads((ev / "report.json").read_text())
    assert report["export"] is None and "no finished student" in report["no_export"]
    assert report["stages"]["skipped"] == {"causal-init": f"no stage folder {ev.parent / 'causal-init'}"}


def test_eval_is_deterministic_and_cli_on_the_run_matches_the_stage(run, evaluated, tmp_path, capsys):
    out = tmp_path / "again"
    assert main(["eval", str(run), "--out", str(out)]) == 0
    stage, cli = (json.loads((d / "metrics.json").read_text()) for d in (evaluated, out))
    assert _scores(cli) == _scores(stage) and _scores(cli)
    assert "cut_accuracy" in capsys.readouterr().out


def test_cli_eval_of_a_run_scores_its_stages_as_the_eval_stage_does(staged, tmp_path, capsys):
    """`shotdistill eval RUN eval.stages=[...]` runs the eval stage's code path: the same final and
    per-stage numbers, `stages` report entry, stages.md rows and scalars; a run without a student
    (the teacher-only run, its recipe's eval.stages) is scored through its teacher alone."""
    ev = staged[0]
    out = tmp_path / "cli"
    assert main(["eval", str(ev.parent), "--out", str(out), "eval.stages=[teacher,causal-init]"]) == 0
    cli, stage = (json.loads((d / "metrics.json").read_text()) for d in (out, ev))
    assert {k.split("/")[0] for k in cli if "/" in k} == {"teacher", "causal-init"}
    for prefix in ("", "teacher/", "causal-init/"):
        assert _scores(cli, prefix) == _scores(stage, prefix) and _scores(cli, prefix)
    report = json.loads((out / "report.json").read_text())
    assert report["stages"] == {"evaluated": {"teacher": "stages/teacher/report.json",
                                              "causal-init": "stages/causal-init/report.json"}, "skipped": {}}
    table = (out / "stages.md").read_text()
    assert [line.split(" | ")[0] for line in table.splitlines()[2:]] == ["| teacher", "| causal-init"]
    assert table in capsys.readouterr().out
    assert read_scalars(out / "tb", "eval/teacher/cut_accuracy") == {1: pytest.approx(cli["teacher/cut_accuracy"])}
    teacher_only = staged[1].parent
    assert main(["eval", str(teacher_only), "--out", str(tmp_path / "t")]) == 0
    assert {k.split("/")[0] for k in json.loads((tmp_path / "t" / "metrics.json").read_text())} == {"teacher"}
    assert json.loads((tmp_path / "t" / "report.json").read_text())["export"] is None


@pytest.fixture(scope="module")
def dino(tmp_path_factory):
    """A tiny random DINOv2 with its image processor, saved as a local transformers folder."""
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model

    folder = tmp_path_factory.mktemp("dino")
    torch.manual_seed(0)
    Dinov2Model(Dinov2Config(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                             image_size=16, patch_size=8)).save_pretrained(folder)
    BitImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16}).save_pretrained(folder)
    return folder


def test_cli_eval_of_an_export_with_prompts_skips_facts_and_adds_features(evaluated, dino, tmp_path, capsys):
    prompts = tmp_path / "prompts.jsonl"
    shots = [{"caption": "wide: the red circle moves left on a blue background"},
             {"caption": "close-up: the red circle stays still on a blue background"},
             {"caption": "medium: the red circle moves up on a blue background"}]
    prompts.write_text(json.dumps({"global_caption": "a small red circle on a blue background", "shots": shots}) + "\n")
    out = tmp_path / "out"
    assert main(["eval", str(evaluated / "export"), "--prompts", str(prompts), "--out", str(out),
                 "eval.features.kind=dino", f"eval.features.path={dino}"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics) - {"intra_identity"} == SCENE_METRICS | {"dino_intra", "dino_inter"}
    report = json.loads((out / "report.json").read_text())
    assert {k: v for k, v in report["skipped"].items() if k != "intra_identity"} == \
        {k: "no prompt carries facts" for k in FACT_METRICS}
    assert report["videos"][0]["shot_frames"] == [6, 6, 6]
    assert "motion_adherence     skipped: no prompt carries facts" in capsys.readouterr().out


def _fails(capsys, argv, message):
    assert main(argv) == 1
    assert capsys.readouterr().err.strip() == f"shotdistill: error: {message}"


def test_eval_errors_are_one_line(evaluated, tmp_path, capsys):
    export = evaluated / "export"
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"shots": [{"caption": "wide: x"}]}) + "\n" + json.dumps({"shots": []}) + "\n")
    _fails(capsys, ["eval", str(export), "--prompts", str(bad)],
           f"{bad}:2: 'shots' must be a non-empty list of {{\"caption\": ...}}")
    _fails(capsys, ["eval", str(export)], f"{export}: not a run folder (no config.yaml): give --prompts FILE")
    _fails(capsys, ["eval", str(tmp_path / "nowhere")], f"{tmp_path / 'nowhere'}: export or run folder not found")
    _fails(capsys, ["eval", str(export), "--prompts", str(bad), "eval.features.kind=clip"],
           f"{export}: eval.features.path is required when eval.features.kind is clip")
    _fails(capsys, ["eval", str(export), "--prompts", str(bad), "--videos", "-1"],
           f"{export}: eval.videos and eval.cut_tolerance must be >= 0, eval.cut_window and "
           "eval.features.batch >= 1")
    facts = tmp_path / "facts.jsonl"
    facts.write_text(json.dumps({"shots": [{"caption": "wide: x"}, {"caption": "close-up: y"}],
                                 "facts": {"cast": [], "shots": [{"characters": []}]}}) + "\n")
    _fails(capsys, ["eval", str(export), "--prompts", str(facts)],
           f"{facts}:1: 'facts' must hold 'cast' and one entry of 'shots' per shot")


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    """A tiny random CLIP vision tower with its image processor, saved as a local transformers folder."""
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    folder = tmp_path_factory.mktemp("clip")
    torch.manual_seed(0)
    CLIPVisionModel(CLIPVisionConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                                     image_size=16, patch_size=8)).save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16}).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("kind", ["clip", "dino"])
def test_feature_extractor_embeds_unit_vectors(kind, request):
    folder = request.getfixturevalue(kind)
    frames = torch.randint(0, 256, (5, SIZE, SIZE, 3), dtype=torch.uint8)
    extractor = FeatureExtractor(kind, folder, batch=2)
    emb = extractor.embed(frames)
    assert emb.shape == (5, 16)
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(5))
    torch.testing.assert_close(extractor.embed(frames[3:4]), emb[3:4])  # batching does not change a frame's vector
    same = extractor.embed(frames[:1].expand(3, -1, -1, -1))
    assert feature_consistency(same, [3], kind)[f"{kind}_intra"] == pytest.approx(1.0)
    assert feature_consistency(emb, [5], kind)[f"{kind}_intra"] < 0.9999  # different frames differ


def test_feature_consistency_known_answers():
    e = torch.eye(4)
    # shot 1: frames e0, e0; shot 2: e1, e1 (orthogonal shots); shot 3: e0, e1 (half of each)
    emb = torch.stack([e[0], e[0], e[1], e[1], e[0], e[1]])
    out = feature_consistency(emb, [2, 2, 2], "clip")
    assert out["clip_intra"] == pytest.approx((1 + 1 + 0) / 3)
    assert out["clip_inter"] == pytest.approx((0 + 2 ** -0.5 + 2 ** -0.5) / 3)
    assert set(feature_consistency(emb, [6], "clip")) == {"clip_intra"}


def _fake_run(root, name, eval_metrics=None, losses=None):
    run = root / name
    run.mkdir()
    if eval_metrics is not None:
        (run / "eval").mkdir()
        (run / "eval" / "metrics.json").write_text(json.dumps(eval_metrics))
    for stage, values in (losses or {}).items():
        (run / stage).mkdir()
        (run / stage / "metrics.json").write_text(json.dumps(values))
        (run / stage / "DONE").write_text("{}")
    return run


def test_compare_table_has_axes_metrics_and_final_losses(tmp_path, capsys):
    a = _fake_run(tmp_path, "tiny__indicator=rope", {"cut_accuracy": 0.5, "fps": 12.0},
                  {"dmd-intra": {"generator/loss": 0.125, "critic/grad_norm": 3.0}})
    b = _fake_run(tmp_path, "tiny__indicator=none__stages=intra", None, {"dmd-intra": {"generator/loss": 0.25}})
    out = tmp_path / "tables" / "cmp.md"
    assert main(["compare", str(a), str(b), "--out", str(out)]) == 0
    expected = ("| | tiny__indicator=rope | tiny__indicator=none__stages=intra |\n"
                "|---|---|---|\n"
                "| variant | indicator=rope | indicator=none-stages=intra |\n"
                "| indicator | rope | none |\n"
                "| stages | – | intra |\n"
                "| cut_accuracy | 0.5 | – |\n"
                "| fps | 12 | – |\n"
                "| dmd-intra generator/loss | 0.125 | 0.25 |\n"
                "\nNo evaluation (`eval/metrics.json`) in: tiny__indicator=none__stages=intra.\n")
    assert out.read_text() == expected
    assert capsys.readouterr().out == expected
    assert run_axes("base__lr=1e-4__x") == {"lr": "1e-4"}
    assert variants(["tiny", "tiny-indicator-none", "tiny-stage2-only"]) == ["(base)", "indicator-none", "stage2-only"]
    with pytest.raises(FileNotFoundError, match="missing: run folder not found"):
        comparison_table([tmp_path / "missing"])
