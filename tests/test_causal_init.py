"""Protects the causal init: per-chunk trajectory indices, the x0 loss, kill -9 resume, closeness to the teacher."""

from __future__ import annotations

import json
import os
import shutil
import signal
from types import SimpleNamespace

import pytest
import torch

from student.context import Context

from conftest import REPO, shotdistill
from helpers import Recorder
from distill import checkpoint
from distill.config import load_recipe
from distill.logging import read_scalars
from distill.models import build_teacher
from distill.runner import run_recipe
from distill.models import build_student
from distill.stages.causal_init import CausalInitStage, chunk_inputs
from student.model import CausalStudent
from teacher.flow import sigma
from test_ode_pairs import PAIRS, WORLD, pairs_run  # noqa: F401 (fixture)

CAUSAL = REPO / "recipes" / "tiny" / "causal-init.yaml"
TRAIN = ["train.steps=6", "train.checkpoint_every=3", "train.micro_batch=2", "logging.every=1",
         "logging.tensorboard=true", "optim.student.lr=1e-4", "optim.student.warmup=0", "causal_init.eval_pairs=3"]


def test_each_chunk_takes_its_own_trajectory_index():
    batch, k, c, frames, chunk = 2, 4, 3, 6, 3
    trajectory = torch.arange(batch * k * c * frames * 2 * 2, dtype=torch.float32).view(batch, k, c, frames, 2, 2)
    timesteps = torch.tensor([1000.0, 937.5, 833.3, 625.0])
    torch.manual_seed(3)
    x_t, t, index = chunk_inputs(trajectory, timesteps, chunk)
    assert index.shape == (batch, frames // chunk) and x_t.shape == (batch, c, frames, 2, 2)
    for b in range(batch):
        for f in range(frames):
            i = int(index[b, f // chunk])
            assert torch.equal(x_t[b, :, f], trajectory[b, i, :, f]) and t[b, f] == timesteps[i]
    torch.manual_seed(3)
    draws = torch.stack([chunk_inputs(trajectory, timesteps, chunk)[2] for _ in range(20)])
    assert len(set(draws.flatten().tolist())) == k  # every stored timestep gets drawn
    with pytest.raises(ValueError, match="ODE pairs have 6 target frames, not a whole number of 4-frame chunks"):
        chunk_inputs(trajectory, timesteps, 4)



def test_a_chunk_may_draw_the_clean_level():
    batch, k, c, frames, chunk = 2, 4, 3, 12, 3
    trajectory = torch.randn(batch, k, c, frames, 2, 2)
    clean = torch.randn(batch, c, frames, 2, 2)
    timesteps = torch.tensor([1000.0, 937.5, 833.3, 625.0])
    torch.manual_seed(0)
    draws = torch.stack([chunk_inputs(trajectory, timesteps, chunk, clean)[2] for _ in range(20)])
    assert set(draws.flatten().tolist()) == set(range(k + 1))  # level K: t = 0
    torch.manual_seed(0)
    x_t, t, index = chunk_inputs(trajectory, timesteps, chunk, clean)
    for b in range(batch):
        for f in range(frames):
            if index[b, f // chunk] == k:
                assert t[b, f] == 0 and torch.equal(x_t[b, :, f], clean[b, :, f])


def _stage_and_batch(clean_level: bool):
    cfg = load_recipe(CAUSAL, ["model.layers=1", "model.patch_size=[1,2,2]", f"causal_init.clean_level={clean_level}"])
    torch.manual_seed(0)
    student = build_student(cfg, build_teacher(cfg))
    stage = CausalInitStage(cfg, SimpleNamespace(env=SimpleNamespace(device=torch.device("cpu"))))
    engine = Recorder(student)
    stage.trainer = SimpleNamespace(engines={"student": engine})
    stage.timesteps = torch.tensor([1000.0, 937.5, 833.3, 625.0])
    g = torch.Generator().manual_seed(1)
    batch = {"trajectory": torch.randn(2, 4, 12, 12, 8, 8, generator=g),
             "x0": torch.randn(2, 12, 12, 8, 8, generator=g), "text": torch.randn(2, 64, 32, generator=g),
             "context": Context(torch.randn(2, 12, 3, 8, 8, generator=g), torch.randn(2, 3, 64, 32, generator=g),
                                torch.tensor([[0, 0, 1]] * 2))}
    return stage, engine, student, batch


def test_clean_chunks_take_the_clean_input_and_carry_no_loss():
    stage, engine, student, batch = _stage_and_batch(clean_level=True)
    def levels(seed):  # what the step's first draw (chunk_inputs) gives: 2 pairs x 4 chunks, 5 levels
        torch.manual_seed(seed)
        return torch.randint(5, (2, 4))

    seed = next(s for s in range(100) if levels(s).eq(4).any() and not levels(s).eq(4).all())
    torch.manual_seed(seed)
    out = stage.step(batch, frozenset({"student"}), step=0)
    noisy_in, timestep, _ = engine.args
    clean_frames = timestep == 0
    assert clean_frames.any() and not clean_frames.all()
    assert torch.equal(noisy_in.permute(0, 2, 1, 3, 4)[clean_frames], batch["x0"].permute(0, 2, 1, 3, 4)[clean_frames])
    with torch.no_grad():
        v = student(noisy_in, timestep, batch["text"], **engine.kwargs)
    error = (noisy_in - sigma(timestep)[:, None, :, None, None] * v - batch["x0"]).pow(2).permute(0, 2, 1, 3, 4)
    torch.testing.assert_close(out["student"].detach(), error[~clean_frames].mean())


def test_loss_is_the_x0_mse_with_a_clean_context_prefix():
    cfg = load_recipe(CAUSAL, ["model.layers=1", "model.patch_size=[1,2,2]", "causal_init.clean_level=false"])
    torch.manual_seed(0)
    student = build_student(cfg, build_teacher(cfg))
    assert isinstance(student, CausalStudent) and all(p.requires_grad for p in student.parameters())
    stage = CausalInitStage(cfg, SimpleNamespace(env=SimpleNamespace(device=torch.device("cpu"))))
    engine = Recorder(student)
    stage.trainer = SimpleNamespace(engines={"student": engine})
    stage.timesteps = torch.tensor([1000.0, 937.5, 833.3, 625.0])
    g = torch.Generator().manual_seed(1)
    batch = {"trajectory": torch.randn(2, 4, 12, 6, 8, 8, generator=g), "x0": torch.randn(2, 12, 6, 8, 8, generator=g),
             "text": torch.randn(2, 64, 32, generator=g),
             "context": Context(torch.randn(2, 12, 3, 8, 8, generator=g), torch.randn(2, 3, 64, 32, generator=g),
                                torch.tensor([[0, 0, 1]] * 2))}
    torch.manual_seed(7)
    out = stage.step(batch, frozenset({"student"}), step=0)
    torch.manual_seed(7)
    x_t, t, _ = chunk_inputs(batch["trajectory"], stage.timesteps, 3)
    noisy, timestep, text = engine.args
    assert torch.equal(noisy, x_t) and torch.equal(timestep, t) and torch.equal(text, batch["text"])
    assert torch.equal(engine.kwargs["context"], batch["context"].latents)
    v = student(x_t, t, batch["text"], **engine.kwargs)
    x0 = x_t - sigma(t)[:, None, :, None, None] * v
    torch.testing.assert_close(out["student"], (x0 - batch["x0"]).pow(2).mean())
    out["student"].backward()
    assert all(p.grad is not None for p in student.transformer.blocks.parameters())


def test_pairs_kept_at_other_timesteps_are_refused(pairs_run, tmp_path):  # noqa: F811
    run, _ = pairs_run
    out = tmp_path / "out"
    shutil.copytree(run.parent, out)
    # refused while planning: the finished ode-pairs stage recorded the shift it sampled at
    with pytest.raises(ValueError, match=r"student\.shift=3\.0 cannot take effect in stage causal-init: its input "
                                         r"causal_init\.pairs_from='ode-pairs' was built with 5\.0$"):
        run_recipe(CAUSAL, WORLD + PAIRS + ["ode.dtype=float32", f"run.out={out}", "student.shift=3.0"])
    # and while running, against the pairs' own index, when the recorded recipe does not say
    (out / "tiny" / "ode-pairs" / "config.yaml").unlink()
    with pytest.raises(ValueError, match=r"index\.json: pairs kept timesteps \[1000\.0, 937\.5.*student\.shift"):
        run_recipe(CAUSAL, WORLD + PAIRS + ["ode.dtype=float32", f"run.out={out}", "student.shift=3.0"])


# --------------------------------------------------------------------------- end to end


class KillAt(CausalInitStage):
    """Test-only: SIGKILLs itself when step SHOTDISTILL_CI_KILL_AT starts."""

    def step(self, batch, due, step):
        if step == int(os.environ["SHOTDISTILL_CI_KILL_AT"]):
            os.kill(os.getpid(), signal.SIGKILL)
        return super().step(batch, due, step)


def _losses(run) -> dict[int, float]:
    return read_scalars(run / "tb" / "causal-init", "causal-init/student/loss")


@pytest.mark.slow
def test_kill9_resume_is_bit_identical_and_the_student_gets_closer(pairs_run, tmp_path):  # noqa: F811
    run, _ = pairs_run
    overrides = WORLD + PAIRS + ["ode.dtype=float32"] + TRAIN
    ref = tmp_path / "ref"
    shutil.copytree(run.parent, ref)
    run_recipe(CAUSAL, overrides + [f"run.out={ref}"])
    reference = _losses(ref / "tiny")
    assert sorted(reference) == list(range(1, 7))
    metrics = json.loads((ref / "tiny" / "causal-init" / "metrics.json").read_text())
    print("distance to the teacher's end points, before -> after: all steps "
          f"{metrics['eval_distance_before']:.4f} -> {metrics['eval_distance_after']:.4f}, first step "
          f"{metrics['eval_first_step_before']:.4f} -> {metrics['eval_first_step_after']:.4f}")
    # The first step from the pair's noise is the map the regression fits; the later steps see
    # re-noised inputs off the teacher's trajectories (on this world 6 steps help there too).
    assert metrics["eval_first_step_after"] < metrics["eval_first_step_before"]
    assert metrics["eval_distance_after"] < metrics["eval_distance_before"]
    exported = CausalStudent.from_pretrained(ref / "tiny" / "causal-init" / "student")
    assert exported.settings.chunk_frames == 3 and exported.settings.local_chunks == 1  # the recipe's
    components = json.loads((ref / "tiny" / "causal-init" / "student" / "generator.json").read_text())["components"]
    # the tiny random text encoder exists nowhere else: saved inside the stage's student folder
    assert components["codec"] == {"kind": "patch", "patch": 2, "mean": -0.4, "std": 0.54} and components["text_encoder"]["path"] == "."
    assert (ref / "tiny" / "causal-init" / "student" / "tokenizer").is_dir()

    cut = tmp_path / "cut"
    shutil.copytree(run.parent, cut)
    recipe = tmp_path / "kill.yaml"
    recipe.write_text(f"base: {CAUSAL}\nstage: test_causal_init:KillAt\n"
                      f"needs: [{CAUSAL.parent / 'teacher.yaml'}, {CAUSAL.parent / 'ode-pairs.yaml'}]\n")
    killed = shotdistill(["run", str(recipe), *overrides, f"run.out={cut}"], tmp_path,
                         {"SHOTDISTILL_CI_KILL_AT": "4"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert [s for s, _ in checkpoint.committed(cut / "tiny" / "causal-init" / "checkpoints")] == [3]
    run_recipe(CAUSAL, overrides + [f"run.out={cut}"])
    assert _losses(cut / "tiny") == reference


def test_wan_recipes_have_the_paper_settings():
    filled = ["model.path=/set/by/test", "data.manifest=/set/by/test/manifest.jsonl"]
    ode = load_recipe(REPO / "recipes" / "wan2.1-1.3b" / "ode-pairs.yaml", filled)
    assert (ode.ode.pairs, ode.ode.steps, ode.ode.shift, ode.ode.guidance_scale) == (5000, 50, 8.0, 5.0)
    assert ode.sampler.negative_prompt and ode.ode.dtype == "bfloat16"
    cfg = load_recipe(REPO / "recipes" / "wan2.1-1.3b" / "causal-init.yaml", filled)
    ranks = 8
    assert cfg.train.micro_batch * cfg.train.grad_accum * ranks == 64
    assert (cfg.optim.student.lr, cfg.train.steps) == (1e-6, 2000)
    assert cfg.student == ode.student and cfg.needs == ["teacher.yaml", "ode-pairs.yaml"]
