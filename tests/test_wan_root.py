"""Protects the real-Wan path's footprint: on a Wan diffusers root, no stage folder and no export holds
anything of the root but the components it needs (the DMD stages once copied the whole root twice)."""

import json

import pytest
from conftest import REPO
from helpers import folder_bytes, make_wan_root

from distill.runner import run_recipe
from student.folder import read_folder

TINY = REPO / "recipes" / "tiny"
MB = 1 << 20


@pytest.mark.slow
def test_stages_reference_the_root_and_the_export_copies_only_its_components(tmp_path):
    root = make_wan_root(tmp_path / "Wan2.1-tiny", ballast_mb=64)
    wan = [f"model.path={root}", "codec.kind=wan", f"codec.path={root}", "text_encoder.kind=umt5",
           f"text_encoder.path={root}", "data.height=16", "data.width=16", "data.shot_frames=9",
           "data.synth.videos=4", "data.synth.min_frames=9", "data.synth.max_frames=10", "data.synth.max_shots=2", "model.patch_size=[1,2,2]",
           "train.steps=2", "train.micro_batch=1", "train.checkpoint_every=2", "ode.pairs=2", "ode.steps=2", "ode.pairs_per_shard=2",
           "teacher.eval_samples=0", "causal_init.eval_pairs=0", "dmd.eval_videos=0", "dmd.sample_every=0",
           "logging.progress=false", f"run.out={tmp_path / 'runs'}"]
    run_recipe(TINY / "dmd-intra.yaml", wan)
    run_recipe(TINY / "export.yaml", wan)
    run = tmp_path / "runs" / "tiny"

    components = read_folder(run / "dmd-intra" / "student").components  # a stage folder references the root
    assert components["codec"]["path"] == str((root / "vae").resolve())
    assert components["text_encoder"]["path"] == str(root.resolve())
    biggest = max(p.stat().st_size for p in run.rglob("*") if p.is_file())
    assert biggest < 8 * MB and folder_bytes(run) < 48 * MB, (biggest, folder_bytes(run))

    export = run / "export"  # the serving export: exactly the components, nothing else of the root
    assert sorted(p.name for p in export.iterdir() if p.is_dir()) == ["scheduler", "text_encoder", "tokenizer",
                                                                       "transformer", "vae"]
    assert not list(export.rglob("ballast*")) and folder_bytes(export) < 8 * MB
    for part in ("vae", "text_encoder", "tokenizer"):
        assert folder_bytes(export / part) == folder_bytes(root / part), part
    meta = json.loads((export / "generator.json").read_text())
    assert meta["components"]["codec"]["path"] == meta["components"]["text_encoder"]["path"] == "."

    from student.generator import StreamingGenerator
    frames = [f for f in StreamingGenerator.from_export(export).next_shot("a red circle moves left")]
    assert sum(f.shape[0] for f in frames) == 9 and frames[0].shape[1:] == (16, 16, 3)
