"""Protects NextShotTeacher: diffusers parity, target-only noise and output, caption isolation, trainable sets, save/load, shape errors."""

import pytest
import torch
from helpers import make_tiny_wan

from teacher import NextShotTeacher

TEXT_DIM = 24  # tests/helpers.tiny_wan_config text_dim


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("wan")
    make_tiny_wan(path)
    return path


def _inputs(batch=2, frames=3, context_frames=5, seed=0):
    gen = torch.Generator().manual_seed(seed)
    noisy = torch.randn(batch, 4, frames, 4, 6, generator=gen)
    context = torch.randn(batch, 4, context_frames, 4, 6, generator=gen)
    text = torch.randn(batch, 5, TEXT_DIM, generator=gen)
    shot_a, shot_b = torch.randn(2, batch, 1, 5, TEXT_DIM, generator=gen)
    context_text = torch.cat([shot_a.expand(-1, 2, -1, -1), shot_b.expand(-1, context_frames - 2, -1, -1)], 1)
    return noisy, torch.tensor([250.0, 900.0][:batch]), text, context, context_text


@pytest.mark.parametrize("frames,height,width", [(1, 2, 2), (3, 4, 6), (6, 8, 4)])
def test_no_context_matches_diffusers(folder, frames, height, width):
    from diffusers import WanTransformer3DModel

    wan = WanTransformer3DModel.from_pretrained(str(folder))
    teacher = NextShotTeacher.from_pretrained(folder)
    x = torch.randn(2, 4, frames, height, width)
    t, text = torch.tensor([0.0, 999.0]), torch.randn(2, 9, TEXT_DIM)
    with torch.no_grad():
        assert (wan(x, t, text, return_dict=False)[0] - teacher(x, t, text)).abs().max().item() <= 1e-5


def test_context_runs_clean_and_only_target_frames_come_out(folder, monkeypatch):
    teacher = NextShotTeacher.from_pretrained(folder)
    noisy, t, text, context, context_text = _inputs()
    seen = {}
    original = teacher.backbone.conditioning

    def spy(timesteps, positions, grid, dtype, phases=None):
        seen.update(timesteps=timesteps, positions=positions, phases=phases)
        return original(timesteps, positions, grid, dtype, phases)

    monkeypatch.setattr(teacher.backbone, "conditioning", spy)
    with torch.no_grad():
        out = teacher(noisy, t, text, context, context_text)
    assert out.shape == noisy.shape
    assert torch.equal(seen["timesteps"][:, :5], torch.zeros(2, 5))
    assert torch.equal(seen["timesteps"][:, 5:], t[:, None].expand(2, 3))
    theta = teacher.theta  # context shots [0, 0, 1, 1, 1] inferred from context_text; target = shot 2
    assert torch.equal(seen["positions"], torch.arange(8, dtype=torch.float64))
    expected = torch.tensor([0, 0, 1, 1, 1, 2, 2, 2], dtype=torch.float64) * theta  # a phase per shot
    assert torch.allclose(seen["phases"], expected.expand(2, -1))
    with torch.no_grad():  # explicit shot indices win over the ones inferred from context_text
        teacher(noisy, t, text, context, context_text, context_shots=torch.tensor([0, 1, 2, 2, 2]))
    assert torch.allclose(seen["phases"][0, 4:], torch.tensor([2, 3, 3, 3], dtype=torch.float64) * theta)
    with pytest.raises(ValueError, match=r"context_shots \[3\] must be \[Fc\] or \[B, Fc\] for context "
                                         r"\[2, 4, 5, 4, 6\]"):
        teacher(noisy, t, text, context, context_text, context_shots=torch.tensor([0, 1, 2]))


