"""Protects the teacher stage: its loss and context handling, the colour metric, the model builder and every recipe."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from student.context import Context

from distill.config import ConfigError, load_recipe, read_recipe_chain
from distill.data.synth import SynthSettings, render_video
from distill.eval.metrics import colour_consistency, dominant_colours, expected_colours
from distill.models import build_wan
from distill.runner import plan
from distill.stages.teacher import StratifiedTimesteps, TeacherStage, trainable_teacher
from teacher.flow import add_noise, shift_timestep, velocity_target

from conftest import REPO, shotdistill
from helpers import Recorder, make_tiny_wan

RECIPES = sorted((REPO / "recipes").rglob("*.yaml"))
TINY_TEACHER = REPO / "recipes" / "tiny" / "teacher.yaml"
WAN_TEACHER = REPO / "recipes" / "wan2.1-1.3b" / "teacher.yaml"


def _mandatory(path: Path, data: dict | None = None, prefix: str = "") -> list[str]:
    """Dotted keys a recipe chain leaves as '???'."""
    data = read_recipe_chain(path) if data is None else data
    keys = []
    for k, v in data.items():
        if isinstance(v, dict):
            keys += _mandatory(path, v, f"{prefix}{k}.")
        elif v == "???":
            keys.append(f"{prefix}{k}")
    return keys


def _filled(path: Path) -> list[str]:
    return [f"{k}=/set/by/test/{k}" for k in _mandatory(path)]


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: str(p.relative_to(REPO / "recipes")))
def test_every_recipe_plans(recipe, tmp_path):
    """Each recipe (and what it needs or pipelines) validates and resolves its stage classes; a
    base-only recipe (no `stage:`) validates its keys on its own."""
    if "stage" not in read_recipe_chain(recipe):
        load_recipe(recipe, _filled(recipe) + ["stage=base-only"])
        return
    root = plan(recipe, _filled(recipe) + [f"run.out={tmp_path}"])
    assert root.cls is not None or root.steps


def test_wan_paths_are_mandatory():
    with pytest.raises(ConfigError, match=r"missing mandatory value for .*model\.path"):
        load_recipe(WAN_TEACHER)


def test_wan_teacher_recipe_has_the_paper_settings():
    cfg = load_recipe(WAN_TEACHER, _filled(WAN_TEACHER))
    ranks = 8
    assert cfg.train.micro_batch * cfg.train.grad_accum * ranks == 64
    assert (cfg.optim.teacher.lr, cfg.train.steps) == (1e-5, 10000)
    assert (cfg.data.width, cfg.data.height, cfg.data.context.budget) == (832, 480, 6)
    assert cfg.deepspeed.bf16 and cfg.deepspeed.zero_stage == 2 and cfg.train.gradient_checkpointing
    assert cfg.teacher.trainable == "self_attention" and cfg.teacher.context_dropout == 0.1
    assert cfg.codec.path == cfg.text_encoder.path == cfg.model.path
    assert cfg.needs == ["prepare.yaml"]


def test_wan_recipes_carry_the_official_release_conventions():
    wan = WAN_TEACHER.parent
    teacher = load_recipe(WAN_TEACHER, _filled(WAN_TEACHER))
    assert (teacher.text_encoder.caption_layout, teacher.teacher.captions) == ("joint", "target_only")
    assert (teacher.teacher.context_timestep, teacher.teacher.positions) == ("target", "shot_rope")
    assert teacher.teacher.text_dropout == 0.1 and teacher.sampler.negative_scope == "all"
    intra = load_recipe(wan / "dmd-intra.yaml", _filled(wan / "dmd-intra.yaml"))
    assert list(intra.student.denoising_steps) == [1000, 740, 500, 260] and intra.student.shift == 8
    d = intra.dmd
    assert (d.timestep_shift, d.guidance, d.generator_every, d.ema_decay) == (8, 3, 6, 0)
    assert (intra.optim.generator.clip, intra.optim.critic.clip) == (1.0, 10.0)
    inter = load_recipe(wan / "dmd-inter.yaml", _filled(wan / "dmd-inter.yaml"))
    assert (inter.lora.rank, inter.lora.alpha, inter.dmd.ema_decay) == (256, 256, 0)
    assert set(inter.lora.targets) >= {"to_q", "to_k", "to_v", "to_out.0", "ffn.net.0.proj", "ffn.net.2"}


def test_tiny_teacher_needs_prepare():
    root = plan(TINY_TEACHER, [])
    assert root.folder == "teacher" and [n.folder for n in root.needs] == ["prepare"]


# --------------------------------------------------------------------------- the model builder


def test_random_wan_follows_codec_and_text_encoder():
    cfg = load_recipe(TINY_TEACHER, ["codec.patch=4", "text_encoder.dim=24", "model.patch_size=[1,2,2]"])
    wan = build_wan(cfg)
    assert (wan.config.in_channels, wan.config.out_channels, wan.config.text_dim) == (48, 48, 24)
    assert list(wan.config.patch_size) == [1, 2, 2]
    cfg = load_recipe(TINY_TEACHER, ["codec.patch=8"])  # 192 channels x 2 x 2 patches per token
    with pytest.raises(ValueError, match="= 256 is narrower than the 768 latent values of a token"):
        build_wan(cfg)


def test_pretrained_wan_is_checked_against_the_codec(tmp_path):
    make_tiny_wan(tmp_path / "transformer", in_channels=4, out_channels=4, text_dim=32)
    cfg = load_recipe(TINY_TEACHER, [f"model.path={tmp_path}"])
    with pytest.raises(ValueError, match="outputs 4 latent channels but the codec makes 12"):
        build_wan(cfg)
    make_tiny_wan(tmp_path / "other", in_channels=12, out_channels=12, text_dim=32)
    cfg = load_recipe(TINY_TEACHER, [f"model.path={tmp_path / 'other'}", "text_encoder.dim=24"])
    with pytest.raises(ValueError, match="text_dim 32 does not match the text encoder's width 24"):
        build_wan(cfg)


# --------------------------------------------------------------------------- the loss


def test_timesteps_are_stratified_and_bucketed():
    strata = StratifiedTimesteps(4, 3.0, window=2)
    edges = shift_timestep(torch.tensor([0.0, 250.0, 500.0, 750.0, 1000.0], dtype=torch.float64), 3.0)
    assert strata.names == ["loss_t0-500", "loss_t500-750", "loss_t750-900", "loss_t900-1000"]
    t, k = strata.draw(step=1, batch=3, device=torch.device("cpu"))
    assert k.tolist() == [3, 0, 1]
    assert all(edges[s] <= v <= edges[s + 1] for s, v in zip(k.tolist(), t.double().tolist()))
    assert strata.record(0, torch.tensor([0, 1]), torch.tensor([1.0, 2.0])) == {
        "loss_t0-500": 1.0, "loss_t500-750": 2.0}
    assert strata.record(1, torch.tensor([0]), torch.tensor([3.0]))["loss_t0-500"] == 2.0
    assert strata.record(2, torch.tensor([3]), torch.tensor([5.0])) == {"loss_t900-1000": 5.0}



def _stage(dropout: float):
    cfg = load_recipe(TINY_TEACHER, [f"teacher.context_dropout={dropout}", "model.layers=1",
                                       "teacher.trainable=self_attention"])
    torch.manual_seed(0)
    stage = TeacherStage(cfg, SimpleNamespace(env=SimpleNamespace(device=torch.device("cpu"))))
    engine = Recorder(trainable_teacher(cfg))
    stage.trainer = SimpleNamespace(engines={"teacher": engine})
    g = torch.Generator().manual_seed(1)
    batch = {"latents": torch.randn(2, 12, 2, 8, 8, generator=g),
             "text": torch.randn(2, 64, 32, generator=g),
             "context": Context(torch.randn(2, 12, 3, 8, 8, generator=g), torch.randn(2, 3, 64, 32, generator=g),
                                torch.tensor([[0, 0, 1], [0, 1, 1]]))}
    return stage, engine, batch


def test_loss_noises_the_target_only_and_keeps_the_context_clean():
    stage, engine, batch = _stage(dropout=0.0)
    torch.manual_seed(5)
    out = stage.step(batch, frozenset({"teacher"}), step=0)
    torch.manual_seed(5)
    noise = torch.randn_like(batch["latents"])
    t, _ = stage.timesteps.draw(0, 2, torch.device("cpu"))
    noisy, timestep, text = engine.args
    assert torch.equal(noisy, add_noise(batch["latents"], noise, t)) and torch.equal(timestep, t)
    assert torch.equal(engine.kwargs["context"], batch["context"].latents)
    assert torch.equal(engine.kwargs["context_shots"], batch["context"].shots)
    v = engine.module(noisy, t, text, **engine.kwargs)
    want = (v - velocity_target(batch["latents"], noise)).pow(2).mean()
    torch.testing.assert_close(out["teacher"], want)
    assert out["context_used"] == 1.0 and set(out) > set(stage.timesteps.names[:2])
    out["teacher"].backward()
    trained = {n for n, p in engine.module.named_parameters() if p.grad is not None}
    assert trained and all(".attn1." in n for n in trained)


def test_context_dropout_trains_without_context():
    stage, engine, batch = _stage(dropout=1.0)
    out = stage.step(batch, frozenset({"teacher"}), step=0)
    assert engine.kwargs == {} and out["context_used"] == 0.0


# --------------------------------------------------------------------------- the colour metric


def test_colour_consistency_against_the_facts():
    frames, facts = render_video(3, SynthSettings(
        videos=4, seed=0, height=48, width=48, fps=8, min_shots=2, max_shots=3, min_frames=4, max_frames=6,
        max_cast=3, speed=1.0))
    first = facts["shots"][0]
    shot = torch.from_numpy(frames[first["start"]:first["end"]])
    assert dominant_colours(shot) == expected_colours(facts, 0)
    assert colour_consistency(shot, facts, 0) == 1.0
    blank = torch.zeros_like(shot)  # black background only: the characters are missing
    want = expected_colours(facts, 0)
    assert colour_consistency(blank, facts, 0) == pytest.approx(len(want & {"black"}) / len(want | {"black"}))
    blend = torch.full_like(shot, 0) + torch.tensor([55, 110, 75], dtype=torch.uint8)
    assert dominant_colours(blend) == set()  # green-on-purple edge blends match no identity
    with pytest.raises(ValueError, match="facts have no usable cast/background for shot 9"):
        expected_colours(facts, 9)


# --------------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_tiny_teacher_recipe_end_to_end(tmp_path):
    """prepare (as a need) then a few teacher steps; the saved teacher loads both ways; reruns skip."""
    from diffusers import WanTransformer3DModel

    from distill.data.datasets import ShotDataset
    from distill.logging import read_scalars
    from distill.data.components import build_codec
    from teacher.encoders import pixels_to_uint8
    from teacher.model import NextShotTeacher

    args = ["run", str(TINY_TEACHER), f"run.out={tmp_path}", "train.steps=4", "train.checkpoint_every=2",
            "logging.every=2", "logging.progress=false", "data.synth.videos=4", "teacher.eval_samples=1",
            "sampler.steps=2", "sampler.guidance_scale=2.0"]
    done = shotdistill(args, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    run = tmp_path / "tiny"
    metrics = json.loads((run / "teacher" / "metrics.json").read_text())
    assert torch.isfinite(torch.tensor(metrics["teacher/loss"])) and metrics["steps"] == 4
    assert 0.0 <= metrics["eval_colour_with_context"] <= 1.0
    assert 0.0 <= metrics["eval_colour_without_context"] <= 1.0
    tb = run / "tb" / "teacher"
    assert set(read_scalars(tb, "teacher/teacher/loss")) == {2, 4}
    t = load_recipe(TINY_TEACHER).teacher
    assert all(read_scalars(tb, f"teacher/{name}") for name in StratifiedTimesteps(t.loss_buckets, t.timestep_shift, 2).names)
    assert read_scalars(tb, "teacher/eval_colour_with_context")
    model = run / "teacher" / "model"
    teacher = NextShotTeacher.from_pretrained(model)
    assert teacher.trainable == "all" and teacher.transformer.config.in_channels == 12
    WanTransformer3DModel.from_pretrained(str(model))
    data = ShotDataset(run / "prepare", "dynamic", 3)
    codec = build_codec(load_recipe(TINY_TEACHER).codec)  # the recipe's normalisation
    for k in range(0, len(data), 3):  # the world's own shots, through mp4 and the codec, score 1
        frames = pixels_to_uint8(codec.decode(data[k]["latents"][None])[0])
        record = data.data.records[data.items[k][0]]
        assert colour_consistency(frames, record["facts"], data.items[k][1]) == 1.0
    marker = (run / "teacher" / "DONE").read_text()
    assert (run / "prepare" / "DONE").is_file()
    again = shotdistill(args, tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "done earlier" in again.stdout and (run / "teacher" / "DONE").read_text() == marker


def test_text_dropout_zeroes_every_frames_text_of_the_dropped_samples():
    from student.context import drop_text

    text = torch.randn(64, 5, 8)
    context = Context(torch.randn(64, 4, 3, 2, 2), torch.randn(64, 3, 5, 8), torch.tensor([[0, 0, 1]] * 64))
    torch.manual_seed(0)
    out, ctx, dropped = drop_text(text, context, 0.25)
    assert 0 < int(dropped.sum()) < 64  # about a quarter of 64
    assert not out[dropped].any() and not ctx.texts[dropped].any()
    assert torch.equal(out[~dropped], text[~dropped]) and torch.equal(ctx.texts[~dropped], context.texts[~dropped])
    assert torch.equal(ctx.latents, context.latents)
    state = torch.random.get_rng_state()
    same, _, none = drop_text(text, context, 0.0)
    assert same is text and not none.any() and torch.equal(torch.random.get_rng_state(), state)  # no draw


@pytest.mark.parametrize("scope", ["all", "target"])
def test_the_negative_replaces_every_frames_text_or_the_targets(scope):
    from student.context import denoisers

    calls = []
    model = lambda x, t, text, **kw: calls.append((text, kw)) or x  # noqa: E731
    context = Context(torch.randn(1, 4, 3, 2, 2), torch.randn(1, 3, 5, 8), torch.tensor([[0, 0, 1]]))
    cond, uncond = denoisers(model, context, scope)
    negative = torch.zeros(1, 5, 8)
    cond(torch.zeros(1), torch.zeros(1), torch.ones(1, 5, 8))
    uncond(torch.zeros(1), torch.zeros(1), negative)
    (_, kw_cond), (text, kw_uncond) = calls
    assert torch.equal(kw_cond["context_text"], context.texts) and text is negative
    if scope == "all":
        assert not kw_uncond["context_text"].any()  # the official: every frame's text is the negative
    else:
        assert torch.equal(kw_uncond["context_text"], context.texts)
    assert torch.equal(kw_uncond["context"], context.latents)


def test_joint_captions_need_one_text_per_frame(tmp_path):
    from distill.runner import plan

    with pytest.raises(ValueError, match=r"caption_layout=joint gives every frame one text: it needs "
                                         r"teacher.captions=target_only, got 'multi'"):
        plan(TINY_TEACHER, [f"run.out={tmp_path}", "text_encoder.caption_layout=joint"])
    plan(TINY_TEACHER, [f"run.out={tmp_path}", "text_encoder.caption_layout=joint", "teacher.captions=target_only"])


@pytest.mark.slow
def test_teacher_ema_is_what_the_stage_saves(tmp_path):
    """With teacher.ema_decay the saved teacher is the checkpointed EMA, not the last raw weights."""
    from distill.checkpoint import safe_load
    from teacher.model import NextShotTeacher

    args = ["run", str(TINY_TEACHER), f"run.out={tmp_path}", "train.steps=4", "train.checkpoint_every=2",
            "logging.progress=false", "data.synth.videos=4", "teacher.eval_samples=0", "teacher.ema_decay=0.5",
            "teacher.ema_start=1"]
    done = shotdistill(args, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    stage = tmp_path / "tiny" / "teacher"
    last = max(stage.rglob("rank-00000.pt"), key=lambda p: p.parent.name)
    shadow = safe_load(last)["extra"]["ema"]["shadow"]
    raw = safe_load(next(last.parent.rglob("*model_states.pt")))["module"]
    saved = dict(NextShotTeacher.from_pretrained(stage / "model").named_parameters())
    assert set(shadow) == set(saved)
    for name, value in shadow.items():
        assert torch.equal(saved[name].detach(), value), name
    assert any(not torch.equal(raw[n].float(), shadow[n]) for n in shadow)  # the EMA lags the weights
