"""Launchers: torchrun command line, two "nodes" on localhost training together, sbatch script."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from conftest import free_port, subprocess_env
from distill import checkpoint
from distill.logging import read_scalars
from launch.cli import main
from launch.torchrun import torchrun_argv


def _launch_args(**kw) -> argparse.Namespace:
    base = dict(recipe="r.yaml", overrides=["train.steps=3"], nproc=2, nnodes=1, node_rank=0,
                master="10.0.0.1:1234")
    return argparse.Namespace(**{**base, **kw})


def test_torchrun_command_line():
    argv = torchrun_argv(_launch_args(nnodes=2, node_rank=1))
    assert argv[:3] == [sys.executable, "-m", "torch.distributed.run"]
    assert argv[3:8] == ["--nproc_per_node=2", "--nnodes=2", "--node_rank=1",
                         "--master_addr=10.0.0.1", "--master_port=1234"]
    assert argv[8:] == ["-m", "launch.cli", "run", "r.yaml", "train.steps=3"]
    with pytest.raises(ValueError, match="--master 'nohost': expected HOST:PORT"):
        torchrun_argv(_launch_args(master="nohost"))
    with pytest.raises(ValueError, match="0 <= --node-rank < --nnodes"):
        torchrun_argv(_launch_args(node_rank=1))


@pytest.mark.slow
def test_two_nodes_on_localhost_train_together(tmp_path, toy_recipe):
    recipe = toy_recipe(tmp_path, "nodes")
    master = f"127.0.0.1:{free_port()}"
    procs = [subprocess.Popen(
        [sys.executable, "-m", "launch.cli", "launch", str(recipe), "--nnodes", "2",
         "--node-rank", str(rank), "--nproc", "1", "--master", master],
        cwd=tmp_path, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True) for rank in (0, 1)]
    outs = [p.communicate(timeout=240) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-2000:] for _, err in outs]
    run = tmp_path / "runs" / "nodes"
    assert (run / "toy" / "DONE").is_file()
    last = checkpoint.committed(run / "toy/checkpoints")[-1][1]
    assert sorted(p.name for p in last.glob("rank-*.pt")) == ["rank-00000.pt", "rank-00001.pt"]
    assert sorted(read_scalars(run / "tb/toy", "toy/critic/loss")) == list(range(1, 13))


def test_sbatch_script(tmp_path, toy_recipe, capsys):
    recipe = toy_recipe(tmp_path, "big")
    out = tmp_path / "job.sh"
    assert main(["slurm", str(recipe), "--nodes", "4", "--gpus-per-node", "8", "--partition",
                 "h100", "--time", "48:00:00", "--account", "proj", "--out", str(out),
                 "train.steps=9"]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    text = out.read_text()
    subprocess.run(["bash", "-n", str(out)], check=True)
    for line in ["#SBATCH --nodes=4", "#SBATCH --gpus-per-node=8", "#SBATCH --ntasks-per-node=1",
                 "#SBATCH --partition=h100", "#SBATCH --time=48:00:00", "#SBATCH --account=proj",
                 "#SBATCH --requeue", "trap stop USR1 TERM"]:
        assert line in text.splitlines(), line
    for fragment in [f"launch {recipe} --nproc 8 --nnodes 4", '--node-rank "${SLURM_NODEID}"',
                     '--master "${MASTER_ADDR}:${MASTER_PORT}"', "--signal=B:USR1@",
                     'scontrol show hostnames "${SLURM_JOB_NODELIST}" | head -n 1',
                     'train.steps=9 run.name=big-job"${SLURM_JOB_ID}"', "TORCH_NCCL_ASYNC_ERROR",
                     'if [ "${requeue}" = 1 ] || [ "${status}" = 143 ]; then']:
        assert fragment in text, fragment
    assert main(["slurm", str(recipe), "--nodes", "1", "--gpus-per-node", "1"]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "runs/big/sbatch.sh")
