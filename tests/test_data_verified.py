"""Data verified: a shard's sidecar records its size and sha256; a rerun of preparation redoes (and
reports) a shard that was truncated or altered since, and a damaged shard read in training fails
with an error naming the shard file."""

from __future__ import annotations

import json
import shutil

import pytest

from distill.config import load_recipe
from distill.data.components import synth_settings
from distill.data.datasets import ShotDataset
from distill.data.synth import synthesize
from distill.stages.prepare import prepare
from launch.data import default_recipe

TINY = ["data.synth.videos=4", "data.synth.seed=1", "data.synth.max_frames=14",
        "data.records_per_shard=2", "logging.progress=false"]


def _cfg():
    return load_recipe(default_recipe(), TINY)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("verified")
    manifest = synthesize(root / "world", synth_settings(_cfg().data.synth))
    report = prepare(_cfg(), manifest, root / "out", progress=False)
    return root, manifest, report


@pytest.fixture
def copy(prepared, tmp_path):
    root, manifest, report = prepared
    out = tmp_path / "out"
    shutil.copytree(root / "out", out)
    return out, manifest, report


def _damage(path, how):
    data = path.read_bytes()
    if how == "truncate":
        path.write_bytes(data[:len(data) // 2])
    else:  # one byte flipped inside the tensor data: same size
        flipped = bytearray(data)
        flipped[-7] ^= 0xFF
        path.write_bytes(bytes(flipped))


def test_sidecar_records_size_and_sha256(prepared):
    import hashlib
    root, _, _ = prepared
    meta = json.loads((root / "out/shard-00001.json").read_text())
    data = (root / "out/shard-00001.safetensors").read_bytes()
    assert meta["file"] == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


@pytest.mark.parametrize("how", ["truncate", "flip"])
def test_rerun_redoes_and_reports_a_damaged_shard(copy, capfd, how):
    out, manifest, report = copy
    good = (out / "shard-00001.safetensors").read_bytes()
    untouched = (out / "shard-00000.safetensors").stat().st_mtime_ns
    _damage(out / "shard-00001.safetensors", how)
    assert prepare(_cfg(), manifest, out, progress=False) == report
    err = capfd.readouterr().err
    assert f"{out / 'shard-00001'}: " in err and "preparing the shard again" in err, err
    assert "shard-00000" not in err
    assert (out / "shard-00001.safetensors").read_bytes() == good  # re-encoded, bit for bit
    assert (out / "shard-00000.safetensors").stat().st_mtime_ns == untouched


def test_a_truncated_shard_read_in_training_names_the_file(copy):
    out, _, _ = copy
    dataset = ShotDataset(out, "dynamic", 6)
    shard = out / "shard-00001.safetensors"
    _damage(shard, "truncate")
    items = [i for i, (r, _) in enumerate(dataset.items) if dataset.data.records[r]["shard"] == "shard-00001"]
    with pytest.raises(Exception) as error:
        dataset[items[0]]
    assert str(shard) in str(error.value) and "\n" not in str(error.value), error.value
