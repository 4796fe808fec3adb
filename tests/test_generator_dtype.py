"""Protects bf16 serving: a student loaded with torch_dtype=bfloat16 (diffusers keeps its norms, embedders
and modulation tables in float32) streams shots, text and cache in the model's compute dtype."""

import torch
from diffusers import AutoencoderKLWan, WanTransformer3DModel

from helpers import make_tiny_wan, tiny_wan_config
from student.generator import StreamingGenerator, VideoSettings
from student.model import CausalStudent
from teacher.encoders import WanVAECodec, build_tiny_t5, vocabulary_of

PROMPTS = ["wide: a red circle moves left", "close-up: the red circle stays still"]


def test_a_bf16_student_streams_shots_with_history(tmp_path, one_thread):
    make_tiny_wan(tmp_path / "transformer")
    wan = WanTransformer3DModel.from_pretrained(tmp_path / "transformer", torch_dtype=torch.bfloat16)
    assert {p.dtype for p in wan.parameters()} == {torch.bfloat16, torch.float32}  # mixed, as loaded
    torch.manual_seed(0)
    vae = AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
                           temperal_downsample=[False, True, True], latents_mean=[0.0] * 4, latents_std=[1.0] * 4)
    text = build_tiny_t5(vocabulary_of(PROMPTS), tiny_wan_config()["text_dim"], 1, 2, 8, seed=0)
    gen = StreamingGenerator(CausalStudent(wan), WanVAECodec(vae), text, VideoSettings(64, 64, 8.0, 9))
    assert gen.stream.dtype == torch.bfloat16
    for prompt in PROMPTS:  # the second shot runs the context pass over the first one's frames
        frames = torch.cat(list(gen.next_shot(prompt)))
        assert frames.shape == (9, 64, 64, 3) and frames.dtype == torch.uint8
