"""Protects the attention benchmark's CPU-checkable parts: pair counts, baselines' masks, the results file."""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

import kernels

_BENCH = Path(__file__).parents[1] / "benchmarks" / "attention.py"
_SPEC = importlib.util.spec_from_file_location("bench_attention", _BENCH)
bench = importlib.util.module_from_spec(_SPEC)
sys.modules[_SPEC.name] = bench  # dataclasses look their module up by name
_SPEC.loader.exec_module(bench)

SMALL = [bench.Shape("train", 70, 14, 8), bench.Shape("window", 64, 6, 7, window_chunks=2),
         bench.Shape("prefix_rows", 40, 25, 6), bench.Shape("decoding", 40, 40, 8, q_length=8)]


def test_student_shapes_follow_the_notes():
    train, decoding = bench.student_shapes()
    assert (train.length, train.prefix_len, train.chunk_len) == (11 * 4680, 2 * 4680, 4680)
    # one chunk of queries over the full cache: 2 global + 7 local chunks + itself, all visible
    assert (decoding.queries, decoding.length, decoding.prefix_len) == (4680, 10 * 4680, 10 * 4680)
    assert bench.visible_pairs(bench.Shape("d", 40, 40, 4, q_length=4), torch.device("cpu")) == 160


@pytest.mark.parametrize("shape", SMALL, ids=lambda s: s.name)
def test_pair_count_and_baseline_masks_match_the_rule(shape):
    mask = kernels.chunk_causal_mask(shape.queries, shape.length, **shape.geometry())
    assert bench.visible_pairs(shape, torch.device("cpu"), rows_per_step=7) == int(mask.sum())
    from torch.nn.attention.flex_attention import create_mask

    from kernels.dispatch import chunk_mask_mod
    from kernels.reference import resolve_window

    window = resolve_window(shape.window_chunks, shape.length, shape.prefix_len, shape.chunk_len)
    mask_mod = chunk_mask_mod(shape.prefix_len, shape.chunk_len, window)  # what the flex backend compiles
    flex = create_mask(mask_mod, None, None, shape.queries, shape.length, device="cpu")
    assert torch.equal(flex[0, 0], mask)


@pytest.mark.parametrize("shape", SMALL, ids=lambda s: s.name)
def test_chunk_loop_baseline_equals_the_reference(shape):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, n, 2, 16, generator=g, dtype=torch.float64) for n in (shape.queries, shape.length,
                                                                                    shape.length))
    expected = kernels.reference_attention(q, k, v, **shape.geometry())
    assert torch.allclose(bench.run_chunk_loop(shape)(q, k, v), expected, atol=1e-12)


def test_tile_census_fractions_add_up_and_match_the_notes():
    train = bench.student_shapes()[0]
    census = bench.tile_census(train, 128, 128)
    assert census["full"] + census["partial"] + census["skipped"] == pytest.approx(1.0)
    # notes/algorithms.md: ~56% full, ~1% partial, ~43% skippable at 128x128 tiles
    assert abs(census["full"] - 0.56) < 0.02 and census["partial"] < 0.01 and abs(census["skipped"] - 0.43) < 0.02


def test_results_section_is_replaced_in_place(tmp_path):
    path = tmp_path / "RESULTS.md"
    path.write_text("# Benchmark results\n\n## Attention\n\nold\n\n## Rollout\n\nkeep me\n")
    bench.write_section("## Attention\n\nnew\n", path)
    assert path.read_text() == "# Benchmark results\n\n## Attention\n\nnew\n\n## Rollout\n\nkeep me\n"
    bench.write_section("## Attention\n\nnewer\n", path)
    assert path.read_text().count("## Attention") == 1 and "keep me" in path.read_text()


def test_benchmark_fails_fast_without_cuda():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(SystemExit, match="needs a CUDA GPU and none is visible"):
        bench.main([])
