"""Protects Diffusion-DPO (STAGE): the loss on a hand-computed example, log 2 at the reference, a few steps on
a toy model raise the implicit accuracy, the pairs' losers, and a tiny dpo stage that runs and resumes."""

from __future__ import annotations

import copy
import json
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file

import distill.stages.dpo as dpo_stage
from distill import checkpoint
from distill.data.preference import PreferenceDataset, check_sources
from distill.dpo import dpo_loss, velocity_errors
from distill.logging import read_scalars
from distill.runner import run_recipe

from conftest import REPO, write_recipe
from helpers import make_prepared

TINY = REPO / "recipes" / "tiny"


def test_the_loss_equals_a_hand_computed_example():
    # x_w = (1, 0), x_l = (0, 1), ε = 0, t = 500: targets v_w = (-1, 0), v_l = (0, -1)
    winner, loser = torch.tensor([1.0, 0.0]).view(1, 1, 1, 1, 2), torch.tensor([0.0, 1.0]).view(1, 1, 1, 1, 2)
    noise, t = torch.zeros_like(winner), torch.tensor([500.0])
    policy = lambda x_t, tt: torch.tensor([-1.0, 0.0]).view(1, 1, 1, 1, 2).expand_as(x_t)  # noqa: E731
    reference = lambda x_t, tt: torch.zeros_like(x_t)  # noqa: E731
    # err_θ(w) = 0, err_θ(l) = (1 + 1) / 2 = 1, err_ref(w) = err_ref(l) = 1/2: Δ_w - Δ_l = -1/2 - 1/2 = -1
    out = dpo_loss(policy, reference, winner, loser, t, noise, beta=2.0)
    assert out.loss.item() == pytest.approx(math.log1p(math.exp(-2.0)))  # -log σ(-2 · -1)
    assert out.margin.item() == pytest.approx(2.0) and out.accuracy.item() == 1.0
    assert (out.winner_gap.item(), out.loser_gap.item()) == (pytest.approx(-0.5), pytest.approx(0.5))
    swapped = dpo_loss(policy, reference, loser, winner, t, noise, beta=2.0)
    assert swapped.loss.item() == pytest.approx(math.log1p(math.exp(2.0))) and swapped.accuracy.item() == 0.0


def test_winner_and_loser_share_t_and_noise():
    seen = []
    score = lambda x_t, tt: seen.append((x_t, tt)) or torch.zeros_like(x_t)  # noqa: E731
    g = torch.Generator().manual_seed(0)
    w, l, eps = (torch.randn(3, 2, 2, 2, 2, generator=g) for _ in range(3))
    t = torch.tensor([100.0, 500.0, 900.0])
    velocity_errors(score, w, l, t, eps)
    x_t, tt = seen[0]
    assert torch.equal(tt, torch.cat([t, t]))
    s = (t / 1000).view(-1, 1, 1, 1, 1)
    torch.testing.assert_close(x_t, torch.cat([(1 - s) * w + s * eps, (1 - s) * l + s * eps]))


def test_the_policy_at_the_reference_gives_log_2():
    g = torch.Generator().manual_seed(1)
    w, l, eps = (torch.randn(4, 3, 2, 2, 2, generator=g) for _ in range(3))
    model = torch.nn.Conv3d(3, 3, 1)
    score = lambda x_t, tt: model(x_t)  # noqa: E731
    out = dpo_loss(score, score, w, l, torch.full((4,), 300.0), eps, beta=1000.0)
    assert out.loss.item() == pytest.approx(math.log(2)) and out.margin.item() == 0 and out.accuracy.item() == 0.5