def test_context_changes_the_prediction_and_positions_matter(folder):
    noisy, t, text, context, context_text = _inputs()
    shot = NextShotTeacher.from_pretrained(folder)
    seq = NextShotTeacher.from_pretrained(folder, positions="sequential")
    with torch.no_grad():
        alone = shot(noisy, t, text)
        with_context = shot(noisy, t, text, context, context_text)
        sequential = seq(noisy, t, text, context, context_text)
        assert torch.equal(alone, seq(noisy, t, text))
    assert (alone - with_context).abs().max().item() > 1e-3
    assert (with_context - sequential).abs().max().item() > 1e-4


def test_a_shot_does_not_see_another_shots_caption(folder, tmp_path):
    """One block: cross-attention comes after self-attention, so caption leaks could only be direct."""
    noisy, t, text, context, context_text = _inputs()
    perturbed = context_text.clone()
    perturbed[:, 2:] += 1.0
    with torch.no_grad():  # with two blocks the context's caption does reach the target, via attention
        deep = NextShotTeacher.from_pretrained(folder)
        assert not torch.equal(deep(noisy, t, text, context, context_text),
                               deep(noisy, t, text, context, perturbed))
    make_tiny_wan(tmp_path, num_layers=1)
    teacher = NextShotTeacher.from_pretrained(tmp_path)
    target_only = NextShotTeacher.from_pretrained(tmp_path, captions="target_only")
    with torch.no_grad():
        base = teacher(noisy, t, text, context, context_text)
        assert torch.equal(base, teacher(noisy, t, text, context, perturbed))
        assert (base - teacher(noisy, t, text + 1.0, context, context_text)).abs().max().item() > 1e-4
        # With target_only captions the context frames use the target text instead of their own.
        assert torch.equal(target_only(noisy, t, text, context, context_text),
                           target_only(noisy, t, text, context, perturbed))


@pytest.mark.parametrize("trainable", ["self_attention", "all"])
def test_optimizer_step_changes_only_trainable_parameters(folder, trainable):
    teacher = NextShotTeacher.from_pretrained(folder, trainable=trainable)
    names = set(teacher.set_trainable())
    before = {n: p.detach().clone() for n, p in teacher.named_parameters()}
    optim = torch.optim.Adam([p for p in teacher.parameters() if p.requires_grad], lr=1e-2)
    noisy, t, text, context, context_text = _inputs()
    teacher(noisy, t, text, context, context_text).square().mean().backward()
    optim.step()
    changed = {n for n, p in teacher.named_parameters() if not torch.equal(p, before[n])}
    assert changed == names
    if trainable == "self_attention":
        assert names and all(".attn1." in n for n in names)
    else:
        assert names == {n for n, _ in teacher.named_parameters()}


def test_save_and_load_round_trip(folder, tmp_path):
    teacher = NextShotTeacher.from_pretrained(folder, positions="sequential", theta=0.5)
    teacher.save_pretrained(tmp_path / "saved")
    teacher.save_pretrained(tmp_path / "saved")  # overwriting an existing folder stays atomic
    loaded = NextShotTeacher.from_pretrained(tmp_path / "saved")
    assert loaded.settings() == teacher.settings()
    noisy, t, text, context, context_text = _inputs()
    with torch.no_grad():
        assert torch.equal(teacher(noisy, t, text, context, context_text),
                           loaded(noisy, t, text, context, context_text))


def test_channel_concat_starts_as_the_base_model_and_round_trips(folder, tmp_path):
    base = NextShotTeacher.from_pretrained(folder)
    widened = NextShotTeacher.from_pretrained(folder, injection="channel_concat")
    assert widened.transformer.config.in_channels == 8
    noisy, t, text, context, _ = _inputs(context_frames=2)
    with torch.no_grad():
        assert (base(noisy, t, text) - widened(noisy, t, text, context)).abs().max().item() <= 1e-5
    assert "transformer.patch_embedding.weight" in widened.set_trainable()
    with torch.no_grad():
        widened.transformer.patch_embedding.weight[:, 4:].normal_()
    widened.save_pretrained(tmp_path / "cc")
    loaded = NextShotTeacher.from_pretrained(tmp_path / "cc")
    assert loaded.injection == "channel_concat"
    with torch.no_grad():
        assert torch.equal(loaded(noisy, t, text, context), widened(noisy, t, text, context))
    with pytest.raises(ValueError, match="in_channels 8 does not fit injection 'frame_concat'"):
        NextShotTeacher.from_pretrained(tmp_path / "cc", injection="frame_concat")


