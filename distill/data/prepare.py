"""Preparation: manifest → decode → encode → safetensors shards, an index and a report.

Manifest entries (records and bad lines alike, in line order) are cut into shards of
`records_per_shard`; shard k belongs to rank k mod world_size, so ranks never share a record and
the shards do not depend on the number of ranks. Each rank writes its shards (skipping those already
committed: resume), then, after a barrier, rank 0 merges the sidecars into `index.json` and
`report.json` = {"prepared": [ids], "skipped": [{"line", "reason"}]}.

Every shard records the settings fingerprint (resolution, fps, shot length, codec, text encoder,
context candidates, the manifest's hash); resuming into a folder made with other settings fails
instead of mixing shards.
"""

from __future__ import annotations

import hashlib
import sys
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from tqdm import tqdm

from distill.data.manifest import BadRecord, Record, Skip, read_manifest
from distill.data.references import crop_reference, reference_boxes
from distill.data.shards import INDEX, REPORT, read_json, shard_name, shard_problem, write_json, write_shard
from distill.data.shots import load_shots
from teacher.context import candidate_frames
from teacher.encoders import DTYPES, Codec, T5TextEncoder, pixels_from_uint8



@dataclass(frozen=True)
class PrepareSettings:
    height: int
    width: int
    fps: float
    shot_frames: int
    records_per_shard: int
    latent_dtype: str
    strategy: str
    budget: int
    caption_layout: str
    long_shots: str
    chunk_frames: int
    references: int = 0  # most trained references per sample; > 0 stores character crops (data/references.py)
    similarity: str = ""  # a CLIP folder: its image features of every candidate frame are stored (ranked context)


def fingerprint(s: PrepareSettings, codec: Codec, text: T5TextEncoder, manifest: Path) -> dict:
    """Everything that decides a shard's content, as JSON."""
    if not codec.frames_aligned(s.shot_frames):
        raise ValueError(f"data.shot_frames={s.shot_frames} does not fit the codec: "
                         f"expected 1 + k*{codec.temporal_factor}")
    if not codec.whole_chunks(s.shot_frames, s.chunk_frames):
        raise ValueError(f"data.shot_frames={s.shot_frames} holds no whole {s.chunk_frames}-latent-frame chunk "
                         "(student.chunk_frames)")
    # latents: context frames are latent frames of the shots; else each shot's candidates, encoded alone
    frames = "shot" if codec.frames_are_latents else "per_shot"
    fields = asdict(s)
    if not s.references:  # folders prepared before references existed stay valid
        del fields["references"]
    if s.similarity:  # which CLIP scored the frames: its folder and config
        config = Path(s.similarity) / "config.json"
        fields["similarity"] = {"path": s.similarity, "config": hashlib.sha256(config.read_bytes()).hexdigest()[:16]}
    else:
        del fields["similarity"]
    return {"format": 2, **fields,
            "codec": {"kind": type(codec).__name__, "channels": codec.channels,
                      "temporal_factor": codec.temporal_factor, "spatial_factor": codec.spatial_factor},
            "text": {"dim": text.dim, "max_tokens": text.max_tokens, "vocab": len(text.tokenizer),
                     "name": text.model.config.name_or_path or "tiny"},
            "context": {"frames": frames},
            "manifest": hashlib.sha256(manifest.read_bytes()).hexdigest()}


def context_candidates(n: int, s: PrepareSettings) -> list[int]:
    """Every frame of an n-frame shot the context rule may pick for any history: with references, also
    under the budgets they leave the history (budget − 1 … budget − references)."""
    budgets = {s.budget, *range(max(1, s.budget - s.references), s.budget)}
    return sorted({f for b in budgets for f in candidate_frames(n, s.strategy, b)})


