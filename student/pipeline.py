"""ShotStreamPipeline: a serving export as a diffusers pipeline.

    from diffusers import DiffusionPipeline
    pipe = DiffusionPipeline.from_pretrained(export, trust_remote_code=True)
    story = pipe(["wide: a red circle moves left", "close-up: it turns right"], global_prompt="...", seed=0)
    story.frames                                    # one uint8 [f, H, W, 3] tensor per shot
    session = pipe.stream(global_prompt="...", seed=0)
    for frames in session.next_shot("wide: ..."):   # prompts one at a time, frames chunk by chunk
        ...

The pipeline wraps `StreamingGenerator` (student/generator.py), the one sampling loop: `stream` is a
StreamingGenerator over the pipeline's components, and a call runs its shots in order.

What a serving export holds for diffusers, written by `write_pipeline_files` from the student's
settings and generator.json's components (and recorded, like every file, in generator.json's
checksums), so the diffusers view never disagrees with ours:

- model_index.json: `_class_name` ["pipeline", "ShotStreamPipeline"], diffusers' form for a pipeline
  class it does not ship. The export's pipeline.py only imports this module from the installed
  package, but diffusers runs no code from a folder unasked: loading needs trust_remote_code=True.
  Components: transformer (`CausalStudentLoader`: the student through the one loader,
  `CausalStudent.from_pretrained`), scheduler, vae (a Wan codec only), text_encoder, tokenizer; and
  `student_components`, generator.json's codec / text encoder / video descriptions without paths.
- scheduler/scheduler_config.json: diffusers' FlowMatchEulerDiscreteScheduler with the student's
  shift, its denoising timesteps (before the shift) as `_student_timesteps` (diffusers keeps
  underscore keys without warning they are ignored). Every `stream` reads both from the scheduler:
  the student's own settings only seed the export, and a scheduler made with
  `FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config, shift=3.0)` changes the shift.

diffusers' WanPipeline refuses an export: `WanPipeline.from_pretrained(export)` stops at the custom
class (and, trusted, builds this pipeline instead), and `WanTransformer3DModel.from_pretrained` of
its transformer/ finds no config.json (student/folder.py).

dtypes, as `StreamingGenerator.from_export`: the transformer loads in the export's dtype unless
`torch_dtype` is given; the codec and text encoder run in the dtypes their descriptions name (diffusers
loads them in `torch_dtype` first: a lower one rounds their weights).
"""

import json
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

import torch
from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler, ModelMixin
from diffusers.utils import BaseOutput

from student.folder import read_folder, verify_components
from student.generator import Reference, StreamingGenerator, load_components
from student.model import CausalStudent
from student.settings import StudentSettings

MODEL_INDEX = "model_index.json"
PIPELINE_FILE = "pipeline.py"
SCHEDULER = "scheduler"
TIMESTEPS_KEY = "_student_timesteps"
# what the export's pipeline.py holds: the class comes from the installed package, never from the folder
PIPELINE_SOURCE = ('"""ShotStreamPipeline for diffusers: model_index.json names this file; the class lives in the '
                   'installed shotdistill package (pip install shotdistill)."""\n\n'
                   'from student.pipeline import ShotStreamPipeline  # noqa: F401\n')


class CausalStudentLoader(ModelMixin):
    """model_index.json's class for the `transformer` component. diffusers calls its from_pretrained
    with the export's transformer/ folder; it returns the `CausalStudent` of the folder around it
    (weights, indicator and settings by `CausalStudent.from_pretrained`), after checking the export's
    other files against generator.json as `StreamingGenerator.from_export` does. Never instantiated."""

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, torch_dtype: torch.dtype | None = None,
                        **options) -> CausalStudent:
        given = sorted(k for k in ("device_map", "max_memory", "offload_folder", "variant", "quantization_config")
                       if options.get(k) is not None)
        if given:  # accepted by diffusers for its own models; silently dropping them would mislead
            raise ValueError(f"the ShotStream student loads without {', '.join(given)}: load the pipeline, "
                             "then move it with pipe.to(device)")
        folder = Path(path).parent
        verify_components(read_folder(folder))
        return CausalStudent.from_pretrained(folder, torch_dtype=torch_dtype)


@dataclass
class ShotStreamPipelineOutput(BaseOutput):
    """frames: one uint8 tensor [f, H, W, 3] per shot, in prompt order."""

    frames: list[torch.Tensor]


