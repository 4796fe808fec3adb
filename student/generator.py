"""StreamingGenerator: an exported student that makes a video shot by shot while prompts arrive.

    gen = StreamingGenerator.from_export(folder)
    for frames in gen.next_shot("close-up: the red circle turns left"):   # uint8 [f, H, W, 3] per chunk
        ...
    for frames in gen.next_shot("wide: both circles meet"):               # conditions on its own history
        ...

`next_shot` checks its arguments at once and returns a generator; iterating it runs the shot chunk
by chunk (the student's few denoising steps, then the t = 0 pass that caches the chunk) and yields
each chunk's decoded frames as soon as they exist. A shot joins the history only when it is iterated
to the end; a shot abandoned part-way (generator closed, or a new shot started) is forgotten.

Text: the model's text is the global prompt's tokens ⊕ the shot prompt's tokens, zero-padded to
2·max_tokens, the layout the student was trained on (`T5TextEncoder.shot_text`).

History: at every shot start the global cache is rebuilt from frames of the generator's own finished
shots, picked by the student's context rule (`context_strategy`, budget `context_frames`), and the
local cache is cleared (student/sampling.py). With a temporal-factor-1 codec (PatchCodec) the picked
frames are the shot's latent frames; with Wan's VAE they are decoded pixel frames re-encoded one by
one as single-frame videos, as the teacher saw context in training. Per finished shot only the frames
the rule can ever pick are kept, and a shot the rule no longer picks is dropped for good (the rule
gives old shots fewer frames as history grows, never more), so memory and time per chunk stay
bounded however many shots are generated. When the rule picks more frames than the global cache
holds ("first"/"first_last" over a long history) the most recent ones are kept.

Ranked memory (`retrieval`, `memory_pack`; student/memory.py): each finished shot keeps its `budget`
evenly spaced candidate frames with their similarity features (oracle: the caption's world terms; clip:
image embeddings of the decoded frames), only the newest `max_candidates` over the stream, so memory
and time per chunk stay flat once that pool is full; every shot start scores the pool against the new
prompt and picks (or packs) as training did.

Shot positions: the picked shots are numbered 0, 1, … in time order and the new shot gets the next
number. While every finished shot is picked (always, for histories up to the budget under the
dynamic rule) this is exactly the shot index used in training; beyond that the shot-RoPE offsets
stay inside the range training saw instead of growing with the stream.

Reference images (FilmWeaver-style concept injection): each image is encoded as a one-frame clip
and placed in the global cache before the history frames, as the frames of a virtual shot −1 (its
temporal RoPE bands turn by the phase −θ, then the history continues with shot 0). Each
reference cross-attends to the global prompt ⊕ its own caption. References use global-cache slots,
so the history budget becomes `context_frames − len(references)`.

Chunk decoding: with a temporal factor of 1 each chunk decodes on its own. With Wan's causal VAE the
first chunk of a shot gives 1 + 4·(chunk − 1) frames; every later chunk is decoded together with the
shot's previous latent frame and that frame's output is dropped, giving 4·chunk frames. A shot of
k chunks therefore has 1 + tf·(k·chunk − 1) frames, the length the codec gives its latents.

Speed (`compile=`, student/compiled.py): "regions" compiles each block's FFN and norms, "compile" the
whole fixed-shape chunk pass, "cudagraph" (CUDA) also replays it as a CUDA graph and decodes chunk k
on a side stream while chunk k + 1 denoises (so chunk k + 1 is already running when chunk k's frames
are handed out). Frames equal eager up to float rounding.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from typing import Any, Iterator, Sequence

import torch

from student.folder import read_folder, verify_components
from student.context import Context, pick_context
from student.memory import MemoryRule
from student.model import CausalStudent
from student.sampling import ChunkStream
from teacher.context import candidate_frames, sample_context
from teacher.encoders import (DTYPES, Codec, PatchCodec, T5TextEncoder, WanVAECodec, pixels_from_uint8,
                              pixels_to_uint8)



@dataclass(frozen=True)
class VideoSettings:
    """Output geometry: frame size, frame rate and the default frames per shot (the training shot length)."""

    height: int
    width: int
    fps: float
    frames: int


@dataclass
class Reference:
    """A reference image (uint8 [H, W, 3] at the video's size) and the caption it is shown with."""

    image: torch.Tensor
    caption: str = ""


@dataclass
class _Shot:
    """What the generator remembers of a finished shot: its frame count (in the units the context
    rule counts), its model text, the latents [C, h, w] of the frames the rule may pick, and (ranked
    strategies, student/memory.py) those frames' similarity features."""

    frames: int
    caption: str
    text: torch.Tensor | None
    kept: dict[int, torch.Tensor] = field(default_factory=dict)
    features: dict[int, Any] = field(default_factory=dict)


def _value(desc: dict, name: str, key: str, source: str | os.PathLike):
    if key not in desc:
        raise ValueError(f"{source}: generator.json component {name!r} lacks {key!r}")
    return desc[key]


def load_components(components: dict[str, dict], source: str | os.PathLike, device: torch.device | str,
                    loaded: dict | None = None) -> tuple[Codec, T5TextEncoder, VideoSettings]:
    """The codec, text encoder and video settings an export's generator.json describes. `loaded` holds
    modules a diffusers pipeline already loaded ("vae", "text_encoder", "tokenizer"): they are used,
    in the described dtypes, instead of loading the described folders."""
    for name in ("codec", "text_encoder", "video"):
        if name not in components:
            raise ValueError(f"{source}: generator.json has no component {name!r}")
    codec_desc, text_desc, video = components["codec"], components["text_encoder"], components["video"]
    kind = _value(codec_desc, "codec", "kind", source)
    if kind == "patch":
        # folders written before latents were normalised hold no mean/std: the identity
        codec: Codec = PatchCodec(int(_value(codec_desc, "codec", "patch", source)),
                                  float(codec_desc.get("mean", 0.0)), float(codec_desc.get("std", 1.0)))
    elif kind == "wan":
        dtype = DTYPES[codec_desc.get("dtype", "float32")]
        codec = WanVAECodec(loaded["vae"].to(dtype=dtype)) if loaded else \
            WanVAECodec.from_pretrained(_value(codec_desc, "codec", "path", source), device=device, dtype=dtype)
    else:
        raise ValueError(f"{source}: codec kind {kind!r} is not 'patch' or 'wan'")
    if _value(text_desc, "text_encoder", "kind", source) != "umt5":
        raise ValueError(f"{source}: text_encoder must be a saved 'umt5' folder; got kind {text_desc['kind']!r}")
    max_tokens = int(_value(text_desc, "text_encoder", "max_tokens", source))
    dtype = DTYPES[text_desc.get("dtype", "float32")]
    text = T5TextEncoder(loaded["text_encoder"].to(dtype=dtype), loaded["tokenizer"], max_tokens) if loaded else \
        T5TextEncoder.from_pretrained(_value(text_desc, "text_encoder", "path", source), max_tokens, device=device,
                                      dtype=dtype)
    settings = VideoSettings(*(int(_value(video, "video", k, source)) for k in ("height", "width")),
                             float(_value(video, "video", "fps", source)),
                             int(_value(video, "video", "frames", source)))
    return codec, text, settings


def load_export(folder: str | os.PathLike, device: torch.device | str = "cpu", dtype: torch.dtype | None = None
                ) -> tuple[CausalStudent, Codec, T5TextEncoder, VideoSettings]:
    """The student (in eval mode), codec, text encoder and video settings of a student folder (a serving
    export or a stage's `student/`), its files verified against its records; no DeepSpeed. Generators
    built on these share them (the server's sessions do)."""
    info = read_folder(folder)
    verify_components(info)
    student = CausalStudent.from_pretrained(folder, torch_dtype=dtype).to(device).eval()
    codec, text, video = load_components(info.components, info.folder, device)
    return student, codec, text, video


class StreamingGenerator:
    """Shot-by-shot streaming generation with an exported causal student (see module doc)."""

    def __init__(self, student: CausalStudent, codec: Codec, text_encoder: T5TextEncoder, video: VideoSettings,
                 global_prompt: str = "", seed: int = 0, references: Sequence[Reference] = (), *,
                 compile: str = "none") -> None:
        self.student, self.codec, self.text_encoder, self.video = student.eval(), codec, text_encoder, video
        self.seed = seed
        param = next(student.parameters())
        self.device = param.device
        s, sf = student.settings, codec.spatial_factor
        if video.height % sf or video.width % sf:
            raise ValueError(f"video size {video.height}x{video.width} is not divisible by the codec's "
                             f"spatial factor {sf}")
        if codec.channels != student.latent_channels:
            raise ValueError(f"the codec makes {codec.channels} latent channels; the student expects "
                             f"{student.latent_channels}")
        if text_encoder.dim != student.transformer.config.text_dim:
            raise ValueError(f"the text encoder's width {text_encoder.dim} differs from the student's text_dim "
                             f"{student.transformer.config.text_dim}")
        self.latent_size = (video.height // sf, video.width // sf)
        student.backbone.check_latents("latents", torch.empty(1, codec.channels, s.chunk_frames, *self.latent_size))
        self.stream = ChunkStream(student, 1, *self.latent_size, compile=compile)
        # cudagraph: chunk k decodes on this stream while chunk k + 1 denoises (module doc)
        self.side = torch.cuda.Stream(self.device) if compile == "cudagraph" else None
        self.rng = torch.Generator(device=self.device)
        self.global_prompt = global_prompt
        self._epoch = 0
        self.references: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.history_budget = s.context_frames
        self.memory = MemoryRule.from_settings(s, device=self.device)  # None: a frame-count rule
        self.reset(references)

    @classmethod
    def from_export(cls, folder: str | os.PathLike, device: torch.device | str = "cpu",
                    dtype: torch.dtype | None = None, global_prompt: str = "", seed: int = 0,
                    references: Sequence[Reference] = (), *, compile: str = "none") -> "StreamingGenerator":
        """Load a student folder (a serving export or a stage's `student/`); no DeepSpeed. `compile`:
        none | regions | compile | cudagraph (student/compiled.py)."""
        student, codec, text, video = load_export(folder, device, dtype)
        return cls(student, codec, text, video, global_prompt=global_prompt, seed=seed, references=references,
                   compile=compile)

    # ---- state -----------------------------------------------------------------------------
    def reset(self, references: Sequence[Reference] | None = None) -> None:
        """Forget every shot and restart the noise from the seed; `references` replace the current
        ones (None keeps them). The cache buffers are reused."""
        if references is not None:
            self._set_references(references)
        self._epoch += 1  # a shot still being iterated is abandoned
        self.shots: list[_Shot] = []
        self.rng.manual_seed(self.seed)
        self.stream.cache.reset()

    def _set_references(self, references: Sequence[Reference]) -> None:
        capacity = self.student.settings.context_frames
        if len(references) >= capacity:
            raise ValueError(f"{len(references)} reference images leave no global-cache slot for the history "
                             f"(context_frames {capacity}); give at most {capacity - 1}")
        latents, texts = [], []
        for i, ref in enumerate(references):
            image = torch.as_tensor(ref.image)
            if image.dtype != torch.uint8 or tuple(image.shape) != (self.video.height, self.video.width, 3):
                raise ValueError(f"reference image {i} must be uint8 [{self.video.height}, {self.video.width}, 3]; "
                                 f"got {image.dtype} {list(image.shape)}")
            pixels = pixels_from_uint8(image.unsqueeze(0)).unsqueeze(0).to(self.device)
            latents.append(self.codec.encode(pixels)[0, :, 0].to(self.device))
            texts.append(self._model_text(ref.caption))
        self.references = list(zip(latents, texts))
        self.history_budget = capacity - len(self.references)

    # ---- text ------------------------------------------------------------------------------
    def _model_text(self, caption: str, before: Sequence[str] = ()) -> torch.Tensor:
        """[L, D]: the model text of `caption` after the shots `before`, in the training layout (the
        student's `caption_layout`: global prompt ⊕ caption, or the whole prompt so far as one string)."""
        layout = self.student.settings.caption_layout
        dtype = self.student.transformer.dtype  # a bf16 student takes bf16 text
        return self.text_encoder.prompt_text(layout, self.global_prompt, [*before, caption]).to(self.device, dtype)

    # ---- frame counts ------------------------------------------------------------------------
    def frames_for(self, chunks: int) -> int:
        """Output frames of a shot of `chunks` chunks."""
        return 1 + self.codec.temporal_factor * (chunks * self.student.settings.chunk_frames - 1)

    def chunks_for(self, num_frames: int) -> int:
        """Chunks of a shot of `num_frames` frames; ValueError unless it is a whole number of chunks."""
        tf, chunk = self.codec.temporal_factor, self.student.settings.chunk_frames
        latents, rest = divmod(num_frames - 1, tf)
        if num_frames < 1 or rest or (latents + 1) % chunk:
            valid = ", ".join(str(self.frames_for(k)) for k in (1, 2, 3))
            raise ValueError(f"num_frames {num_frames} is not a whole number of chunks ({chunk} latent frames "
                             f"each); valid frame counts: {valid}, ...")
        return (latents + 1) // chunk

    # ---- shots -------------------------------------------------------------------------------
    def next_shot(self, prompt: str, num_frames: int | None = None) -> Iterator[torch.Tensor]:
        """A generator of the next shot's frames, chunk by chunk (uint8 [f, H, W, 3] on the CPU);
        the shot continues the story from this generator's finished shots (see module doc)."""
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError("shot prompt is empty: every shot needs a description")
        chunks = self.chunks_for(self.video.frames if num_frames is None else num_frames)
        return self._shot(prompt, chunks)

    def _shot(self, prompt: str, chunks: int) -> Iterator[torch.Tensor]:
        """Run one shot; it joins the history only if it finishes while still the newest shot."""
        self._epoch += 1
        mine = self._epoch
        shot = _Shot(frames=self.frames_for(chunks), caption=prompt,
                     text=self._model_text(prompt, [s.caption for s in self.shots]))
        keep = set(candidate_frames(shot.frames, self.student.settings.context_strategy, self.history_budget))
        with torch.no_grad():  # not held across a yield: the caller's grad mode stays its own
            self.stream.begin_shot(shot.text.unsqueeze(0), self._context(prompt))
        pending: dict[int, torch.Tensor] = {}
        images: dict[int, torch.Tensor] = {}  # pixels of kept frames, for a scorer that looks at them
        looks = self.memory is not None and self.memory.similarity.needs_images
        offset = 0
        for index, (x0, pixels, frames, finite) in enumerate(self._chunks(chunks)):
            if not finite:  # NaN frames would be written as black
                culprit = "student" if not torch.isfinite(x0).all() else "decoder"
                raise FloatingPointError(
                    f"shot {len(self.shots) + 1}, chunk {index + 1}: the {culprit} produced non-finite values "
                    "(damaged weights, or an overflow in this dtype); nothing more is generated")
            source = x0[0] if self.codec.frames_are_latents else pixels
            for j in range(pixels.shape[1]):
                if offset + j in keep:
                    pending[offset + j] = source[:, j].clone()
                    if looks:
                        images[offset + j] = pixels[:, j].clone()
            offset += pixels.shape[1]
            yield frames
            if self._epoch != mine:
                raise RuntimeError("this shot was abandoned: a later next_shot() or reset() took over the stream")
        shot.kept = self._encode_kept(pending)
        if self.memory is not None:
            order = sorted(pending)
            features = self.memory.similarity.features(
                [prompt] * len(order), torch.stack([images[f] for f in order]) if looks else None)
            shot.features = dict(zip(order, features))
        self.shots.append(shot)
        self._forget_unreachable()

    def _chunks(self, chunks: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor, bool]]:
        """(x0, pixels [3, f, H, W], uint8 frames on the CPU, all finite) of each chunk of the shot begun."""
        if self.side is not None:
            yield from self._overlapped_chunks(chunks)
            return
        previous = None
        for _ in range(chunks):
            with torch.no_grad():
                x0 = self.stream.next_chunk(self.rng)
                pixels = self._decode(x0, previous)
            yield x0, pixels, *self._frames(pixels)
            previous = x0[:, :, -1:]

    def _overlapped_chunks(self, chunks: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor, bool]]:
        """`_chunks` on CUDA, chunk k decoded on the side stream while chunk k + 1 denoises on the
        current one. Chunk k + 1 is queued before chunk k's frames are copied to the CPU (a wait on
        the side stream only) and handed out; its noise draws come in the same order, so the frames
        are those of `_chunks`."""
        main, previous = torch.cuda.current_stream(self.device), None
        with torch.no_grad():
            x0 = self.stream.next_chunk(self.rng)
        for index in range(chunks):
            self.side.wait_stream(main)  # x0 was written on main
            with torch.no_grad(), torch.cuda.stream(self.side):
                pixels = self._decode(x0, previous)
            x0.record_stream(self.side)  # the allocator must not reuse x0 while the side stream reads it
            following = None
            if index + 1 < chunks:
                with torch.no_grad():
                    following = self.stream.next_chunk(self.rng)
            with torch.no_grad(), torch.cuda.stream(self.side):
                frames, finite = self._frames(pixels)  # waits for the side stream alone
            main.wait_stream(self.side)  # the caller's use of the pixels comes after the decode
            pixels.record_stream(main)
            yield x0, pixels, frames, finite
            previous, x0 = x0[:, :, -1:], following

    def _frames(self, pixels: torch.Tensor) -> tuple[torch.Tensor, bool]:
        """uint8 frames [f, H, W, 3] on the CPU, and whether every pixel is finite (NaN would be black)."""
        return pixels_to_uint8(pixels).cpu(), bool(torch.isfinite(pixels).all())

    def _decode(self, x0: torch.Tensor, previous: torch.Tensor | None) -> torch.Tensor:
        """Pixels [3, f, H, W] of a chunk; Wan's causal VAE continues from the shot's previous latent."""
        if self.codec.temporal_factor == 1 or previous is None:
            return self.codec.decode(x0)[0]
        return self.codec.decode(torch.cat([previous, x0], dim=2))[0][:, 1:]

    def _encode_kept(self, pending: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
        """Latents [C, h, w] of the kept frames; pixel frames are encoded one by one (Wan)."""
        if self.codec.frames_are_latents or not pending:
            return pending
        order = sorted(pending)
        with torch.no_grad():
            latents = self.codec.encode_frames(torch.stack([pending[f] for f in order], dim=1).unsqueeze(0))
        return {f: latents[0, :, i].to(self.device) for i, f in enumerate(order)}

    # ---- context -------------------------------------------------------------------------------
    def _picks(self) -> list[tuple[int, int]]:
        """(shot, frame) of the history frames the next shot sees, at most `history_budget` of them
        (ranked strategies: every candidate it may see)."""
        if self.memory is not None:
            return self._rule().candidates([s.frames for s in self.shots])
        return sample_context([s.frames for s in self.shots], self.student.settings.context_strategy,
                              self.history_budget, limit=self.history_budget)

    def _rule(self) -> MemoryRule:
        return replace(self.memory, budget=self.history_budget)

    def _memory_context(self, prompt: str) -> Context | None:
        """The ranked strategies' history: candidates scored against `prompt` (student/memory.py)."""
        candidates = self._picks()
        if not candidates:
            return None
        scores = self.memory.similarity.scores(prompt, [self.shots[k].features[f] for k, f in candidates])
        return self._rule().pick(candidates, scores, lambda k, f: self.shots[k].kept[f],
                                 lambda k: self.shots[k].text)

    def _context(self, prompt: str) -> Context | None:
        """The references, then the history frames the rule picks for `prompt` (batch of one), or None."""
        if self.memory is not None:
            history = self._memory_context(prompt)
        else:
                history = pick_context([s.frames for s in self.shots], self.student.settings.context_strategy,
                                   self.history_budget, lambda k, f: self.shots[k].kept[f],
                                   lambda k: self.shots[k].text, limit=self.history_budget, renumber=True)
        references = None
        if self.references:
            references = Context(torch.stack([lat for lat, _ in self.references], dim=1),
                                 torch.stack([text for _, text in self.references]),
                                 torch.full((len(self.references),), -1, dtype=torch.long, device=self.device))
        context = Context.cat([references, history])
        return context and Context.stack([context])

    def _forget_unreachable(self) -> None:
        """Drop the frames and text of shots the rule will never pick again (see module doc)."""
        picks = set(self._picks())
        used = {k for k, _ in picks}
        for k, shot in enumerate(self.shots):
            if k not in used:
                shot.kept, shot.text, shot.features = {}, None, {}
        if self.memory is not None:  # candidates only leave, oldest first: drop frames no longer candidates
            for k, shot in enumerate(self.shots):
                shot.kept = {f: x for f, x in shot.kept.items() if (k, f) in picks}
                shot.features = {f: x for f, x in shot.features.items() if f in shot.kept}

    def kept_tensors(self) -> int:
        """How many history tensors the generator holds (bounded; for tests and the benchmark)."""
        return sum(len(s.kept) + len(s.features) + (s.text is not None) for s in self.shots)
