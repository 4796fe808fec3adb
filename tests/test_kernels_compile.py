"""Protects the compiled (non-interpreted) kernels: they build for an H100 and fit its shared memory."""

import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")


@pytest.mark.slow
def test_kernels_compile_for_h100_within_shared_memory():
    """The kernels build to a sm_90 cubin without a GPU (Triton ships ptxas) within 227 KiB of shared memory."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    result = subprocess.run([sys.executable, "-m", "kernels.compile_check", "--arch", "90", "--head-dim", "128",
                             "--dtype", "bf16"], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    shared = {line.split()[0]: int(line.split()[1]) for line in result.stdout.splitlines()}
    assert set(shared) == {"forward", "dkdv", "dq"}
    assert all(0 < nbytes <= 227 * 1024 for nbytes in shared.values()), shared
