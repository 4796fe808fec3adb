"""Protects the packed memory (memory_pack, student/memory.py): tile layout and areas, where frame j lands,
the packed context's texts and shots, datasets and the streaming generator (bounded, equal to a reference pack)."""

import pytest
import torch
from test_context_retrieval import PROMPTS, WORLD, memory_export, prepared, recorded_run  # noqa: F401

from distill.config import load_recipe
from distill.data.datasets import ShotDataset
from distill.data.components import memory_rule
from distill.data.memory import WORLD_TERMS
from launch.data import default_recipe
from student.generator import StreamingGenerator
from student.memory import MemoryRule, OracleSimilarity, Tile, memory_candidates, pack, pack_layout, rank

pytestmark = pytest.mark.usefixtures("one_thread")


def test_layout_areas_halve_and_tiles_do_not_overlap():
    tiles = pack_layout(8, 2, 8, 8)
    assert [t.height * t.width for t in tiles] == [64, 32, 16, 8, 4, 2, 1]  # 1/2^j of a frame; the 8th is left out
    assert {t.slot for t in tiles[1:]} == {1} and tiles[0] == Tile(0, 0, 0, 8, 8)
    cover = torch.zeros(8, 8, dtype=torch.long)
    for t in tiles[1:]:
        cover[t.top:t.top + t.height, t.left:t.left + t.width] += 1
    assert cover.max() == 1 and cover.sum() == 63  # one cell stays free


def test_layout_places_frame_j_as_documented():
    tiles = pack_layout(6, 2, 4, 4)
    assert tiles[1:] == [Tile(1, 0, 0, 2, 4), Tile(1, 2, 0, 2, 2), Tile(1, 2, 2, 1, 2), Tile(1, 3, 2, 1, 1)]
    three = pack_layout(5, 3, 4, 8)  # two whole frames, then halving in slot 2 (wider than tall: left half first)
    assert three[:2] == [Tile(0, 0, 0, 4, 8), Tile(1, 0, 0, 4, 8)]
    assert three[2:] == [Tile(2, 0, 0, 4, 4), Tile(2, 0, 4, 2, 4), Tile(2, 2, 4, 2, 2)]
    assert pack_layout(2, 1, 4, 4) == [Tile(0, 0, 0, 2, 4), Tile(0, 2, 0, 2, 2)]
    with pytest.raises(ValueError, match="pack_frames must be >= 1"):
        pack_layout(2, 0, 4, 4)


def test_pack_downsamples_by_area_into_the_tiles():
    frames = [torch.arange(16.0).view(1, 4, 4) + 100 * j for j in range(4)]
    out, tiles = pack(frames, 2)
    assert out.shape == (1, 2, 4, 4) and len(tiles) == 4
    assert torch.equal(out[0, 0], frames[0][0])
    # frame 1 at rows 0-1: each row is the mean of two source rows (area interpolation)
    assert torch.equal(out[0, 1, 0:2], frames[1][0].view(2, 2, 4).mean(1))
    assert torch.allclose(out[0, 1, 2:4, 0:2], frames[2][0].view(2, 2, 2, 2).mean((1, 3)))
    assert torch.allclose(out[0, 1, 2, 2:4], frames[3][0].view(1, 4, 2, 2).mean((1, 3))[0])
    assert out[0, 1, 3, 3] == 0
    batched, _ = pack([f.expand(2, 1, 4, 4) for f in frames], 2)  # leading batch dims pass through
    assert batched.shape == (2, 1, 2, 4, 4) and torch.equal(batched[1], out)


def test_packed_context_carries_first_tile_texts_and_one_memory_shot():
    frames = {(k, 0): torch.full((1, 4, 4), float(k)) for k in range(4)}
    rule = MemoryRule("memory_pack", 4, OracleSimilarity(["x"]), pack_frames=3)
    ctx = rule.pick(sorted(frames), [1, 3, 2, 0], lambda k, f: frames[k, f], lambda k: torch.full((2, 2), 10.0 + k))
    # ranked 1, 2, 0, 3: slots 0 and 1 whole (shots 1 and 2), slot 2 halves: shot 0 then shot 3
    assert ctx.latents.shape == (1, 3, 4, 4) and ctx.latents[0, :, 0, 0].tolist() == [1.0, 2.0, 0.0]
    assert ctx.latents[0, 2, 2, 0] == 3.0
    assert ctx.texts[:, 0, 0].tolist() == [11.0, 12.0, 10.0] and ctx.shots.tolist() == [0, 0, 0]
    one = rule.pick([(0, 0)], [1], lambda k, f: frames[k, f], lambda k: torch.zeros(2, 2))
    assert one.frames == 1 == rule.frames(1, 4, 4) and rule.frames(9, 4, 4) == 3


