"""Exports verified: a student folder records the size and sha256 of its files in generator.json;
`CausalStudent.from_pretrained` and `StreamingGenerator.from_export` check them (one line naming
the file), and the generator stops with a clear error on non-finite output instead of writing
black frames."""

from __future__ import annotations

import hashlib
import json
import shutil

import pytest
import torch
from helpers import make_tiny_wan

from conftest import shotdistill
from student.export import save_student
from student.generator import StreamingGenerator
from student.model import CausalStudent
from teacher import NextShotTeacher
from teacher.encoders import build_tiny_t5

WORDS = "a red blue circle square turns left right wide close-up both meet".split()


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
    """A random student exported with a PatchCodec and a tiny T5 held inside."""
    root = tmp_path_factory.mktemp("verified-export")
    build_tiny_t5(WORDS, dim=24, layers=1, heads=2, max_tokens=8, seed=0).save_pretrained(root / "t5")
    student = CausalStudent.from_teacher(NextShotTeacher(make_tiny_wan(in_channels=12, out_channels=12),
                                                         positions="sequential"),
                                         chunk_frames=3, local_chunks=2, context_frames=4, indicator="learnable")
    components = {"codec": {"kind": "patch", "patch": 2},
                  "text_encoder": {"kind": "umt5", "path": str(root / "t5"), "max_tokens": 8},
                  "video": {"height": 16, "width": 16, "fps": 8, "frames": 9}}
    return save_student(student, root / "export", components, copy=True)


@pytest.fixture
def copy(export_dir, tmp_path):
    folder = tmp_path / "export"
    shutil.copytree(export_dir, folder)
    return folder


def _weights(folder):
    return next((folder / "transformer").glob("*.safetensors"))


def _flip(path, offset=-5):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x40
    path.write_bytes(bytes(data))


def test_generator_json_records_every_file(export_dir):
    files = json.loads((export_dir / "generator.json").read_text())["files"]
    inside = sorted(p.relative_to(export_dir).as_posix() for p in export_dir.rglob("*")
                    if p.is_file() and p.name != "generator.json" and not p.name.startswith("."))
    assert sorted(files) == inside
    assert any(f.startswith("text_encoder/") for f in files) and "indicator.safetensors" in files
    data = (export_dir / "indicator.safetensors").read_bytes()
    assert files["indicator.safetensors"] == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


@pytest.mark.parametrize("target", ["weights", "indicator.safetensors"])
def test_a_corrupted_byte_stops_the_load_naming_the_file(copy, target):
    path = _weights(copy) if target == "weights" else copy / target
    _flip(path)
    for load in (CausalStudent.from_pretrained, StreamingGenerator.from_export):
        with pytest.raises(ValueError) as error:
            load(copy)
        message = str(error.value)
        assert message.startswith(f"{path}: ") and "sha256" in message and "\n" not in message, message


def test_a_truncated_component_stops_the_generator_naming_the_file(copy):
    path = next((copy / "text_encoder").glob("*.safetensors"))
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ValueError, match=f"^{path}: 100 bytes, generator.json records"):
        StreamingGenerator.from_export(copy)
    CausalStudent.from_pretrained(copy)  # the student itself is intact


def test_generate_with_a_corrupted_export_exits_nonzero_with_one_line(copy, tmp_path):
    _flip(_weights(copy), offset=-5)
    result = shotdistill(["generate", str(copy), "--shot", "a red circle turns left",
                          "--out", str(tmp_path / "story.mp4")], tmp_path)
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1].startswith(f"shotdistill: error: {_weights(copy)}: ")
    assert not (tmp_path / "story.mp4").exists()


def test_nonfinite_output_stops_the_generator(export_dir):
    gen = StreamingGenerator.from_export(export_dir)
    with torch.no_grad():
        next(gen.student.transformer.parameters()).fill_(float("nan"))  # weights gone bad in memory
    with pytest.raises(FloatingPointError, match=r"^shot 1, chunk 1: the student produced non-finite values"):
        list(gen.next_shot("a red circle turns left"))
