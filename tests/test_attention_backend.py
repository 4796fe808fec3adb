"""Protects the recipe key `model.attention`: it reaches the teacher's and the student's self-attention."""

import pytest
import torch

from distill.config import ConfigError, load_recipe
from distill.models import build_student, build_teacher, use_attention
from kernels import dispatch

RECIPE = "recipes/tiny/causal-init.yaml"


def test_a_bad_backend_fails_before_compute():
    with pytest.raises(ConfigError, match="model.attention: 'flash' is not one of auto, triton, flex, sdpa"):
        load_recipe(RECIPE, ["model.attention=flash"])


@pytest.mark.parametrize("backend", ["sdpa", "triton"])
def test_the_backend_reaches_teacher_and_student(backend, monkeypatch):
    cfg = load_recipe(RECIPE, [f"model.attention={backend}"])
    torch.manual_seed(0)
    teacher = build_teacher(cfg)
    assert teacher.backbone.attention.keywords == {"backend": backend}
    student = build_student(cfg, teacher)
    assert student.attention_backend == backend
    seen = []
    real = dispatch.chunk_causal_attention

    def spy(*args, backend="auto", **kwargs):
        seen.append(backend)
        return real(*args, **kwargs, backend="sdpa")
    monkeypatch.setattr("student.model.chunk_causal_attention", spy)
    monkeypatch.setattr(dispatch, "chunk_causal_attention", spy)  # the teacher's dense "triton" path
    x = torch.randn(1, teacher.latent_channels, 3, 8, 8)
    text = torch.randn(1, 4, teacher.transformer.config.text_dim)
    with torch.no_grad():
        student(x, torch.full((1,), 500.0), text)
        teacher(x, torch.full((1,), 500.0), text)
    assert seen and set(seen) == {backend}
    assert use_attention(student, "flex").attention_backend == "flex"
