"""One prepared GPU check: `python benchmarks/gpu.py` turns ~10 minutes of one H100/H200 into numbers.

Parts (each also runs alone with `--parts`):
- kernel: the Triton kernel's bf16 forward and backward against the float64 reference
  (kernels.testing's GPU cases and tolerance), and the dispatcher's self-check;
- attention: chunk-causal attention TFLOP/s at the training and decoding shapes, forward and
  backward: our Triton kernel, FlexAttention with the same mask, SDPA with a dense mask, per-chunk
  dense SDPA (benchmarks/attention.py); prints the `MEASURED` dict for kernels/dispatch.py's rule;
- streaming: 832x480, 81-frame shots, 4 steps, a Wan2.1-1.3B-shaped random student with the real
  AutoencoderKLWan architecture decoding (random weights): frames per second and time to first
  frame for each `compile` mode of StreamingGenerator (none, regions, compile, cudagraph: see
  student/compiled.py), compile + warm-up time, VAE decode included and alone, peak memory;
- training: one teacher step and one DMD step (generator, real score, critic) at the 1.3B shape,
  21 target latent frames + 6 context frames, micro-batch 1, gradient checkpointing, through our
  trainer (benchmarks/steps.py): tokens/s, model FLOP utilisation, peak memory.

Writes the "## GPU check" section of benchmarks/RESULTS.md and benchmarks/gpu.json (GPU name,
torch / Triton / CUDA versions, date). `--smoke` runs every part at tiny shapes on the CPU (the
kernel under TRITON_INTERPRET=1) and writes only under `--out`: CI runs it so the script never rots.
Nothing here is extrapolated: a part that cannot run says why.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

if "--smoke" in sys.argv:  # the interpreter must be chosen before anything imports triton
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # sibling benchmark modules
import attention  # noqa: E402
import results  # noqa: E402

SECTION = "## GPU check"
JSON = Path(__file__).with_name("gpu.json")
PARTS = ("kernel", "attention", "streaming", "training")
# dense bf16 tensor-core peak, FLOP/s, for model FLOP utilisation (vendor datasheets, SXM parts)
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12}
PROMPTS = ["wide: a red circle moves left", "close-up: the red circle stays still", "medium: a blue square moves right"]


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _now() -> float:
    _sync()
    return time.perf_counter()


def _peak() -> int | None:
    return torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None


def _reset_peak() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------- kernel


SMOKE_CASES = {  # interpreter tiles are 16 x 16: these span full, partial and skipped tiles
    "train_small": (1, 40, 40, 2, 16, dict(prefix_len=6, chunk_len=11)),
    "window_small": (1, 45, 45, 1, 32, dict(prefix_len=5, chunk_len=8, window_chunks=2)),
}


def kernel_part(smoke: bool) -> dict:
    """Accuracy of the unchecked kernel on each case (bf16 on CUDA, fp32 under the interpreter) and
    the dispatcher's self-check."""
    from kernels import triton_attention
    from kernels.dispatch import self_check
    from kernels.testing import GPU_CASES, accuracy_report, tolerance

    device = "cpu" if smoke else "cuda"
    dtype = torch.float32 if smoke else torch.bfloat16
    rows = []
    for name, (batch, q_len, k_len, heads, head_dim, geometry) in (SMOKE_CASES if smoke else GPU_CASES).items():
        g = torch.Generator(device=device).manual_seed(0)
        q = torch.randn(batch, q_len, heads, head_dim, device=device, generator=g).to(dtype)
        k, v = (torch.randn(batch, k_len, heads, head_dim, device=device, generator=g).to(dtype) for _ in range(2))
        dout = torch.randn_like(q)
        report = accuracy_report(triton_attention, q, k, v, dout, geometry)
        errors = {n: {"ours": ours, "torch": theirs, "limit": tolerance(theirs, dtype)}
                  for n, (ours, theirs) in report.items()}
        rows.append({"case": name, "dtype": str(dtype).split(".")[-1], "errors": errors,
                     "passed": all(e["ours"] <= e["limit"] for e in errors.values())})
    checks = {}
    for head_dim in (16,) if smoke else (64, 128):
        passed, reason = self_check(torch.device(device), head_dim)
        checks[str(head_dim)] = {"passed": passed, "reason": reason}
    return {"cases": rows, "self_check": checks}


