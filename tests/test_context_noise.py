"""Protects asymmetric context noise (FilmWeaver): drawn timesteps lie in the range, context latents are
add_noise(x, ε, t) at those t, the teacher sees each frame's t, and off ([0, 0]) is today's path exactly."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pytest
import torch

import distill.stages.teacher as teacher_stage
from distill.config import load_recipe
from distill.context_noise import noise_context
from distill.stages.dmd import DMDStage
from distill.stages.teacher import TeacherStage, trainable_teacher
from student.context import Context
from teacher.flow import add_noise, velocity_target
from teacher.model import NextShotTeacher

from conftest import REPO
from helpers import Recorder, make_tiny_wan

TINY_TEACHER = REPO / "recipes" / "tiny" / "teacher.yaml"


def _context(batch=3, frames=4, seed=1) -> Context:
    g = torch.Generator().manual_seed(seed)
    return Context(torch.randn(batch, 12, frames, 8, 8, generator=g), torch.randn(batch, frames, 64, 32, generator=g),
                   torch.tensor([0, 0, 1, 2][:frames]).expand(batch, -1))


def _replay(state: torch.Tensor, context: Context, lo: float, hi: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(t, noised latents) the noise rule draws from RNG state `state`: t ~ U[lo, hi] per frame, then ε."""
    torch.set_rng_state(state)
    b, _, f = context.latents.shape[:3]
    t = (lo + (hi - lo) * torch.rand(b, f, dtype=torch.float64)).float()
    eps = torch.randn(context.latents.shape)
    return t, add_noise(context.latents, eps, t)


def test_drawn_timesteps_lie_in_the_range_and_latents_are_add_noise_at_them():
    context = _context()
    torch.manual_seed(3)
    state = torch.get_rng_state()
    noisy = noise_context(context, [100.0, 400.0])
    t, want = _replay(state, context, 100.0, 400.0)
    assert noisy.timesteps.shape == (3, 4) and torch.equal(noisy.timesteps, t)
    assert 100.0 <= float(t.min()) and float(t.max()) <= 400.0 and float(t.std()) > 0  # one t per frame
    torch.testing.assert_close(noisy.latents, want, rtol=0, atol=0)
    assert torch.equal(noisy.texts, context.texts) and torch.equal(noisy.shots, context.shots)
    many = noise_context(_context(batch=64, frames=4), [100.0, 400.0]).timesteps
    assert 100.0 <= float(many.min()) < 130.0 and 370.0 < float(many.max()) <= 400.0  # uniform over the range
    assert noise_context(context, [250.0, 250.0]).timesteps.eq(250.0).all()


def test_off_draws_nothing_and_keeps_the_context():
    context = _context()
    torch.manual_seed(0)
    state = torch.get_rng_state()
    assert noise_context(context, [0.0, 0.0]) is context and noise_context(None, [100.0, 400.0]) is None
    assert torch.equal(torch.get_rng_state(), state)


@pytest.mark.parametrize("span", [[400.0, 100.0], [0.0, 1001.0], [-1.0, 10.0], [100.0]])
def test_a_bad_range_names_the_key(span):
    with pytest.raises(ValueError, match=r"^data.context.noise.shot must be \[lo, hi\] with 0 <= lo <= hi <= 1000"):
        noise_context(_context(), span)


def test_the_teacher_runs_noised_frames_at_their_timesteps():
    torch.manual_seed(0)
    teacher = NextShotTeacher(make_tiny_wan(), captions="target_only")
    g = torch.Generator().manual_seed(2)
    x, text = torch.randn(2, 4, 2, 4, 4, generator=g), torch.randn(2, 5, 24, generator=g)
    context, t = torch.randn(2, 4, 3, 4, 4, generator=g), torch.tensor([500.0, 700.0])
    with torch.no_grad():
        clean = teacher(x, t, text, context=context)
        zero = teacher(x, t, text, context=context, context_timesteps=torch.zeros(2, 3))
        drawn = teacher(x, t, text, context=context, context_timesteps=torch.tensor([[100.0, 200.0, 300.0]] * 2))
    assert torch.equal(clean, zero)  # t = 0 is the clean convention
    assert not torch.allclose(clean, drawn)
    with pytest.raises(ValueError, match=r"context_timesteps \[2, 2\] needs frame_concat injection and must be "
                                         r"\[B, Fc\] for context \[2, 4, 3, 4, 4\]"):
        teacher(x, t, text, context=context, context_timesteps=torch.zeros(2, 2))



