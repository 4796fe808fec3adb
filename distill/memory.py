"""A memory plan per GPU before a job is queued (`shotdistill plan`): estimates, not measurements.

For every stage of a recipe tree: each model's parameters, gradients and optimizer states under the
stage's ZeRO stage and offload settings, activation memory from token counts with and without
gradient checkpointing, and whether the sum fits the GPU. Model shapes come from configs only (a Wan
root's transformer/config.json when `model.path` is set, else the random-Wan `model.*` keys); the
models are built on the meta device, so parameter counts are exact and no weight is loaded.

Model states of a trained model follow DeepSpeed's own estimators, called with the trainable
parameter count (`estimate_zero2_model_states_mem_needs` for ZeRO 0-2, `estimate_zero3_...` for
ZeRO-3): bf16 weights (2 bytes), gradients, and optimizer states (fp32 master 4 + Adam m, v 8 bytes),
partitioned over the ranks as the stage does; the gradient column is the estimator's total minus
the other two. Frozen parameters (a teacher training only its self-attention, LoRA bases, the real
score) are bf16 weights, partitioned only under ZeRO-3. ZeRO 0 is the estimator at one rank.

Activations per sample, bf16, FlashAttention-style attention (no L² term). Counted from the tensors
`WanBackbone.block` keeps for backward (its norms and modulation run in fp32): about
`ACT_D·D + ACT_F·F` bytes per token per block without checkpointing (D model width, F FFN width);
with checkpointing the block inputs (2·D bytes) plus one block recomputed at a time. A DMD step adds
the KV cache of the rollout and keeps every shot's rollout and critic graph until backward.
"""

from __future__ import annotations

import functools
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import DictConfig

GiB = 1024 ** 3
RESERVE = 0.10  # of GPU memory kept for the CUDA context, NCCL buffers and allocator fragmentation
ACT_D, ACT_F = 64, 4  # bytes per token per block saved for backward: ACT_D·D + ACT_F·F (module doc)
LIVE_D, LIVE_F = 16, 4  # bytes per token of one block in flight without gradient
WAN_VAE = (8, 4)  # Wan2.1 VAE: spatial, temporal compression (when its config is not at hand)
TRAINING_STAGES = ("teacher", "causal_init", "dmd_intra", "dmd_inter")
# Wan2.1-T2V-1.3B's transformer/config.json values (diffusers): plans and benchmarks of its shape without
# the weights (benchmarks/gpu.py, tests/test_plan.py).
WAN_1_3B_CONFIG = dict(patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16,
                       out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30, cross_attn_norm=True,
                       qk_norm="rms_norm_across_heads", eps=1e-6, image_dim=None, added_kv_proj_dim=None,
                       rope_max_seq_len=1024)


def parse_bytes(text: str) -> int:
    """'80GiB', '80GB', '141 GB', '80' (GiB) -> bytes."""
    match = re.fullmatch(r"\s*([0-9.]+)\s*([KMGT]i?B?)?\s*", text, re.IGNORECASE)
    if not match:
        raise ValueError(f"--gpu-memory {text!r}: expected a size like 80GiB or 141GB")
    unit = (match.group(2) or "GiB").upper().rstrip("B")
    power = {"K": 1, "M": 2, "G": 3, "T": 4}[unit[0]]
    base = 1024 if unit.endswith("I") else 1000
    return int(float(match.group(1)) * base ** power)


# ---------------------------------------------------------------------------------------------- shapes


def transformer_config(cfg: DictConfig) -> dict:
    """WanTransformer3DModel arguments: the Wan root's transformer/config.json (model.path) or the
    random Wan of `model.*` (distill/models.py)."""
    if cfg.model.path:
        from teacher.encoders import component_folder

        path = component_folder(cfg.model.path, "transformer") / "config.json"
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"{path}: model.path has no transformer config") from None
        return {k: v for k, v in data.items() if not k.startswith("_")}
    from distill.models import wan_config

    return wan_config(cfg)


@dataclass(frozen=True)
class Counts:
    """Parameter counts of one model as built for a stage (DeepSpeed's `model_to_params` conventions)."""

    total: int
    trainable: int
    largest_layer: int  # most parameters held directly by one module (what ZeRO-3 gathers at once)


def count_model(config: dict, role: str, cfg: DictConfig) -> Counts:
    """Counts of the model `role` ("teacher", "student", "generator", "critic", "real") of a stage,
    built on the meta device exactly as the stage builds it (trainable set, LoRA, indicator)."""
    lora = (cfg.lora.rank, tuple(cfg.lora.targets)) if role in ("generator", "critic") else (0, ())
    return _count(json.dumps(config, sort_keys=True), role, cfg.teacher.injection, cfg.teacher.trainable,
                  cfg.student.indicator == "learnable", cfg.student.chunk_frames, *lora)