# ---------------------------------------------------------------------------------------------- attention


def attention_part(smoke: bool) -> dict:
    """TFLOP/s of the four contenders at the training and decoding shapes (benchmarks/attention.py)."""
    from kernels.dispatch import TRITON_MARGIN, prefers_triton

    if smoke:
        shapes, kwargs = attention.student_shapes(chunk=16), dict(heads=1, head_dim=16, device="cpu",
                                                                  dtype=torch.float32)
    else:
        shapes, kwargs = attention.student_shapes(), {}
    tables = {}
    for shape in shapes:
        tables[attention.shape_label(shape)] = attention.bench_shape(shape, **kwargs)
        _free()
    train = tables[attention.shape_label(shapes[0])]
    by_name = {r["name"]: r for r in train}
    measured = None
    ours, flex = by_name.get("triton (ours)", {}), by_name.get("flex_attention", {})
    if "fwd_ms" in ours and "fwd_ms" in flex:
        measured = {"triton_ms": round(ours["fwd_ms"] + ours["bwd_ms"], 3),
                    "flex_ms": round(flex["fwd_ms"] + flex["bwd_ms"], 3)}
    return {"tables": tables, "measured": measured,
            "auto_picks": None if measured is None else ("triton" if prefers_triton(measured) else "flex"),
            "margin": TRITON_MARGIN}


# ---------------------------------------------------------------------------------------------- streaming


TINY_WAN = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
                text_dim=32, freq_dim=32, ffn_dim=64, num_layers=2, cross_attn_norm=True,
                qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=64)
TINY_VAE = dict(base_dim=8, z_dim=4, dim_mult=[1, 2, 2, 2], num_res_blocks=1, temperal_downsample=[False, True, True],
                latents_mean=[0.0] * 4, latents_std=[1.0] * 4)


def build_generator(smoke: bool):
    """StreamingGenerator: a random Wan-1.3B-shaped student (tiny under --smoke), AutoencoderKLWan's
    architecture with random weights (its default config is Wan2.1's VAE), and a one-layer random UMT5
    of the model's text width (text encoding is once per shot and not what is measured)."""
    from diffusers import AutoencoderKLWan, WanTransformer3DModel

    from distill.memory import WAN_1_3B_CONFIG
    from student.generator import StreamingGenerator, VideoSettings
    from student.model import CausalStudent
    from teacher.encoders import WanVAECodec, build_tiny_t5, vocabulary_of

    device = torch.device("cpu" if smoke else "cuda")
    dtype = torch.bfloat16  # as a bf16 export loads; the smoke run checks the dtype path on the CPU
    torch.manual_seed(0)
    with torch.device(device):
        wan = as_loaded(WanTransformer3DModel(**(TINY_WAN if smoke else WAN_1_3B_CONFIG)), dtype)
        vae = as_loaded(AutoencoderKLWan(**TINY_VAE) if smoke else AutoencoderKLWan(), dtype)
    student = CausalStudent(wan).eval().requires_grad_(False)
    codec = WanVAECodec(vae)
    dim = wan.config.text_dim
    text = build_tiny_t5(vocabulary_of(PROMPTS), dim, 1, 2 if smoke else 32, 16 if smoke else 256, seed=0)
    text.model.to(device)
    video = VideoSettings(64, 64, 16.0, 21) if smoke else VideoSettings(480, 832, 16.0, 81)
    return StreamingGenerator(student, codec, text, video, global_prompt="two shapes on grass", seed=0)


