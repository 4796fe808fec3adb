"""Protects student export/load: exact round trip, diffusers-loadable transformer, LoRA merge, components, no DeepSpeed, missing-file errors."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import make_tiny_wan

from student.export import save_student
from student.folder import read_folder
from student.model import CausalStudent
from teacher import NextShotTeacher

TEXT_DIM = 24  # tests/helpers.tiny_wan_config text_dim
REPO = Path(__file__).resolve().parent.parent


def _inputs(seed=0):
    gen = torch.Generator().manual_seed(seed)
    x, context = torch.randn(2, 4, 6, 4, 4, generator=gen), torch.randn(2, 4, 2, 4, 4, generator=gen)
    text, context_text = torch.randn(2, 5, TEXT_DIM, generator=gen), torch.randn(2, 2, 5, TEXT_DIM, generator=gen)
    return x, torch.rand(2, 6, generator=gen) * 1000, text, context, context_text


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A learnable-indicator student with a non-zero indicator, exported with two components."""
    root = tmp_path_factory.mktemp("export")
    teacher = NextShotTeacher(make_tiny_wan(), positions="sequential")
    student = CausalStudent.from_teacher(teacher, indicator="learnable", local_chunks=3, shift=8.0)
    with torch.no_grad():
        student.shot_indicator.normal_()
    vae = root / "my_vae"
    vae.mkdir()
    (vae / "config.json").write_text("{}")
    components = {"codec": {"kind": "wan", "path": str(vae)}, "text_encoder": {"kind": "tiny_t5", "dim": 24}}
    return student, save_student(student, root / "out", components, copy=True)


def test_round_trip_is_exact(exported):
    from diffusers import WanTransformer3DModel

    from student.model import CausalWanTransformer3DModel

    student, folder = exported
    loaded = CausalStudent.from_pretrained(folder)
    assert loaded.settings == student.settings and loaded.settings.shift == 8.0
    x, t, text, context, context_text = _inputs()
    with torch.no_grad():
        assert torch.equal(student(x, t, text, context, context_text), loaded(x, t, text, context, context_text))
        # diffusers' own weights, read only under our class: a plain Wan load refuses the folder
        wan = CausalWanTransformer3DModel.from_pretrained(str(folder / "transformer"))
        assert torch.equal(wan(x, t[:, 0], text, return_dict=False)[0],
                           student.transformer(x, t[:, 0], text, return_dict=False)[0])
    with pytest.raises(OSError, match="no file named config.json"):
        WanTransformer3DModel.from_pretrained(str(folder / "transformer"))
    info = read_folder(folder)
    # a serving export copies the VAE folder in as vae/ and points at itself
    assert info.components["codec"] == {"kind": "wan", "path": str(folder.resolve())}
    assert (folder / "vae" / "config.json").is_file()
    assert info.components["text_encoder"] == {"kind": "tiny_t5", "dim": 24}


def test_stage_folder_references_components_in_place(exported, tmp_path):
    student, folder = exported
    vae = folder.parent / "my_vae"
    saved = save_student(student, tmp_path / "stage", {"codec": {"kind": "wan", "path": str(vae)}})
    assert read_folder(saved).components["codec"]["path"] == str(vae.resolve())
    assert not (saved / "vae").exists()


def test_lora_adapters_are_merged(tmp_path):
    from peft import LoraConfig

    teacher = NextShotTeacher(make_tiny_wan())
    student = CausalStudent.from_teacher(teacher)
    student.transformer.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=["to_q", "to_v"],
                                               init_lora_weights=False))
    loaded = CausalStudent.from_pretrained(save_student(student, tmp_path / "out"))
    assert not any("lora" in name for name, _ in loaded.named_parameters())
    assert any("lora" in name for name, _ in student.named_parameters())  # the live student keeps its adapters
    x, t, text, context, context_text = _inputs()
    with torch.no_grad():
        ours, theirs = student(x, t, text, context, context_text), loaded(x, t, text, context, context_text)
        base = CausalStudent.from_teacher(teacher)(x, t, text, context, context_text)
    assert (ours - theirs).abs().max().item() <= 1e-5
    assert (ours - base).abs().max().item() > 1e-3  # the adapters do change the model


@pytest.mark.slow
def test_loading_does_not_import_deepspeed(exported):
    _, folder = exported
    code = ("import sys; from student.model import CausalStudent; CausalStudent.from_pretrained(sys.argv[1]); "
            "assert 'deepspeed' not in sys.modules, 'deepspeed was imported'")
    done = subprocess.run([sys.executable, "-c", code, str(folder)], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


@pytest.mark.parametrize("missing,message", [
    ("generator.json", "student folder is missing generator.json"),
    ("transformer/causal_config.json", "student folder is missing transformer/causal_config.json"),
    ("transformer/diffusion_pytorch_model.safetensors", "student folder is missing transformer/\\*.safetensors"),
    ("indicator.safetensors", "student folder is missing indicator.safetensors"),
    ("vae", "student folder is missing vae"),
])
def test_missing_files_are_named(exported, tmp_path, missing, message):
    import shutil

    _, folder = exported
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    target = copy / missing
    shutil.rmtree(target) if target.is_dir() else target.unlink()
    with pytest.raises(FileNotFoundError, match=f"^{copy}: {message}$"):
        CausalStudent.from_pretrained(copy)


def test_bad_settings_name_the_file(exported, tmp_path):
    import shutil

    _, folder = exported
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    meta = json.loads((copy / "generator.json").read_text())
    meta["student"]["chunk"] = 3
    (copy / "generator.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"generator.json: unknown student settings \['chunk'\]"):
        CausalStudent.from_pretrained(copy)
