"""Protects the DMD stages: LoRA-only training and exact merged export, 2-rank ZeRO-2/3 runs, bit-identical kill -9 resume."""

from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, free_port, shotdistill
from distill import checkpoint
from distill.dmd import generator_loss
from distill.logging import read_scalars
from distill.models import build_student, load_teacher
from distill.rollout import SelfForcingGenerator, shots
from distill.layout import DONE
from distill.runner import plan
from distill.stages.dmd import DMDInterStage, add_lora, only_lora_trainable
from student.export import save_student
from student.model import CausalStudent
from test_ode_pairs import WORLD, build_world, copy_world

TINY = REPO / "recipes" / "tiny"
INTER = TINY / "dmd-inter.yaml"
# threshold 0: ZeRO-3 partitions every parameter, the directly read modulation tables included
STEPS = ["train.steps=4", "train.checkpoint_every=2", "logging.every=1", "dmd.generator_every=2",
         "dmd.ema_start=1", "dmd.eval_videos=0", "dmd.sample_every=2", "logging.tensorboard=true",
         "deepspeed.param_persistence_threshold=0", "run.dist_timeout=120"]


def _with_causal_init(out: Path) -> Path:
    """The small world (prepare + teacher) plus a causal-init folder: the teacher's weights as a
    chunk-causal student export (what causal_init starts from), marked DONE."""
    run = out / "tiny"
    cfg = plan(TINY / "causal-init.yaml", WORLD + [f"run.out={out}"]).cfg
    student = build_student(cfg, load_teacher(run / "teacher" / "model"))
    save_student(student, run / "causal-init" / "student")
    (run / "causal-init" / DONE).write_text(json.dumps({"metrics": {}, "produces": "student"}) + "\n")
    return run


@pytest.fixture(scope="module")
def dmd_world(tmp_path_factory) -> Path:
    out = copy_world(build_world(tmp_path_factory), tmp_path_factory.mktemp("dmd") / "out")
    _with_causal_init(out)
    return out


def _fresh(world: Path, dest: Path, intra: bool = False) -> Path:
    """A copy of the world; with `intra`, a dmd-intra folder holding the causal-init student (DONE),
    so that dmd-inter starts at once."""
    shutil.copytree(world, dest, ignore=shutil.ignore_patterns("dmd-*"))
    if intra:
        shutil.copytree(dest / "tiny" / "causal-init", dest / "tiny" / "dmd-intra")
    return dest


def test_planning_rejects_bad_dmd_keys():
    with pytest.raises(ValueError, match=r"min_t <= max_t <= 1000 .*got \[990.0, 980.0\]"):
        plan(INTER, WORLD + ["run.out=/nonexistent", "dmd.min_t=990"])
    with pytest.raises(ValueError, match=r"dmd.ema_decay must be in \[0, 1\), got 1.0"):
        plan(INTER, WORLD + ["run.out=/nonexistent", "dmd.ema_decay=1.0"])


def test_lora_trains_only_adapters_and_merged_export_equals_unmerged(dmd_world, tmp_path):
    """One generator update through a LoRA rollout changes only LoRA weights; the export (LoRA
    merged) computes what the unmerged student computes."""
    student = CausalStudent.from_pretrained(dmd_world / "tiny" / "causal-init" / "student").train()
    add_lora(student.transformer, plan(INTER, WORLD + [f"run.out={tmp_path}"]).cfg.lora)
    names = only_lora_trainable(student)
    assert names and all("lora_" in n for n in names)
    before = {n: p.detach().clone() for n, p in student.named_parameters()}
    opt = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=1e-2)
    torch.manual_seed(0)
    text = torch.randn(1, 64, 32)
    shot, = shots(SelfForcingGenerator(student)([text], 2, 1, 16, 16))
    score = lambda x_t, t: torch.zeros_like(x_t)  # noqa: E731
    generator_loss(shot.x, score, lambda x_t, t: x_t, torch.tensor([500.0]), torch.randn_like(shot.x)).loss.backward()
    opt.step()
    changed = {n for n, p in student.named_parameters() if not torch.equal(p, before[n])}
    assert changed and changed <= set(names)
    save_student(student, tmp_path / "export")
    merged = CausalStudent.from_pretrained(tmp_path / "export")
    assert not any("lora" in n for n, _ in merged.named_parameters())
    student.eval()
    x, t = torch.randn(1, 12, 6, 16, 16), torch.full((1,), 700.0)
    with torch.no_grad():
        torch.testing.assert_close(merged(x, t, text), student(x, t, text), rtol=1e-5, atol=1e-5)


def _losses(run: Path, stage: str, name: str) -> dict[int, float]:
    return read_scalars(run / "tb" / stage, f"{stage}/{name}/loss")


class KillAt(DMDInterStage):
    """dmd_inter whose rank SHOTDISTILL_CI_KILL_RANK SIGKILLs itself when step SHOTDISTILL_CI_KILL_AT
    starts (after the checkpoint before it)."""

    def step(self, batch, due, step):
        if step == int(os.environ["SHOTDISTILL_CI_KILL_AT"]) and \
                self.env.rank == int(os.environ["SHOTDISTILL_CI_KILL_RANK"]):
            os.kill(os.getpid(), signal.SIGKILL)
        return super().step(batch, due, step)


def _launch(recipe: Path, cwd: Path, overrides: list[str], env: dict | None = None):
    """`shotdistill launch RECIPE --nproc 2` on a free port."""
    return shotdistill(["launch", str(recipe), "--nproc", "2", "--master", f"127.0.0.1:{free_port()}",
                        *overrides], cwd, env, timeout=400)


