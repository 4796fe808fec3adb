"""Protects Self Forcing rollouts: gradient only through exit steps, clean t = 0 cache writes, shared exit step, inference parity."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import make_tiny_wan

from student.context import Context
from distill.rollout import ReencodedContext, SelfForcingGenerator, draw_exit_step, latent_context_fn, shots
from distill.seeds import derive_seed
from student.model import CausalStudent
from student.sampling import ChunkStream
from teacher import NextShotTeacher
from teacher.encoders import PatchCodec

TEXT_DIM = 24  # tests/helpers.tiny_wan_config text_dim
CHUNKS = 3


def _student(**settings) -> CausalStudent:
    return CausalStudent.from_teacher(NextShotTeacher(make_tiny_wan()), local_chunks=1, context_frames=4,
                                      **settings)


def _context(batch: int = 2):
    gen = torch.Generator().manual_seed(11)
    return Context(torch.randn(batch, 4, 2, 4, 4, generator=gen), torch.randn(batch, 2, 5, TEXT_DIM, generator=gen),
                   torch.tensor([0, 0]))


class PassLog:
    """Forward hook on the patch embedding (every pass embeds its latents once)."""

    def __init__(self, student: CausalStudent) -> None:
        self.grad, self.outputs = [], []
        self.handle = student.transformer.patch_embedding.register_forward_hook(self._hook)

    def _hook(self, module, args, out) -> None:
        self.grad.append(torch.is_grad_enabled() and out.requires_grad)
        self.outputs.append(out)


@pytest.mark.parametrize("exit_step", [0, 2])
def test_gradient_reaches_the_generator_only_through_exit_steps(exit_step):
    student = _student()
    log = PassLog(student)
    text = torch.randn(2, 5, TEXT_DIM, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(0)
    shot, = shots(SelfForcingGenerator(student)([text], CHUNKS, exit_step, 4, 4, first_context=_context()))
    # the context pass, then per chunk: exit_step passes without grad, the exit pass, the t = 0 pass
    per_chunk = [False] * exit_step + [True, False]
    assert log.grad == [False] + per_chunk * CHUNKS
    exit_passes = [out for out, g in zip(log.outputs, log.grad) if g]
    reached = []
    for i, out in enumerate(exit_passes):
        # slicing sends exact zeros to the other chunks: count only passes that get a non-zero gradient
        out.register_hook(lambda g, i=i: reached.append(i) if bool(g.abs().sum() > 0) else None)
    frames = student.settings.chunk_frames
    shot.x[:, :, -frames:].sum().backward(retain_graph=True)
    assert reached == [CHUNKS - 1]  # the last chunk's loss does not leak into earlier chunks via the cache
    assert all(p.grad is not None for p in student.transformer.blocks[0].attn1.parameters())
    reached.clear()
    shot.x.sum().backward()
    assert sorted(reached) == list(range(CHUNKS))


def test_t0_pass_writes_clean_keys_and_values():
    """After a gradient rollout the local cache holds exactly the K/V of a t = 0 pass over each
    finished (detached) chunk, without autograd history."""
    student = _student()
    text = torch.randn(2, 5, TEXT_DIM, generator=torch.Generator().manual_seed(1))
    context = _context()
    stream = ChunkStream(student, 2, 4, 4, keep_graph=True)
    stream.begin_shot(text, context)
    torch.manual_seed(0)
    chunks = [stream.next_chunk(exit_step=1) for _ in range(CHUNKS)]
    reference = ChunkStream(student, 2, 4, 4, keep_graph=True)
    reference.begin_shot(text, context)
    with torch.no_grad():
        for chunk in chunks:
            reference.commit(chunk.detach())
    assert len(stream.cache.local_kv) == len(reference.cache.local_kv) == 1  # local_chunks = 1
    for (k, v), (k_ref, v_ref) in zip(stream.cache.local_kv[-1], reference.cache.local_kv[-1]):
        assert not k.requires_grad and not v.requires_grad
        torch.testing.assert_close(k, k_ref, rtol=0, atol=0)
        torch.testing.assert_close(v, v_ref, rtol=0, atol=0)


def test_multi_shot_rollout_is_inference():
    """A gradient rollout computes the numbers the inference stream computes (same noise, same exit
    step), shot boundaries included; re-encoding through PatchCodec equals taking latent frames."""
    student = _student()
    texts = list(torch.randn(3, 2, 5, TEXT_DIM, generator=torch.Generator().manual_seed(2)))
    s = student.settings
    reencode = ReencodedContext(PatchCodec(1), s.context_strategy, s.context_frames)
    torch.manual_seed(5)
    rolled = shots(SelfForcingGenerator(student)(texts, CHUNKS, 1, 4, 4, context_fn=reencode))
    stream = ChunkStream(student, 2, 4, 4)
    torch.manual_seed(5)
    done = []
    with torch.no_grad():
        for k, text in enumerate(texts):
            stream.begin_shot_after(text, done, texts[:k])
            done.append(torch.cat([stream.next_chunk(exit_step=1) for _ in range(CHUNKS)], dim=2))
    for got, want in zip(rolled, done):
        assert got.x.requires_grad
        torch.testing.assert_close(got.x.detach(), want, rtol=1e-5, atol=1e-5)
    direct = latent_context_fn(s.context_strategy, s.context_frames)(done[:2], texts[:2])
    again = reencode(done[:2], texts[:2])
    torch.testing.assert_close(again.latents, direct.latents, rtol=0, atol=1e-6)
    assert torch.equal(again.texts, direct.texts) and torch.equal(again.shots, direct.shots)
    assert rolled[2].context.shots[0].tolist() == [0, 0, 1, 1]


def _draw_on_rank(rank: int, port: int, path: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    # each rank passes its own seed: only a broadcast makes them agree
    value = draw_exit_step(seed=rank, step=3, steps=4)
    torch.save(value, f"{path}.{rank}")
    dist.destroy_process_group()


@pytest.mark.slow
def test_every_rank_uses_rank0s_exit_step(tmp_path):
    from conftest import free_port

    local = [int(torch.randint(4, (1,), generator=torch.Generator().manual_seed(derive_seed(r, "exit-step", 3))))
             for r in range(2)]
    assert local[0] != local[1]  # the test would pass trivially otherwise
    mp.spawn(_draw_on_rank, args=(free_port(), str(tmp_path / "exit")), nprocs=2)
    assert [torch.load(tmp_path / f"exit.{r}") for r in range(2)] == [local[0], local[0]]
    assert draw_exit_step(seed=0, step=3, steps=4) == local[0]  # single process: no group needed


def test_gradient_checkpointing_gives_the_same_gradient():
    """Recomputing the exit-step passes in backward (cache snapshots per pass) changes no gradient."""
    student = _student()
    text = torch.randn(2, 5, TEXT_DIM, generator=torch.Generator().manual_seed(1))
    grads = []
    for checkpointing in (False, True):
        student.zero_grad()
        student.enable_gradient_checkpointing(checkpointing)
        torch.manual_seed(0)
        shot, = shots(SelfForcingGenerator(student)([text], CHUNKS, 1, 4, 4, first_context=_context()))
        shot.x.square().mean().backward()
        grads.append([p.grad.clone() for p in student.parameters() if p.grad is not None])
    assert len(grads[0]) == len(grads[1]) > 0
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
