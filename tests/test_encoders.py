"""Codecs and text encoders (teacher/encoders.py): exact PatchCodec, Wan VAE and UMT5 loaded by path."""

import pytest
import torch

from distill.data.world import grammar_texts
from teacher.encoders import (PatchCodec, T5TextEncoder, WanVAECodec, build_tiny_t5, join_text,
                              pixels_from_uint8, pixels_to_uint8, vocabulary_of, word_tokenizer)


def test_patch_codec_round_trip_is_exact():
    codec = PatchCodec(2)
    frames = torch.randint(0, 256, (5, 8, 6, 3), dtype=torch.uint8)
    pixels = pixels_from_uint8(frames).unsqueeze(0)
    latents = codec.encode(pixels)
    assert latents.shape == (1, 12, 5, 4, 3) and codec.latent_frames(5) == 5
    assert torch.equal(codec.decode(latents), pixels)
    assert torch.equal(pixels_to_uint8(codec.decode(latents)[0]), frames)
    # one latent pixel holds exactly its 2x2 pixel patch
    assert torch.equal(latents[0, :, 1, 1, 2].view(3, 2, 2), pixels[0, :, 1, 2:4, 4:6])
    assert torch.equal(codec.encode_frames(pixels), latents)


def test_patch_codec_rejects_indivisible_frames():
    with pytest.raises(ValueError, match="7x6 is not divisible by the codec patch 2"):
        PatchCodec(2).encode(torch.zeros(1, 3, 1, 7, 6))


@pytest.fixture(scope="module")
def wan_vae_folder(tmp_path_factory):
    from diffusers import AutoencoderKLWan

    torch.manual_seed(0)
    vae = AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
                           temperal_downsample=[False, True, True],
                           latents_mean=[0.1, -0.2, 0.3, 0.0], latents_std=[1.5, 0.5, 2.0, 1.0])
    root = tmp_path_factory.mktemp("wan")
    vae.save_pretrained(root / "vae")  # a Wan diffusers root: the codec finds vae/
    return root