def test_a_few_steps_push_the_winners_error_down_relative_to_the_losers():
    torch.manual_seed(0)
    policy = torch.nn.Conv3d(3, 3, 1)
    reference = copy.deepcopy(policy).requires_grad_(False)
    g = torch.Generator().manual_seed(2)
    w = torch.randn(8, 3, 2, 4, 4, generator=g)
    l = torch.randn(8, 3, 2, 4, 4, generator=g) + 1.0  # a differently distributed loser
    opt = torch.optim.Adam(policy.parameters(), lr=1e-2)
    first = last = None
    for step in range(30):
        eps = torch.randn(w.shape, generator=g)
        t = torch.rand(8, generator=g) * 1000
        out = dpo_loss(lambda x, tt: policy(x), lambda x, tt: reference(x), w, l, t, eps, beta=5.0)
        first = first or out
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        last = out
    assert first.loss.item() == pytest.approx(math.log(2))
    assert last.loss.item() < 0.5 * math.log(2) and last.accuracy.item() == 1.0 and last.margin.item() > 0
    eps, t = torch.randn(w.shape, generator=g), torch.full((8,), 500.0)
    with torch.no_grad():
        pw, pl = velocity_errors(lambda x, tt: policy(x), w, l, t, eps)
        rw, rl = velocity_errors(lambda x, tt: reference(x), w, l, t, eps)
    assert float((pw - pl).mean()) < float((rw - rl).mean())


def test_pair_sources_are_checked():
    assert check_sources(["wrong_shot"]) == ("wrong_shot",)
    for bad in ([], ["judged"], ["wrong_shot", "wrong_shot"]):
        with pytest.raises(ValueError, match=r"^dpo.pairs must list distinct sources among other_record, wrong_shot, "
                                             r"manifest; got"):
            check_sources(bad)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_prepared(tmp_path_factory.mktemp("pairs"))


def _with_rejected(root):
    """The small world's manifest where shot 1 of every record names a rejected clip: the next record's
    shot 1 (another story, same prepared length); the last record names a clip too short."""
    from distill.config import load_recipe
    from distill.data.components import synth_settings
    from distill.data.synth import synthesize
    from helpers import SMALL_WORLD
    from launch.data import default_recipe

    cfg = load_recipe(default_recipe(), list(SMALL_WORLD))
    manifest = synthesize(root / "world", synth_settings(cfg.data.synth))
    lines = [json.loads(line) for line in manifest.read_text().splitlines()]
    for i, line in enumerate(lines):
        other = lines[(i + 1) % len(lines)]
        start, end = other["shots"][1]["start"], other["shots"][1]["end"]
        line["shots"][1]["rejected"] = {"video": other["video"], "start": start,
                                        "end": end if i < len(lines) - 1 else start + 1}
    manifest.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return cfg, manifest, lines


def test_manifest_rejected_clips_are_prepared_and_become_the_losers(tmp_path):
    """`rejected` clips are encoded beside their shots (a bad one skips its record, named), and
    dpo.pairs [manifest] pairs each such shot with exactly its rejected clip."""
    from distill.stages.prepare import prepare

    cfg, manifest, lines = _with_rejected(tmp_path)
    report = prepare(cfg, manifest, tmp_path / "out", progress=False)
    assert len(report["prepared"]) == len(lines) - 1
    assert [s["line"] for s in report["skipped"]] == [len(lines)]
    assert "shot 1 rejected clip: too short" in report["skipped"][0]["reason"]
    pairs = PreferenceDataset(tmp_path / "out", "dynamic", 3, ["manifest"], seed=0)
    data = pairs.shots.data
    assert {pairs.shots.items[i] for i in pairs.items} == {(r, 1) for r in range(len(data.records))}
    for j in range(len(pairs)):
        r, _ = pairs.shots.items[pairs.items[j]]
        item = pairs[j]
        assert pairs.loser(j) == ("manifest", (r, 1)) and item["loser"].shape == item["latents"].shape
        assert torch.equal(item["loser"], data.tensor(data.records[r], "shot1/rejected"))
        # the rejected clip is the next record's shot 1: the very latents that shot prepares to
        if r + 1 < len(data.records):
            assert torch.equal(item["loser"], data.tensor(data.records[r + 1], "shot1/latents"))