def encode_record(record: Record, slot: int, s: PrepareSettings, codec: Codec, text: T5TextEncoder,
                  context_frames: list[int] | str, scorer=None) -> tuple[dict[str, torch.Tensor], dict]:
    """The tensors and metadata of one record (raises BadRecord on bad input); `scorer` (a
    ClipSimilarity, with `s.similarity`) stores the image features of each shot's candidate frames."""
    clips = load_shots(record, s.height, s.width, s.fps, s.shot_frames, s.long_shots,
                       lambda n: codec.whole_chunks(n, s.chunk_frames))
    dtype = DTYPES[s.latent_dtype]
    tensors: dict[str, torch.Tensor] = {}
    candidates = []
    for j, clip in enumerate(clips):
        pixels = pixels_from_uint8(torch.from_numpy(clip)).unsqueeze(0)
        tensors[f"{slot}/shot{j}/latents"] = codec.encode(pixels)[0].to("cpu", dtype)
        if context_frames != "shot":  # every frame the rule may pick from this shot, for any history
            candidates.append(context_candidates(len(clip), s))
            picked = codec.encode_frames(pixels[:, :, candidates[-1]])[0]
            tensors[f"{slot}/shot{j}/frames"] = picked.to("cpu", dtype)
    captions = [record.global_caption] + [shot.caption for shot in record.shots]
    embeddings = text.encode(captions)
    tensors[f"{slot}/global_text"] = embeddings[0].to(dtype)
    for j, emb in enumerate(embeddings[1:]):
        tensors[f"{slot}/shot{j}/text"] = emb.to(dtype)
        if s.caption_layout == "joint":  # the whole prompt up to shot j, encoded as one string
            tensors[f"{slot}/shot{j}/joint_text"] = text.joint_text(captions[0], captions[1:j + 2]).to(dtype)
    meta = {"id": record.id, "line": record.line, "slot": slot, "global_caption": record.global_caption,
            "captions": captions[1:], "facts": record.facts, "shot_frames": [len(c) for c in clips],
            "latent_frames": [codec.latent_frames(len(c)) for c in clips]}
    if candidates:
        meta["context_frames"] = candidates
    if scorer is not None:  # once here, instead of decoding and scoring candidates in every training step
        meta["clip_frames"] = [candidate_frames(len(clip), s.strategy, s.budget) for clip in clips]
        for j, (clip, picks) in enumerate(zip(clips, meta["clip_frames"])):
            pixels = pixels_from_uint8(torch.from_numpy(clip[picks]))  # [3, N, H, W]
            tensors[f"{slot}/shot{j}/clip"] = torch.stack(scorer.features([], pixels.transpose(0, 1))).float()
    rejected = _encode_rejected(record, slot, clips, s, codec, tensors)
    if rejected:
        meta["rejected"] = rejected
    if s.references:
        meta["references"] = _encode_references(record, slot, clips, s, codec, text, tensors)
    return tensors, meta


def _encode_rejected(record: Record, slot: int, clips: list, s: PrepareSettings, codec: Codec,
                     tensors: dict[str, torch.Tensor]) -> list[int]:
    """The shots with a manifest `rejected` clip, whose latents go into `tensors` as shot{j}/rejected;
    a rejected clip must prepare to its shot's length (BadRecord otherwise)."""
    shots = []
    for j, shot in enumerate(record.shots):
        if shot.rejected is None:
            continue
        try:
            (clip,) = load_shots(replace(record, shots=(shot.rejected,)), s.height, s.width, s.fps, s.shot_frames,
                                 s.long_shots, lambda n: codec.whole_chunks(n, s.chunk_frames))
        except BadRecord as e:
            raise BadRecord(f"shot {j} rejected clip{str(e).removeprefix('shot 0')}") from None
        if len(clip) != len(clips[j]):
            raise BadRecord(f"shot {j} rejected clip: {len(clip)} frames prepared, the shot has {len(clips[j])}")
        pixels = pixels_from_uint8(torch.from_numpy(clip)).unsqueeze(0)
        tensors[f"{slot}/shot{j}/rejected"] = codec.encode(pixels)[0].to("cpu", DTYPES[s.latent_dtype])
        shots.append(j)
    return shots


def _encode_references(record: Record, slot: int, clips: list, s: PrepareSettings, codec: Codec,
                       text: T5TextEncoder, tensors: dict[str, torch.Tensor]) -> list[list[str]]:
    """Per shot, the captions of its character crops; their latents [C, h, w] (one-frame clips, as the
    generator encodes a reference image) and texts go into `tensors` as shot{j}/ref{i}/..."""
    dtype = DTYPES[s.latent_dtype]
    captions = []
    for j, clip in enumerate(clips):
        boxes = reference_boxes(record.facts, j, s.height, s.width)
        for i, (caption, box) in enumerate(boxes):
            pixels = pixels_from_uint8(crop_reference(clip[0], box).unsqueeze(0)).unsqueeze(0)
            tensors[f"{slot}/shot{j}/ref{i}/latents"] = codec.encode(pixels)[0, :, 0].to("cpu", dtype)
            if s.caption_layout == "joint":
                tensors[f"{slot}/shot{j}/ref{i}/joint_text"] = text.joint_text(record.global_caption,
                                                                                [caption]).to(dtype)
            else:
                tensors[f"{slot}/shot{j}/ref{i}/text"] = text.encode([caption])[0].to(dtype)
        captions.append([caption for caption, _ in boxes])
    return captions