@pytest.mark.slow
def test_two_ranks_zero3_intra_then_inter(dmd_world, tmp_path):
    """`shotdistill launch dmd-inter.yaml --nproc 2 deepspeed.zero_stage=3`: dmd-intra runs first, both
    log finite generator and critic losses and export a student; dmd-inter's GIF summaries exist."""
    out = _fresh(dmd_world, tmp_path / "out")
    done = _launch(INTER, tmp_path, [*WORLD, *STEPS, f"run.out={out}", "deepspeed.zero_stage=3", "train.steps=2",
                                     "dmd.sample_every=1", "train.micro_batch=1"])
    assert done.returncode == 0, done.stderr[-3000:]
    for stage in ("dmd-intra", "dmd-inter"):
        run = out / "tiny"
        for name in ("generator", "critic"):
            losses = _losses(run, stage, name)
            assert losses and all(torch.isfinite(torch.tensor(v)) for v in losses.values()), (stage, name)
        assert (run / stage / "student" / "generator.json").is_file()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(out / "tiny" / "tb" / "dmd-inter"), size_guidance={"images": 0, "histograms": 0})
    acc.Reload()
    assert acc.Images("dmd-inter/rollout")[0].encoded_image_string[:6] == b"GIF89a"
    assert acc.Histograms("dmd-inter/exit_steps")


@pytest.mark.slow
@pytest.mark.parametrize("guidance", [0.0, 3.0])
def test_two_ranks_zero2_kill9_resume_is_bit_identical_with_ema_and_only_lora_changes(dmd_world, tmp_path, guidance):
    """2 gloo ranks, ZeRO-2: rank 1 killed as step 2 starts (checkpoint at 2) and resumed, dmd-inter logs
    the same finite generator and critic losses as an uninterrupted 2-rank run and exports the same
    EMA student; LoRA leaves base weights."""
    # generator updates at steps 0 and 2: the EMA starts at 0, so the checkpoint holds it and the
    # resumed step 2 averages into the restored EMA (a lost EMA would export step 2's weights)
    overrides = WORLD + STEPS + ["train.steps=3", "dmd.ema_decay=0.5", "dmd.ema_start=0", "logging.progress=false",
                                 "deepspeed.zero_stage=2", f"dmd.guidance={guidance}"]
    ref = _fresh(dmd_world, tmp_path / "ref", intra=True)
    intra_done = ref / "tiny" / "dmd-intra"
    cut = _fresh(dmd_world, tmp_path / "cut", intra=True)
    # One intra-op thread per rank: with two (CI's OMP_NUM_THREADS), the resumed export differed from
    # the uninterrupted one by 2 ulps (7e-9) in LoRA-merged weights, with or without guidance; with one
    # it is equal every time (5 runs). Which kernel is thread-dependent here is not yet known.
    one = {"OMP_NUM_THREADS": "1"}
    done = _launch(INTER, tmp_path, overrides + [f"run.out={ref}"], one)
    assert done.returncode == 0, done.stderr[-3000:]
    recipe = tmp_path / "kill.yaml"
    recipe.write_text(f"base: {INTER}\nstage: test_dmd_stage:KillAt\nneeds: [{TINY / 'teacher.yaml'}, "
                      f"{TINY / 'dmd-intra.yaml'}]\n")
    killed = _launch(recipe, tmp_path, overrides + [f"run.out={cut}"],
                     {"SHOTDISTILL_CI_KILL_AT": "2", "SHOTDISTILL_CI_KILL_RANK": "1", **one})
    # torchrun lists every failed rank; the one that must be there is the SIGKILLed rank 1
    assert killed.returncode != 0 and "killed by SIGKILL" in killed.stderr, killed.stderr[-3000:]
    assert [s for s, _ in checkpoint.committed(cut / "tiny" / "dmd-inter" / "checkpoints")] == [2]
    resumed = _launch(INTER, tmp_path, overrides + [f"run.out={cut}"], one)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    for name in ("generator", "critic"):
        reference = _losses(ref / "tiny", "dmd-inter", name)
        assert sorted(reference) == ([1, 3] if name == "generator" else [1, 2, 3])
        assert all(torch.isfinite(torch.tensor(v)) for v in reference.values()), name
        assert _losses(cut / "tiny", "dmd-inter", name) == reference
    exported = [load_file(r / "tiny" / "dmd-inter" / "student" / "transformer" / "diffusion_pytorch_model.safetensors")
                for r in (ref, cut)]
    assert exported[0].keys() == exported[1].keys()
    assert all(torch.equal(exported[0][k], exported[1][k]) for k in exported[0])
    start = load_file(intra_done / "student" / "transformer" / "diffusion_pytorch_model.safetensors")
    # the EMA of LoRA-only training differs from the start only where adapters were merged
    moved = {k for k in start if not torch.equal(start[k], exported[0][k])}
    assert moved and all(".attn1." in k or ".attn2." in k for k in moved)


def test_ema_starts_late_then_averages_and_round_trips():
    from distill.ema import EMA

    model = torch.nn.Linear(1, 1, bias=False)
    model.weight.data.fill_(1.0)
    ema = EMA(model, decay=0.5, start=2)
    ema.update(1)  # before the start: nothing
    assert not ema.shadow
    ema.update(2)  # starts as a copy
    model.weight.data.fill_(3.0)
    ema.update(3)  # 0.5 * 1 + 0.5 * 3
    assert ema.shadow["weight"].item() == 2.0
    other = EMA(model, decay=0.5, start=2)
    other.load_state_dict(ema.state_dict())
    assert other.copy_to() and model.weight.item() == 2.0
    assert not EMA(model, decay=0.5, start=2).copy_to()
