"""`shotdistill slurm`: write an sbatch script (srun starts one torchrun per node) and print its path.

Each node runs `shotdistill launch` (torchrun with the first node as master, this node's rank from
SLURM_NODEID). Each job gets its own run folder (`<run.name>-job<SLURM_JOB_ID>`); a requeued job
keeps its id, so it resumes in that folder. Preemption: SLURM sends USR1 to the batch shell
`PREEMPT_GRACE_S` before the time limit (or TERM when it preempts); the shell sends SIGTERM to srun
(launch and torchrun pass it to the workers, which checkpoint and exit 143) and requeues the job.
The job is also requeued when the step exits 143 on its own (SLURM signalled the steps directly).
"""

from __future__ import annotations

import argparse
import re
import shlex
import sys
from pathlib import Path

PREEMPT_GRACE_S = 300
RDZV_PORT_BASE = 29500
# --partition/--time/--account go into #SBATCH lines verbatim: letters, digits and . _ , : + - only
# (partition lists "a,b", times "2-00:00:00"), so no value can end a line or reach a shell.
SBATCH_VALUE = re.compile(r"[A-Za-z0-9._,:+-]+")


def check_sbatch_values(args: argparse.Namespace) -> None:
    """One line naming the flag when a value would leave its #SBATCH line."""
    for flag in ("partition", "time", "account"):
        value = getattr(args, flag)
        if value is not None and not SBATCH_VALUE.fullmatch(value):
            raise ValueError(f"slurm: --{flag} {value!r}: only letters, digits and . _ , : + - are allowed")


def _directives(args: argparse.Namespace, name: str, log_dir: Path) -> list[str]:
    lines = [f"--job-name={name}", f"--nodes={args.nodes}", "--ntasks-per-node=1",
             f"--gpus-per-node={args.gpus_per_node}", f"--output={log_dir}/slurm-%j.out",
             f"--signal=B:USR1@{PREEMPT_GRACE_S}", "--requeue"]
    for flag, value in (("partition", args.partition), ("time", args.time),
                        ("account", args.account)):
        if value:
            lines.append(f"--{flag}={value}")
    return [f"#SBATCH {line}" for line in lines]


def render(args: argparse.Namespace, name: str, out: str, log_dir: Path) -> str:
    """The sbatch script text for the validated recipe `args.recipe`."""
    recipe = shlex.quote(str(Path(args.recipe).resolve()))
    overrides = " ".join(shlex.quote(o) for o in args.overrides)
    run_name = shlex.quote(f"run.name={name}-job") + '"${SLURM_JOB_ID}"'
    # one `shotdistill launch` per node (its node rank is srun's SLURM_NODEID, expanded on the node):
    # its exit status is the ranks' (143 after a stop signal's checkpoint) and its last line says why
    node = (f"exec {shlex.quote(sys.executable)} -m launch.cli launch {recipe} "
            f"--nproc {args.gpus_per_node} --nnodes {args.nodes} "
            '--node-rank "${SLURM_NODEID}" --master "${MASTER_ADDR}:${MASTER_PORT}" '
            f"{overrides} {run_name} {shlex.quote('run.out=' + out)}")
    return "\n".join([
        "#!/bin/bash",
        *_directives(args, name, log_dir),
        "set -euo pipefail",
        f"cd {shlex.quote(str(Path.cwd()))}",
        'MASTER_ADDR="$(scontrol show hostnames "${SLURM_JOB_NODELIST}" | head -n 1)"',
        f'MASTER_PORT="$(( {RDZV_PORT_BASE} + SLURM_JOB_ID % 10000 ))"',
        "export MASTER_ADDR MASTER_PORT",
        "# A hung collective fails the job instead of idling the allocation.",
        "export TORCH_NCCL_ASYNC_ERROR_HANDLING=1 NCCL_DEBUG=${NCCL_DEBUG:-WARN}",
        "export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}",
        "# USR1 (the time limit is near) or TERM (preemption): the ranks checkpoint and exit 143, then requeue.",
        "requeue=0",
        "stop() {",
        "  requeue=1 interrupted=1",
        '  echo "shotdistill: stop signal: checkpointing, then requeueing" >&2',
        '  kill -TERM "${SRUN_PID}" 2>/dev/null || true',
        "}",
        "trap stop USR1 TERM",
        f"srun --kill-on-bad-exit=1 --ntasks-per-node=1 bash -c {shlex.quote(node)} &",
        "SRUN_PID=$!",
        "while :; do  # a trapped signal ends a wait early: wait again for srun's own status",
        "  interrupted=0 status=0",
        '  wait "${SRUN_PID}" || status=$?',
        '  [ "${interrupted}" = 1 ] || break',
        "done",
        'if [ "${requeue}" = 1 ] || [ "${status}" = 143 ]; then',
        '  scontrol requeue "${SLURM_JOB_ID}"',
        "fi",
        'exit "${status}"',
        "",
    ])


def write_script(args: argparse.Namespace) -> int:
    """Validate the recipe, write the script (atomically) and print its path."""
    from distill.runner import plan
    from teacher.files import write_atomic
    if args.nodes < 1 or args.gpus_per_node < 1:
        raise ValueError(f"slurm: --nodes and --gpus-per-node must be >= 1 "
                         f"(got {args.nodes}, {args.gpus_per_node})")
    check_sbatch_values(args)
    cfg = plan(args.recipe, list(args.overrides)).cfg
    out = str(Path(cfg.run.out).resolve())
    log_dir = Path(out)
    path = Path(args.out) if args.out else Path(out) / cfg.run.name / "sbatch.sh"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, render(args, cfg.run.name, out, log_dir))
    path.chmod(0o755)
    print(path)
    return 0
