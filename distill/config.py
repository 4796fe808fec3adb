"""The recipe schema: every key a recipe may set, its type, default and a one-line doc.

A recipe is a YAML file validated against `Recipe` in omegaconf struct mode before any compute, so
a misspelled key, a wrong type or a missing mandatory value fails with the full key named (and
omegaconf's "Did you mean" hint) instead of passing silently. A recipe may extend another with
`base: other.yaml` (resolved relative to the recipe, chained, deep-merged, lists replaced);
command-line overrides are `key=value` dotlists applied last.

Keys are declared with `key(default, doc)` or `choice(default, options, doc)`; the doc travels in the
dataclass field metadata, `shotdistill config --docs` prints it, and a test checks that no key lacks
one. Stage-specific sections live beside the core ones at the end of this file.
"""

from __future__ import annotations

import dataclasses
import functools
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List

import yaml
from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from distill.data.world import CAPTION_MODES
from kernels.dispatch import BACKENDS
from student.settings import NEGATIVE_SCOPES, SIMILARITIES, StudentSettings
from teacher.context import CAPTION_LAYOUTS, STRATEGIES


class ConfigError(ValueError):
    """A recipe problem, reported as one line naming the file and/or the full key."""


def key(default: Any, doc: str) -> Any:
    """Declare a recipe key with its default (or MISSING) and its one-line doc."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"doc": doc})
    if dataclasses.is_dataclass(default) and isinstance(default, type):
        return field(default_factory=default, metadata={"doc": doc})
    return field(default=default, metadata={"doc": doc})


def choice(default: Any, options: tuple, doc: str) -> Any:
    """Declare a key whose value must be one of `options`."""
    return field(default=default, metadata={"doc": doc, "choices": tuple(options)})


def section(cls: type, doc: str) -> Any:
    """Declare a nested section."""
    return field(default_factory=cls, metadata={"doc": doc})


_STUDENT = StudentSettings()  # the student's own defaults (student/settings.py): the one place they live


# --------------------------------------------------------------------------- core sections


@dataclass
class RunConfig:
    name: str = key(MISSING, "run folder name: outputs go to <out>/<name>/")
    out: str = key("runs", "parent folder of run folders (relative to the working directory)")
    seed: int = key(0, "global seed: model init, data order, noise; each rank offsets it by its rank")
    dist_timeout: int = key(1800, "seconds a collective may wait: a dead rank fails the job, not hangs it")


@dataclass
class TrainConfig:
    steps: int = key(100, "optimizer steps of the stage (for DMD: critic steps)")
    micro_batch: int = key(1, "samples per rank per forward/backward")
    grad_accum: int = key(1, "micro-batches accumulated into one optimizer step")
    checkpoint_every: int = key(50, "save a checkpoint every N steps (and at the end)")
    keep_checkpoints: int = key(2, "how many committed checkpoints to keep (oldest deleted)")
    max_bad_steps: int = key(5, "bad steps (a non-finite or spiking loss or grad norm) within the last "
                             "train.bad_window steps that stop the run")
    bad_window: int = key(50, "steps over which bad steps are counted, and finite values per loss and grad "
                          "norm that a spike is judged against")
    spike_factor: float = key(100.0, "a loss or grad norm above this times the median of its last "
                              "train.bad_window values makes the step bad (a loss spike skips the update); 0: off")
    gradient_checkpointing: bool = key(False, "recompute block activations in backward to save memory")


@dataclass
class OptimConfig:
    lr: float = key(1e-4, "peak learning rate")
    betas: List[float] = key([0.9, 0.999], "AdamW betas (beta1, beta2)")
    weight_decay: float = key(0.0, "AdamW decoupled weight decay")
    eps: float = key(1e-8, "AdamW epsilon")
    warmup: int = key(0, "linear warmup steps from 0 to lr (counted in this model's updates)")
    decay: str = choice("none", ("none", "cosine", "linear"), "after warmup: constant lr, or decay to "
                        "min_lr x lr at the stage's last update of this model")
    min_lr: float = key(0.0, "decay floor as a fraction of lr")
    clip: float = key(1.0, "gradient-norm clip; 0 disables clipping")


@dataclass
class OptimSection:
    teacher: OptimConfig = section(OptimConfig, "optimizer of the teacher (teacher stage)")
    student: OptimConfig = section(OptimConfig, "optimizer of the student (causal init stage)")
    generator: OptimConfig = section(OptimConfig, "optimizer of the DMD generator (the student)")
    critic: OptimConfig = section(OptimConfig, "optimizer of the DMD critic (fake score)")
    dpo: OptimConfig = section(OptimConfig, "optimizer of the model under preference alignment (dpo, dpo_student)")


@dataclass
class DeepSpeedConfig:
    zero_stage: int = choice(2, (0, 1, 2, 3), "ZeRO stage of every trained engine")
    offload_optimizer: bool = key(False, "ZeRO-2/3: keep optimizer states in CPU memory")
    offload_params: bool = key(False, "ZeRO-3: keep parameters in CPU memory")
    bf16: bool = key(True, "bf16 mixed precision on GPU (CPU always trains in fp32)")
    reduce_bucket_size: int = key(50_000_000, "elements per gradient reduce bucket")
    allgather_bucket_size: int = key(50_000_000, "elements per ZeRO-2 all-gather bucket")
    prefetch_bucket_size: int = key(50_000_000, "ZeRO-3: elements prefetched ahead of use")
    param_persistence_threshold: int = key(100_000, "ZeRO-3: params smaller than this stay whole")
    frozen_zero3: bool = key(False, "partition frozen models (teacher/real score) with ZeRO-3 too")


@dataclass
class LoggingConfig:
    every: int = key(10, "log scalars to TensorBoard every N steps")
    tensorboard: bool = key(True, "write TensorBoard events under <run>/tb/<stage>/")
    progress: bool = key(True, "show a progress bar on rank 0")


# --------------------------------------------------------------------------- data (distill/data)


@dataclass
class ContextNoiseConfig:
    shot: List[float] = key([0.0, 0.0], "[lo, hi]: during teacher and DMD-critic training every context (shot "
                            "memory) frame is noised at its own t ~ U[lo, hi] and runs at that t (FilmWeaver: "
                            "100-400); [0, 0]: clean context at t = 0, no draw (distill/context_noise.py)")


@dataclass
class NegativeContextConfig:
    p: float = key(0.0, "probability a teacher / dmd_intra sample gets frames of another record as an extra "
                   "history shot at a random place in its context (FilmWeaver's negative sampling; 0: off)")
    frames: int = key(1, "most frames of that irrelevant shot, evenly spaced (distill/data/negatives.py)")


@dataclass
class ReferencesConfig:
    p: float = key(0.0, "probability a teacher / dmd_intra sample's context starts with crops of its target "
                   "shot's own characters as references (virtual shot -1, as at inference; 0: off, and prepare "
                   "stores none; distill/data/references.py)")
    max: int = key(1, "most references per sample (each takes a context slot; one is always left for history)")


@dataclass
class SimilarityConfig:
    kind: str = choice(_STUDENT.similarity, SIMILARITIES, "how history frames are ranked against a new shot's "
                       "prompt: oracle (the synthetic world's caption facts) or clip (student/memory.py)")
    path: str = key(_STUDENT.similarity_path, "clip: a local folder holding a transformers CLIPModel and its "
                    "tokenizer")


@dataclass
class ContextConfig:
    strategy: str = choice(_STUDENT.context_strategy, STRATEGIES,
                           "which history frames condition a shot (teacher/context.py; retrieval / memory_pack: "
                           "student/memory.py)")
    budget: int = key(_STUDENT.context_frames, "dynamic strategy: context frames taken from the history "
                      "shots (the student's global cache size)")
    similarity: SimilarityConfig = section(SimilarityConfig, "the scorer of the retrieval and memory_pack "
                                           "strategies")
    pack_frames: int = key(_STUDENT.pack_frames, "memory_pack: latent frames the ranked history is tiled into "
                           "(the j-th frame at area 1/2^j for 2)")
    max_candidates: int = key(_STUDENT.max_candidates, "retrieval / memory_pack: newest candidate frames kept "
                              "(bounds the generator's memory)")
    noise: ContextNoiseConfig = section(ContextNoiseConfig, "asymmetric context noise against copy-paste "
                                        "(training only; generation keeps clean context)")
    negative: NegativeContextConfig = section(NegativeContextConfig, "negative context: irrelevant frames "
                                              "mixed into training histories")
    references: ReferencesConfig = section(ReferencesConfig, "trained references: character crops as "
                                           "reference images in training contexts")


@dataclass
class SynthConfig:
    videos: int = key(16, "synthetic videos to render")
    seed: int = key(0, "seed of the synthetic world (video i is a pure function of seed and i)")
    height: int = key(64, "rendered frame height in pixels")
    width: int = key(64, "rendered frame width in pixels")
    fps: int = key(8, "frame rate of the rendered mp4 files")
    min_shots: int = key(2, "fewest shots per video")
    max_shots: int = key(5, "most shots per video")
    min_frames: int = key(8, "fewest frames per shot")
    max_frames: int = key(24, "most frames per shot")
    max_cast: int = key(3, "most characters per video (1 to 3)")
    speed: float = key(1.0, "character speed in pixels per frame at wide framing")
    sprite_scale: float = key(1.0, "character radius multiplier (small frames need larger sprites to keep shapes legible)")
    captions: str = choice("full", CAPTION_MODES, "full: every caption names every fact; memory: only the first "
                           "shot names colours and background, later ones shapes and motions (distill/data/world.py)")


@dataclass
class DataConfig:
    manifest: str = key("", "JSONL manifest of multi-shot videos; '' renders the synthetic world "
                        "(data.synth) into <prepare folder>/world/ first")
    prepared: str = key("", "folder of prepared shards; '' = <run.out>/<run.name>/prepare")
    height: int = key(64, "frame height after resize + centre crop (Wan: 480)")
    width: int = key(64, "frame width after resize + centre crop (Wan: 832)")
    fps: float = key(8.0, "frame rate shots are resampled to (Wan: 16)")
    shot_frames: int = key(12, "most pixel frames of a training shot, aligned to the codec (1 + 4k for Wan); a "
                           "shorter shot keeps its own length cut to whole student chunks (at least one)")
    long_shots: str = choice("truncate", ("truncate", "stride"), "a shot longer than data.shot_frames keeps its first frames "
                             "(truncate) or every k-th frame, k the smallest stride that fits (stride: the release)")
    records_per_shard: int = key(8, "manifest records per safetensors shard")
    latent_dtype: str = choice("float32", ("float32", "bfloat16", "float16"),
                               "dtype of latents and text embeddings stored in shards")
    context: ContextConfig = section(ContextConfig, "context-frame sampling (teacher and student caches)")
    synth: SynthConfig = section(SynthConfig, "the synthetic sprite world (`shotdistill data synth`)")


@dataclass
class CodecConfig:
    kind: str = choice("patch", ("patch", "wan"), "patch: lossless space-to-depth (tiny world); "
                       "wan: AutoencoderKLWan from codec.path")
    path: str = key("", "wan: the VAE folder (or a Wan diffusers root holding vae/)")
    patch: int = key(2, "patch: pixels per latent pixel along each side")
    mean: float = key(0.0, "patch: latents are (pixel - mean) / std, pixels in [-1, 1] (the world's mean pixel)")
    std: float = key(1.0, "patch: the pixels' standard deviation, so latents have unit variance like the noise")
    dtype: str = choice("float32", ("float32", "bfloat16"), "wan: compute dtype of the VAE")


@dataclass
class TextEncoderConfig:
    kind: str = choice("tiny_t5", ("tiny_t5", "umt5"), "tiny_t5: random word-level UMT5 built from "
                       "these keys; umt5: UMT5 encoder + tokenizer from text_encoder.path")
    path: str = key("", "umt5: a folder holding text_encoder/ and tokenizer/ (a Wan diffusers root)")
    max_tokens: int = key(32, "tokens per caption (Wan: 512); the model's text is global + shot, "
                          "2 x max_tokens long, zero-padded")
    caption_layout: str = choice("separate", CAPTION_LAYOUTS, "a shot's model text: separate = global and shot "
                                 "captions each encoded (ours, with teacher.captions: multi); joint = one string "
                                 "'<global> shot0: <c0> shot1: ...' up to the shot, as the official teacher was "
                                 "trained (needs teacher.captions: target_only)")
    dim: int = key(32, "tiny_t5: width d_model (= the transformer's text_dim)")
    layers: int = key(2, "tiny_t5: encoder layers")
    heads: int = key(2, "tiny_t5: attention heads")
    seed: int = key(0, "tiny_t5: seed of its random weights (fixed so shards are reproducible)")
    dtype: str = choice("float32", ("float32", "bfloat16"), "umt5: compute dtype of the encoder")


# --------------------------------------------------------------------------- model and teacher


@dataclass
class ModelConfig:
    path: str = key("", "a Wan2.1 diffusers root or its transformer/ folder; '' builds a random Wan "
                    "from the keys below (in_channels from the codec, text_dim from the text encoder)")
    patch_size: List[int] = key([1, 2, 2], "random Wan: (frames, height, width) latents per token")
    heads: int = key(2, "random Wan: attention heads")
    head_dim: int = key(32, "random Wan: width of one head (model width = heads x head_dim)")
    ffn_dim: int = key(256, "random Wan: feed-forward hidden width")
    layers: int = key(2, "random Wan: transformer blocks")
    freq_dim: int = key(64, "random Wan: sinusoidal timestep embedding width")
    attention: str = choice("auto", BACKENDS, "self-attention backend of teacher and student (kernels/dispatch.py): "
                            "auto = FlexAttention on CUDA unless Triton was measured >=10% faster, SDPA on CPU; a "
                            "student with student.local_compression runs its pooled attention in SDPA whatever this says")


@dataclass
class TeacherConfig:
    injection: str = choice("frame_concat", ("frame_concat", "channel_concat"),
                            "how context latents enter the teacher (teacher/model.py)")
    captions: str = choice("multi", ("multi", "target_only"),
                           "multi: context frames attend to their own shot text; target_only: all use the target's")
    positions: str = choice("shot_rope", ("shot_rope", "sequential"),
                            "shot_rope: every temporal RoPE band of shot k's frames turns by the phase k*theta "
                            "(ShotStream); sequential: frame positions alone (Table 4's 'no indicator')")
    theta: float = key(1.0 / 6.0, "shot RoPE phase per shot, in radians (ShotStream: 1/6)")
    trainable: str = choice("self_attention", ("self_attention", "all"),
                            "parameters trained: the blocks' self-attention only, or everything")
    context_timestep: str = choice("zero", ("zero", "target"), "the clean context tokens' timestep: 0 (ours) or the "
                                   "target's (the official ShotStream teacher's convention)")
    context_dropout: float = key(0.1, "probability a micro-batch trains without its context")
    text_dropout: float = key(0.1, "probability a sample trains with every frame's text zeroed (the official "
                              "release: 10%), the unconditional branch CFG needs in ODE pairs and DMD")
    timestep_shift: float = key(1.0, "shift applied to the uniformly drawn training timesteps")
    loss_buckets: int = key(4, "timestep strata; the loss of each is logged as teacher/loss_t<lo>-<hi>")
    eval_samples: int = key(4, "next shots sampled at the end for the colour-consistency metric (0: none)")
    ema_decay: float = key(0.0, "EMA decay of the teacher's trainable weights (0: off); the EMA is what is saved")
    ema_start: int = key(0, "step at which the teacher's EMA starts as a copy of the weights")


@dataclass
class SamplerConfig:
    steps: int = key(50, "Euler steps of teacher sampling")
    shift: float = key(5.0, "timestep shift of the sampling schedule")
    guidance_scale: float = key(5.0, "classifier-free guidance scale (1: conditional only)")
    negative_prompt: str = key("", "caption whose embedding is the unconditional branch of CFG ('': zeros, the "
                               "embedding text dropout trains)")
    negative_scope: str = choice("all", NEGATIVE_SCOPES, "the unconditional branch's text replaces every frame's, "
                                 "context frames' too (all: the official release) or only the target's (target)")


# --------------------------------------------------------------------------- student, ODE pairs, causal init


@dataclass
class StudentConfig:
    chunk_frames: int = key(_STUDENT.chunk_frames, "latent frames per chunk the student denoises together "
                            "(ShotStream: 3)")
    local_chunks: int = key(_STUDENT.local_chunks, "chunks of the current shot in the local KV cache; training "
                            "attends to local_chunks + 1 chunks, what the cache holds at inference")
    local_compression: List[int] = key(_STUDENT.local_compression, "compressed local memory (FilmWeaver): a "
                                       "spatial pooling kernel per past local chunk, newest first, each dividing the "
                                       "next (e.g. [1, 2, 4]: whole, x4, x16 fewer tokens); [] keeps them whole")
    indicator: str = choice("auto", ("auto", "rope_offset", "learnable", "none"),
                            "shot-boundary indicator (student/model.py); auto follows teacher.positions")
    denoising_steps: List[float] = key(_STUDENT.denoising_steps, "the student's few-step timesteps, before "
                                       "the shift")
    shift: float = key(_STUDENT.shift, "shift warping student.denoising_steps (1000, 750, 500, 250 -> 1000, "
                        "937.5, 833.3, 625 at 5)")


@dataclass
class OdeConfig:
    pairs: int = key(5000, "teacher trajectories to sample (ShotStream: 5k); pair i is a pure function "
                     "of (run.seed, i)")
    pairs_per_shard: int = key(16, "pairs per safetensors shard: the unit of work split over ranks and of resume")
    steps: int = key(50, "Euler steps of the teacher's sampler")
    shift: float = key(8.0, "timestep shift of the sampling schedule (public ODE-pair code: 8)")
    guidance_scale: float = key(5.0, "ordinary CFG scale against sampler.negative_prompt (1: conditional only)")
    teacher_from: str = key("teacher", "stage folder (listed in `needs:`) whose trained teacher samples the pairs")
    dtype: str = choice("bfloat16", ("bfloat16", "float16", "float32"), "dtype of the tensors stored in shards")


@dataclass
class CausalInitConfig:
    text_dropout: float = key(0.0, "probability a pair trains with every frame's text zeroed (as "
                              "teacher.text_dropout); "
                              "off by default: the targets are the teacher's guided, conditional samples")
    clean_level: bool = key(True, "a chunk may also draw t = 0: the clean latent as input, no loss (the official "
                            "[1000, 740, 500, 260, 0] lists): the student meets clean history, what its cache holds")
    teacher_from: str = key("teacher", "stage folder (listed in `needs:`) whose trained teacher the student starts as")
    pairs_from: str = key("ode-pairs", "stage folder (listed in `needs:`) whose ODE pairs the student regresses")
    eval_pairs: int = key(8, "ODE pairs the student samples (cached steps, re-noised with the pair's own "
                          "noise; all steps and the first alone) before and after training; the mean squared "
                          "distances to the teacher's end points are reported (0: none)")


# --------------------------------------------------------------------------- DMD (Self Forcing)


@dataclass
class DMDConfig:
    generator_from: str = key("causal-init", "folder (in this run, listed in `needs:`) whose student/ export "
                              "starts the generator: causal-init for stage 1, dmd-intra for stage 2")
    teacher_from: str = key("teacher", "folder (listed in `needs:`) whose model/ is the real score and the "
                            "critic's starting point")
    generator_every: int = key(5, "update the generator on steps where step % N == 0 (critic: every step); "
                               "train.steps counts critic steps")
    guidance: float = key(3.0, "real-score guidance in the DMD2 convention cond + g*(cond - uncond): "
                          "0 = conditional only, 3 = ordinary CFG scale 4; uncond = sampler.negative_prompt")
    timestep_shift: float = key(5.0, "shift applied to the uniform DMD / critic timesteps")
    min_t: float = key(20.0, "DMD / critic timesteps are clamped to [min_t, max_t]")
    max_t: float = key(980.0, "upper clamp of DMD / critic timesteps")
    ema_decay: float = key(0.0, "generator EMA decay (0: off); the EMA weights are what gets exported")
    ema_start: int = key(200, "step at which the EMA is initialised from the generator")
    shots: int = key(5, "dmd_inter: shots per caption-only rollout (records with fewer are skipped)")
    context_from: str = choice("reencode", ("reencode", "latents"),
                               "dmd_inter: global cache frames from generated shots decoded and re-encoded one "
                               "frame at a time (as the teacher saw context), or latent frames taken directly")
    score_context: str = choice("generated", ("generated", "ground_truth"),
                                "context the real score and critic see: the generator's own (generated "
                                "history in dmd_inter) or the record's ground-truth history frames")
    sample_every: int = key(0, "write a sample rollout as an animated GIF image summary every N steps (0: never)")
    eval_videos: int = key(4, "multi-shot prompts rolled out by the student (before/after) and by the "
                           "teacher for the colour-consistency metric (0: none)")


@dataclass
class LoraConfig:
    rank: int = key(0, "LoRA rank on the generator and critic (peft); 0 trains full weights")
    alpha: float = key(16.0, "LoRA alpha (scale alpha / rank)")
    targets: List[str] = key(["to_q", "to_k", "to_v", "to_out.0"],
                             "module names (suffixes) that get LoRA adapters: Wan attention projections")


# --------------------------------------------------------------------------- preference alignment (distill/stages/dpo.py)


@dataclass
class DPOConfig:
    teacher_from: str = key("teacher", "stage folder (listed in `needs:`) whose teacher is the policy's start "
                            "and the frozen reference (stage dpo)")
    student_from: str = key("causal-init", "stage folder (listed in `needs:`) whose student is the policy's start "
                            "and the frozen reference (stage dpo_student)")
    beta: float = key(500.0, "Diffusion-DPO beta on the per-sample mean squared velocity errors (distill/dpo.py)")
    pairs: List[str] = key(["other_record", "wrong_shot"], "loser sources, one drawn per pair: other_record = a "
                           "shot of another record, wrong_shot = another shot of the same record (a wrong "
                           "transition), manifest = the shot's own `rejected` clip given in the manifest; the "
                           "winner is the true next shot")
    timestep_shift: float = key(1.0, "shift applied to the uniform timesteps (winner and loser share t and noise)")


# --------------------------------------------------------------------------- evaluation (distill/stages/eval.py)


@dataclass
class FeaturesConfig:
    kind: str = choice("none", ("none", "clip", "dino"), "learned-feature consistency (distill/eval/features.py): "
                       "clip = CLIPVisionModel, dino = Dinov2Model, from eval.features.path")
    path: str = key("", "a local transformers folder: the model (config.json + weights) and its image processor")
    batch: int = key(32, "frames per forward pass of the feature model")


@dataclass
class EvalConfig:
    export: str = key("", "export folder to evaluate; '' = the run's export/, else its newest finished "
                      "student (exported into the stage folder)")
    prompts: str = key("", "JSONL of {global_caption, shots: [{caption}], facts?}; '' = the prepared records")
    videos: int = key(4, "prompts evaluated: the first N (0: all)")
    stages: List[str] = key([], "stage folders of the run also evaluated, each on the same prompts and seeds "
                            "(students exported, the teacher sampled shot by shot); unfinished ones are "
                            "skipped with the reason (distill/eval/stages.py)")
    dtype: str = choice("float32", ("float32", "bfloat16", "float16"), "dtype the student generates in")
    cut_ratio: float = key(3.0, "a cut's label change must be this many times the median change beside it")
    cut_min_change: float = key(0.01, "fraction of pixels whose palette label must change at a cut")
    cut_window: int = key(2, "frames on each side whose median change a cut is compared with")
    cut_tolerance: int = key(1, "a detected cut within this many frames of a true cut counts as correct")
    motion_tolerance: float = key(0.25, "centroid speed (pixels per frame) below which a character is still")
    features: FeaturesConfig = section(FeaturesConfig, "CLIP/DINO feature consistency for real footage")


# --------------------------------------------------------------------------- the recipe


@dataclass
class Recipe:
    stage: str = key(MISSING, "what this recipe runs: a stage name (see `shotdistill config --stages`), "
                     "'pipeline', or 'package.module:Class' for a custom stage")
    needs: List[str] = key([], "recipes (relative to this one) whose stage outputs this stage reads; "
                      "each is run first when its output is missing")
    pipeline: List[str] = key([], "stage: pipeline — recipes (relative to this one) run in order")
    resume: str = key("auto", "auto (newest committed checkpoint) | never | a checkpoint folder path | force: as "
                      "auto, and reuse a finished stage or resume a checkpoint that was made with other settings "
                      "(its recorded fingerprint differs; the differences are logged) instead of stopping")
    overrides: List[str] = key([], "key=value overrides applied to this recipe and to every recipe it needs "
                               "or pipelines (an ablation changing upstream stages); the command line's win")
    run: RunConfig = section(RunConfig, "run identity and seed")
    train: TrainConfig = section(TrainConfig, "training loop of the stage")
    optim: OptimSection = section(OptimSection, "one optimizer per trained model")
    deepspeed: DeepSpeedConfig = section(DeepSpeedConfig, "DeepSpeed engines (the JSON is derived from it)")
    logging: LoggingConfig = section(LoggingConfig, "TensorBoard and progress output")
    data: DataConfig = section(DataConfig, "videos, preparation, datasets and context frames")
    codec: CodecConfig = section(CodecConfig, "pixels <-> latents (teacher/encoders.py)")
    text_encoder: TextEncoderConfig = section(TextEncoderConfig, "captions -> token embeddings")
    model: ModelConfig = section(ModelConfig, "the Wan transformer every model starts from (distill/models.py)")
    teacher: TeacherConfig = section(TeacherConfig, "next-shot teacher training (distill/stages/teacher.py)")
    sampler: SamplerConfig = section(SamplerConfig, "teacher sampling (evaluation; ODE pairs read its negative_prompt)")
    student: StudentConfig = section(StudentConfig, "the causal student (ODE pairs, causal init, DMD)")
    ode: OdeConfig = section(OdeConfig, "teacher ODE trajectories for the causal init (distill/stages/ode_pairs.py)")
    causal_init: CausalInitConfig = section(CausalInitConfig, "regression of the student on ODE pairs "
                                            "(distill/stages/causal_init.py)")
    dmd: DMDConfig = section(DMDConfig, "Self Forcing DMD, stages dmd_intra / dmd_inter (distill/stages/dmd.py)")
    lora: LoraConfig = section(LoraConfig, "LoRA adapters of the DMD generator and critic (dmd_inter)")
    dpo: DPOConfig = section(DPOConfig, "Diffusion-DPO preference alignment of the teacher or a student "
                             "(distill/stages/dpo.py)")
    eval: EvalConfig = section(EvalConfig, "evaluation of the newest student export (distill/stages/eval.py)")


# --------------------------------------------------------------------------- loading


def read_yaml(path: Path) -> dict:
    from teacher.files import read_text

    try:
        text = read_text(path, "recipe")
    except (OSError, ValueError) as e:
        raise ConfigError(str(e)) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
        what = " ".join(filter(None, (getattr(e, "problem", None), getattr(e, "context", None))))
        raise ConfigError(f"{where}: invalid YAML: {what or str(e).splitlines()[0]}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a recipe must be a mapping of keys, got {type(data).__name__}")
    return data


def _merge(base: dict, top: dict) -> dict:
    """Deep-merge mappings; lists and scalars in `top` replace those in `base`."""
    out = dict(base)
    for k, v in top.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def read_recipe_chain(path: str | Path, _seen: tuple = ()) -> dict:
    """The recipe at `path` with its `base:` chain merged under it (plain data, not validated)."""
    path = Path(path).resolve()
    if path in _seen:
        raise ConfigError(f"{path}: 'base' chain loops back to itself")
    data = read_yaml(path)
    base = data.pop("base", None)
    if base is None:
        return data
    if not isinstance(base, str):
        raise ConfigError(f"{path}: 'base' must be a recipe path, got {base!r}")
    return _merge(read_recipe_chain(path.parent / base, _seen + (path,)), data)


def _one_line(e: OmegaConfBaseException) -> str:
    """omegaconf's message without its object_type lines, keeping full_key and the hint."""
    msg = str(e).splitlines()[0].strip()
    full_key = getattr(e, "full_key", None)
    return f"{full_key}: {msg}" if full_key else msg


