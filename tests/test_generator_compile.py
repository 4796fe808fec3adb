"""Protects the compiled streaming paths (student/compiled.py): the fixed-shape chunk pass equals the eager
sliced pass, torch.compile (inductor) gives eager's frames with a bounded number of graphs over many chunks
and shots, and a bad `compile` value fails in one line."""

import pytest
import torch
from torch._dynamo.utils import counters

from helpers import make_tiny_wan
from student import compiled
from student.export import save_student
from student.generator import StreamingGenerator
from student.model import CausalStudent
from teacher import NextShotTeacher
from teacher.encoders import build_tiny_t5

WORDS = "a red blue circle square turns left right wide close-up both meet".split()
PROMPTS = ["a red circle turns left", "wide both circles meet", "close-up a blue square", "a blue square turns right"]

pytestmark = pytest.mark.usefixtures("one_thread")


def _export(root, indicator: str):
    """A random student (chunk 3, local 2 chunks: a ring of 3 slots, global 4 frames), PatchCodec, tiny T5."""
    build_tiny_t5(WORDS, dim=24, layers=1, heads=2, max_tokens=8, seed=0).save_pretrained(root / "t5")
    teacher = NextShotTeacher(make_tiny_wan(in_channels=12, out_channels=12),
                              positions="shot_rope" if indicator == "rope_offset" else "sequential")
    student = CausalStudent.from_teacher(teacher, chunk_frames=3, local_chunks=2, context_frames=4,
                                         indicator=indicator)
    if student.shot_indicator is not None:  # a trained indicator: zero would hide a missed marked chunk
        with torch.no_grad():
            student.shot_indicator.normal_(generator=torch.Generator().manual_seed(1))
    components = {"codec": {"kind": "patch", "patch": 2},
                  "text_encoder": {"kind": "umt5", "path": str(root / "t5"), "max_tokens": 8},
                  "video": {"height": 16, "width": 16, "fps": 8, "frames": 6}}
    return save_student(student, root / "export", components)


def _story(gen, chunks):
    """Frames of one shot per entry of `chunks` (its chunk count), and the latents the generator kept."""
    frames = [torch.cat(list(gen.next_shot(PROMPTS[k % len(PROMPTS)], gen.frames_for(n)))) for k, n in
              enumerate(chunks)]
    kept = [torch.stack([shot.kept[f] for f in sorted(shot.kept)]) for shot in gen.shots if shot.kept]
    return frames, kept


def _assert_close(eager, fast, atol):
    (frames_a, kept_a), (frames_b, kept_b) = eager, fast
    assert len(frames_a) == len(frames_b) and len(kept_a) == len(kept_b) > 0
    for a, b in zip(frames_a, frames_b):
        assert a.shape == b.shape and (a.int() - b.int()).abs().max() <= 1  # uint8 rounding at most
    for a, b in zip(kept_a, kept_b):
        torch.testing.assert_close(b, a, atol=atol, rtol=0)


def test_bad_mode_is_one_line(tmp_path):
    folder = _export(tmp_path, "rope_offset")
    with pytest.raises(ValueError, match=r"^compile must be one of none, regions, compile, cudagraph; got 'jit'$"):
        StreamingGenerator.from_export(folder, compile="jit")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="compile 'cudagraph' needs a CUDA device; the student is on cpu"):
            StreamingGenerator.from_export(folder, compile="cudagraph")


@pytest.mark.parametrize("indicator", ["learnable", "rope_offset"])
def test_fixed_shape_pass_equals_sliced_pass(tmp_path, monkeypatch, indicator):
    """The fixed-shape pass run eagerly (no compiler): whole-buffer masked attention and index writes give
    the sliced pass's numbers, through the ring's wrap-around (4-chunk shots, 3 slots), context growth and
    the learnable indicator's marked first chunk."""
    monkeypatch.setitem(compiled._COMPILED, compiled.BACKEND, compiled.fixed_chunk_pass)
    folder = _export(tmp_path, indicator)
    eager = _story(StreamingGenerator.from_export(folder, global_prompt="a red circle", seed=3), [2, 4, 1, 4])
    gen = StreamingGenerator.from_export(folder, global_prompt="a red circle", seed=3, compile="compile")
    assert gen.stream.fixed is not None
    _assert_close(eager, _story(gen, [2, 4, 1, 4]), atol=1e-5)


