"""A quiet console: known third-party deprecations hidden, our warnings once, other ranks silent."""

from __future__ import annotations

import logging
import os
import re
import uuid
import warnings
from collections import Counter

import pytest

from conftest import REPO, free_port, shotdistill
from distill.logging import quiet_console


def _warn(message: str, category: type[Warning], module: str) -> None:
    warnings.warn_explicit(message, category, f"{module.replace('.', '/')}.py", 83, module=module)


def test_third_party_deprecations_hidden_ours_once(monkeypatch):
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    ours = f"test_console: ours {uuid.uuid4()}"        # "once" remembers a message for the process
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")                  # as under PYTHONWARNINGS=always
        quiet_console(0)
        for _ in range(3):
            _warn("`torch.distributed.all_gather_into_tensor` is deprecated. Please use ...",
                  FutureWarning, "torch.distributed.c10d_logger")
            _warn("something old", DeprecationWarning, "deepspeed.runtime.zero.stage3")
            _warn("something old", FutureWarning, "diffusers.models.attention")
            _warn(ours, UserWarning, "distill.trainer")
            _warn("test_console: torch's own", UserWarning, "torch.nn.modules.module")
    assert [str(w.message) for w in seen] == [ours] + ["test_console: torch's own"] * 3


def test_other_ranks_keep_only_errors(monkeypatch, caplog):
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    try:
        with warnings.catch_warnings(record=True) as seen:
            quiet_console(1)
            warnings.warn("test_console: rank 1", UserWarning)
            logging.getLogger("DeepSpeed.test").warning("test_console: a warning")
            logging.getLogger("DeepSpeed.test").error("test_console: an error")
        assert os.environ["TQDM_DISABLE"] == "1"
    finally:
        logging.disable(logging.NOTSET)
    assert not seen
    assert [r.getMessage() for r in caplog.records if "test_console" in r.getMessage()] == [
        "test_console: an error"]


@pytest.mark.slow
def test_two_rank_zero3_launch_prints_no_line_twice(tmp_path):
    """A 2-rank ZeRO-3 teacher run under PYTHONWARNINGS=always: no line (timestamps aside) is
    printed twice, so no warning repeats and rank 1 prints nothing rank 0 does."""
    out = shotdistill(["launch", str(REPO / "recipes/tiny/teacher.yaml"), "--nproc", "2",
                       "--master", f"127.0.0.1:{free_port()}", f"run.out={tmp_path / 'runs'}",
                       "train.steps=2", "teacher.eval_samples=0", "deepspeed.zero_stage=3"],
                      cwd=tmp_path, extra_env={"PYTHONWARNINGS": "always", "OMP_NUM_THREADS": "1"},
                      timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = [re.sub(r"^\[\d{4}-\d\d-\d\d [\d:,]+\] ", "", line)
             for line in (out.stdout + out.stderr).splitlines() if line.strip()]
    repeated = {line: n for line, n in Counter(lines).items() if n > 1}
    assert not repeated, repeated
    assert not [line for line in lines if "Warning:" in line], lines
