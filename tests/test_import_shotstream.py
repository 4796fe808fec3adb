"""Protects `shotdistill import shotstream`: a tiny checkpoint written the way the official ShotStream
release writes its files (`{"generator": state_dict}`, original Wan key layout, prefixed `model.`)
converts into a teacher folder and a student folder whose weights and forward equal the model it
was written from, plus a recipe fragment the schema accepts; a file holding anything but tensors,
or weights that do not fit the Wan root's config, fail with one line and leave no output behind."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from helpers import folder_bytes, make_tiny_wan, make_wan_root

from launch.cli import main

SIZE = dict(text_dim=32, attention_head_dim=32)  # the transformer of tests/helpers.make_wan_root
STEPS = [1000.0, 740.0, 500.0, 260.0]

# The release's original Wan layout, as the state_dict of its WanModel (wan/modules/model.py of
# KlingAIResearch/ShotStream, Wan2.1's own names) lists it: outside the blocks, and in block N.
ORIGINAL_TOP = {"patch_embedding.weight", "patch_embedding.bias", "text_embedding.0.weight",
                "text_embedding.0.bias", "text_embedding.2.weight", "text_embedding.2.bias",
                "time_embedding.0.weight", "time_embedding.0.bias", "time_embedding.2.weight",
                "time_embedding.2.bias", "time_projection.1.weight", "time_projection.1.bias",
                "head.modulation", "head.head.weight", "head.head.bias"}
ORIGINAL_BLOCK = {"modulation", "norm3.weight", "norm3.bias", "ffn.0.weight", "ffn.0.bias", "ffn.2.weight",
                  "ffn.2.bias"} | {f"{attn}.{part}" for attn in ("self_attn", "cross_attn") for part in
                                   ("q.weight", "q.bias", "k.weight", "k.bias", "v.weight", "v.bias",
                                    "o.weight", "o.bias", "norm_q.weight", "norm_k.weight")}

# diffusers → original, written out here so that the test's input never comes from the converter
# under test. Whole dotted segments first (diffusers' norm2 is the cross-attention norm, Wan's norm3,
# and the other way round), then runs of segments.
SEGMENTS = {"attn1": "self_attn", "attn2": "cross_attn", "to_q": "q", "to_k": "k", "to_v": "v",
            "norm2": "norm3", "norm3": "norm2"}
RUNS = [("condition_embedder.time_embedder.linear_1.", "time_embedding.0."),
        ("condition_embedder.time_embedder.linear_2.", "time_embedding.2."),
        ("condition_embedder.text_embedder.linear_1.", "text_embedding.0."),
        ("condition_embedder.text_embedder.linear_2.", "text_embedding.2."),
        ("condition_embedder.time_proj.", "time_projection.1."),
        (".to_out.0.", ".o."), (".ffn.net.0.proj.", ".ffn.0."), (".ffn.net.2.", ".ffn.2.")]


def original_name(key: str) -> str:
    if key == "scale_shift_table":
        return "head.modulation"
    if key.startswith("proj_out."):
        return "head.head." + key[len("proj_out."):]
    key = ".".join(SEGMENTS.get(part, part) for part in key.split("."))
    for diffusers, original in RUNS:
        key = key.replace(diffusers, original)
    return key.replace("scale_shift_table", "modulation")


def release_file(path: Path, model: torch.nn.Module, bare: bool = False, **extra) -> Path:
    """`model` saved as the release saves its generator: original names, prefixed `model.`."""
    state = {"model." + original_name(k): v.clone() for k, v in model.state_dict().items()}
    torch.save(state if bare else {"generator": state, **extra}, path)
    return path


class OptimizerState:
    """Not a tensor: a file holding one must not be unpickled."""


def run_import(teacher: Path, out: Path, wan: Path, student: Path | None = None) -> int:
    return main(["import", "shotstream", "--teacher", str(teacher), "--wan", str(wan), "--out", str(out),
                 *(["--student", str(student)] if student else [])])


@pytest.fixture(scope="module")
def wan_root(tmp_path_factory):
    return make_wan_root(tmp_path_factory.mktemp("wan") / "Wan2.1-tiny", ballast_mb=1)


@pytest.fixture(scope="module")
def imported(tmp_path_factory, wan_root):
    """A teacher and a student (weights unlike the Wan root's own) written as release files and imported."""
    root = tmp_path_factory.mktemp("release")
    teacher, student = make_tiny_wan(seed=1, **SIZE), make_tiny_wan(seed=2, **SIZE)
    files = release_file(root / "bidirectional_teacher.pt", teacher), release_file(root / "ode_init.pt", student)
    assert run_import(files[0], root / "out", wan_root, files[1]) == 0
    return teacher, student, root / "out"


def _inputs(seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(2, 4, 3, 4, 6, generator=gen), torch.tensor([0.0, 999.0]),
            torch.randn(2, 7, SIZE["text_dim"], generator=gen))


def test_the_test_writes_the_release_layout():
    keys = {original_name(k) for k in make_tiny_wan(**SIZE).state_dict()}
    assert keys == ORIGINAL_TOP | {f"blocks.{i}.{name}" for i in range(2) for name in ORIGINAL_BLOCK}


def test_teacher_weights_and_forward_equal_the_original(imported):
    from diffusers import WanTransformer3DModel

    from teacher.model import NextShotTeacher

    original, _, out = imported
    loaded = NextShotTeacher.from_pretrained(out / "teacher")
    expected = original.state_dict()
    assert set(loaded.transformer.state_dict()) == set(expected)
    assert all(torch.equal(v, expected[k]) for k, v in loaded.transformer.state_dict().items())
    x, t, text = _inputs()
    with torch.no_grad():
        reference = original(x, t, text, return_dict=False)[0]
        plain = WanTransformer3DModel.from_pretrained(str(out / "teacher"))
        assert torch.equal(plain(x, t, text, return_dict=False)[0], reference)
        assert (loaded(x, t, text) - reference).abs().max().item() <= 1e-5  # as tests/test_teacher_model.py
    settings = loaded.settings()
    assert (settings["positions"], settings["theta"]) == ("shot_rope", 1.0 / 6.0)
    assert (settings["captions"], settings["context_timestep"]) == ("target_only", "target")


def test_student_folder_holds_the_release_student(imported, wan_root):
    from student.folder import read_folder
    from student.model import CausalStudent

    _, original, out = imported
    student = CausalStudent.from_pretrained(out / "student")
    expected = original.state_dict()
    assert all(torch.equal(v, expected[k]) for k, v in student.transformer.state_dict().items())
    s = student.settings
    assert (s.chunk_frames, s.local_chunks, s.context_frames, s.context_strategy) == (3, 7, 6, "dynamic")
    assert (s.denoising_steps, s.shift, s.indicator, s.theta) == (STEPS, 8.0, "rope_offset", 1.0 / 6.0)
    assert (s.captions, s.caption_layout) == ("target_only", "joint")
    components = read_folder(out / "student").components
    assert components["codec"]["path"] == str((wan_root / "vae").resolve())
    assert components["text_encoder"]["path"] == str(wan_root.resolve())
    assert components["video"] == {"height": 480, "width": 832, "fps": 16.0, "frames": 81}
    assert folder_bytes(out / "student") < folder_bytes(wan_root)  # referenced, never copied
    assert not (out / "student" / "vae").exists()


def test_recipe_fragment_sets_the_release_conventions(imported, wan_root, tmp_path):
    from distill.config import load_recipe

    _, _, out = imported
    fragment = yaml.safe_load((out / "recipe.yaml").read_text())
    assert fragment["model"]["path"] == str(wan_root.resolve())
    assert fragment["student"] == {"chunk_frames": 3, "local_chunks": 7, "denoising_steps": STEPS, "shift": 8.0}
    assert fragment["data"]["context"] == {"strategy": "dynamic", "budget": 6}
    assert fragment["teacher"] == {"positions": "shot_rope", "theta": 1.0 / 6.0, "captions": "target_only",
                                   "context_timestep": "target"}
    assert fragment["text_encoder"] == {"caption_layout": "joint"}
    text = (out / "recipe.yaml").read_text()
    assert all("#" in line for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")
               and not line.rstrip().endswith(":"))   # every value says what it reproduces
    user = tmp_path / "mine.yaml"
    user.write_text(f"base: {out / 'recipe.yaml'}\nstage: ode_pairs\nrun:\n  name: mine\n")
    cfg = load_recipe(user)                      # every key it sets is a schema key
    assert cfg.student.shift == 8.0 and cfg.data.context.budget == 6 and cfg.model.path == str(wan_root.resolve())
    assert cfg.text_encoder.caption_layout == "joint" and cfg.teacher.context_timestep == "target"


def test_bare_state_dict_converts_too(tmp_path, wan_root):
    from teacher.model import NextShotTeacher

    original = make_tiny_wan(seed=3, **SIZE)
    assert run_import(release_file(tmp_path / "bare.pt", original, bare=True), tmp_path / "out", wan_root) == 0
    loaded = NextShotTeacher.from_pretrained(tmp_path / "out" / "teacher").transformer.state_dict()
    assert all(torch.equal(v, original.state_dict()[k]) for k, v in loaded.items())
    assert not (tmp_path / "out" / "student").exists()


def _one_line_failure(capsys, code: int) -> str:
    err = capsys.readouterr().err.strip()
    assert code != 0 and len(err.splitlines()) == 1, err
    return err


def _nothing_written(out: Path) -> None:
    assert not out.exists()
    assert not [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]


@pytest.mark.parametrize("which", ["teacher", "student"])
def test_a_non_tensor_object_fails_with_one_line_and_writes_nothing(tmp_path, wan_root, capsys, which):
    good = release_file(tmp_path / "good.pt", make_tiny_wan(**SIZE))
    bad = release_file(tmp_path / "bad.pt", make_tiny_wan(**SIZE), opt=OptimizerState())
    out = tmp_path / "out"
    code = run_import(bad, out, wan_root) if which == "teacher" else run_import(good, out, wan_root, bad)
    err = _one_line_failure(capsys, code)
    assert str(bad) in err and "OptimizerState" in err
    _nothing_written(out)


def test_a_non_tensor_entry_in_the_state_dict_is_named(tmp_path, wan_root, capsys):
    state = {"model.patch_embedding.weight": torch.zeros(1), "model.step": 3}
    torch.save({"generator": state}, tmp_path / "odd.pt")
    err = _one_line_failure(capsys, run_import(tmp_path / "odd.pt", tmp_path / "out", wan_root))
    assert str(tmp_path / "odd.pt") in err and "'model.step'" in err
    _nothing_written(tmp_path / "out")


def test_weights_that_do_not_fit_the_wan_root_are_named(tmp_path, wan_root, capsys):
    path = release_file(tmp_path / "t.pt", make_tiny_wan(**SIZE))
    state = torch.load(path, weights_only=True)
    del state["generator"]["model.head.head.bias"]
    state["generator"]["model.blocks.0.extra.weight"] = torch.zeros(2)
    torch.save(state, path)
    err = _one_line_failure(capsys, run_import(path, tmp_path / "out", wan_root))
    assert "missing proj_out.bias" in err and "unexpected blocks.0.extra.weight" in err and str(path) in err
    _nothing_written(tmp_path / "out")
    narrow = release_file(tmp_path / "narrow.pt", make_tiny_wan())  # text_dim 24, head dim 16
    err = _one_line_failure(capsys, run_import(narrow, tmp_path / "out", wan_root))
    assert str(narrow) in err and "expects" in err
    _nothing_written(tmp_path / "out")
