"""2-rank preparation under `shotdistill launch` writes the same shards, index and report as 1 rank."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from distill.config import load_recipe
from distill.stages.prepare import prepare

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes/tiny/prepare.yaml"


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_two_ranks_write_what_one_rank_writes(tmp_path):
    overrides = [f"run.out={tmp_path / 'runs'}", "run.dist_timeout=60", "data.synth.videos=4",
                 "data.records_per_shard=1", "logging.progress=false"]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    result = subprocess.run(
        [sys.executable, "-m", "launch.cli", "launch", str(RECIPE), "--nproc", "2",
         "--master", f"127.0.0.1:{_port()}", *overrides],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=110)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "prepared 4 records, skipped 0" in result.stdout
    two = tmp_path / "runs/tiny/prepare"
    assert json.loads((two / "metrics.json").read_text()) == {"prepared": 4, "skipped": 0}
    events = (tmp_path / "runs/tiny/tb/prepare").glob("events.out.tfevents.*")  # .runinfo: the runner's HParams
    assert [p for p in events if not p.name.endswith(".runinfo")]

    one = tmp_path / "one"  # the same videos, prepared by one rank
    prepare(load_recipe(RECIPE, overrides), two / "world/manifest.jsonl", one, progress=False)
    for name in ("index.json", "report.json"):
        assert (one / name).read_text() == (two / name).read_text()
    shards = sorted(p.name for p in one.glob("shard-*.safetensors"))
    assert shards == sorted(p.name for p in two.glob("shard-*.safetensors")) and len(shards) == 4
    for name in shards:
        a, b = load_file(one / name), load_file(two / name)
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), f"{name}: {key} differs"
