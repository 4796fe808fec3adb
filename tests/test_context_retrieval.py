"""Protects the retrieval context strategy (student/memory.py): which frames are picked, oracle and CLIP
scoring, the datasets' and the streaming generator's retrieved memory (bounded, equal to a reference pick)."""

import dataclasses
import json

import pytest
import torch
from helpers import make_prepared, make_tiny_wan

from distill.config import load_recipe
from distill.data.datasets import ShotDataset
from distill.data.components import memory_rule
from distill.data.memory import WORLD_TERMS
from launch.data import default_recipe
from student.export import save_student
from student.generator import StreamingGenerator
from student.memory import (ClipSimilarity, MemoryRule, OracleSimilarity, memory_candidates, rank, retrieve,
                            similarity_from)
from student.model import CausalStudent
from teacher import NextShotTeacher
from teacher.context import frames_per_shot
from teacher.encoders import build_tiny_t5

pytestmark = pytest.mark.usefixtures("one_thread")

WORDS = "a the red green blue circle square moves left right on background close-up wide".split()


def test_retrieve_takes_the_most_similar_in_time_order_ties_to_recent():
    scores = [0.1, 0.9, 0.5, 0.9, 0.2, 0.5]
    assert rank(scores) == [3, 1, 5, 2, 4, 0]  # equal scores: the later candidate first
    assert retrieve(scores, 3) == [1, 3, 5]  # the 3 best, back in time order
    assert retrieve(scores, 0) == [] and retrieve(scores, 10) == list(range(6))


def test_candidates_are_budget_frames_per_shot_newest_kept():
    assert memory_candidates([9, 5], 3, 64) == [(0, 0), (0, 4), (0, 8), (1, 0), (1, 2), (1, 4)]
    assert memory_candidates([9, 5, 2], 3, 4) == [(1, 2), (1, 4), (2, 0), (2, 1)]
    with pytest.raises(ValueError, match="ranks frames by similarity"):
        frames_per_shot(2, "retrieval", 6)


def test_oracle_scores_shared_world_facts():
    oracle = OracleSimilarity(WORLD_TERMS)
    captions = ["close-up: the red circle moves left on a blue background",
                "wide: the green square stays still on a blue background",
                "medium: the green circle moves up on a black background"]
    scores = oracle.scores("medium: the red circle moves down", oracle.features(captions)).tolist()
    # red, circle and the named pair (red, circle) | nothing | circle
    assert scores == [3.0, 0.0, 1.0]
    with pytest.raises(ValueError, match="vocabulary"):
        OracleSimilarity([])
    with pytest.raises(ValueError, match="similarity.kind must be one of"):
        similarity_from("bleu")


def test_rule_picks_renumbers_shots_and_reads_texts():
    frames = {(k, f): torch.full((2, 3, 3), 10.0 * k + f) for k in range(3) for f in range(3)}
    rule = MemoryRule("retrieval", 3, OracleSimilarity(["x"]))
    candidates = sorted(frames)
    scores = [0, 0, 5, 0, 0, 0, 1, 0, 4]  # (0, 2), (2, 0), (2, 2)
    ctx = rule.pick(candidates, scores, lambda k, f: frames[k, f], lambda k: torch.full((4, 2), float(k)))
    assert ctx.latents[:, :, 0, 0][0].tolist() == [2.0, 20.0, 22.0]
    assert ctx.shots.tolist() == [0, 1, 1]  # shots 0 and 2 are the picked shots 0 and 1
    assert ctx.texts[:, 0, 0].tolist() == [0.0, 2.0, 2.0]


# ---- CLIP --------------------------------------------------------------------------------------------
def _tiny_clip(folder):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import CLIPConfig, CLIPModel, PreTrainedTokenizerFast

    torch.manual_seed(0)
    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", *WORDS])}
    config = CLIPConfig(text_config={"vocab_size": len(vocab), "hidden_size": 16, "intermediate_size": 32,
                                     "num_hidden_layers": 1, "num_attention_heads": 2, "max_position_embeddings": 16,
                                     "eos_token_id": 1, "pad_token_id": 0, "bos_token_id": 1},
                        vision_config={"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                                       "num_attention_heads": 2, "image_size": 16, "patch_size": 8},
                        projection_dim=8)
    CLIPModel(config).save_pretrained(folder)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]").save_pretrained(folder)
    return folder