def _teacher_stage(span: str, monkeypatch):
    cfg = load_recipe(TINY_TEACHER, ["teacher.context_dropout=0.0", "teacher.text_dropout=0.0", "model.layers=1",
                                     f"data.context.noise.shot={span}"])
    TeacherStage.check(cfg)
    torch.manual_seed(0)
    stage = TeacherStage(cfg, SimpleNamespace(env=SimpleNamespace(device=torch.device("cpu"))))
    engine = Recorder(trainable_teacher(cfg))
    stage.trainer = SimpleNamespace(engines={"teacher": engine})
    states = []
    real = teacher_stage.noise_context
    monkeypatch.setattr(teacher_stage, "noise_context", lambda c, s: states.append(torch.get_rng_state()) or real(c, s))
    g = torch.Generator().manual_seed(1)
    batch = {"latents": torch.randn(2, 12, 2, 8, 8, generator=g), "text": torch.randn(2, 64, 32, generator=g),
             "context": Context(torch.randn(2, 12, 3, 8, 8, generator=g), torch.randn(2, 3, 64, 32, generator=g),
                                torch.tensor([[0, 0, 1], [0, 1, 1]]))}
    return stage, engine, batch, states


def test_teacher_step_off_is_the_old_loss_exactly(monkeypatch):
    stage, engine, batch, _ = _teacher_stage("[0.0, 0.0]", monkeypatch)
    torch.manual_seed(5)
    out = stage.step(batch, frozenset({"teacher"}), step=0)
    assert "context_timesteps" not in engine.kwargs
    assert torch.equal(engine.kwargs["context"], batch["context"].latents)
    torch.manual_seed(5)  # the old path: noise, timesteps, the context-dropout draw, nothing else
    noise = torch.randn_like(batch["latents"])
    t, _ = stage.timesteps.draw(0, 2, torch.device("cpu"))
    torch.rand(())
    with torch.no_grad():
        v = engine.module(add_noise(batch["latents"], noise, t), t, batch["text"], **batch["context"].kwargs())
    want = (v - velocity_target(batch["latents"], noise)).pow(2).flatten(1).mean(1).mean()  # the stage's reduction: per sample, then the batch
    assert torch.equal(out["teacher"].detach(), want)


def test_teacher_step_noises_the_context_and_shows_its_timesteps(monkeypatch):
    stage, engine, batch, states = _teacher_stage("[100.0, 400.0]", monkeypatch)
    stage.step(batch, frozenset({"teacher"}), step=0)
    t, latents = _replay(states[0], batch["context"], 100.0, 400.0)
    assert torch.equal(engine.kwargs["context_timesteps"], t)
    assert torch.equal(engine.kwargs["context"], latents)
    assert engine.args[1].shape == (2,)  # the target keeps its own timestep, one per sample


def test_noise_needs_context_tokens_at_t0():
    cfg = load_recipe(TINY_TEACHER, ["data.context.noise.shot=[100.0, 400.0]", "teacher.context_timestep=target"])
    with pytest.raises(ValueError, match=r"data.context.noise.shot=\[100.0, 400.0\] needs teacher.injection="
                                         r"frame_concat and teacher.context_timestep=zero"):
        TeacherStage.check(cfg)


@pytest.mark.parametrize("span", ["[0.0, 0.0]", "[100.0, 400.0]"])
def test_the_dmd_critic_trains_on_noised_context(span, monkeypatch):
    cfg = load_recipe(REPO / "recipes" / "tiny" / "dmd-intra.yaml", [f"data.context.noise.shot={span}"])
    DMDStage.check(cfg)
    stage = DMDStage.__new__(DMDStage)
    stage.cfg, stage.dtype = cfg, torch.float32
    seen = {}
    critic = lambda x, t, text, **kw: seen.update(kw) or x  # noqa: E731
    context = _context(batch=2, frames=3)
    torch.manual_seed(4)
    state = torch.get_rng_state()
    score = stage._critic_score(critic, context, torch.zeros(2, 64, 32))
    score(torch.zeros(2, 12, 2, 8, 8), torch.tensor([500.0, 500.0]))
    if span == "[0.0, 0.0]":
        assert "context_timesteps" not in seen and seen["context"] is context.latents
        return
    t, latents = _replay(state, context, 100.0, 400.0)
    assert torch.equal(seen["context_timesteps"], t) and torch.equal(seen["context"], latents)


def test_a_stage_made_before_the_key_existed_is_reused_at_its_default():
    from distill import keys

    now = keys.fingerprint(TeacherStage, load_recipe(TINY_TEACHER))
    old = {"sha256": "older", "keys": {k: v for k, v in now["keys"].items() if not k.startswith("data.context.")
                                       or k in keys.CONTEXT_RULE}}
    assert len(old["keys"]) < len(now["keys"]) and keys.fingerprint_changes(old, now) == []
    noisy = keys.fingerprint(TeacherStage, load_recipe(TINY_TEACHER, ["data.context.noise.shot=[100.0, 400.0]"]))
    assert keys.fingerprint_changes(old, noisy) == ["data.context.noise.shot: (absent) → [100.0, 400.0]"]