@functools.lru_cache(maxsize=1)
def schema() -> DictConfig:
    """The read-only structured schema; built once per process (merging copies it, never changes it)."""
    cfg = OmegaConf.structured(Recipe)
    OmegaConf.set_struct(cfg, True)
    OmegaConf.set_readonly(cfg, True)
    return cfg


def load_recipe(path: str | Path, overrides: list[str] = ()) -> DictConfig:
    """Load, merge, override and validate a recipe; raise ConfigError with one line on any problem."""
    path = Path(path)
    data = read_recipe_chain(path)
    cfg = schema()
    try:
        cfg = OmegaConf.merge(cfg, OmegaConf.create(data))
        OmegaConf.set_readonly(cfg, False)  # the copy inherits the cached schema's flag
        _mark_missing(cfg, data)
    except OmegaConfBaseException as e:
        raise ConfigError(f"{path}: {_one_line(e)}") from None
    cfg = _apply_overrides(cfg, list(overrides))
    validate(cfg, source=str(path))
    OmegaConf.set_readonly(cfg, True)
    return cfg


def _apply_overrides(cfg: DictConfig, overrides: list[str]) -> DictConfig:
    """Merge `key=value` overrides in one pass (every merge copies the whole tree); when that fails,
    merge them one at a time so the error names the override at fault."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value")
    if not overrides:
        return cfg
    try:
        return OmegaConf.merge(cfg, OmegaConf.from_dotlist(overrides))
    except OmegaConfBaseException:
        pass
    for item in overrides:
        try:
            cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist([item]))
        except OmegaConfBaseException as e:
            raise ConfigError(f"override {item!r}: {_one_line(e)}") from None
    return cfg


def _mark_missing(cfg: DictConfig, data: dict, prefix: str = "") -> None:
    """Re-apply the recipe's '???' values: a merge keeps the schema default where the source is
    missing, which would silently turn a recipe's mandatory key into the default."""
    for k, v in data.items():
        if isinstance(v, dict):
            _mark_missing(cfg, v, f"{prefix}{k}.")
        elif v == MISSING:
            OmegaConf.update(cfg, f"{prefix}{k}", MISSING, merge=False)