def test_tiny_clip_folder_loads_and_scores_cosine(tmp_path):
    from transformers import CLIPModel

    folder = _tiny_clip(tmp_path / "clip")
    clip = ClipSimilarity.from_pretrained(folder)
    images = torch.rand(3, 3, 16, 16) * 2 - 1
    features = clip.features(["", "", ""], images)
    scores = clip.scores("the red circle", features)
    # the same cosine from the model's own forward (its image and text embeddings)
    model = CLIPModel.from_pretrained(folder).eval()
    pixels = ((images + 1) / 2 - clip.mean) / clip.std
    tokens = clip.tokenizer(["the red circle"], return_tensors="pt")
    with torch.no_grad():
        out = model(input_ids=tokens["input_ids"], pixel_values=pixels)
    expected = torch.nn.functional.normalize(out.image_embeds, dim=-1) @ \
        torch.nn.functional.normalize(out.text_embeds, dim=-1)[0]
    assert scores.shape == (3,) and torch.allclose(scores, expected, atol=1e-5)
    assert len(set(scores.tolist())) == 3  # different frames, different scores
    with pytest.raises(FileNotFoundError, match="similarity.path"):
        ClipSimilarity.from_pretrained(tmp_path / "nowhere")


# ---- training data -------------------------------------------------------------------------------------
WORLD = ["data.synth.videos=3", "data.synth.seed=2", "data.synth.min_shots=4", "data.synth.max_shots=4",
         "data.synth.min_frames=9", "data.synth.max_frames=9", "logging.progress=false"]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    return make_prepared(tmp_path_factory.mktemp("retrieval"), WORLD)


def test_dataset_context_is_the_oracle_retrieval(prepared):
    folder = prepared
    cfg = load_recipe(default_recipe(), WORLD + ["data.context.strategy=retrieval", "data.context.budget=4"])
    rule = memory_rule(cfg)
    ds = ShotDataset(folder, "retrieval", 4, memory=rule)
    i = next(i for i, (_, target) in enumerate(ds.items) if target == 3)
    r, target = ds.items[i]
    rec = ds.data.records[r]
    candidates = memory_candidates(rec["shot_frames"][:3], 4, cfg.data.context.max_candidates)
    oracle = OracleSimilarity(WORLD_TERMS)
    scores = oracle.scores(rec["captions"][3], oracle.features([rec["captions"][k] for k, _ in candidates]))
    picked = [candidates[j] for j in retrieve(scores, 4)]
    context = ds[i]["context"]
    assert context.frames == 4 == ds.group(i)[0]
    for c, (k, f) in enumerate(picked):
        assert torch.equal(context.latents[:, c], ds.data.context_frame(rec, k, f))
        assert torch.equal(context.texts[c], ds.data.shot_text(rec, k))
    shots = sorted({k for k, _ in picked})
    assert context.shots.tolist() == [shots.index(k) for k, _ in picked]
    with pytest.raises(ValueError, match="needs its memory rule"):
        ShotDataset(folder, "retrieval", 4)[i]


# ---- the streaming generator ---------------------------------------------------------------------------
def memory_export(root, strategy, **settings):
    """A random student (chunk 3, global 4 frames) with a ranked context rule, PatchCodec, tiny T5."""
    build_tiny_t5(WORDS, dim=24, layers=1, heads=2, max_tokens=8, seed=0).save_pretrained(root / "t5")
    teacher = NextShotTeacher(make_tiny_wan(in_channels=12, out_channels=12))
    student = CausalStudent.from_teacher(teacher, chunk_frames=3, local_chunks=2, context_frames=4,
                                         context_strategy=strategy, similarity="oracle",
                                         similarity_terms=list(WORLD_TERMS), **settings)
    components = {"codec": {"kind": "patch", "patch": 2},
                  "text_encoder": {"kind": "umt5", "path": str(root / "t5"), "max_tokens": 8},
                  "video": {"height": 16, "width": 16, "fps": 8, "frames": 3}}
    return save_student(student, root / "export", components)


