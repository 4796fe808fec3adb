"""The path every real user takes: the Wan2.1 recipe chain on a Wan diffusers root (real AutoencoderKLWan,
UMT5 and WanTransformer3DModel classes, tiny and random), over a manifest whose shots have five
different lengths, shorter and longer than `data.shot_frames`: prepare -> teacher -> ODE pairs ->
causal init -> dmd-intra -> dmd-inter (LoRA) -> export -> generate -> eval."""

import json

import av
import numpy as np
import pytest
from conftest import REPO
from helpers import folder_bytes, make_wan_root

from distill.data.datasets import PreparedData
from distill.runner import run_recipe
from launch.cli import main
from student.video import write_mp4

WAN = REPO / "recipes" / "wan2.1-1.3b"
LENGTHS = [9, 15, 21, 30, 50]  # source frames at 16 fps; data.shot_frames = 21 (two 3-latent chunks)
CAPTIONS = ["wide: a red circle moves left", "close-up: the red circle stays still", "medium: a blue square moves up",
            "wide: the blue square moves down", "close-up: a green triangle moves right"]


def _manifest(folder):
    """Two records of five shots each, one shot of every length, cut from one mp4 of changing colours."""
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 255, size=(sum(LENGTHS), 32, 32, 3), dtype=np.uint8)
    write_mp4(folder / "story.mp4", frames, 16)
    starts = np.cumsum([0] + LENGTHS)
    shots = [{"start": int(a), "end": int(b), "caption": c} for a, b, c in zip(starts, starts[1:], CAPTIONS)]
    lines = [{"video": "story.mp4", "id": f"story-{i}", "global_caption": "a toy story",
              "shots": shots[i:] + shots[:i]} for i in range(2)]
    (folder / "manifest.jsonl").write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    return folder / "manifest.jsonl"


@pytest.mark.slow
def test_the_wan_recipe_chain_runs_end_to_end_on_a_wan_root(tmp_path, capsys):
    root = make_wan_root(tmp_path / "Wan2.1-tiny", text_dim=32, max_tokens=64, ballast_mb=16)
    manifest = _manifest(tmp_path)
    small = [f"model.path={root}", f"data.manifest={manifest}", "data.height=16", "data.width=16",
             "data.shot_frames=21", "data.long_shots=stride", "data.records_per_shard=1", "data.latent_dtype=float32",
             "text_encoder.max_tokens=32", "codec.dtype=float32", "text_encoder.dtype=float32",
             "deepspeed.bf16=false", "train.steps=2", "train.checkpoint_every=2", "train.micro_batch=1",
             "train.grad_accum=1", "ode.pairs=2", "ode.pairs_per_shard=1", "ode.steps=2", "sampler.steps=2",
             "teacher.eval_samples=0", "causal_init.eval_pairs=0", "dmd.eval_videos=0", "dmd.sample_every=0",
             "dmd.shots=2", "lora.rank=4", "lora.alpha=4", "logging.progress=false", f"run.out={tmp_path / 'runs'}"]
    run_recipe(WAN / "dmd-inter.yaml", small)
    run = tmp_path / "runs" / "wan2.1-1.3b"

    data = PreparedData(run / "prepare")  # every record prepared, each shot at its own length
    assert [r["id"] for r in data.records] == ["story-0", "story-1"]
    kept = {n: k for n, k in zip(LENGTHS, data.records[0]["shot_frames"])}
    assert kept == {9: 9, 15: 9, 21: 21, 30: 9, 50: 9}  # cut to whole chunks; longer ones strided first
    for stage in ("teacher", "ode-pairs", "causal-init", "dmd-intra", "dmd-inter"):
        assert (run / stage / "DONE").is_file(), stage
    assert folder_bytes(run) < 40 << 20  # no stage holds a copy of the root

    export = tmp_path / "export"
    assert main(["export", str(run), "--out", str(export)]) == 0
    video = tmp_path / "story.mp4"
    assert main(["generate", str(export), "--global-prompt", "a toy story", "--shot", CAPTIONS[0],
                 "--shot", CAPTIONS[1], "--out", str(video)]) == 0
    with av.open(str(video)) as container:
        assert sum(1 for _ in container.decode(video=0)) == 2 * 21
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"global_caption": "a toy story",
                                   "shots": [{"caption": c} for c in CAPTIONS[:2]]}) + "\n")
    assert main(["eval", str(export), "--prompts", str(prompts), "--out", str(tmp_path / "eval")]) == 0
    assert "fps" in json.loads((tmp_path / "eval" / "metrics.json").read_text())
    capsys.readouterr()
