"""Shared builders for tests: a tiny random Wan transformer (2 layers, 2 heads) that builds in well under a second."""

from __future__ import annotations

from pathlib import Path

import torch


def tiny_wan_config(**overrides) -> dict:
    """Config of a 2-layer, 2-head WanTransformer3DModel with tiny dims (head dim 16 splits 8/4/4 for RoPE)."""
    config = dict(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=16,
        in_channels=4,
        out_channels=4,
        text_dim=24,
        freq_dim=32,
        ffn_dim=64,
        num_layers=2,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        eps=1e-6,
        rope_max_seq_len=64,
    )
    config.update(overrides)
    return config


def make_tiny_wan(folder: str | Path | None = None, seed: int = 0, **overrides):
    """Build a tiny random WanTransformer3DModel (saved as a diffusers folder when `folder` is given)."""
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    model = WanTransformer3DModel(**tiny_wan_config(**overrides))
    # Random, not default, values everywhere so that no parity test passes by symmetry.
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    model.eval()
    if folder is not None:
        model.save_pretrained(str(folder))
    return model


TEXT_DIM = tiny_wan_config()["text_dim"]


def student_inputs(frames: int, context_frames: int = 4, batch: int = 2, seed: int = 0, grad: bool = False):
    """Random (x, per-frame t, text, context, context_text) for the tiny Wan: the context holds two
    shots (2 frames, then the rest), so per-frame caption grouping is exercised."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, frames, 4, 4, generator=gen)
    context = torch.randn(batch, 4, context_frames, 4, 4, generator=gen)
    text = torch.randn(batch, 5, TEXT_DIM, generator=gen)
    shot_a, shot_b = torch.randn(2, batch, 1, 5, TEXT_DIM, generator=gen)
    context_text = torch.cat([shot_a.expand(-1, 2, -1, -1), shot_b.expand(-1, context_frames - 2, -1, -1)], 1)
    t = torch.rand(batch, frames, generator=gen) * 1000
    return x.requires_grad_(grad), t, text, context, context_text


def make_wan_root(root: str | Path, text_dim: int = 32, max_tokens: int = 32, ballast_mb: int = 64) -> Path:
    """A tiny random Wan2.1 diffusers root in the standard layout: model_index.json, transformer/,
    vae/ (AutoencoderKLWan), text_encoder/ (UMT5EncoderModel) and tokenizer/ (word-level, over the
    synthetic world's vocabulary), plus `ballast_mb` of a file no component loads, so that a copy of
    the whole root shows in any folder's size."""
    import json

    from diffusers import AutoencoderKLWan

    from distill.data.world import grammar_texts
    from teacher.encoders import build_tiny_t5, vocabulary_of

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
                     temperal_downsample=[False, True, True], latents_mean=[0.0] * 4,
                     latents_std=[1.0] * 4).save_pretrained(root / "vae")
    build_tiny_t5(vocabulary_of(grammar_texts()), text_dim, 1, 2, max_tokens, seed=0).save_pretrained(root)
    make_tiny_wan(root / "transformer", text_dim=text_dim, attention_head_dim=32)
    (root / "model_index.json").write_text(json.dumps({
        "_class_name": "WanPipeline", "transformer": ["diffusers", "WanTransformer3DModel"],
        "vae": ["diffusers", "AutoencoderKLWan"], "text_encoder": ["transformers", "UMT5EncoderModel"],
        "tokenizer": ["transformers", "PreTrainedTokenizerFast"]}))
    with open(root / "ballast.bin", "wb") as f:
        f.write(b"\0" * (ballast_mb << 20))
    return root


def folder_bytes(folder: str | Path) -> int:
    """Bytes of every file below `folder`."""
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())


SERVE_WORDS = ("a red blue green circle square triangle turns left right moves wide close-up both meet stays "
               "still").split()