def test_wan_vae_codec_from_folder(wan_vae_folder):
    codec = WanVAECodec.from_pretrained(wan_vae_folder)
    assert (codec.channels, codec.temporal_factor, codec.spatial_factor) == (4, 4, 8)
    assert codec.latent_frames(9) == 3 and not codec.frames_aligned(8)
    pixels = torch.rand(1, 3, 5, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    latents = codec.encode(pixels)
    assert latents.shape == (1, 4, 2, 2, 2)
    # normalised with the config's per-channel mean/std, as Wan's pipelines do
    mu = codec.vae.encode(pixels).latent_dist.mode()
    mean, std = torch.tensor([0.1, -0.2, 0.3, 0.0]), torch.tensor([1.5, 0.5, 2.0, 1.0])
    assert torch.allclose(latents, (mu - mean.view(1, -1, 1, 1, 1)) / std.view(1, -1, 1, 1, 1), atol=1e-6)
    decoded = codec.decode(latents)
    assert decoded.shape == pixels.shape and decoded.abs().max() <= 1
    expected = codec.vae.decode(mu).sample.clamp(-1, 1)
    assert torch.allclose(decoded, expected, atol=1e-5)


def test_wan_context_frames_are_encoded_as_images(wan_vae_folder):
    codec = WanVAECodec.from_pretrained(wan_vae_folder)
    pixels = torch.rand(1, 3, 5, 16, 16, generator=torch.Generator().manual_seed(2)) * 2 - 1
    frames = codec.encode_frames(pixels[:, :, [0, 3]])
    assert frames.shape == (1, 4, 2, 2, 2)
    assert torch.allclose(frames[:, :, 1:2], codec.encode(pixels[:, :, 3:4]), atol=1e-6)
    # the causal VAE's first latent sees only the first frame, so both ways agree there
    assert torch.allclose(frames[:, :, 0], codec.encode(pixels)[:, :, 0], atol=1e-5)


@pytest.fixture(scope="module")
def umt5_folder(tmp_path_factory):
    from transformers import UMT5Config, UMT5EncoderModel

    torch.manual_seed(0)
    tokenizer = word_tokenizer(["a", "red", "circle", "moves", "left", "on", "blue", "background"], 8)
    model = UMT5EncoderModel(UMT5Config(vocab_size=len(tokenizer), d_model=16, d_kv=8, d_ff=32,
                                        num_layers=2, num_heads=2, pad_token_id=0, eos_token_id=2))
    root = tmp_path_factory.mktemp("umt5")
    model.save_pretrained(root / "text_encoder")
    tokenizer.save_pretrained(root / "tokenizer")
    return root


def test_umt5_from_folder_keeps_real_tokens_only(umt5_folder):
    enc = T5TextEncoder.from_pretrained(umt5_folder, max_tokens=8)
    alone, longer = enc.encode(["a red circle", "a red circle moves left on blue background"])
    assert alone.shape == (4, 16) and longer.shape == (8, 16)  # 3 words + EOS; 8 = truncated
    # attention masks the padding: a caption's tokens do not depend on its batch companions
    assert torch.allclose(enc.encode(["a red circle"])[0], alone, atol=1e-6)
    ids = enc.tokenizer("a red circle", return_tensors="pt").input_ids
    assert torch.allclose(enc.model(input_ids=ids).last_hidden_state[0], alone, atol=1e-5)


def test_join_text_zero_pads_past_the_real_tokens():
    a, b = torch.ones(3, 4), 2 * torch.ones(2, 4)
    joined = join_text([a, b], 8)
    assert joined.shape == (8, 4)
    assert torch.equal(joined[:3], a) and torch.equal(joined[3:5], b) and not joined[5:].any()
    assert torch.equal(join_text([a, b], 4), torch.cat([a, b[:1]]))


def test_tiny_t5_is_fixed_by_its_seed_and_knows_every_grammar_word(tmp_path):
    vocab = vocabulary_of(grammar_texts())
    one, two = (build_tiny_t5(vocab, 32, 2, 2, 32, seed=7) for _ in range(2))
    other = build_tiny_t5(vocab, 32, 2, 2, 32, seed=8)
    caption = "close-up: the red circle moves left and the green square stays still on a blue background"
    ids = one.tokenizer(caption).input_ids
    assert one.tokenizer.unk_token_id not in ids and ids[-1] == one.tokenizer.eos_token_id
    assert torch.equal(one.encode([caption])[0], two.encode([caption])[0])
    assert not torch.allclose(one.encode([caption])[0], other.encode([caption])[0])
    one.save_pretrained(tmp_path / "te")
    loaded = T5TextEncoder.from_pretrained(tmp_path / "te", max_tokens=32)
    assert torch.allclose(loaded.encode([caption])[0], one.encode([caption])[0], atol=1e-6)


def test_joint_layout_encodes_the_prompt_so_far_as_one_string():
    from teacher.context import joint_caption
    from teacher.encoders import build_tiny_t5

    enc = build_tiny_t5(["a", "red", "circle", "moves", "left", "stays", "shot0", "shot1"], 16, 1, 2, 8, seed=0)
    assert joint_caption("a circle", ["moves left", "stays"]) == "a circle shot0: moves left shot1: stays"
    joint = enc.prompt_text("joint", "a circle", ["moves left", "stays"])
    assert joint.shape == (16, 16)
    expected = enc.encode(["a circle shot0: moves left shot1: stays"], 16)[0]
    assert torch.equal(joint[: len(expected)], expected) and not joint[len(expected):].any()
    separate = enc.prompt_text("separate", "a circle", ["moves left", "stays"])
    assert torch.equal(separate, enc.shot_text("a circle", "stays"))
    with pytest.raises(ValueError, match="caption layout must be one of"):
        enc.prompt_text("both", "a", ["b"])
