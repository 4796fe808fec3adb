"""Protects the ODE-pair stage: stored pairs are the sampler's, shards split over ranks and resume intact."""

from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path

import pytest
import torch

from conftest import REPO, free_port, shotdistill
from distill.data.components import negative_text, prepared_dir
from distill.data.datasets import ShotDataset
from distill.data.pairs import OdePairDataset
from distill.models import load_teacher, student_timesteps
from distill.runner import plan, run_recipe
from distill.stages.ode_pairs import OdePairsStage, pair_noise, pair_tensors, sample_pair
from student.context import Context

TINY = REPO / "recipes" / "tiny"
ODE = TINY / "ode-pairs.yaml"
# A small world: 3 videos of 32x32 frames, 6-frame shots (2 student chunks), a 1-layer teacher.
# resume=force: the world's finished teacher (40 steps, no eval samples) is reused by runs whose
# tree-wide train.* overrides plan it otherwise (its DONE fingerprint differs; distill/keys.py).
WORLD = ["data.synth.videos=3", "data.synth.max_frames=8", "data.height=32", "data.width=32",
         "data.shot_frames=6", "model.layers=1", "logging.progress=false", "logging.tensorboard=false",
         "resume=force"]
PAIRS = ["ode.pairs=7", "ode.pairs_per_shard=2", "ode.steps=4", "ode.guidance_scale=2.0"]
_BUILT: dict[str, Path] = {}


def build_world(factory) -> Path:
    """A run folder (under run.out, name 'tiny') with prepare and a briefly trained teacher (40 steps:
    enough for curved trajectories that a causal student does not follow at once), built once per session."""
    if "world" not in _BUILT:
        out = factory.mktemp("world")
        run_recipe(TINY / "teacher.yaml", WORLD + [f"run.out={out}", "train.steps=40", "teacher.eval_samples=0"])
        _BUILT["world"] = out
    return _BUILT["world"]


def copy_world(world: Path, dest: Path) -> Path:
    """A fresh run.out holding a copy of the world's run folder (prepare + teacher only)."""
    shutil.copytree(world, dest, ignore=shutil.ignore_patterns("ode-pairs", "causal-init"))
    return dest


@pytest.fixture(scope="module")
def pairs_run(tmp_path_factory):
    """The world with ODE pairs stored in float32 (exact comparisons), with CFG against the negative prompt."""
    out = copy_world(build_world(tmp_path_factory), tmp_path_factory.mktemp("pairs") / "out")
    overrides = WORLD + PAIRS + [f"run.out={out}", "ode.dtype=float32"]
    run_recipe(ODE, overrides)
    return out / "tiny", plan(ODE, overrides).cfg


def test_stored_pairs_are_the_samplers_output(pairs_run):
    """Stored noise, kept latents and end point equal (bit for bit, float32 storage) what the sampler
    gives for the pair's seed; the conditioning is the dataset item's."""
    run, cfg = pairs_run
    pairs = OdePairDataset(run / "ode-pairs")
    assert len(pairs) == 7 and pairs.timesteps == pytest.approx([1000.0, 937.5, 833.3333, 625.0])
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # where the stage sampled
    teacher = load_teacher(run / "teacher" / "model").eval().to(device)
    dataset = ShotDataset(prepared_dir(cfg), cfg.data.context.strategy, cfg.data.context.budget)
    negative = negative_text(cfg, device, torch.float32)
    assert negative is not None
    with_context = [n for n in range(len(pairs)) if pairs.group(n)[0] > 0]
    assert with_context and len(with_context) < len(pairs)
    for n in (0, with_context[0], 6):
        stored = pairs[n]
        i = int(stored["pair"])
        item = dataset[i % len(dataset)]
        noise = pair_noise(cfg.run.seed, i, item["latents"].shape, torch.float32, device)
        want = sample_pair(teacher, item, noise, negative, cfg.ode, student_timesteps(cfg), cfg.sampler.negative_scope)
        assert torch.equal(stored["x0"], want.x0[0].cpu())
        assert torch.equal(stored["trajectory"], want.trajectory[:, 0].cpu())
        noise = noise[0].cpu()
        assert torch.equal(stored["noise"], noise) and torch.equal(stored["trajectory"][0], noise)
        assert torch.equal(stored["text"], item["text"])
        for got, want in zip(vars(stored["context"]).values(), vars(item["context"]).values()):
            assert (got is None and want is None) or torch.equal(got, want.to(got.dtype))  # None: clean context
        assert (stored["record"], int(stored["target_shot"])) == (item["record"], int(item["target_shot"]))
    # pair 6 re-uses dataset item 6 mod N with its own noise
    assert not torch.equal(pairs[0]["noise"], pairs[6]["noise"])