def make_tiny_export(root: str | Path, frames: int = 9, seed: int = 0) -> Path:
    """A random student (chunk 3, local 2 chunks, global 4 frames) saved as a student folder with a
    PatchCodec, a tiny T5 and 16x16 video at 8 fps, `frames` frames per shot (for the server tests)."""
    from student.export import save_student
    from student.model import CausalStudent
    from teacher import NextShotTeacher
    from teacher.encoders import build_tiny_t5

    root = Path(root)
    build_tiny_t5(SERVE_WORDS, dim=24, layers=1, heads=2, max_tokens=8, seed=seed).save_pretrained(root / "t5")
    teacher = NextShotTeacher(make_tiny_wan(in_channels=12, out_channels=12, seed=seed))
    student = CausalStudent.from_teacher(teacher, chunk_frames=3, local_chunks=2, context_frames=4)
    components = {"codec": {"kind": "patch", "patch": 2},
                  "text_encoder": {"kind": "umt5", "path": str(root / "t5"), "max_tokens": 8},
                  "video": {"height": 16, "width": 16, "fps": 8, "frames": frames}}
    return save_student(student, root / "export", components)


class RunningServer:
    """An ASGI app served by uvicorn on 127.0.0.1 (a free port the OS picks) in a background thread:
    `with RunningServer(app) as server: httpx.get(server.url + "/health")`."""

    def __init__(self, app, startup_timeout: float = 60.0) -> None:
        import threading

        import uvicorn

        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, name="uvicorn-test", daemon=True)
        self.startup_timeout = startup_timeout

    def __enter__(self) -> "RunningServer":
        import time

        self.thread.start()
        deadline = time.monotonic() + self.startup_timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the test server did not start")
            time.sleep(0.01)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url, self.ws_url = f"http://127.0.0.1:{self.port}", f"ws://127.0.0.1:{self.port}"
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(30)


class Recorder(torch.nn.Module):
    """Calls the wrapped model and keeps the arguments of its last call (what a stage fed its engine)."""

    def __init__(self, module):
        super().__init__()
        self.module = module

    def forward(self, *args, **kwargs):
        self.args, self.kwargs = args, kwargs
        return self.module(*args, **kwargs)


def assert_stream_resumes(make_stream, same) -> list:
    """A DataStream restored from the state it had after 3 batches continues with exactly the batches an
    uninterrupted stream gives (`same(got, want)` compares two); returns the uninterrupted batches (2 epochs)."""
    first = make_stream()
    batches = [next(first) for _ in range(2 * len(first.dataset))]
    again = make_stream()
    for _ in range(3):
        next(again)
    resumed = make_stream()
    resumed.load_state_dict(again.state_dict())
    for want in batches[3:]:
        same(next(resumed), want)
    return batches


# a small synthetic world: 4 videos of 2+ shots of 8-9 frames, world seed 2
SMALL_WORLD = ("data.synth.videos=4", "data.synth.seed=2", "data.synth.min_shots=2", "data.synth.min_frames=8",
               "data.synth.max_frames=9", "logging.progress=false")


def make_prepared(root: Path, overrides=SMALL_WORLD) -> Path:
    """Shards of the synthetic world the default recipe with `overrides` describes, prepared under
    root/out (the world's videos under root/world)."""
    from distill.config import load_recipe
    from distill.data.components import synth_settings
    from distill.data.synth import synthesize
    from distill.stages.prepare import prepare
    from launch.data import default_recipe

    cfg = load_recipe(default_recipe(), list(overrides))
    prepare(cfg, synthesize(root / "world", synth_settings(cfg.data.synth)), root / "out", progress=False)
    return root / "out"


def stream_chunks(stream, x, t, text, context, grad: bool = False):
    """Every chunk of x [B, C, F, H, W] through a ChunkStream's cache at its own timesteps t [B, F], each
    committed at the same input (what the full-sequence forward sees); the velocities, concatenated."""
    stream.begin_shot(text, context, grad=grad)
    chunk, outs = stream.student.settings.chunk_frames, []
    for i in range(x.shape[2] // chunk):
        xi, ti = x[:, :, chunk * i:chunk * (i + 1)], t[:, chunk * i:chunk * (i + 1)]
        outs.append(stream.predict(xi, ti))
        stream.commit(xi, ti, grad=grad)
    return torch.cat(outs, dim=2)
