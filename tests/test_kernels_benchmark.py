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

SMALL = [bench.Shape("train", 70, 70, 14, 8, 0), bench.Shape("decode", 8, 60, 16, 8, 52),
         bench.Shape("window", 50, 64, 6, 7, 14, window_chunks=2), bench.Shape("prefix_rows", 30, 40, 25, 6, 5)]


def test_student_shapes_follow_the_notes():
    train, decode = bench.student_shapes()
    assert (train.q_len, train.prefix_len, train.chunk_len) == (11 * 4680, 2 * 4680, 4680)
    assert (decode.q_len, decode.k_len, decode.q_offset) == (4680, 46_800, 46_800 - 4680)


@pytest.mark.parametrize("shape", SMALL, ids=lambda s: s.name)
def test_pair_count_and_baseline_masks_match_the_rule(shape):
    mask = kernels.chunk_causal_mask(shape.q_len, shape.k_len, **shape.geometry())
    assert bench.visible_pairs(shape, torch.device("cpu"), rows_per_step=7) == int(mask.sum())
    from torch.nn.attention.flex_attention import create_mask

    flex = create_mask(bench.flex_mask_mod(shape), None, None, shape.q_len, shape.k_len, device="cpu")
    assert torch.equal(flex[0, 0], mask)


@pytest.mark.parametrize("shape", SMALL, ids=lambda s: s.name)
def test_chunk_loop_baseline_equals_the_reference(shape):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, shape.q_len, 2, 16, generator=g, dtype=torch.float64)
    k, v = (torch.randn(1, shape.k_len, 2, 16, generator=g, dtype=torch.float64) for _ in range(2))
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