def validate(cfg: DictConfig, source: str = "recipe") -> None:
    """Missing values, choices and interpolations, checked over the whole tree before any compute."""
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise ConfigError(f"{source}: missing mandatory value for {', '.join(missing)}")
    try:
        OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except OmegaConfBaseException as e:
        raise ConfigError(f"{source}: {_one_line(e)}") from None
    for full_key, value, meta in _walk(Recipe, cfg):
        options = meta.get("choices")
        if options is not None and value not in options:
            raise ConfigError(
                f"{source}: {full_key}: {value!r} is not one of {', '.join(map(str, options))}")
    for full_key, value, lowest, strict in _ranged(cfg):
        if value < lowest or (strict and value == lowest):
            raise ConfigError(f"{source}: {full_key}={value!r} must be {'>' if strict else '>='} {lowest}")
    if cfg.data.manifest and Path(cfg.data.manifest).is_dir():
        raise ConfigError(f"{source}: data.manifest={cfg.data.manifest!r} is a folder: name the manifest file "
                          "in it (e.g. manifest.jsonl)")
    check_run_name(cfg.run.name, source)


# Ranges the types cannot say, checked before any compute: (key, lowest value, lowest excluded);
# `*` stands for every section (`optim.*.lr`: the lr of every optimizer). Training stages also need
# train.steps >= 1 (distill/runner.py); a stage checks its own section's relations (ode.*, eval.*).
RANGES = (
    ("train.steps", 0, False), ("train.micro_batch", 1, False), ("train.grad_accum", 1, False),
    ("train.checkpoint_every", 1, False), ("train.keep_checkpoints", 1, False), ("train.max_bad_steps", 1, False),
    ("logging.every", 1, False),
    ("optim.*.lr", 0, False), ("optim.*.weight_decay", 0, False), ("optim.*.eps", 0, True),
    ("optim.*.warmup", 0, False), ("optim.*.clip", 0, False), ("optim.*.min_lr", 0, False),
    ("data.height", 1, False), ("data.width", 1, False), ("data.fps", 0, True), ("data.shot_frames", 1, False),
    ("data.records_per_shard", 1, False),
    ("data.synth.videos", 1, False), ("data.synth.height", 1, False), ("data.synth.width", 1, False),
    ("data.synth.fps", 1, False), ("data.synth.min_shots", 1, False), ("data.synth.min_frames", 1, False),
    ("codec.patch", 1, False), ("codec.std", 0, True), ("text_encoder.max_tokens", 1, False),
    ("model.heads", 1, False), ("model.head_dim", 1, False), ("model.ffn_dim", 1, False), ("model.layers", 1, False),
    ("model.freq_dim", 1, False), ("sampler.steps", 1, False), ("student.chunk_frames", 1, False),
    ("dmd.generator_every", 1, False), ("lora.rank", 0, False),
)


