"""Protects benchmarks/validity.py without training: the row plan (runs, shared folders, overrides),
that the runner accepts the shared folders (their fingerprints) and refuses them across seeds, the
hard-link helper, the aggregation and its table, and the in-place replacement of its RESULTS.md section."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from distill import keys, layout
from distill.config import ConfigError, to_yaml
from distill.runner import _stages, plan

_PATH = Path(__file__).parents[1] / "benchmarks" / "validity.py"
ALL_ROWS = ["indicator-none", "indicator-learnable", "phase-offset", "stage1-only", "stage2-only", "both",
            "context-first", "context-first-last", "dynamic"]


@pytest.fixture(scope="module")
def validity():
    spec = importlib.util.spec_from_file_location("validity_bench", _PATH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _jobs(validity, root: Path, rows=ALL_ROWS, seeds=(0,), user=()):
    overrides = list(validity.BASE) + list(validity.SMOKE) + list(user)
    return validity.plan_jobs(list(rows), list(seeds), root, overrides, root / "stories.jsonl", 1)


def test_plan_trains_six_runs_per_seed_and_shares_only_what_stage2_only_reuses(validity, tmp_path):
    jobs = _jobs(validity, tmp_path, seeds=(0, 1))
    assert [(j.seed, j.run) for j in jobs] == [(s, r) for s in (0, 1) for r in (
        "default", "indicator-none", "indicator-learnable", "stage2-only", "context-first", "context-first-last")]
    by_run = {j.run: j for j in jobs if j.seed == 1}
    stage2 = by_run["stage2-only"]
    assert stage2.source == tmp_path / "seed-1" / "default"  # the same seed's default run, never another seed's
    assert stage2.shares == ("prepare", "teacher", "ode-pairs", "causal-init")
    assert all(not j.shares for j in jobs if j.run != "stage2-only")
    for job in jobs:
        ident = [f"run.name={job.run}", f"run.out={tmp_path}/seed-{job.seed}", f"run.seed={job.seed}"]
        assert job.train[2:5] == tuple(ident) and job.eval[2:5] == tuple(ident)
        assert "data.synth.captions=memory" in job.train and "train.steps=2" in job.train
        assert f"eval.prompts={tmp_path / 'stories.jsonl'}" in job.eval
        assert not any(o.startswith(("train.", "data.synth.")) for o in job.eval)  # the eval tree would refuse them
    assert "eval.stages=[]" in stage2.eval and "eval.stages=[]" not in by_run["default"].eval


def test_stage_rows_need_the_default_run_and_nothing_else(validity, tmp_path):
    assert [j.run for j in _jobs(validity, tmp_path, rows=["stage1-only"])] == ["default"]
    assert [j.run for j in _jobs(validity, tmp_path, rows=["stage2-only"])] == ["default", "stage2-only"]
    rows = {r.key: r for r in validity.ROWS}
    assert (rows["stage1-only"].run, rows["stage1-only"].stage) == ("default", "dmd-intra")
    assert {rows[k].run for k in ("phase-offset", "both", "dynamic")} == {"default"}


def test_user_overrides_come_last_and_eval_ones_reach_only_the_eval(validity, tmp_path):
    job = _jobs(validity, tmp_path, rows=["both"], user=["data.synth.captions=full", "eval.videos=2"])[0]
    assert job.train[-1] == "data.synth.captions=full" and "eval.videos=2" not in job.train
    assert job.eval[-1] == "eval.videos=2"
    with pytest.raises(SystemExit):
        validity.parse(["run.seed=3"])  # the seed is set per run
    with pytest.raises(SystemExit):
        validity.parse(["--smoke", "--results", str(tmp_path / "R.md")])  # a smoke table is never a result


def _finish_default_upstream(job) -> None:
    """Fake DONE records for the default run's upstream stages, with the fingerprints the runner
    would record for them (no compute), and their resolved config.yaml."""
    tree = plan(job.train[1], list(job.train[2:]))
    for node in _stages(tree):
        if node.folder in ("prepare", "teacher", "ode-pairs", "causal-init"):
            folder = job.folder / node.folder
            folder.mkdir(parents=True)
            (folder / layout.CONFIG).write_text(to_yaml(node.cfg))
            record = {"produces": getattr(node.cls, "produces", None), "wall_s": 2.0,
                      "fingerprint": keys.fingerprint(node.cls, node.cfg)}
            (folder / layout.DONE).write_text(json.dumps(record))


def test_the_runner_reuses_linked_stages_in_the_stage2_run_and_refuses_another_seeds(validity, tmp_path):
    jobs = {(j.seed, j.run): j for j in _jobs(validity, tmp_path, rows=["stage2-only"], seeds=(0, 1))}
    _finish_default_upstream(jobs[0, "default"])
    stage2 = jobs[0, "stage2-only"]
    assert validity.link_stages(stage2.source, stage2.folder, stage2.shares) == list(stage2.shares)
    planned = plan(stage2.train[1], list(stage2.train[2:]))  # fingerprints checked here: run.name is neutral
    assert {n.folder for n in _stages(planned)} == {*stage2.shares, "dmd-inter"}
    other = jobs[1, "stage2-only"]  # a seed-1 run that found seed 0's folders: the seed differs
    validity.link_stages(stage2.source, other.folder, other.shares)
    with pytest.raises(ConfigError, match="run.seed: 0 → 1"):
        plan(other.train[1], list(other.train[2:]))


def test_memory_option_rows_are_opt_in_and_dpo_reuses_the_default_teacher(validity, tmp_path):
    assert validity.parse([]).rows == ALL_ROWS  # the default rows stay ShotStream's tables
    jobs = _jobs(validity, tmp_path, rows=["context-noise", "negative-context", "references", "dpo", "dynamic"])
    assert [j.run for j in jobs] == ["default", "context-noise", "negative-context", "references", "dpo"]
    dpo = jobs[-1]
    assert dpo.source == jobs[0].folder and dpo.shares == ("prepare", "teacher")
    _finish_default_upstream(jobs[0])
    validity.link_stages(dpo.source, dpo.folder, dpo.shares)
    planned = plan(dpo.train[1], list(dpo.train[2:]))  # the linked teacher's fingerprint matches
    assert {n.folder for n in _stages(planned)} == {"prepare", "teacher", "dpo", "ode-pairs", "causal-init",
                                                    "dmd-intra", "dmd-inter"}
    table = validity.results_table(["context-noise", "dynamic"], tmp_path, [0])
    assert "| FilmWeaver | context-noise (Asymmetric Noise) | context-noise | 0 |" in table
    assert "Asymmetric Noise" not in validity.paper_table(["context-noise", "dynamic"])


def _fake_run(folder: Path, done: dict[str, float], wall: float = 1.0) -> None:
    for stage in done:
        (folder / stage).mkdir(parents=True)
        (folder / stage / layout.DONE).write_text(json.dumps({"wall_s": wall}))
    (folder / "eval" / layout.METRICS).write_text(json.dumps(done["eval"]))


def test_link_stages_hard_links_every_file_and_is_idempotent(validity, tmp_path):
    source, target = tmp_path / "default", tmp_path / "stage2"
    (source / "teacher" / "model").mkdir(parents=True)
    (source / "teacher" / "model" / "weights.bin").write_bytes(b"w" * 64)
    (source / "teacher" / layout.DONE).write_text("{}")
    assert validity.link_stages(source, target, ("teacher",)) == ["teacher"]
    linked = target / "teacher" / "model" / "weights.bin"
    assert linked.stat().st_ino == (source / "teacher" / "model" / "weights.bin").stat().st_ino
    assert validity.link_stages(source, target, ("teacher",)) == []  # a rerun: already there
    (source / "prepare").mkdir()
    with pytest.raises(RuntimeError, match="has not finished"):
        validity.link_stages(source, target, ("prepare",))


def _metrics(value: float) -> dict:
    final = {m: value for m in ("colour_consistency", "identity_match", "inter_identity", "motion_adherence",
                                "cut_accuracy")}
    return {**final, "fps": 100 * value, **{f"dmd-intra/{k}": v / 2 for k, v in final.items()}}


def test_aggregation_means_and_spreads_over_seeds_with_the_papers_numbers_beside(validity, tmp_path):
    for seed, value in ((0, 0.2), (1, 0.4)):
        _fake_run(tmp_path / f"seed-{seed}" / "default", {"teacher": {}, "eval": _metrics(value)})
    table = validity.results_table(["both", "stage1-only", "indicator-none"], tmp_path, [0, 1, 2])
    lines = {line.split(" | ")[1]: line for line in table.splitlines()[2:]}
    both = lines["both (Two Stage (Ours))"].split(" | ")
    assert both[3] == "2"  # seeds with a result (seed 2 has none)
    assert both[4] == "0.300 ± 0.141" and both[6] == "0.300 ± 0.141"  # mean ± sample std (n - 1)
    assert both[7] == "0.654" and both[10] == "0.978"  # paper: inter-shot Sub., Trans. Control
    assert lines["stage1-only (Stage 1 Only)"].split(" | ")[4] == "0.150 ± 0.071"  # the dmd-intra row
    assert "| 0.507 |" in lines["indicator-none (w/o Indicator)"] and "–" in lines["indicator-none (w/o Indicator)"]
    assert validity.spread([0.5], 3) == "0.500"


def test_section_replaces_itself_in_the_results_file(validity, tmp_path):
    _fake_run(tmp_path / "seed-0" / "default", {"eval": _metrics(0.3)})
    results = tmp_path / "RESULTS.md"
    results.write_text("# Benchmark results\n\n## Before\n\nkept\n\n## After\n\nkept too\n")
    meta = {"command": "python benchmarks/validity.py", "date": "2026-12-01", "overrides": ["a=1"], "stories": 4,
            "shots": 5, "stories_seed": 1000, "stories_file": "x"}
    timings = {"seed-0/default": {"stages_s": 30.0}}
    for _ in range(2):
        text = validity.section(validity.SECTION, meta, ["both"], tmp_path, [0], timings)
        validity.results.write_section(text, results)
    written = results.read_text()
    assert written.count(validity.SECTION) == 1 and written.count("## Before\n\nkept") == 1
    assert "## After\n\nkept too" in written and "total 30 s" in written


def test_memory_option_rows_write_their_own_section(validity, tmp_path):
    """The opt-in rows never replace the paper's tables: they tabulate into their own section, whose
    compute-time line counts only their runs."""
    assert validity.section_title(["both", "dynamic"], smoke=False) == validity.SECTION
    assert validity.section_title(["local-compression", "dynamic"], smoke=False) == validity.OPTIONS_SECTION
    assert validity.section_title(["local-compression"], smoke=True) == validity.SMOKE_SECTION
    timings = {"seed-0/default": {"stages_s": 30.0}, "seed-0/indicator-none": {"stages_s": 500.0},
               "seed-0/local-compression": {"stages_s": 10.0}}
    line = validity.timing_lines(timings, validity.runs_for(["local-compression", "dynamic"]))[0]
    assert "indicator-none" not in line and "total 40 s" in line


def test_smoke_and_real_runs_never_share_an_out_root(validity, tmp_path):
    validity.check_out_root(tmp_path / "smoke", smoke=True)
    with pytest.raises(SystemExit, match="smoke"):
        validity.check_out_root(tmp_path / "smoke", smoke=False)


def check_smoke_output(out_root: Path) -> None:
    """What a finished `--smoke` leaves: every run ok, the stage2-only run built on the default run's
    own (hard-linked) upstream stages with only dmd-inter trained, a table of every row, no result."""
    timings = json.loads((out_root / "timings.json").read_text())
    assert {r["status"] for r in timings.values()} == {"ok"} and len(timings) == 6
    seed = out_root / "seed-0"
    for stage in ("prepare", "teacher", "ode-pairs", "causal-init"):
        assert (seed / "stage2-only" / stage / layout.DONE).stat().st_ino == \
            (seed / "default" / stage / layout.DONE).stat().st_ino
    ran = [line.split()[0] for line in (seed / "stage2-only.log").read_text().splitlines() if " ran " in line]
    assert ran[:2] == ["dmd-inter", "eval"]
    table = (out_root / "SMOKE.md").read_text()
    assert table.startswith("## SMOKE RUN")
    assert "| Table 4 | stage1-only (Stage 1 Only) | default dmd-intra | 1 |" in table


@pytest.mark.slow
def test_smoke_runs_every_row_end_to_end(validity, tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the runs are subprocesses; tiny ops on a shared CPU
    assert validity.main(["--smoke", "--out-root", str(tmp_path / "smoke")]) == 0
    check_smoke_output(tmp_path / "smoke")