def test_a_bad_rejected_field_is_a_one_line_skip(tmp_path):
    from distill.data.manifest import Skip, read_manifest

    video = tmp_path / "v.mp4"
    video.write_bytes(b"")
    shot = {"start": 0, "end": 8, "caption": "wide: x"}
    lines = [{"video": "v.mp4", "global_caption": "g", "shots": [shot | {"rejected": bad}]}
             for bad in ({"video": "v.mp4", "caption": "y"}, "v.mp4", {"video": "absent.mp4"}, {"start": 4, "end": 2})]
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    reasons = [entry.reason for entry in read_manifest(tmp_path / "m.jsonl")]
    assert all(isinstance(e, Skip) for e in read_manifest(tmp_path / "m.jsonl"))
    assert reasons[0] == reasons[1] == "shot 0: 'rejected' must be an object with only video, start and end"
    assert reasons[2] == f"shot 0 rejected clip: video not found: {tmp_path / 'absent.mp4'}"
    assert reasons[3] == "shot 0 rejected clip: empty range 4..2"


@pytest.mark.parametrize("source", ["other_record", "wrong_shot"])
def test_losers_match_the_winners_length_and_never_are_the_target(folder, source):
    pairs = PreferenceDataset(folder, "dynamic", 3, [source], seed=0)
    records = pairs.shots.data.records
    for j in range(len(pairs)):
        r, target = pairs.shots.items[pairs.items[j]]
        chosen, (r2, k) = pairs.loser(j)
        assert chosen == source and (r2, k) != (r, target)
        assert (r2 != r) if source == "other_record" else (r2 == r)
        item = pairs[j]
        assert item["loser"].shape == item["latents"].shape
        assert torch.equal(item["loser"], pairs.shots.data.tensor(records[r2], f"shot{k}/latents"))
    again = PreferenceDataset(folder, "dynamic", 3, [source], seed=0)
    assert [again.loser(j) for j in range(len(again))] == [pairs.loser(j) for j in range(len(pairs))]


QUICK = ["data.synth.videos=4", "logging.progress=false", "model.layers=1"]


@pytest.fixture(scope="module")
def trained_teacher(tmp_path_factory):
    """(recipes folder, run folder holding prepare/ and a 1-step teacher/): the dpo stage's needs."""
    root = tmp_path_factory.mktemp("teacher")
    write_recipe(root / "teacher.yaml", {"base": str(TINY / "teacher.yaml"), "needs": [str(TINY / "prepare.yaml")],
                                         "train": {"steps": 1}, "teacher": {"eval_samples": 0}})
    write_recipe(root / "dpo.yaml", {"base": str(TINY / "dpo.yaml"), "needs": ["teacher.yaml"],
                                     "train": {"steps": 4, "checkpoint_every": 2, "micro_batch": 1},
                                     "logging": {"every": 1}})
    run_recipe(root / "teacher.yaml", [f"run.out={root / 'runs'}", *QUICK])
    return root, root / "runs" / "tiny"


def _dpo(out, trained_teacher):
    """A run folder under `out` starting from copies of the trained teacher's stages; the dpo run's arguments."""
    recipes, trained = trained_teacher
    run = out / "tiny"
    run.mkdir(parents=True)
    for stage in ("prepare", "teacher"):
        shutil.copytree(trained / stage, run / stage)
    return run, recipes / "dpo.yaml", [f"run.out={out}", *QUICK]