PROMPTS = ["the red circle moves left", "the green square moves right", "wide the blue circle",
           "close-up the green circle", "the red square on a blue background"]


def recorded_run(gen, prompts):
    """Run shots, recording each finished shot's latent frames [C, F, h, w] (PatchCodec: the x0 chunks)."""
    chunks, shots = [], []
    step = gen.stream.next_chunk

    def record(*args, **kwargs):
        x0 = step(*args, **kwargs)
        chunks.append(x0[0])
        return x0

    gen.stream.next_chunk = record
    for p in prompts:
        list(gen.next_shot(p))
        shots.append(torch.cat(chunks, dim=1))
        chunks.clear()
    return shots


def test_generator_retrieval_is_bounded_and_equals_the_reference_pick(tmp_path):
    gen = StreamingGenerator.from_export(memory_export(tmp_path, "retrieval", max_candidates=5), seed=1)
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(12)]
    held, shots = [], []
    for p in prompts:
        shots += recorded_run(gen, [p])
        held.append(gen.kept_tensors())
    # 5 candidate frames (latents + features) and the texts of at most 5 shots
    assert max(held) <= 5 * 2 + 5 and held[-4:] == [held[-1]] * 4
    prompt = "the green square moves left"
    candidates = memory_candidates([s.shape[1] for s in shots], 4, 5)
    oracle = OracleSimilarity(WORLD_TERMS)
    scores = oracle.scores(prompt, oracle.features([prompts[k] for k, _ in candidates]))
    expected = torch.stack([shots[k][:, f] for k, f in (candidates[j] for j in retrieve(scores, 4))], dim=1)
    context = gen._context(prompt)
    assert torch.equal(context.latents[0], expected)


def test_rollout_context_ranks_each_sample_by_its_own_captions():
    """RankedContext (dmd_inter rollouts, multishot evals): per sample, the retrieval of its captions;
    re-encoding through PatchCodec equals taking latent frames; no captions is a one-line error."""
    from distill.rollout import RankedContext
    from teacher.encoders import PatchCodec

    rule = MemoryRule("retrieval", 2, OracleSimilarity(WORLD_TERMS))
    shots = [torch.randn(2, 4, 3, 2, 2, generator=torch.Generator().manual_seed(k)) for k in range(2)]
    texts = [torch.full((2, 5, 3), float(k)) for k in range(2)]
    captions = [["the red circle", "the green square", "the red circle moves up"],
                ["the red circle", "the green square", "the green square moves up"]]
    context = RankedContext(rule)(shots, texts, captions)
    # sample 0 asks for the red circle: shot 0's frames 0 and 2; sample 1 the green square: shot 1's
    assert torch.equal(context.latents[0], shots[0][0][:, [0, 2]])
    assert torch.equal(context.latents[1], shots[1][1][:, [0, 2]])
    assert context.shots.tolist() == [[0, 0], [0, 0]] and context.texts[:, :, 0, 0].tolist() == [[0, 0], [1, 1]]
    reencoded = RankedContext(rule, PatchCodec(1), reencode=True)(shots, texts, captions)
    torch.testing.assert_close(reencoded.latents, context.latents)
    with pytest.raises(ValueError, match="ranks history by the shots' captions"):
        RankedContext(rule)(shots, texts)