@functools.lru_cache(maxsize=64)
def _count(config_json: str, role: str, injection: str, trainable: str, learnable: bool, chunk_frames: int,
           lora_rank: int, lora_targets: tuple[str, ...]) -> Counts:
    import torch
    from diffusers import WanTransformer3DModel

    from student.model import CausalStudent
    from student.settings import StudentSettings
    from teacher.model import NextShotTeacher

    with torch.device("meta"):
        wan = WanTransformer3DModel(**json.loads(config_json))
        if role in ("student", "generator"):
            settings = StudentSettings(chunk_frames=chunk_frames, indicator="learnable" if learnable else "rope_offset")
            model = CausalStudent(wan, settings).requires_grad_(True)
        else:
            model = NextShotTeacher(wan, injection=injection if role == "teacher" else "frame_concat",
                                    trainable=trainable)
            if role == "teacher":
                model.set_trainable()
            else:
                model.requires_grad_(role == "critic")
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    if lora_rank > 0:
        lora = lora_parameters(model, lora_rank, list(lora_targets))
        total, trainable = total + lora, lora
    return Counts(total, trainable, largest)


def lora_parameters(model, rank: int, targets: list[str]) -> int:
    """Parameters peft's LoRA adds: rank·(in + out) per Linear whose name ends with a target."""
    import torch

    return sum(rank * (m.in_features + m.out_features) for name, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and any(name == t or name.endswith("." + t) for t in targets))


# ---------------------------------------------------------------------------------------------- model states


@dataclass
class States:
    """Bytes per GPU of one model's weights, gradients and optimizer states (and per node on CPU)."""

    name: str
    role: str
    counts: Counts
    weights: float
    grads: float
    optimizer: float
    cpu: float = 0.0
    how: str = ""

    @property
    def gpu(self) -> float:
        return self.weights + self.grads + self.optimizer


def deepspeed_estimate(trainable: int, largest_layer: int, zero_stage: int, gpus: int, gpus_per_node: int,
                       offload_optimizer: bool, offload_params: bool) -> tuple[float, float]:
    """(CPU bytes per node, GPU bytes per GPU) of DeepSpeed's estimator for `trainable` parameters."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    per_node = min(gpus, gpus_per_node)
    nodes = math.ceil(gpus / per_node)
    if zero_stage == 3:
        cpu, gpu, _ = estimate_zero3_model_states_mem_needs(
            trainable, largest_layer, num_gpus_per_node=per_node, num_nodes=nodes, cpu_offload=offload_optimizer,
            cpu_offload_params=offload_params, zero_init=True)
        return cpu, gpu
    if zero_stage == 0:  # nothing partitioned: the estimator at one rank
        per_node, nodes = 1, 1
    return estimate_zero2_model_states_mem_needs(trainable, num_gpus_per_node=per_node, num_nodes=nodes,
                                                 cpu_offload=offload_optimizer)


def trained_states(name: str, counts: Counts, ds: DictConfig, gpus: int, gpus_per_node: int) -> States:
    """A trained model's states per GPU (module doc): DeepSpeed's estimate for its trainable
    parameters plus its frozen parameters as bf16 weights."""
    stage, t = ds.zero_stage, counts.trainable
    shards = gpus if stage >= 1 else 1
    cpu, gpu = deepspeed_estimate(t, counts.largest_layer, stage, gpus, gpus_per_node, ds.offload_optimizer,
                                  ds.offload_params)
    frozen = 2 * (counts.total - t) / (gpus if stage == 3 else 1)
    if stage == 3:
        weights = 0.0 if ds.offload_params else 2 * t / gpus
        weights += 4 * counts.largest_layer  # DeepSpeed's gathered-layer working set
        frozen = 0.0 if ds.offload_params else frozen
    else:
        weights = 2 * t
    optimizer = 0.0 if ds.offload_optimizer else 12 * t / shards
    grads = gpu - weights - optimizer
    how = f"ZeRO-{stage}" + (", optimizer on CPU" if ds.offload_optimizer else "") + \
        (", params on CPU" if ds.offload_params else "")
    return States(name, "trained", counts, weights + frozen, grads, optimizer, cpu, how)


def frozen_states(name: str, counts: Counts, ds: DictConfig, gpus: int) -> States:
    """A frozen model as `distill.trainer.place_frozen` places it: bf16 weights, ZeRO-3 partitioned
    with `deepspeed.frozen_zero3` (plus the gathered layer)."""
    if ds.frozen_zero3:
        return States(name, "frozen", counts, 2 * counts.total / gpus + 4 * counts.largest_layer, 0.0, 0.0,
                      how="ZeRO-3 partitioned")
    return States(name, "frozen", counts, 2.0 * counts.total, 0.0, 0.0, how="bf16, whole")


# ---------------------------------------------------------------------------------------------- activations


@dataclass(frozen=True)
class Geometry:
    """Token counts of one sample: per latent frame, target frames, context frames, the model's dims."""

    frame_tokens: int
    target_frames: int
    context_frames: int
    chunk_frames: int
    width: int  # D
    ffn: int  # F
    layers: int

    @property
    def sequence(self) -> int:
        return (self.context_frames + self.target_frames) * self.frame_tokens

    def saved(self, tokens: int) -> float:
        """Bytes kept for backward over all blocks, no checkpointing."""
        return tokens * self.layers * (ACT_D * self.width + ACT_F * self.ffn)

    def block(self, tokens: int) -> float:
        """Bytes of one block's activations (recomputed one at a time under checkpointing)."""
        return tokens * (ACT_D * self.width + ACT_F * self.ffn)

    def inputs(self, tokens: int) -> float:
        """Block inputs kept under checkpointing (bf16)."""
        return tokens * self.layers * 2 * self.width

    def live(self, tokens: int) -> float:
        """One block in flight without gradient."""
        return tokens * (LIVE_D * self.width + LIVE_F * self.ffn)


