"""The `prepare` stage: videos → latent shards in the stage folder (or `data.prepared`), on N ranks.

With `data.manifest` empty it first renders the synthetic world (`data.synth`) into
`<prepared>/world/`. The tiny text encoder is saved beside the shards (`text_encoder/`), so that
serving and evaluation encode prompts with the very weights the shards were made with. With a
ranked context strategy scored by CLIP (`data.context.similarity.kind: clip`), each shot's candidate
frames are scored once here: their image features are stored beside the latents.
`shotdistill data prepare` runs the same function in one process.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
from omegaconf import DictConfig

from distill import layout
from distill.data.components import build_codec, build_text_encoder, prepared_dir, synth_settings
from distill.data.prepare import PrepareSettings, finish, prepare_shards
from distill.data.references import check_references
from distill.data.synth import synthesize
from student.memory import ClipSimilarity
from teacher.context import RANKED


def settings_of(cfg: DictConfig) -> PrepareSettings:
    d = cfg.data
    check_references(d.context.references.p, d.context.references.max)
    if d.shot_frames < 1 or d.records_per_shard < 1 or d.context.budget < 0:
        raise ValueError("data.shot_frames and data.records_per_shard must be >= 1, "
                         "data.context.budget >= 0")
    return PrepareSettings(height=d.height, width=d.width, fps=d.fps, shot_frames=d.shot_frames,
                           records_per_shard=d.records_per_shard, latent_dtype=d.latent_dtype,
                           strategy=d.context.strategy, budget=d.context.budget,
                           caption_layout=cfg.text_encoder.caption_layout, long_shots=d.long_shots,
                           chunk_frames=cfg.student.chunk_frames,
                           references=d.context.references.max if d.context.references.p > 0 else 0,
                           similarity=d.context.similarity.path if d.context.strategy in RANKED and
                           d.context.similarity.kind == "clip" else "")


def prepare(cfg: DictConfig, manifest: str | Path | None, out: str | Path, rank: int = 0,
            world: int = 1, barrier: Callable[[], None] = lambda: None,
            device: str | torch.device = "cpu", progress: bool = True) -> dict | None:
    """Prepare `manifest` (None: the synthetic world) into `out` on this rank; rank 0 returns the
    report (and prints its counts), other ranks None."""
    out = Path(out)
    settings = settings_of(cfg)
    if manifest is None:
        if rank == 0:
            synthesize(out / "world", synth_settings(cfg.data.synth))
        barrier()
        manifest = out / "world" / "manifest.jsonl"
    if not Path(manifest).is_file():
        raise FileNotFoundError(f"{manifest}: manifest not found")
    codec = build_codec(cfg.codec, device)
    text = build_text_encoder(cfg.text_encoder, device)
    scorer = ClipSimilarity.from_pretrained(settings.similarity, device) if settings.similarity else None
    prepare_shards(manifest, out, settings, codec, text, rank, world, progress, scorer)
    barrier()
    report = finish(manifest, out, settings.records_per_shard) if rank == 0 else None
    barrier()
    if rank == 0:
        print(f"prepared {len(report['prepared'])} records, skipped {len(report['skipped'])}", flush=True)
    return report


def check_report(report: dict, out: Path) -> None:
    """Fail (non-zero exit) when not a single record was prepared."""
    if not report["prepared"]:
        raise ValueError(f"no record was prepared ({len(report['skipped'])} skipped; see {out / 'report.json'})")


class PrepareStage:
    """Recipe `stage: prepare`; metrics: prepared and skipped record counts."""

    folder = layout.PREPARE
    produces = "prepared"
    reads = ("data", "codec", "text_encoder", "student.chunk_frames")

    def __init__(self, cfg: DictConfig, ctx) -> None:
        self.cfg, self.ctx = cfg, ctx

    @staticmethod
    def check(cfg: DictConfig) -> None:
        """Refuse impossible data settings before any compute."""
        settings_of(cfg)

    def run(self) -> dict[str, float]:
        from distill.distributed import barrier, broadcast_object

        env = self.ctx.env
        manifest = self.cfg.data.manifest or None
        report = prepare(self.cfg, manifest, prepared_dir(self.cfg), env.rank, env.world_size,
                         barrier, env.device, self.cfg.logging.progress)
        report = broadcast_object(report)
        check_report(report, prepared_dir(self.cfg))
        metrics = {"prepared": len(report["prepared"]), "skipped": len(report["skipped"])}
        self._log(metrics)
        return metrics

    def _log(self, metrics: dict[str, float]) -> None:
        from distill.logging import StageLogger

        logger = StageLogger(self.ctx.tb_dir, self.folder, main=self.ctx.env.is_main,
                             tensorboard=self.cfg.logging.tensorboard, progress=False,
                             total_steps=0, start_step=0)
        logger.scalars(0, metrics)
        logger.close()