def as_loaded(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """`model` in `dtype` the way diffusers' from_pretrained(torch_dtype=...) leaves it: the modules the
    class keeps in float32 (Wan: rope, time embedder, norms, modulation tables) stay float32."""
    model.to(dtype)
    keep = getattr(model, "_keep_in_fp32_modules", None) or []
    for name, module in model.named_modules():
        if any(k in name.split(".") for k in keep):
            module.float()
    for name, param in model.named_parameters(recurse=True):
        if any(k in name.split(".") for k in keep):
            param.data = param.data.float()
    return model


def time_shots(gen, shots: int) -> dict:
    """Shots of the generator's default length after one untimed warm-up shot; each timed shot has
    history (global cache from the earlier shots). Decode time is measured around the VAE calls,
    except under cudagraph, where the decode overlaps denoising and synchronising would serialise it."""
    decode = []
    inner = gen._decode

    def timed_decode(*args):
        t0 = _now()
        out = inner(*args)
        decode.append(_now() - t0)
        return out
    if gen.side is None:
        gen._decode = timed_decode
    gen.reset()
    t0 = _now()
    first = None
    for _ in gen.next_shot(PROMPTS[0]):
        first = first or time.perf_counter() - t0
    warm = {"shot_s": _now() - t0, "ttff_s": first}
    _reset_peak()
    rows = []
    for k in range(shots):
        decode.clear()
        t0 = _now()
        first = None
        frames = 0
        for chunk in gen.next_shot(PROMPTS[(k + 1) % len(PROMPTS)]):
            first = first or time.perf_counter() - t0  # frames arrive on the CPU: synchronised
            frames += chunk.shape[0]
        total = _now() - t0
        rows.append({"shot_s": total, "ttff_s": first, "decode_s": sum(decode), "frames": frames})
    gen._decode = inner
    med = {key: statistics.median(r[key] for r in rows) for key in ("shot_s", "ttff_s", "decode_s")}
    frames = rows[0]["frames"]
    decode = med["decode_s"] if gen.side is None else None
    return {"warmup": warm, "shots": rows, "frames": frames, "fps": frames / med["shot_s"],
            "ttff_s": med["ttff_s"], "fps_without_decode": decode and frames / (med["shot_s"] - decode),
            "decode_s": decode, "decode_fps": decode and frames / decode, "peak_bytes": _peak(),
            # the warm-up shot compiles (and captures); a timed shot does the same work without that
            "compile_and_warmup_s": warm["shot_s"] - med["shot_s"]}


def streaming_modes(smoke: bool) -> tuple[str, ...]:
    """Every compile mode that runs here: all on CUDA; the CPU smoke run skips cudagraph."""
    from student.compiled import MODES

    return tuple(m for m in MODES if m != "cudagraph" or not smoke)


def streaming_part(smoke: bool) -> dict:
    """Each compile mode on its own copy of one random student (regions compiles in place), one after
    the other; a mode's graphs are compiled during its warm-up shot."""
    import copy

    from student import compiled
    from student.generator import StreamingGenerator

    compiled.BACKEND = "eager" if smoke else "inductor"  # smoke: dynamo traces every graph, no code generation
    base = build_generator(smoke)
    out = {"frames_per_shot": base.video.frames, "size": f"{base.video.width}x{base.video.height}",
           "steps": len(base.student.settings.denoising_steps), "backend": compiled.BACKEND, "modes": {}}
    for mode in streaming_modes(smoke):
        gen = StreamingGenerator(copy.deepcopy(base.student), base.codec, base.text_encoder, base.video,
                                 global_prompt=base.global_prompt, seed=base.seed, compile=mode)
        out["modes"][mode] = time_shots(gen, 1 if smoke else 2)
        del gen
        _free()
    torch._dynamo.reset()
    compiled.BACKEND = "inductor"
    return out


# ---------------------------------------------------------------------------------------------- training


def training_part(smoke: bool, tmp: Path) -> dict:
    """One teacher step and one DMD step through our trainer (steps.py): step time, tokens/s, FLOPs
    (torch.utils.flop_counter), model FLOP utilisation, peak memory. Checkpoint writes are left out."""
    import steps

    env = steps.environment()  # a process group of one (DeepSpeed needs one); kept, as init_distributed does
    peak = next((v for k, v in PEAK_BF16.items() if k in torch.cuda.get_device_name()), None) \
        if env.cuda else None
    out = {}
    for kind in ("teacher", "dmd-intra"):
        count = 2 if smoke else (4 if kind == "teacher" else 7)
        overrides = [f"train.steps={count}", "train.checkpoint_every=100000", "logging.every=1000000"]
        overrides = steps.wan_1_3b_overrides(count) + overrides[1:] if not smoke else \
            overrides + ["train.micro_batch=1", "data.shot_frames=6"]  # smoke: 2 chunks, one sample
        cfg = steps.recipe(kind, tmp / kind, overrides)
        shape = None if smoke else steps.WAN_1_3B
        batch = steps.random_batch(shape or steps.tiny_shape(cfg), cfg.train.micro_batch)
        build = steps.teacher_harness if kind == "teacher" else steps.dmd_harness
        h = build(cfg, env, steps.InMemory([batch]), shape)
        # counted steps run slower under the FLOP counter: timed are the others (smoke: too few, so those)
        counted = (0,) if kind == "teacher" else (0, 1)
        timing = steps.run_trainer(h, cfg, env, save=False, count_flops_at=counted)
        it = timing.iterations
        if kind == "teacher":
            timed = {"step": it[1:]}
            flops = {"step": timing.flops[0]}
        else:  # steps 0 and 5 update generator + critic, the others the critic only
            timed = {"generator+critic step": it[5:6] or it[:1], "critic step": it[2:5] or it[1:2]}
            flops = {"generator+critic step": timing.flops[0], "critic step": timing.flops[1]}
        rows = {}
        for name, times in timed.items():
            seconds = statistics.median(times)
            f = flops[name]
            rows[name] = {"seconds": seconds, "tokens_per_s": h.tokens_per_step / seconds, "flops": f,
                          "executed_tflops": f["executed"] / seconds / 1e12,
                          "mfu": None if peak is None else f["model"] / seconds / peak}
        out[kind] = {"rows": rows, "tokens_per_step": h.tokens_per_step, "peak_bytes": timing.peak_bytes,
                     "engine_setup_s": timing.setup_s}
        del h, timing
        _free()
    return out


# ---------------------------------------------------------------------------------------------- report


def meta(smoke: bool) -> dict:
    import triton

    return {"gpu": "CPU (smoke run, tiny shapes)" if smoke or not torch.cuda.is_available()
            else torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
            "cuda": torch.version.cuda, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": "python benchmarks/gpu.py " + " ".join(sys.argv[1:]), "smoke": smoke}


def _gib(n) -> str:
    return "n/a (CPU)" if n is None else f"{n / 2 ** 30:.1f} GiB"


def format_section(data: dict) -> str:
    m = data["meta"]
    lines = [SECTION, "", f"Produced by `{m['command']}` on **{m['gpu']}**, {m['date']}; torch {m['torch']}, "
             f"Triton {m['triton']}, CUDA {m['cuda']}. Measured, not extrapolated.", ""]
    if "kernel" in data:
        k = data["kernel"]
        lines += ["### Kernel correctness (max abs error vs float64; limit = 3 x PyTorch same-dtype error + floor)", "",
                  "| case | dtype | out | dq | dk | dv | passed |", "|---|---|---|---|---|---|---|"]
        for r in k["cases"]:
            cells = " | ".join(f"{r['errors'][n]['ours']:.2e} (≤ {r['errors'][n]['limit']:.1e})"
                               for n in ("out", "dq", "dk", "dv"))
            lines.append(f"| {r['case']} | {r['dtype']} | {cells} | {'yes' if r['passed'] else '**NO**'} |")
        lines += ["", "Self-check of the dispatcher: " + ", ".join(
            f"head dim {d}: {'passed' if c['passed'] else 'FAILED (' + c['reason'] + ')'}"
            for d, c in k["self_check"].items()), ""]
    if "attention" in data:
        a = data["attention"]
        lines += ["### Chunk-causal attention (TFLOP/s over visible pairs; backward = 2.5 x forward FLOPs)", ""]
        for label, rows in a["tables"].items():
            lines += attention.format_table(f"#### {label}", rows, ms=".3f", tflops=".1f")
        lines += [f"`auto` rule (kernels/dispatch.py): Triton only if flex fwd+bwd ms >= {a['margin']} x Triton's at "
                  f"the training shape. Measured: `MEASURED = {a['measured']}` -> auto picks **{a['auto_picks']}**.",
                  ""]
    if "streaming" in data:
        s = data["streaming"]
        lines += [f"### Streaming ({s['size']}, {s['frames_per_shot']}-frame shots, {s['steps']} steps, shots with "
                  f"history; VAE decode per chunk; `compile` modes of StreamingGenerator, torch.compile backend "
                  f"{s['backend']})", "",
                  "| compile | FPS | time to first frame | FPS without decode | VAE decode alone | compile + warm-up | "
                  "peak memory |", "|---|---|---|---|---|---|---|"]
        for mode, r in s["modes"].items():
            no_decode = "n/a (overlapped)" if r["decode_s"] is None else f"{r['fps_without_decode']:.2f}"
            decode = "n/a (overlapped)" if r["decode_s"] is None else \
                f"{r['decode_s']:.2f} s/shot = {r['decode_fps']:.1f} FPS"
            lines.append(f"| {mode} | {r['fps']:.2f} | {r['ttff_s']:.3f} s | {no_decode} | {decode} | "
                         f"{r['compile_and_warmup_s']:.0f} s | {_gib(r['peak_bytes'])} |")
        lines.append("")
    if "training" in data:
        lines += ["### Training steps (micro-batch 1, gradient checkpointing; our trainer, DeepSpeed ZeRO-2, bf16)", "",
                  "| step | seconds | tokens/s | executed TFLOP/s | MFU | peak memory |", "|---|---|---|---|---|---|"]
        for kind, t in data["training"].items():
            for name, r in t["rows"].items():
                mfu = "n/a" if r["mfu"] is None else f"{r['mfu']:.1%}"
                lines.append(f"| {kind}: {name} | {r['seconds']:.3f} | {r['tokens_per_s']:,.0f} | "
                             f"{r['executed_tflops']:.1f} | {mfu} | {_gib(t['peak_bytes'])} |")
        lines += ["", "tokens: teacher = context + target tokens of the step; DMD = generated target tokens. MFU = "
                  "model FLOPs (forward + 2 x forward of the passes with gradient, from torch.utils.flop_counter; "
                  "checkpoint recompute excluded) / time / bf16 dense peak.", ""]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="every part at tiny shapes on the CPU (CI)")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    parser.add_argument("--out", type=Path, help="folder for gpu.json and gpu.md (default: benchmarks/, and the "
                        "section goes into RESULTS.md; with --smoke a temporary folder)")
    args = parser.parse_args(argv)
    parts = [p for p in args.parts.split(",") if p]
    unknown = set(parts) - set(PARTS)
    if unknown:
        parser.error(f"unknown parts {sorted(unknown)}; choose from {PARTS}")
    if not args.smoke and not torch.cuda.is_available():
        raise SystemExit("benchmarks/gpu.py: needs a CUDA GPU and none is visible (--smoke runs it on the CPU)")
    tmp = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    out_dir = args.out or (tmp if args.smoke else JSON.parent)
    out_dir.mkdir(parents=True, exist_ok=True)
    data = {"meta": meta(args.smoke)}
    runners = {"kernel": lambda: kernel_part(args.smoke), "attention": lambda: attention_part(args.smoke),
               "streaming": lambda: streaming_part(args.smoke), "training": lambda: training_part(args.smoke, tmp)}
    for part in PARTS:
        if part in parts:
            t0 = time.perf_counter()
            data[part] = runners[part]()
            data["meta"][f"{part}_s"] = round(time.perf_counter() - t0, 1)
            print(f"gpu.py: {part} done in {data['meta'][f'{part}_s']} s", file=sys.stderr, flush=True)
            (out_dir / "gpu.json").write_text(json.dumps(data, indent=2, default=str) + "\n")  # partial results survive
    text = format_section(data)
    (out_dir / "gpu.md").write_text(text)
    if not args.smoke and args.out is None:
        results.write_section(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