def test_clip_scores_prepared_latents_through_the_codec(prepared, tmp_path):
    """memory_rule with a clip scorer decodes prepared latents (PatchCodec here) to rank them."""
    folder = _tiny_clip(tmp_path / "clip")
    cfg = load_recipe(default_recipe(), WORLD + ["data.context.strategy=retrieval", "data.context.budget=2",
                                                 "data.context.similarity.kind=clip",
                                                 f"data.context.similarity.path={folder}"])
    rule = memory_rule(cfg)
    ds = ShotDataset(prepared, "retrieval", 2, memory=rule)
    i = next(i for i, (_, target) in enumerate(ds.items) if target == 2)
    rec = ds.data.records[ds.items[i][0]]
    candidates = memory_candidates(rec["shot_frames"][:2], 2, cfg.data.context.max_candidates)
    latents = [ds.data.context_frame(rec, k, f) for k, f in candidates]
    pixels = torch.stack([rule.decode(x) for x in latents])
    assert pixels.shape == (len(candidates), 3, cfg.data.height, cfg.data.width)
    scores = rule.similarity.scores(rec["captions"][2], rule.similarity.features([""] * len(candidates), pixels))
    expected = torch.stack([latents[j] for j in retrieve(scores, 2)], dim=1)
    assert torch.equal(ds[i]["context"].latents, expected)


def test_clip_features_are_computed_once_at_preparation(tmp_path):
    """Prepared with a clip-ranked strategy, every candidate frame's CLIP image feature is stored: it
    equals scoring the frame's pixels, and the dataset ranks with it as it would through the codec
    (no decoding per training item: a rule without the codec still works)."""
    folder = _tiny_clip(tmp_path / "clip")
    clip = [*WORLD, "data.context.strategy=retrieval", "data.context.budget=2", "data.context.similarity.kind=clip",
            f"data.context.similarity.path={folder}"]
    out = make_prepared(tmp_path / "world", clip)
    cfg = load_recipe(default_recipe(), clip)
    rule = memory_rule(cfg)
    ds = ShotDataset(out, "retrieval", 2, memory=dataclasses.replace(rule, decode=None))
    data = ds.data
    assert data.settings["similarity"]["path"] == str(folder)
    for rec in data.records:
        assert rec["clip_frames"] == [[0, n - 1] for n in rec["shot_frames"]]  # budget 2: first and last
        for k, frames in enumerate(rec["clip_frames"]):
            pixels = torch.stack([rule.decode(data.context_frame(rec, k, f)) for f in frames])
            torch.testing.assert_close(data.tensor(rec, f"shot{k}/clip"),
                                       torch.stack(rule.similarity.features([], pixels)), atol=1e-5, rtol=0)
    decoding = ShotDataset(out, "retrieval", 2, memory=rule)
    decoding.data.records = [{k: v for k, v in r.items() if k != "clip_frames"} for r in data.records]
    picked = [ds[i]["context"].latents for i in range(len(ds))]
    assert all(torch.equal(a, decoding[i]["context"].latents) for i, a in enumerate(picked))
    assert sum(ds.items[i][1] >= 2 for i in range(len(ds))) > 0  # some histories hold more candidates than 2


def test_generator_clip_retrieval_equals_the_reference_pick(tmp_path):
    """The generator scores its own decoded frames with a CLIP folder (features kept per candidate)."""
    folder = _tiny_clip(tmp_path / "clip")
    export = memory_export(tmp_path, "retrieval", max_candidates=4)
    info = json.loads((export / "generator.json").read_text())  # the student settings a clip recipe would save
    info["student"].update(similarity="clip", similarity_path=str(folder), similarity_terms=[])
    (export / "generator.json").write_text(json.dumps(info))
    gen = StreamingGenerator.from_export(export, seed=1)
    shots = recorded_run(gen, PROMPTS[:4])
    assert gen.kept_tensors() <= 4 * 2 + 2
    candidates = memory_candidates([s.shape[1] for s in shots], 4, 4)
    pixels = torch.stack([gen.codec.decode(shots[k][None])[0][:, f] for k, f in candidates])
    clip = ClipSimilarity.from_pretrained(folder)
    scores = clip.scores("the red circle", clip.features([""] * len(candidates), pixels))
    expected = torch.stack([shots[k][:, f] for k, f in (candidates[j] for j in retrieve(scores, 4))], dim=1)
    assert torch.equal(gen._context("the red circle").latents[0], expected)
