"""Datasets and streams: samples match the shards, order is pure in (seed, epoch, rank, world), resume is exact."""

import json

import pytest
import torch
from safetensors.torch import load_file

from distill.config import load_recipe
from distill.data.datasets import PromptDataset, ShotDataset
from distill.data.stream import DataStream, epoch_batches
from distill.stages.prepare import prepare
from launch.data import default_recipe
from teacher.context import candidate_frames, sample_context
from teacher.encoders import join_text

from helpers import make_prepared

TINY = ["data.synth.videos=4", "data.synth.seed=2", "data.synth.min_shots=3", "data.synth.min_frames=9",
        "data.synth.max_frames=13",
        "logging.progress=false"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_prepared(tmp_path_factory.mktemp("ds"), TINY)


def _shard(folder, ds, record_index):
    rec = ds.data.records[record_index]
    return rec, load_file(folder / f"{rec['shard']}.safetensors")


def test_sample_is_the_target_shot_with_its_sampled_context(folder):
    ds = ShotDataset(folder, "dynamic", 6)
    i = next(i for i, (_, target) in enumerate(ds.items) if target == 2)
    r, _ = ds.items[i]
    rec, tensors = _shard(folder, ds, r)
    s = ds[i]
    slot = rec["slot"]
    assert torch.equal(s["latents"], tensors[f"{slot}/shot2/latents"])
    picks = sample_context(rec["shot_frames"][:2], "dynamic", 6)  # over each history shot's own length
    assert s["context"].shots.tolist() == [shot for shot, _ in picks]
    for c, (shot, frame) in enumerate(picks):
        assert torch.equal(s["context"].latents[:, c], tensors[f"{slot}/shot{shot}/latents"][:, frame])
        expected = join_text([tensors[f"{slot}/global_text"], tensors[f"{slot}/shot{shot}/text"]], 64)
        assert torch.equal(s["context"].texts[c], expected)
    g, t = tensors[f"{slot}/global_text"], tensors[f"{slot}/shot2/text"]
    assert torch.equal(s["text"][: len(g)], g) and torch.equal(s["text"][len(g): len(g) + len(t)], t)
    assert not s["text"][len(g) + len(t):].any() and s["text"].shape == (64, 32)
    assert s["target_shot"].item() == 2 and s["record"] == rec["id"]


def test_first_shot_has_empty_context(folder):
    s = ShotDataset(folder, "dynamic", 6)[0]
    c = s["context"]
    assert c.latents.shape == (12, 0, *s["latents"].shape[2:]) and c.texts.shape == (0, 64, 32) and c.nonempty is None
    assert s["target_shot"].item() == 0


def test_order_is_pure_and_ranks_are_disjoint(folder):
    ds = ShotDataset(folder, "first", 6)  # context length = target shot index: several groups
    one = epoch_batches(ds, 2, seed=3, epoch=0, rank=0, world=1)
    assert one == epoch_batches(ds, 2, seed=3, epoch=0, rank=0, world=1)
    assert one != epoch_batches(ds, 2, seed=3, epoch=1, rank=0, world=1)
    for batch in one:
        assert len({ds.group(i) for i in batch}) == 1
    one = epoch_batches(ds, 1, seed=3, epoch=0, rank=0, world=1)
    r0, r1 = (epoch_batches(ds, 1, seed=3, epoch=0, rank=r, world=2) for r in (0, 1))
    assert len(r0) == len(r1) and 0 < len(r0) <= len(one) // 2
    assert not {i for b in r0 for i in b} & {i for b in r1 for i in b}
    assert set(map(tuple, r0 + r1)) <= set(map(tuple, one))
    # ranks in lockstep: at every step both ranks hold batches of one group (the same shapes)
    assert [ds.group(a[0]) for a in r0] == [ds.group(b[0]) for b in r1]


def test_stream_resumes_exactly_across_epochs(folder):
    ds = ShotDataset(folder, "dynamic", 6)
    run = DataStream(ds, 1, seed=4)
    for _ in range(len(ds) + 3):  # into the second epoch
        next(run)
    state = run.state_dict()
    expected = [next(run) for _ in range(4)]
    resumed = DataStream(ds, 1, seed=4)
    resumed.load_state_dict(state)
    got = [next(resumed) for _ in range(4)]
    assert state["epoch"] == 1
    for a, b in zip(expected, got):
        assert a["record"] == b["record"] and torch.equal(a["latents"], b["latents"])
    with pytest.raises(ValueError, match="saved with seed 4 on 1 ranks; this run has seed 5 on 1"):
        DataStream(ds, 1, seed=5).load_state_dict(state)


def test_prompts_hold_every_shot_text(folder):
    prompts = PromptDataset(folder, shots=3)
    p = prompts[0]
    ds = ShotDataset(folder, "dynamic", 6)
    assert p["texts"].shape == (3, 64, 32) and len(p["captions"]) == 3
    assert torch.equal(p["texts"][1], ds.data.shot_text(ds.data.records[0], 1))
    assert p["facts"]["shots"][0]["caption"] == p["captions"][0]
    batch = next(DataStream(prompts, 2, seed=0))
    assert batch["texts"].shape == (2, 3, 64, 32) and len(batch["captions"]) == 2


def test_wan_codec_stores_context_frames_encoded_alone(folder, tmp_path):
    from diffusers import AutoencoderKLWan

    torch.manual_seed(0)
    AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
                     temperal_downsample=[False, True, True], latents_mean=[0.0] * 4,
                     latents_std=[1.0] * 4).save_pretrained(tmp_path / "vae")
    cfg = load_recipe(default_recipe(), TINY + [
        "codec.kind=wan", f"codec.path={tmp_path}", "data.height=16", "data.width=16", "data.shot_frames=9",
        "data.context.budget=6"])
    world = folder.parent / "world"
    first = json.loads((world / "manifest.jsonl").read_text().splitlines()[0])
    first.update(video=str(world / first["video"]), facts=str(world / first["facts"]))
    (tmp_path / "one.jsonl").write_text(json.dumps(first) + "\n")  # one video: the VAE is slow on CPU
    prepare(cfg, tmp_path / "one.jsonl", tmp_path / "out", progress=False)
    ds = ShotDataset(tmp_path / "out", "dynamic", 6)
    cands = candidate_frames(9, "dynamic", 6)
    rec, tensors = _shard(tmp_path / "out", ds, 0)
    assert ds.data.settings["context"]["frames"] == "per_shot"  # each shot's own candidates, by its length
    assert rec["shot_frames"] == [9, 9, 9] and rec["context_frames"][0] == cands == [0, 2, 3, 4, 5, 6, 8]
    assert tensors[f"{rec['slot']}/shot0/latents"].shape == (4, 3, 2, 2)   # 9 frames -> 1 + 2 latents
    assert tensors[f"{rec['slot']}/shot0/frames"].shape == (4, 7, 2, 2)    # one latent per candidate
    s = ds[2]
    assert s["context"].latents.shape == (4, 6, 2, 2)
    for c, (shot, frame) in enumerate(sample_context([9, 9], "dynamic", 6)):
        assert torch.equal(s["context"].latents[:, c], tensors[f"{rec['slot']}/shot{shot}/frames"][:, cands.index(frame)])
    with pytest.raises(ValueError, match="frame 1 of a shot was not prepared as a context frame"):
        ShotDataset(tmp_path / "out", "dynamic", 7)[1]
