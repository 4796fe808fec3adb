"""Protects the diffusers-native export (issue 18 item 1): `DiffusionPipeline.from_pretrained` on an export
generates what StreamingGenerator generates; the scheduler config carries the student's timesteps and
shift; `export --verify` passes, and fails on an export whose weights differ from the trained student's
even with its checksums rewritten; diffusers' WanPipeline refuses the export; the inter-shot LoRA is
a peft adapter beside the merged weights; a bf16 export loads and generates in bf16; the model card."""

import json
import shutil

import pytest
import torch
from diffusers import DiffusionPipeline
from helpers import make_tiny_wan
from omegaconf import OmegaConf

from distill.config import schema, to_yaml
from distill.export import verify_run_export
from distill.models import student_components
from launch.cli import main
from student.export import save_student
from student.folder import record_files
from student.generator import StreamingGenerator
from student.model import CausalStudent
from student.pipeline import ShotStreamPipeline
from student.sampling import denoising_timesteps
from teacher import NextShotTeacher

RECIPE = {"stage": "causal_init", "run": {"name": "r"}, "codec": {"kind": "patch", "patch": 2},
          "text_encoder": {"kind": "tiny_t5", "dim": 24, "layers": 1, "heads": 2, "max_tokens": 8},
          "data": {"height": 16, "width": 16, "fps": 8, "shot_frames": 6}}
SHOTS = ["wide: a red circle moves left", "close-up: a blue square stays still"]

pytestmark = pytest.mark.usefixtures("one_thread")


def _stage(run, name, student, finished):
    cfg = OmegaConf.merge(schema(), RECIPE)
    save_student(student, run / name / "student", student_components(cfg))
    (run / name / "config.yaml").write_text(to_yaml(cfg))
    (run / name / "DONE").write_text(json.dumps({"metrics": {}, "produces": "student", "finished": finished,
                                                 "wall_s": 1.5}))


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A run whose causal-init student was trained on by dmd-inter with LoRA adapters (the newest)."""
    from peft import LoraConfig

    run = tmp_path_factory.mktemp("diffusers") / "run"
    teacher = NextShotTeacher(make_tiny_wan(in_channels=12, out_channels=12, text_dim=24))
    student = CausalStudent.from_teacher(teacher, chunk_frames=3, local_chunks=2, context_frames=4, shift=3.0)
    _stage(run, "causal-init", student, finished=1.0)
    student.transformer.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=["to_q", "to_v"],
                                               init_lora_weights=False))
    _stage(run, "dmd-inter", student, finished=2.0)
    (run / "config.yaml").write_text(to_yaml(OmegaConf.merge(schema(), RECIPE)))
    return run


@pytest.fixture(scope="module")
def export(run_dir):
    out = run_dir.parent / "export"
    assert main(["export", str(run_dir), "--out", str(out)]) == 0
    return out


def _story(frames_per_shot):
    return [torch.cat(list(shot)) for shot in frames_per_shot]


def test_diffusers_pipeline_generates_what_the_streaming_generator_does(export):
    pipe = DiffusionPipeline.from_pretrained(str(export), trust_remote_code=True)
    assert isinstance(pipe, ShotStreamPipeline) and pipe.vae is None
    ours = pipe(SHOTS, global_prompt="two sprites", seed=3).frames
    gen = StreamingGenerator.from_export(export, global_prompt="two sprites", seed=3)
    theirs = _story(gen.next_shot(prompt) for prompt in SHOTS)
    assert [tuple(f.shape) for f in ours] == [(6, 16, 16, 3)] * 2 and ours[0].dtype == torch.uint8
    for a, b in zip(ours, theirs):
        assert (a.int() - b.int()).abs().max().item() <= 1
    session = pipe.stream(global_prompt="two sprites", seed=3)  # the streaming API: chunks as they come
    chunks = [list(session.next_shot(prompt)) for prompt in SHOTS]
    assert [len(c) for c in chunks] == [2, 2] and torch.equal(torch.cat(chunks[1]), ours[1])


def test_the_scheduler_holds_the_timesteps_and_the_pipeline_reads_them(export):
    from diffusers import FlowMatchEulerDiscreteScheduler

    pipe = DiffusionPipeline.from_pretrained(str(export), trust_remote_code=True)
    steps, shift = pipe.transformer.settings.denoising_steps, pipe.transformer.settings.shift
    assert pipe.scheduler.config.shift == shift == 3.0
    assert pipe.scheduler.config["_student_timesteps"] == steps
    pipe.scheduler.set_timesteps(sigmas=[t / 1000 for t in steps])  # the same numbers, diffusers' way
    ours = pipe.stream().stream.timesteps
    assert torch.allclose(pipe.scheduler.timesteps.double(), torch.tensor(ours, dtype=torch.float64), atol=1e-3)
    pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config, shift=1.0)
    assert pipe.stream().stream.timesteps == denoising_timesteps(steps, 1.0) == steps


def test_export_files_and_model_card(run_dir, export, tmp_path):
    index = json.loads((export / "model_index.json").read_text())
    assert index["_class_name"] == ["pipeline", "ShotStreamPipeline"]
    assert index["transformer"] == ["student.pipeline", "CausalStudentLoader"] and index["vae"] == [None, None]
    recorded = json.loads((export / "generator.json").read_text())["files"]
    for name in ("model_index.json", "pipeline.py", "scheduler/scheduler_config.json", "README.md",
                 "transformer_lora/adapter_model.safetensors"):
        assert name in recorded, name
    card = (export / "README.md").read_text()
    assert "| dmd-inter (exported) | causal_init | student | 1.5 |" in card
    assert "| shift | 3.0 |" in card and "Not evaluated yet" in card
    (run_dir / "eval").mkdir()
    (run_dir / "eval" / "stages.md").write_text("| stage | identity_match |\n|---|---|\n| dmd-inter | 0.75 |\n")
    try:
        assert main(["export", str(run_dir), "--out", str(tmp_path / "again")]) == 0
    finally:
        shutil.rmtree(run_dir / "eval")
    card = (tmp_path / "again" / "README.md").read_text()
    assert "| dmd-inter | 0.75 |" in card and "Not evaluated yet" not in card


def _perturb(transformer_folder):
    """Change one weight tensor of a saved transformer."""
    from safetensors.torch import load_file, save_file

    path = transformer_folder / "diffusion_pytorch_model.safetensors"
    weights = load_file(str(path))
    weights["proj_out.weight"] = weights["proj_out.weight"] + 0.5
    save_file(weights, str(path))


def _tamper(folder):
    """Change a weight of an export and rewrite generator.json's checksums to match (consistent but wrong)."""
    _perturb(folder / "transformer")
    meta = json.loads((folder / "generator.json").read_text())
    meta["files"] = record_files(folder)
    (folder / "generator.json").write_text(json.dumps(meta))