@pytest.mark.slow
def test_a_tiny_dpo_stage_runs_and_resumes_bit_identically(tmp_path, trained_teacher, monkeypatch, one_thread):
    run, recipe, args = _dpo(tmp_path / "a", trained_teacher)
    run_recipe(recipe, args)
    tags = ("dpo/dpo/loss", "dpo/margin", "dpo/accuracy")
    reference = {tag: read_scalars(run / "tb" / "dpo", tag) for tag in tags}
    assert sorted(reference["dpo/dpo/loss"]) == [1, 2, 3, 4]
    assert reference["dpo/dpo/loss"][1] == pytest.approx(math.log(2), abs=1e-6)  # the policy starts as the reference
    assert 0 <= min(reference["dpo/accuracy"].values()) <= max(reference["dpo/accuracy"].values()) <= 1
    weights = load_file(next((run / "dpo" / "model").glob("*.safetensors")))

    resumed, recipe, args = _dpo(tmp_path / "b", trained_teacher)
    step = dpo_stage.DPOStage.step

    def crash_at_3(self, batch, due, n):
        if n == 2:  # the third step, after the checkpoint of step 2
            raise RuntimeError("killed")
        return step(self, batch, due, n)

    monkeypatch.setattr(dpo_stage.DPOStage, "step", crash_at_3)
    with pytest.raises(RuntimeError, match="killed"):
        run_recipe(recipe, args)
    assert [s for s, _ in checkpoint.committed(resumed / "dpo" / "checkpoints")] == [2]
    ran = []
    monkeypatch.setattr(dpo_stage.DPOStage, "step", lambda self, batch, due, n: ran.append(n) or step(self, batch, due, n))
    run_recipe(recipe, args)
    assert ran == [2, 3]  # resumed from the checkpoint of step 2, not from the start
    assert {tag: read_scalars(resumed / "tb" / "dpo", tag) for tag in tags} == reference
    again = load_file(next((resumed / "dpo" / "model").glob("*.safetensors")))
    assert again.keys() == weights.keys() and all(torch.equal(again[k], weights[k]) for k in weights)


@pytest.mark.slow
def test_a_student_dpo_stage_aligns_the_causal_student_and_dmd_can_start_from_it(tmp_path_factory, one_thread):
    """stage dpo_student: the causal init's student as policy and reference (loss log 2 at step 1), a
    trained student folder that loads, differs from its start and is a valid DMD starting point."""
    from test_dmd_stage import _with_causal_init
    from test_ode_pairs import WORLD, build_world, copy_world

    from distill.runner import plan
    from student.model import CausalStudent

    out = copy_world(build_world(tmp_path_factory), tmp_path_factory.mktemp("dpo-student") / "out")
    run = _with_causal_init(out)
    args = WORLD + [f"run.out={out}", "train.steps=3", "train.checkpoint_every=3", "logging.every=1",
                    "logging.tensorboard=true", "train.micro_batch=1"]
    run_recipe(TINY / "dpo-student.yaml", args)
    loss = read_scalars(run / "tb" / "dpo-student", "dpo-student/dpo/loss")
    assert sorted(loss) == [1, 2, 3] and loss[1] == pytest.approx(math.log(2), abs=1e-6)
    start = CausalStudent.from_pretrained(run / "causal-init" / "student")
    aligned = CausalStudent.from_pretrained(run / "dpo-student" / "student")
    assert aligned.settings == start.settings
    changed = [name for (name, a), (_, b) in zip(aligned.named_parameters(), start.named_parameters())
               if not torch.equal(a, b)]
    assert changed
    # DMD plans from it: the student keys it was saved with agree with the DMD recipe's
    dmd = write_recipe(out / "dmd-intra.yaml", {
        "base": str(TINY / "dmd-intra.yaml"), "dmd": {"generator_from": "dpo-student"},
        "needs": [str(TINY / "teacher.yaml"), str(TINY / "dpo-student.yaml")]})
    assert plan(dmd, args).cfg.dmd.generator_from == "dpo-student"


def test_each_dpo_stage_refuses_the_other_ones_source_key(tmp_path):
    """dpo.student_from on the teacher's alignment (and dpo.teacher_from on the student's) would do
    nothing: the plan stops naming the key."""
    from distill.config import ConfigError
    from distill.runner import plan

    for recipe, key in (("dpo.yaml", "dpo.student_from=dmd-intra"), ("dpo-student.yaml", "dpo.teacher_from=dpo")):
        with pytest.raises(ConfigError, match=key.split("=")[0]):
            plan(TINY / recipe, [f"run.out={tmp_path}", key])