class ShotStreamPipeline(DiffusionPipeline):
    """Multi-shot streaming text-to-video with a causal ShotStream student (see module doc)."""

    _optional_components = ["vae"]
    model_cpu_offload_seq = "text_encoder->transformer->vae"

    def __init__(self, transformer: CausalStudent, scheduler: FlowMatchEulerDiscreteScheduler,
                 text_encoder: torch.nn.Module, tokenizer, vae: torch.nn.Module | None = None,
                 student_components: dict | None = None) -> None:
        super().__init__()
        if not student_components:
            raise ValueError(f"ShotStreamPipeline needs student_components (the codec, text encoder and video "
                             f"descriptions of {MODEL_INDEX})")
        self.register_modules(transformer=transformer, scheduler=scheduler, text_encoder=text_encoder,
                              tokenizer=tokenizer, vae=vae)
        self.register_to_config(student_components=student_components)
        loaded = {"vae": vae, "text_encoder": text_encoder, "tokenizer": tokenizer}
        self._codec, self._text, self.video = load_components(student_components, MODEL_INDEX, "cpu", loaded)

    def student_settings(self) -> StudentSettings:
        """The student's settings with the denoising timesteps and shift the scheduler holds."""
        config = self.scheduler.config
        if config.get(TIMESTEPS_KEY) is None or config.get("use_dynamic_shifting"):
            raise ValueError(f"the scheduler must be a FlowMatchEulerDiscreteScheduler config with {TIMESTEPS_KEY} "
                             "(the student's denoising timesteps) and a fixed shift; make one with "
                             "FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config, ...)")
        return replace(self.transformer.settings, denoising_steps=[float(t) for t in config[TIMESTEPS_KEY]],
                       shift=float(config["shift"])).check()

    def stream(self, global_prompt: str = "", seed: int = 0, references: Sequence[Reference] = (), *,
               compile: str = "none") -> StreamingGenerator:
        """A new story: `next_shot(prompt)` yields each chunk's frames as it is generated. `compile`:
        none | regions | compile | cudagraph (StreamingGenerator, student/compiled.py)."""
        self.transformer.settings = self.student_settings()
        return StreamingGenerator(self.transformer, self._codec, self._text, self.video, global_prompt=global_prompt,
                                  seed=seed, references=references, compile=compile)

    @torch.no_grad()
    def __call__(self, prompts: Sequence[str], global_prompt: str = "", seed: int = 0, num_frames: int | None = None,
                 references: Sequence[Reference] = (), return_dict: bool = True, *, compile: str = "none"):
        """A story of one shot per prompt, each conditioned on the shots before it; num_frames per shot
        (default: the training shot length); `compile` as `stream`."""
        if isinstance(prompts, str) or not prompts:
            raise ValueError("prompts must be a list of shot prompts, one per shot")
        session = self.stream(global_prompt, seed, references, compile=compile)
        frames = [torch.cat(list(session.next_shot(prompt, num_frames))) for prompt in prompts]
        return ShotStreamPipelineOutput(frames=frames) if return_dict else (frames,)

    def save_pretrained(self, save_directory, *args, **kwargs) -> None:
        raise NotImplementedError("a ShotStream export is written by `shotdistill export RUN --out DIR` "
                                  "(generator.json, checksums and the diffusers files together)")


def _json(path: Path) -> dict:
    return json.loads(path.read_text())


def write_pipeline_files(folder: Path, settings: StudentSettings, components: dict[str, dict]) -> None:
    """model_index.json, pipeline.py and scheduler/ of a serving export being written in `folder`,
    whose components (descriptions as generator.json holds them) are already inside."""
    import diffusers

    scheduler = FlowMatchEulerDiscreteScheduler(shift=settings.shift)
    scheduler.register_to_config(**{TIMESTEPS_KEY: [float(t) for t in settings.denoising_steps]})
    scheduler.save_pretrained(str(folder / SCHEDULER))
    (folder / PIPELINE_FILE).write_text(PIPELINE_SOURCE)
    held = {"text_encoder": folder / "text_encoder" / "config.json",
            "tokenizer": folder / "tokenizer" / "tokenizer_config.json"}
    if components["codec"].get("kind") == "wan":
        held["vae"] = folder / "vae" / "config.json"
    for path in held.values():
        if not path.is_file():
            raise FileNotFoundError(f"{folder}: a serving export needs {path.relative_to(folder)} inside")
    index = {
        "_class_name": [Path(PIPELINE_FILE).stem, ShotStreamPipeline.__name__],
        "_diffusers_version": diffusers.__version__,
        "transformer": [__name__, CausalStudentLoader.__name__],
        "scheduler": ["diffusers", type(scheduler).__name__],
        "text_encoder": ["transformers", _json(held["text_encoder"])["architectures"][0]],
        "tokenizer": ["transformers", _json(held["tokenizer"])["tokenizer_class"]],
        "vae": ["diffusers", _json(held["vae"])["_class_name"]] if "vae" in held else [None, None],
        "student_components": {name: {k: v for k, v in desc.items() if k != "path"}
                               for name, desc in components.items()},
    }
    (folder / MODEL_INDEX).write_text(json.dumps(index, indent=2) + "\n")