def test_verify_passes_and_catches_a_consistent_but_wrong_export(run_dir, export, tmp_path, capsys, monkeypatch):
    out = tmp_path / "verified"
    assert main(["export", str(run_dir), "--out", str(out), "--verify"]) == 0
    assert f"verified {out}" in capsys.readouterr().out
    tampered = tmp_path / "tampered"
    shutil.copytree(export, tampered)
    _tamper(tampered)
    StreamingGenerator.from_export(tampered)  # the checksums agree: only generating tells it apart
    with pytest.raises(ValueError, match=f"^{tampered}: export does not generate what the trained student"):
        verify_run_export(run_dir, tampered)

    import student.export

    real = student.export.save_transformer
    monkeypatch.setattr(student.export, "save_transformer",  # a faulty exporter: wrong weights, valid checksums
                        lambda transformer, folder: (real(transformer, folder), _perturb(folder)))
    assert main(["export", str(run_dir), "--out", str(tmp_path / "bad"), "--verify"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"shotdistill: error: {tmp_path / 'bad'}: export does not generate") and err.count("\n") == 1


def test_wan_pipeline_refuses_the_export(export):
    from diffusers import WanPipeline, WanTransformer3DModel

    with pytest.raises(ValueError, match="contains custom code in pipeline.py"):
        WanPipeline.from_pretrained(str(export))
    trusted = WanPipeline.from_pretrained(str(export), trust_remote_code=True)
    assert isinstance(trusted, ShotStreamPipeline) and not isinstance(trusted, WanPipeline)
    with pytest.raises(TypeError):  # called as a WanPipeline, it does not pretend to be one
        trusted(prompt="a red circle", num_frames=6)
    with pytest.raises(OSError, match="no file named config.json"):  # so WanPipeline(transformer=...) never runs it
        WanTransformer3DModel.from_pretrained(str(export / "transformer"))


def test_lora_adapter_loads_with_peft_to_the_merged_output(run_dir, export, tmp_path):
    from peft import PeftModel

    lora = export / "transformer_lora"
    assert (lora / "adapter_model.safetensors").is_file() and (lora / "adapter_config.json").is_file()
    base = CausalStudent.from_pretrained(run_dir / "causal-init" / "student")  # what dmd-inter started from
    adapted = CausalStudent(PeftModel.from_pretrained(base.transformer, str(lora)).get_base_model(), base.settings)
    merged = CausalStudent.from_pretrained(export)
    gen = torch.Generator().manual_seed(0)
    x, context = torch.randn(1, 12, 6, 8, 8, generator=gen), torch.randn(1, 12, 3, 8, 8, generator=gen)
    text, context_text = torch.randn(1, 5, 24, generator=gen), torch.randn(1, 3, 5, 24, generator=gen)
    t = torch.rand(1, 6, generator=gen) * 1000
    with torch.no_grad():
        ours, theirs = adapted(x, t, text, context, context_text), merged(x, t, text, context, context_text)
        unadapted = CausalStudent.from_pretrained(run_dir / "causal-init" / "student")(x, t, text, context,
                                                                                       context_text)
    assert (ours - theirs).abs().max().item() <= 1e-5
    assert (ours - unadapted).abs().max().item() > 1e-3  # the adapter does change the model
    assert main(["export", str(run_dir / "causal-init"), "--out", str(tmp_path / "plain")]) == 0
    assert not (tmp_path / "plain" / "transformer_lora").exists()  # no adapters, no adapter folder


def test_a_bf16_export_loads_and_generates_in_bf16(run_dir, tmp_path):
    out = tmp_path / "bf16"
    assert main(["export", str(run_dir), "--out", str(out), "--dtype", "bf16", "--verify"]) == 0
    assert json.loads((out / "generator.json").read_text())["dtype"] == "bfloat16"
    pipe = DiffusionPipeline.from_pretrained(str(out), trust_remote_code=True)
    assert pipe.transformer.dtype == torch.bfloat16 and pipe.text_encoder.dtype == torch.float32
    frames = pipe(SHOTS, seed=0).frames
    assert [tuple(f.shape) for f in frames] == [(6, 16, 16, 3)] * 2
    assert StreamingGenerator.from_export(out).stream.dtype == torch.bfloat16


def test_a_wan_codec_export_is_a_pipeline_with_its_vae(tmp_path):
    from diffusers import AutoencoderKLWan
    from helpers import make_wan_root

    root = make_wan_root(tmp_path / "wan", ballast_mb=0)
    student = CausalStudent.from_teacher(NextShotTeacher(make_tiny_wan(text_dim=32)), chunk_frames=3)
    stage = tmp_path / "dmd-intra"  # a stage folder outside a run, referencing the root's components
    save_student(student, stage / "student", {
        "codec": {"kind": "wan", "path": str(root / "vae"), "dtype": "float32"},
        "text_encoder": {"kind": "umt5", "path": str(root), "max_tokens": 32, "dtype": "float32"},
        "video": {"height": 16, "width": 16, "fps": 8.0, "frames": 9}})
    (stage / "DONE").write_text(json.dumps({"produces": "student", "finished": 0.0}))
    out = tmp_path / "export"
    assert main(["export", str(stage), "--out", str(out), "--verify"]) == 0
    pipe = DiffusionPipeline.from_pretrained(str(out), trust_remote_code=True)
    assert isinstance(pipe.vae, AutoencoderKLWan)
    ours = pipe(SHOTS, seed=1).frames
    gen = StreamingGenerator.from_export(out, seed=1)
    theirs = _story(gen.next_shot(prompt) for prompt in SHOTS)
    assert [tuple(f.shape) for f in ours] == [(9, 16, 16, 3)] * 2
    for a, b in zip(ours, theirs):
        assert (a.int() - b.int()).abs().max().item() <= 1


def test_a_student_folder_written_before_still_loads(run_dir, tmp_path):
    from diffusers import WanTransformer3DModel

    old = tmp_path / "old"  # transformer/config.json (diffusers' name) and no dtype in generator.json
    shutil.copytree(run_dir / "causal-init" / "student", old)
    (old / "transformer" / "causal_config.json").rename(old / "transformer" / "config.json")
    meta = json.loads((old / "generator.json").read_text())
    del meta["dtype"]
    meta["files"] = record_files(old)
    (old / "generator.json").write_text(json.dumps(meta))
    loaded, new = CausalStudent.from_pretrained(old), CausalStudent.from_pretrained(run_dir / "causal-init" / "student")
    assert type(loaded.transformer) is WanTransformer3DModel and loaded.dtype == torch.float32
    for name, tensor in new.state_dict().items():
        assert torch.equal(tensor, loaded.state_dict()[name]), name