def geometry(cfg: DictConfig, config: dict) -> Geometry:
    """Token counts from `data.*`, the codec and the transformer's patch size."""
    pt, ph, pw = config["patch_size"]
    if cfg.codec.kind == "patch":
        spatial, temporal = cfg.codec.patch, 1
    else:
        spatial, temporal = _vae_factors(cfg)
    frames = (cfg.data.shot_frames - 1) // temporal + 1 if temporal > 1 else cfg.data.shot_frames
    tokens = (cfg.data.height // spatial // ph) * (cfg.data.width // spatial // pw)
    width = config["num_attention_heads"] * config["attention_head_dim"]
    return Geometry(tokens, frames // pt, cfg.data.context.budget // pt, max(cfg.student.chunk_frames // pt, 1),
                    width, config["ffn_dim"], config["num_layers"])


def _vae_factors(cfg: DictConfig) -> tuple[int, int]:
    path = Path(cfg.codec.path or cfg.model.path or ".")
    for folder in (path / "vae", path):
        config = folder / "config.json"
        if config.is_file():
            down = json.loads(config.read_text()).get("temperal_downsample")
            if down is not None:
                return 2 ** len(down), 2 ** sum(down)
    return WAN_VAE


@dataclass
class Activations:
    """Bytes per GPU with and without gradient checkpointing, and what they count."""

    checkpointed: float
    full: float
    note: str


def stage_activations(cfg: DictConfig, g: Geometry) -> Activations:
    """Activation bytes of one micro-batch of the stage (module doc)."""
    batch, kind = cfg.train.micro_batch, cfg.stage
    if kind in ("teacher", "causal_init"):
        frames = g.target_frames + (g.context_frames if kind == "causal_init" or
                                    cfg.teacher.injection == "frame_concat" else 0)
        tokens = frames * g.frame_tokens
        return Activations(batch * g.inputs(tokens) + g.block(batch * tokens), batch * g.saved(tokens),
                           f"{frames} frames x {g.frame_tokens:,} = {tokens:,} tokens per sample x {batch}")
    if kind in ("dmd_intra", "dmd_inter"):
        shots = cfg.dmd.shots if kind == "dmd_inter" else 1
        chunks = g.target_frames // g.chunk_frames
        chunk = g.chunk_frames * g.frame_tokens
        kernels = list(cfg.student.local_compression) or [1] * cfg.student.local_chunks
        local = sum(chunk // (k * k) for k in kernels)  # the local history, pooled by age when compressed
        cached = (g.context_frames + g.chunk_frames) * g.frame_tokens + local
        kv = cached * g.layers * 4 * g.width  # the rollout's KV cache: K and V, bf16, every block
        critic = g.sequence
        ckpt = batch * (shots * chunks * g.inputs(chunk) + shots * g.inputs(critic) + kv) + g.block(batch * critic)
        full = batch * (shots * chunks * (g.saved(chunk) + kv) + shots * g.saved(critic) + kv)
        return Activations(ckpt, full, f"{shots} shot(s) x {chunks} chunks of {chunk:,} tokens rolled out with "
                           f"gradient, KV cache {cached:,} tokens, critic {critic:,} tokens per shot; x {batch}")
    if kind == "ode_pairs":
        passes = 2 if cfg.ode.guidance_scale != 1 else 1
        live = g.live(passes * g.sequence)
        return Activations(live, live, f"inference, {g.sequence:,} tokens x {passes} (CFG), one block in flight")
    return Activations(0.0, 0.0, "")


# ---------------------------------------------------------------------------------------------- plan


@dataclass
class StagePlan:
    folder: str
    stage: str
    recipe: str
    models: list[States] = field(default_factory=list)
    activations: Activations | None = None
    checkpointing: bool = False
    note: str = ""

    def total(self, checkpointing: bool | None = None) -> float:
        ckpt = self.checkpointing if checkpointing is None else checkpointing
        acts = 0.0 if self.activations is None else (
            self.activations.checkpointed if ckpt else self.activations.full)
        return sum(m.gpu for m in self.models) + acts


def plan_stage(folder: str, cfg: DictConfig, recipe: str, gpus: int, gpus_per_node: int) -> StagePlan:
    """The memory plan of one stage (its resolved recipe) on `gpus` GPUs."""
    plan = StagePlan(folder, cfg.stage, recipe, checkpointing=bool(cfg.train.gradient_checkpointing))
    kind, ds = cfg.stage, cfg.deepspeed
    if kind not in TRAINING_STAGES + ("ode_pairs",):
        plan.note = "no transformer runs here (codec, text encoder or export only): not estimated"
        return plan
    config = transformer_config(cfg)
    g = geometry(cfg, config)
    if kind == "teacher":
        plan.models = [trained_states("teacher", count_model(config, "teacher", cfg), ds, gpus, gpus_per_node)]
    elif kind == "causal_init":
        plan.models = [trained_states("student", count_model(config, "student", cfg), ds, gpus, gpus_per_node)]
    elif kind == "ode_pairs":
        plan.models = [frozen_states("teacher", count_model(config, "real", cfg), ds, gpus)]
    else:
        plan.models = [trained_states("generator", count_model(config, "generator", cfg), ds, gpus, gpus_per_node),
                       trained_states("critic", count_model(config, "critic", cfg), ds, gpus, gpus_per_node),
                       frozen_states("real score", count_model(config, "real", cfg), ds, gpus)]
    plan.activations = stage_activations(cfg, g)
    if kind == "dmd_inter" and cfg.dmd.context_from == "reencode" and cfg.codec.kind == "wan":
        plan.note = "Not counted: the Wan VAE decoding and re-encoding history frames at each shot boundary."
    return plan


def _gib(n: float) -> str:
    return f"{n / GiB:.2f}"


def _number(n: int) -> str:
    return f"{n / 1e9:.3f}B" if n >= 1e8 else f"{n / 1e6:.2f}M" if n else "0"


def format_plan(plans: list[StagePlan], recipe: str, gpus: int, gpus_per_node: int, gpu_memory: int) -> str:
    """The printed plan: one markdown table per stage and a verdict line."""
    usable = gpu_memory * (1 - RESERVE)
    lines = [f"Memory plan for {recipe} on {gpus} GPUs ({min(gpus, gpus_per_node)} per node) of "
             f"{gpu_memory / GiB:.0f} GiB — ESTIMATES from configs, not measurements (distill/memory.py).",
             f"Fits when the total is at most {usable / GiB:.1f} GiB ({RESERVE:.0%} kept for the CUDA context, "
             "NCCL and fragmentation). GiB per GPU; bf16 mixed precision.", ""]
    for p in plans:
        lines.append(f"### {p.folder} (stage {p.stage})")
        if not p.models:
            lines += [p.note, ""]
            continue
        lines += ["", "| model | placement | params | trainable | weights | grads | optimizer | GiB per GPU |",
                  "|---|---|---|---|---|---|---|---|"]
        for m in p.models:
            lines.append(f"| {m.name} | {m.role}, {m.how} | {_number(m.counts.total)} | {_number(m.counts.trainable)} | "
                         f"{_gib(m.weights)} | {_gib(m.grads)} | {_gib(m.optimizer)} | {_gib(m.gpu)} |")
        a, total, training = p.activations, p.total(), p.stage in TRAINING_STAGES
        verdict = "fits" if total <= usable else "DOES NOT FIT"
        cpu = sum(m.cpu for m in p.models if "CPU" in m.how)
        line = f"-> {verdict}: {_gib(total)} of {_gib(usable)} GiB usable"
        line += f"; CPU offload needs {_gib(cpu)} GiB per node" if cpu else ""
        if training:
            lines.append(f"| activations | {a.note} | | | | | | ckpt on {_gib(a.checkpointed)} / off {_gib(a.full)} |")
            lines.append(f"| **total** | gradient checkpointing {'on' if p.checkpointing else 'off'} (recipe) "
                         f"| | | | | | **{_gib(total)}** |")
            other = p.total(not p.checkpointing)
            line += (f"; with checkpointing {'off' if p.checkpointing else 'on'} it would be {_gib(other)} GiB "
                     f"({'fits' if other <= usable else 'does not fit'})")
        else:
            lines.append(f"| activations | {a.note} | | | | | | {_gib(a.full)} |")
            lines.append(f"| **total** | | | | | | | **{_gib(total)}** |")
        lines += ["", line + "." + (f" {p.note}" if p.note else ""), ""]
    return "\n".join(lines)