def test_bad_inputs_fail_with_both_shapes(folder, tmp_path):
    teacher = NextShotTeacher.from_pretrained(folder)
    t, text = torch.tensor([1.0]), torch.randn(1, 5, TEXT_DIM)
    with pytest.raises(ValueError, match=r"latents have 8 channels but the model expects 4 \(out_channels\); "
                                         r"got noisy \[1, 8, 3, 16, 16\]"):
        teacher(torch.randn(1, 8, 3, 16, 16), t, text)
    with pytest.raises(ValueError, match=r"noisy \[1, 4, 3, 16, 15\] does not fit the model's patch size "
                                         r"\[1, 2, 2\]: width 15 is not divisible by 2"):
        teacher(torch.randn(1, 4, 3, 16, 15), t, text)
    with pytest.raises(ValueError, match=r"context \[1, 4, 2, 8, 8\] must share batch, channels, height and "
                                         r"width with noisy \[1, 4, 3, 16, 16\]"):
        teacher(torch.randn(1, 4, 3, 16, 16), t, text, torch.randn(1, 4, 2, 8, 8))
    with pytest.raises(ValueError, match=r"context_text \[1, 3, 5, 24\] must be \[B, Fc, L, D\] for context "
                                         r"\[1, 4, 2, 16, 16\] and text \[1, 5, 24\]"):
        teacher(torch.randn(1, 4, 3, 16, 16), t, text, torch.randn(1, 4, 2, 16, 16), torch.randn(1, 3, 5, 24))
    with pytest.raises(ValueError, match="teacher injection must be one of"):
        NextShotTeacher.from_pretrained(folder, injection="sideways")
    with pytest.raises(FileNotFoundError, match="missing config.json"):
        NextShotTeacher.from_pretrained(tmp_path / "nowhere")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_bf16_cuda_matches_diffusers(folder):
    from diffusers import WanTransformer3DModel

    wan = WanTransformer3DModel.from_pretrained(str(folder), torch_dtype=torch.bfloat16).cuda()
    teacher = NextShotTeacher.from_pretrained(folder, torch_dtype=torch.bfloat16).cuda()
    noisy, t, text, context, context_text = (x.cuda() for x in _inputs())
    noisy, text = noisy.bfloat16(), text.bfloat16()
    with torch.no_grad():
        ref = wan(noisy, t, text, return_dict=False)[0].float()
        assert (ref - teacher(noisy, t, text).float()).abs().max().item() <= 1e-2 * ref.abs().max().item()
        out = teacher(noisy, t, text, context.bfloat16(), context_text.bfloat16())
    assert out.shape == noisy.shape and out.dtype == torch.bfloat16 and torch.isfinite(out).all()


def test_context_timestep_target_runs_the_clean_context_at_the_targets_timestep(folder, monkeypatch):
    teacher = NextShotTeacher.from_pretrained(folder, context_timestep="target")
    noisy, t, text, context, context_text = _inputs()
    seen = {}
    original = teacher.backbone.conditioning

    def spy(timesteps, positions, grid, dtype, phases=None):
        seen["timesteps"] = timesteps
        return original(timesteps, positions, grid, dtype, phases)

    monkeypatch.setattr(teacher.backbone, "conditioning", spy)
    with torch.no_grad():
        teacher(noisy, t, text, context, context_text)
    assert torch.equal(seen["timesteps"], t[:, None].expand(2, 8))  # context frames too
    assert teacher.settings()["context_timestep"] == "target"