def _shard(entries: list[Record | Skip], s: PrepareSettings, codec: Codec, text: T5TextEncoder,
           settings: dict, manifest: Path, bar: tqdm, scorer=None) -> dict:
    """Encode one shard's entries; bad ones become `skipped` and a stderr line."""
    tensors: dict[str, torch.Tensor] = {}
    records, skipped = [], []
    for slot, entry in enumerate(entries):
        try:
            if isinstance(entry, Skip):
                raise BadRecord(entry.reason)
            t, meta = encode_record(entry, slot, s, codec, text, settings["context"]["frames"], scorer)
            tensors.update(t)
            records.append(meta)
        except BadRecord as e:
            skipped.append({"line": entry.line, "reason": str(e)})
            bar.write(f"skipped {manifest}:{entry.line}: {e}", file=sys.stderr)
        bar.update(1)
    return {"settings": settings, "records": records, "skipped": skipped, "_tensors": tensors}


def prepare_shards(manifest: str | Path, out: str | Path, s: PrepareSettings, codec: Codec,
                   text: T5TextEncoder, rank: int = 0, world: int = 1, progress: bool = True, scorer=None) -> int:
    """Write this rank's shards under `out` (`scorer`: see encode_record); return how many were (re)done."""
    manifest, out = Path(manifest), Path(out)
    entries = read_manifest(manifest)
    settings = fingerprint(s, codec, text, manifest)
    out.mkdir(parents=True, exist_ok=True)
    n = s.records_per_shard
    mine = [k for k in range(0, (len(entries) + n - 1) // n) if k % world == rank]
    todo = [k for k in mine if not _committed(out, shard_name(k), settings)]
    done = 0
    with tqdm(total=sum(len(entries[k * n:(k + 1) * n]) for k in todo), disable=not progress or rank != 0,
              desc="prepare", unit="video", file=sys.stderr) as bar:
        for k in todo:
            result = _shard(entries[k * n:(k + 1) * n], s, codec, text, settings, manifest, bar, scorer)
            write_shard(out, shard_name(k), result.pop("_tensors"), result)
            done += 1
    return done


def _committed(out: Path, name: str, settings: dict) -> bool:
    meta = read_json(out / f"{name}.json")
    if meta is None:
        return False
    if meta.get("settings") != settings:
        changed = sorted(k for k in settings if meta.get("settings", {}).get(k) != settings[k])
        raise ValueError(f"{out / name}.json was prepared with other settings ({', '.join(changed)}); "
                         "prepare into a new folder")
    problem = shard_problem(out, name, meta)  # truncated, replaced or deleted since it was written
    if problem:
        print(f"{out / name}: {problem}; preparing the shard again", file=sys.stderr, flush=True)
    return problem is None


def finish(manifest: str | Path, out: str | Path, records_per_shard: int) -> dict:
    """Merge every shard's sidecar into index.json and report.json (rank 0, after all ranks)."""
    out = Path(out)
    count = len(read_manifest(manifest))
    index = {"settings": None, "shards": [], "records": []}
    report = {"prepared": [], "skipped": []}
    for k in range((count + records_per_shard - 1) // records_per_shard):
        meta = read_json(out / f"{shard_name(k)}.json")
        if meta is None:
            raise RuntimeError(f"{out / shard_name(k)}.json is missing: a rank did not finish its shards")
        index["settings"] = meta["settings"]
        if meta["records"]:
            index["shards"].append(shard_name(k))
        index["records"] += [{**r, "shard": shard_name(k)} for r in meta["records"]]
        report["prepared"] += [r["id"] for r in meta["records"]]
        report["skipped"] += meta["skipped"]
    write_json(out / INDEX, index)
    write_json(out / REPORT, report)
    return report
