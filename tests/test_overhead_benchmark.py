"""Protects benchmarks/overhead.py: one tiny round of every variant (trainer over batches in memory, the
bare loop, the trainer over real shards) runs and yields the ratios the RESULTS.md section reports."""

import importlib.util
import sys
from pathlib import Path

import pytest

_PATH = Path(__file__).parents[1] / "benchmarks" / "overhead.py"


@pytest.mark.slow
def test_one_round_of_every_variant(tmp_path, one_thread):
    spec = importlib.util.spec_from_file_location("overhead_bench", _PATH)
    overhead = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = overhead
    spec.loader.exec_module(overhead)
    out = tmp_path / "overhead.json"
    assert overhead.main(["--steps", "3", "--rounds", "1", "--parts", "teacher", "--json", str(out)]) == 0
    import json

    data = json.loads(out.read_text())["teacher"]
    assert set(data["step_s_min"]) == {"trainer", "bare", "trainer_shards"}
    assert all(v > 0 for v in data["step_s_min"].values())
    assert data["overhead"] > 0 and data["data"] > 0