def test_dataset_packs_the_ranked_history(prepared):  # noqa: F811
    cfg = load_recipe(default_recipe(), WORLD + ["data.context.strategy=memory_pack", "data.context.budget=3"])
    ds = ShotDataset(prepared, "memory_pack", 3, memory=memory_rule(cfg))
    i = next(i for i, (_, target) in enumerate(ds.items) if target == 3)
    rec = ds.data.records[ds.items[i][0]]
    candidates = memory_candidates(rec["shot_frames"][:3], 3, cfg.data.context.max_candidates)
    oracle = OracleSimilarity(WORLD_TERMS)
    order = rank(oracle.scores(rec["captions"][3], oracle.features([rec["captions"][k] for k, _ in candidates])))
    expected, _ = pack([ds.data.context_frame(rec, *candidates[j]) for j in order], 2)
    context = ds[i]["context"]
    assert context.frames == 2 == ds.group(i)[0] and torch.equal(context.latents, expected)
    assert context.shots.tolist() == [0, 0]


def test_generator_memory_pack_is_bounded_and_equals_the_reference_pack(tmp_path):
    gen = StreamingGenerator.from_export(memory_export(tmp_path, "memory_pack", max_candidates=6), seed=2)
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(12)]
    held, shots = [], []
    for p in prompts:
        shots += recorded_run(gen, [p])
        held.append(gen.kept_tensors())
    assert max(held) <= 6 * 2 + 6 and held[-4:] == [held[-1]] * 4
    prompt = "the red circle moves right"
    candidates = memory_candidates([s.shape[1] for s in shots], 4, 6)
    oracle = OracleSimilarity(WORLD_TERMS)
    order = rank(oracle.scores(prompt, oracle.features([prompts[k] for k, _ in candidates])))
    expected, _ = pack([shots[k][:, f] for k, f in (candidates[j] for j in order)], 2)
    context = gen._context(prompt)
    assert context.frames == 2 and torch.equal(context.latents[0], expected)
    assert context.shots.tolist() == [[0, 0]]


@pytest.mark.parametrize("recipe,strategy", [("context-retrieval", "retrieval"), ("context-pack", "memory_pack")])
def test_ablation_recipes_plan_the_whole_pipeline_with_their_rule(recipe, strategy, tmp_path):
    """The Table-3-style recipes are valid for every stage (keys each stage honours) and every stage of the
    tree trains with the ranked rule; benchmarks/validity.py offers them as opt-in rows."""
    import importlib.util
    import sys
    from pathlib import Path

    from distill.runner import _stages, plan

    root = Path(__file__).parents[1]
    planned = plan(root / "recipes" / "tiny" / "ablations" / f"{recipe}.yaml", [f"run.out={tmp_path}"])
    stages = _stages(planned)
    assert {n.folder for n in stages} >= {"prepare", "teacher", "ode-pairs", "causal-init", "dmd-intra", "dmd-inter"}
    assert {n.cfg.data.context.strategy for n in stages} == {strategy}
    spec = importlib.util.spec_from_file_location("validity_rows", root / "benchmarks" / "validity.py")
    validity = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = validity  # its dataclasses resolve their annotations through it
    spec.loader.exec_module(validity)
    row = {r.key: r for r in validity.ROWS}[recipe]
    assert not row.default and validity.RUNS[row.run].recipe.endswith(f"{recipe}.yaml")


def test_an_input_built_before_the_memory_keys_existed_still_serves(tmp_path):
    """A finished causal-init recorded before data.context.similarity / pack_frames / max_candidates existed
    serves dmd-intra at their defaults, and refuses a ranked rule it was not built with."""
    import json
    from pathlib import Path

    from omegaconf import OmegaConf

    from distill.config import ConfigError, to_yaml
    from distill.runner import plan

    tiny = Path(__file__).parents[1] / "recipes" / "tiny"
    run = tmp_path / "tiny" / "causal-init"
    run.mkdir(parents=True)
    built = OmegaConf.to_container(plan(tiny / "causal-init.yaml", [f"run.out={tmp_path}"]).cfg)
    for key in ("similarity", "pack_frames", "max_candidates"):
        del built["data"]["context"][key]  # as recorded before the keys existed
    (run / "config.yaml").write_text(to_yaml(OmegaConf.create(built)))
    (run / "DONE").write_text(json.dumps({"metrics": {}, "produces": "student"}))
    plan(tiny / "dmd-intra.yaml", [f"run.out={tmp_path}"])
    with pytest.raises(ConfigError, match=r"data.context.pack_frames=3 cannot take effect in stage dmd-intra"):
        plan(tiny / "dmd-intra.yaml", [f"run.out={tmp_path}", "data.context.pack_frames=3"])
