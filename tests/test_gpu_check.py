"""Protects benchmarks/gpu.py: `--smoke` runs every part (kernel, attention, streaming, training) at tiny
shapes on the CPU, so the one prepared GPU command never rots between GPU sessions (~35 s on 2 shared cores)."""

import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest
import torch

_PATH = Path(__file__).parents[1] / "benchmarks" / "gpu.py"


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="the smoke kernel part needs the interpreter")
def test_smoke_runs_every_part(tmp_path, monkeypatch, one_thread):
    spec = importlib.util.spec_from_file_location("gpu_check", _PATH)
    gpu = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = gpu
    spec.loader.exec_module(gpu)
    results = Path(gpu.results.RESULTS)
    before = results.read_text()
    assert gpu.main(["--smoke", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "gpu.json").read_text())
    assert results.read_text() == before  # a smoke run never writes RESULTS.md
    assert data["meta"]["smoke"] and data["meta"]["torch"] == torch.__version__
    assert set(gpu.PARTS) <= set(data)
    assert all(case["passed"] for case in data["kernel"]["cases"])
    assert all(check["passed"] for check in data["kernel"]["self_check"].values())
    names = [row["name"] for rows in data["attention"]["tables"].values() for row in rows]
    assert names.count("triton (ours)") == 2 and names.count("flex_attention") == 2  # training and decoding
    timed = [r for rows in data["attention"]["tables"].values() for r in rows if "max_diff" in r]
    assert len(timed) >= 6 and all(r["max_diff"] < 1e-4 for r in timed)  # every contender agrees with ours (fp32)
    assert list(data["streaming"]["modes"]) == ["none", "regions", "compile"]  # cudagraph needs CUDA
    for s in data["streaming"]["modes"].values():
        assert s["fps"] > 0 and s["ttff_s"] > 0 and 0 < s["decode_s"] < s["shots"][0]["shot_s"]
    rows = {**data["training"]["teacher"]["rows"], **data["training"]["dmd-intra"]["rows"]}
    assert set(rows) == {"step", "generator+critic step", "critic step"}
    assert all(r["flops"]["model"] > 0 and r["tokens_per_s"] > 0 for r in rows.values())
    text = (tmp_path / "gpu.md").read_text()
    assert text.startswith("## GPU check") and "CPU (smoke run, tiny shapes)" in text