@pytest.mark.slow
def test_compiled_generator_equals_eager_with_bounded_graphs(tmp_path):
    """Inductor on the CPU: 2 shots x 2 chunks equal eager; then 3 more shots (ring wrap-around, a full
    global cache) add no graph: one for the denoising passes, one for the t = 0 pass (26 s cold, 5 s with a warm
    inductor cache, on 2 cores)."""
    folder = _export(tmp_path, "rope_offset")
    torch._dynamo.reset()
    counters.clear()
    eager = _story(StreamingGenerator.from_export(folder, global_prompt="a red circle", seed=3), [2, 2])
    gen = StreamingGenerator.from_export(folder, global_prompt="a red circle", seed=3, compile="compile")
    _assert_close(eager, _story(gen, [2, 2]), atol=1e-5)
    assert counters["stats"]["unique_graphs"] == 2 and not counters["graph_break"]
    list(_story(gen, [4, 1, 4]))
    other = StreamingGenerator.from_export(folder, global_prompt="a blue square", seed=4, compile="compile")
    _story(other, [2])  # a second session over another copy of the student: same graphs
    assert counters["stats"]["unique_graphs"] == 2 and not counters["graph_break"]


@pytest.mark.slow
def test_benchmark_reports_every_mode(tmp_path, monkeypatch):
    """benchmarks/compiled.py side by side on the tiny recipes' model, dynamo's eager backend (no code
    generation, a few seconds): every field of the table, the device named, frames equal to eager's."""
    import importlib.util
    import json
    import sys
    from pathlib import Path

    path = Path(__file__).parents[1] / "benchmarks" / "compiled.py"
    spec = importlib.util.spec_from_file_location("compiled_benchmark", path)
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, bench)
    spec.loader.exec_module(bench)
    monkeypatch.setattr(compiled, "BACKEND", "eager")
    out = tmp_path / "bench.json"
    assert bench.main(["--rounds", "1", "--shots", "2", "--modes", "none,regions,compile", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["device"] and result["threads"] == 1 and list(result["modes"]) == ["none", "regions", "compile"]
    for mode, row in result["modes"].items():
        assert row["shots_timed"] == 2 and row["frames_per_shot"] == 6
        assert 0 < row["ttff_ms"]["min"] <= row["ttff_ms"]["median"] and row["fps"]["median"] > 0
        assert 0 < row["chunk_ms"]["min"] <= row["chunk_ms"]["median"]
        assert row["max_frame_diff"] <= (0 if mode != "compile" else 1)
    assert result["modes"]["compile"]["graphs"] == 2 and result["modes"]["none"]["graphs"] == 0


def test_diffusers_pipeline_passes_the_mode_through(tmp_path, monkeypatch):
    """ShotStreamPipeline's `stream(compile=)` and `__call__(compile=)` reach the generator (the fixed-shape
    pass run without a compiler here; inductor is the test above)."""
    from diffusers import DiffusionPipeline

    from student.export import export_folder

    monkeypatch.setitem(compiled._COMPILED, compiled.BACKEND, compiled.fixed_chunk_pass)
    pipe = DiffusionPipeline.from_pretrained(str(export_folder(_export(tmp_path, "rope_offset"), tmp_path / "out")),
                                             trust_remote_code=True)
    assert pipe.stream(seed=3, compile="compile").stream.fixed is not None
    with pytest.raises(ValueError, match="^compile must be one of"):
        pipe(PROMPTS[:2], seed=3, compile="jit")
    for eager, fast in zip(pipe(PROMPTS[:2], seed=3).frames, pipe(PROMPTS[:2], seed=3, compile="compile").frames):
        assert eager.shape == fast.shape and (eager.int() - fast.int()).abs().max() <= 1


def test_cli_flag_reaches_the_generator(tmp_path, capsys):
    """`generate --compile` and `serve --compile` hand the mode to the generator: a bad one fails in one
    line naming it, before any output is written."""
    from launch.cli import main
    from serve.sessions import load_models

    folder = _export(tmp_path, "rope_offset")
    out = tmp_path / "story.mp4"
    capsys.readouterr()  # the export's own progress lines
    assert main(["generate", str(folder), "--shot", PROMPTS[0], "--compile", "jit", "--out", str(out)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "compile must be one of none, regions, compile, cudagraph; got 'jit'" in err[0]
    assert not out.exists()
    with pytest.raises(ValueError, match="^compile must be one of"):
        load_models(folder, compile="jit")
