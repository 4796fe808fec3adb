"""Protects StreamingGenerator: chunk-by-chunk streaming, history across shots, reset, bounded memory, references, export round trip, no DeepSpeed."""

import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import make_tiny_wan

from student.export import save_student
from student.generator import Reference, StreamingGenerator
from student.model import CausalStudent
from student.sampling import ChunkStream
from student.video import Mp4Writer
from teacher import NextShotTeacher
from teacher.encoders import build_tiny_t5, join_text, pixels_to_uint8

REPO = Path(__file__).resolve().parent.parent
WORDS = "a red blue circle square turns left right wide close-up both meet".split()
PROMPTS = ["a red circle turns left", "wide both circles meet", "close-up a blue square"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
    """A random student (chunk 3, local 2 chunks, global 4 frames) exported with a PatchCodec and a tiny T5."""
    root = tmp_path_factory.mktemp("gen")
    build_tiny_t5(WORDS, dim=24, layers=1, heads=2, max_tokens=8, seed=0).save_pretrained(root / "t5")
    teacher = NextShotTeacher(make_tiny_wan(in_channels=12, out_channels=12))
    student = CausalStudent.from_teacher(teacher, chunk_frames=3, local_chunks=2, context_frames=4)
    components = {"codec": {"kind": "patch", "patch": 2},
                  "text_encoder": {"kind": "umt5", "path": str(root / "t5"), "max_tokens": 8},
                  "video": {"height": 16, "width": 16, "fps": 8, "frames": 9}}
    return save_student(student, root / "export", components)


@pytest.fixture
def gen(export_dir):
    return StreamingGenerator.from_export(export_dir, global_prompt="a red circle", seed=3)


def _run(gen, prompts, frames=None):
    return [list(gen.next_shot(p, frames)) for p in prompts]


def test_next_shot_streams_chunk_by_chunk(gen):
    shot = gen.next_shot(PROMPTS[0])
    assert isinstance(shot, types.GeneratorType)
    first = next(shot)
    assert first.dtype == torch.uint8 and tuple(first.shape) == (3, 16, 16, 3)
    assert gen.stream.cache.chunks == 1  # only the chunk handed out exists yet
    rest = list(shot)
    assert [tuple(f.shape) for f in rest] == [(3, 16, 16, 3)] * 2 and len(gen.shots) == 1
    assert sum(f.shape[0] for f in _run(gen, PROMPTS[1:2], frames=6)[0]) == 6


def test_history_is_the_generators_own_shots(gen):
    """Frames equal a manual rollout whose context is sampled from the same finished shots' latents."""
    got = _run(gen, PROMPTS)
    student, codec, t5 = gen.student, gen.codec, gen.text_encoder
    stream, rng = ChunkStream(student, 1, 8, 8), torch.Generator().manual_seed(3)
    shots, texts = [], []
    for p, frames in zip(PROMPTS, got):
        text = join_text(t5.encode(["a red circle"]) + t5.encode([p]), 16).unsqueeze(0)
        with torch.no_grad():
            stream.begin_shot_after(text, shots, texts)
            chunks = [stream.next_chunk(rng) for _ in range(3)]
        assert stream.cache.global_len == min(4, sum(s.shape[2] for s in shots)) * 16
        for x0, mine in zip(chunks, frames):
            assert torch.equal(pixels_to_uint8(codec.decode(x0)[0]), mine)
        shots.append(torch.cat(chunks, dim=2))
        texts.append(text)
    assert gen.stream.cache.global_len == 4 * 16  # the third shot: context rebuilt from two shots
    assert gen.stream.cache.chunks == 3  # local cache holds only the current shot's chunks


def test_reset_forgets_history(gen, export_dir):
    first = _run(gen, PROMPTS[:2])
    gen.reset()
    assert gen.shots == []
    again = _run(gen, PROMPTS[:2])
    fresh = _run(StreamingGenerator.from_export(export_dir, global_prompt="a red circle", seed=3), PROMPTS[1:2])
    assert all(torch.equal(a, b) for a, b in zip(sum(first, []), sum(again, [])))
    gen.reset()
    assert all(torch.equal(a, b) for a, b in zip(_run(gen, PROMPTS[1:2])[0], fresh[0]))


def test_memory_is_bounded_over_many_shots(gen):
    buffer = gen.stream.cache.buffer
    ptr, shape = buffer.data_ptr(), tuple(buffer.shape)
    held = []
    for i in range(9):
        _run(gen, [PROMPTS[i % 3]], frames=3)
        held.append(gen.kept_tensors())
        assert gen.stream.cache.buffer.data_ptr() == ptr and tuple(gen.stream.cache.buffer.shape) == shape
    # past the budget (4 shots) only the newest shot is ever picked: 3 frames + its text
    assert held[5:] == [4] * 4


def test_abandoned_shot_is_not_history(gen):
    shot = gen.next_shot(PROMPTS[0])
    next(shot)
    list(gen.next_shot(PROMPTS[1]))
    with pytest.raises(RuntimeError, match="abandoned"):
        next(shot)
    assert len(gen.shots) == 1


def test_references_fill_the_global_cache(gen):
    image = torch.randint(0, 256, (16, 16, 3), dtype=torch.uint8)
    plain = _run(gen, PROMPTS[:1])[0]
    gen.reset([Reference(image, "a blue square")])
    shot = gen.next_shot(PROMPTS[0])
    first = next(shot)
    assert gen.stream.cache.global_len == 16 and gen.history_budget == 3
    assert not torch.equal(first, plain[0])
    list(shot)
    list(gen.next_shot(PROMPTS[1]))
    assert gen.stream.cache.global_len == 4 * 16  # the reference + 3 frames of the first shot
    with pytest.raises(ValueError, match="leave no global-cache slot"):
        gen.reset([Reference(image)] * 4)


def test_bad_arguments_fail_with_one_line(gen):
    with pytest.raises(ValueError, match="^shot prompt is empty: every shot needs a description$"):
        gen.next_shot("  ")
    with pytest.raises(ValueError, match=r"^num_frames 7 is not a whole number of chunks \(3 latent frames "
                                         r"each\); valid frame counts: 3, 6, 9, \.\.\.$"):
        gen.next_shot(PROMPTS[0], 7)


def test_round_trip_through_export_is_exact(export_dir, gen):
    student = CausalStudent.from_pretrained(export_dir)
    direct = StreamingGenerator(student, gen.codec, gen.text_encoder, gen.video, "a red circle", seed=3)
    for a, b in zip(sum(_run(direct, PROMPTS[:2]), []), sum(_run(gen, PROMPTS[:2]), [])):
        assert torch.equal(a, b)


def test_mp4_holds_every_frame(gen, tmp_path):
    from distill.data.video import decode_all

    with Mp4Writer(tmp_path / "v.mp4", gen.video.fps) as writer:
        for shot in _run(gen, PROMPTS[:2], frames=6):
            for chunk in shot:
                writer.append(chunk)
    decoded = decode_all(tmp_path / "v.mp4")
    assert decoded.shape == (12, 16, 16, 3) and decoded.dtype == np.uint8
    assert not list(tmp_path.glob(".*"))  # no temporary file left behind


def test_from_export_without_deepspeed(export_dir):
    code = f"""
import sys
sys.modules['deepspeed'] = None  # import deepspeed now raises ImportError, find_spec says absent
from student.generator import StreamingGenerator
gen = StreamingGenerator.from_export({str(export_dir)!r})
frames = list(gen.next_shot("a red circle"))
assert len(frames) == 3 and frames[0].shape == (3, 16, 16, 3), frames
assert sys.modules['deepspeed'] is None and not any(m.startswith('deepspeed.') for m in sys.modules)
print("ok")
"""
    env = {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=240)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


def test_wan_codec_chunks_and_history(tmp_path):
    """Wan's VAE (temporal factor 4): 1 + 4·(chunk − 1) frames, then 4·chunk; context re-encoded from pixels."""
    from diffusers import AutoencoderKLWan

    from teacher.encoders import WanVAECodec

    torch.manual_seed(0)
    vae = AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
                           temperal_downsample=[False, True, True],
                           latents_mean=[0.1, -0.2, 0.3, 0.0], latents_std=[1.5, 0.5, 2.0, 1.0])
    t5 = build_tiny_t5(WORDS, dim=24, layers=1, heads=2, max_tokens=8, seed=0)
    student = CausalStudent.from_teacher(NextShotTeacher(make_tiny_wan()), chunk_frames=3, context_frames=4)
    from student.generator import VideoSettings

    gen = StreamingGenerator(student, WanVAECodec(vae), t5, VideoSettings(32, 32, 16, 21))
    assert gen.chunks_for(21) == 2 and gen.frames_for(3) == 33
    with pytest.raises(ValueError, match="valid frame counts: 9, 21, 33"):
        gen.chunks_for(12)
    first = [f.shape[0] for f in gen.next_shot(PROMPTS[0])]
    second = gen.next_shot(PROMPTS[1])
    next(second)
    assert first == [9, 12] and gen.stream.cache.global_len == 4 * 4  # 4 frames, 2x2 tokens each
    assert sorted(gen.shots[0].kept) == [0, 7, 13, 20]  # every frame the rule may pick (budget 4)
    assert all(lat.shape == (4, 4, 4) for lat in gen.shots[0].kept.values())