def _ranged(cfg: DictConfig):
    """(full key, value, lowest, strict) for every key RANGES names in `cfg`."""
    for pattern, lowest, strict in RANGES:
        head, _, tail = pattern.partition(".*.")
        keys = [f"{head}.{name}.{tail}" for name in cfg[head]] if tail else [pattern]
        for full_key in keys:
            yield full_key, OmegaConf.select(cfg, full_key), lowest, strict


def check_run_name(name: str, source: str = "recipe") -> None:
    """run.name is one path component: a run folder always lies directly inside run.out."""
    if name in ("", ".", "..") or any(c in name for c in "/\\") or not name.isprintable():
        raise ConfigError(f"{source}: run.name={name!r} must be one folder name (no '/', '..', control "
                          "characters): the run folder is <run.out>/<run.name>")


def _walk(cls: type, node: Any, prefix: str = ""):
    """Yield (full_key, value, field metadata) for every leaf key of dataclass `cls` in `node`."""
    for f in dataclasses.fields(cls):
        full_key = f"{prefix}{f.name}"
        value = None if node is None or OmegaConf.is_missing(node, f.name) else node[f.name]
        sub = f.type if isinstance(f.type, type) else _resolve_type(cls, f)
        if dataclasses.is_dataclass(sub):
            yield from _walk(sub, value, full_key + ".")
        else:
            yield full_key, value, dict(f.metadata)


def _resolve_type(cls: type, f: dataclasses.Field) -> Any:
    return _type_hints(cls).get(f.name)


@functools.lru_cache(maxsize=None)
def _type_hints(cls: type) -> dict:
    return typing.get_type_hints(cls)


def key_docs() -> list[tuple[str, Any, str]]:
    """(full key, default, doc) for every leaf key of the schema, in declaration order."""
    rows = []
    for full_key, default, meta in _walk(Recipe, schema()):
        if isinstance(default, (DictConfig, ListConfig)):
            default = OmegaConf.to_container(default)
        rows.append((full_key, "???" if default is None else default, meta.get("doc", "")))
    return rows


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)