def test_bf16_storage_is_the_samplers_output_rounded(pairs_run):
    run, cfg = pairs_run
    teacher = load_teacher(run / "teacher" / "model").eval()
    dataset = ShotDataset(prepared_dir(cfg), cfg.data.context.strategy, cfg.data.context.budget)
    item = dataset[len(dataset) - 1]
    noise = pair_noise(cfg.run.seed, 3, item["latents"].shape, torch.float32, "cpu")
    result = sample_pair(teacher, item, noise, None, cfg.ode, student_timesteps(cfg), "all")
    stored = pair_tensors(0, item, noise, result, torch.bfloat16)
    assert stored["0/x0"].dtype == torch.bfloat16
    assert torch.equal(stored["0/x0"], result.x0[0].to(torch.bfloat16))
    assert torch.equal(stored["0/trajectory"], result.trajectory[:, 0].to(torch.bfloat16))
    assert stored["0/shot_texts"].shape[0] == len(set(item["context"].shots.tolist()))


def test_negative_context_reaches_the_pairs(tmp_path_factory):
    """data.context.negative.p = 1: every pair's history (a first shot's too) holds a shot of another record,
    drawn as the dataset draws it for the pair's pass over the data (pairs 0..N-1 epoch 0, N.. epoch 1),
    so the causal init regresses the teacher's answer to a history with a distractor."""
    out = copy_world(build_world(tmp_path_factory), tmp_path_factory.mktemp("negative") / "out")
    overrides = WORLD + PAIRS + [f"run.out={out}", "ode.dtype=float32", "data.context.negative.p=1.0"]
    run_recipe(ODE, overrides)
    cfg = plan(ODE, overrides).cfg
    pairs = OdePairDataset(out / "tiny" / "ode-pairs")
    dataset = ShotDataset(prepared_dir(cfg), cfg.data.context.strategy, cfg.data.context.budget,
                          (1.0, cfg.data.context.negative.frames, cfg.run.seed), limit=cfg.data.context.budget)
    plain = ShotDataset(prepared_dir(cfg), cfg.data.context.strategy, cfg.data.context.budget)
    mixed = 0
    for n in range(len(pairs)):
        stored, i = pairs[n], int(pairs[n]["pair"])
        dataset.set_epoch(i // len(dataset))
        item, negative = dataset[i % len(dataset)], dataset.negative_shot(i % len(dataset))
        assert torch.equal(stored["context"].latents, item["context"].latents.float())
        assert dataset.data.records[negative.record]["id"] != stored["record"]
        mixed += stored["context"].frames > plain[i % len(plain)]["context"].frames or \
            stored["context"].frames == cfg.data.context.budget
    assert mixed == len(pairs)
    fingerprint = json.loads((out / "tiny" / "ode-pairs" / "shard-00000.json").read_text())["fingerprint"]
    assert fingerprint["negative"] == [1.0, cfg.data.context.negative.frames]


def test_shards_made_with_other_settings_are_refused(pairs_run, tmp_path):
    run, cfg = pairs_run
    out = tmp_path / "out"
    shutil.copytree(run.parent, out)
    (out / "tiny" / "ode-pairs" / "DONE").unlink()
    with pytest.raises(ValueError, match=r"shard-00000\.json was sampled with other settings \(steps\); delete"):
        run_recipe(ODE, WORLD + PAIRS + [f"run.out={out}", "ode.dtype=float32", "ode.steps=5"])


def test_bad_ode_keys_fail_before_compute():
    with pytest.raises(ValueError, match="ode.pairs, ode.pairs_per_shard and ode.steps must be >= 1"):
        plan(ODE, ["ode.pairs=0"])
    with pytest.raises(ValueError, match="student denoising_steps must be descending"):
        plan(ODE, ["student.denoising_steps=[250.0,1000.0]"])


# --------------------------------------------------------------------------- ranks and resume


class KillAfterShards(OdePairsStage):
    """Test-only: SIGKILLs itself after writing SHOTDISTILL_ODE_KILL_AFTER of its shards."""

    def sample_shards(self, teacher, dataset, todo, fingerprint):
        super().sample_shards(teacher, dataset, todo[:int(os.environ["SHOTDISTILL_ODE_KILL_AFTER"])], fingerprint)
        os.kill(os.getpid(), signal.SIGKILL)


def _pairs(run: Path) -> dict[int, dict]:
    """{pair id: its stored tensors and metadata} of a run's ODE folder."""
    data = OdePairDataset(run / "ode-pairs")
    return {int(data[n]["pair"]): data[n] for n in range(len(data))}


def _equal(x, y) -> bool:
    if isinstance(x, Context):
        return all(_equal(u, v) for u, v in zip(vars(x).values(), vars(y).values()))
    return torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y  # None == None: a clean context


def _same(a: dict[int, dict], b: dict[int, dict]) -> bool:
    return a.keys() == b.keys() and all(_equal(x[k], b[i][k]) for i, x in a.items() for k in x)


def _shard_files(folder: Path) -> dict[str, tuple[int, bytes]]:
    return {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(folder.glob("shard-*"))}


@pytest.mark.slow
def test_two_ranks_and_a_killed_run_write_the_pairs_one_rank_writes(pairs_run, tmp_path):
    run, _ = pairs_run
    reference = _pairs(run)
    assert sorted(reference) == list(range(7))
    world = run.parent
    overrides = WORLD + PAIRS + ["ode.dtype=float32"]

    two = copy_world(world, tmp_path / "two")
    launched = shotdistill(["launch", str(ODE), "--nproc", "2", "--master", f"127.0.0.1:{free_port()}",
                            *overrides, f"run.out={two}"], tmp_path)
    assert launched.returncode == 0, launched.stderr[-3000:]
    assert _same(_pairs(two / "tiny"), reference)
    metrics = json.loads((two / "tiny" / "ode-pairs" / "metrics.json").read_text())
    assert metrics == {"pairs": 7.0, "shards": 4.0, "shards_sampled": 4.0}

    cut = copy_world(world, tmp_path / "cut")
    recipe = tmp_path / "kill.yaml"
    recipe.write_text(f"base: {ODE}\nstage: test_ode_pairs:KillAfterShards\nneeds: [{TINY / 'teacher.yaml'}]\n")
    killed = shotdistill(["run", str(recipe), *overrides, f"run.out={cut}"], tmp_path,
                         {"SHOTDISTILL_ODE_KILL_AFTER": "2"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    folder = cut / "tiny" / "ode-pairs"
    finished = _shard_files(folder)
    assert sorted(finished) == ["shard-00000.json", "shard-00000.safetensors",
                                "shard-00001.json", "shard-00001.safetensors"]
    assert not (folder / "DONE").exists()
    run_recipe(ODE, overrides + [f"run.out={cut}"])
    after = _shard_files(folder)
    assert {k: after[k] for k in finished} == finished  # untouched: same mtime and bytes
    assert len(after) == 8 and _same(_pairs(cut / "tiny"), reference)
    metrics = json.loads((folder / "metrics.json").read_text())
    assert metrics["shards_sampled"] == 2.0
