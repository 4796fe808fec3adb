"""TensorBoard's plugins read each stage run's recipe as HParams and one layout charting every tag."""

from __future__ import annotations

import ast
import inspect
import itertools
import json
import re
import textwrap
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from conftest import REPO, write_recipe
from distill.config import load_recipe
from distill.logging import (MACHINE_KEYS, RUN_INFO_SUFFIX, StageLogger, custom_scalars_layout,
                             read_scalars)
from distill.runner import run_recipe

RUNS = {"toy": [], "toy-lr": ["run.name=toy-lr", "optim.critic.lr=3e-4"]}  # run name -> overrides


class Board:
    """TensorBoard's backend over one logdir: the multiplexer, the HParams and custom-scalars plugins."""

    def __init__(self, logdir: Path):
        from tensorboard import context
        from tensorboard.backend.event_processing import data_provider, plugin_event_multiplexer
        from tensorboard.plugins import base_plugin
        from tensorboard.plugins.custom_scalar.custom_scalars_plugin import CustomScalarsPlugin
        from tensorboard.plugins.hparams import backend_context
        from tensorboard.plugins.scalar.scalars_plugin import ScalarsPlugin

        self.mux = plugin_event_multiplexer.EventMultiplexer()
        self.mux.AddRunsFromDirectory(str(logdir))
        self.mux.Reload()
        tb = base_plugin.TBContext(logdir=str(logdir), multiplexer=self.mux, plugin_name_to_instance={},
                                   data_provider=data_provider.MultiplexerDataProvider(self.mux, str(logdir)))
        tb.plugin_name_to_instance["scalars"] = ScalarsPlugin(tb)
        self.ctx, self.hparams, self.custom = context.RequestContext(), backend_context.Context(tb), \
            CustomScalarsPlugin(tb)

    def sessions(self) -> dict[str, tuple[dict, dict]]:
        """{session run: (hparams, {metric tag: last value})} as the HParams tab lists them."""
        from google.protobuf.json_format import MessageToDict
        from tensorboard.plugins.hparams import api_pb2, get_experiment, list_session_groups

        exp = get_experiment.Handler(self.ctx, self.hparams, "", api_pb2.GetExperimentRequest()).run()
        request = api_pb2.ListSessionGroupsRequest(start_index=0, slice_size=100, allowed_statuses=[
            api_pb2.STATUS_UNKNOWN, api_pb2.STATUS_SUCCESS, api_pb2.STATUS_FAILURE, api_pb2.STATUS_RUNNING])
        request.col_params.extend([api_pb2.ColParams(hparam=h.name) for h in exp.hparam_infos]
                                  + [api_pb2.ColParams(metric=m.name) for m in exp.metric_infos])
        groups = list_session_groups.Handler(self.ctx, self.hparams, "", request).run().session_groups
        return {s.name: (MessageToDict(g).get("hparams", {}), {m.name.tag: m.value for m in g.metric_values})
                for g in groups for s in g.sessions}

    def layout(self) -> dict:
        return json.loads(self.custom.layout_impl(self.ctx, "") or "{}")

    def matched(self, run: str, regex: str) -> set[str]:
        """The tags of `run` one chart regex draws, as the Custom Scalars tab asks for them."""
        return set(self.custom.scalars_impl(self.ctx, run, regex, "")["tag_to_events"])


@pytest.fixture(scope="module")
def toy_runs(tmp_path_factory) -> Path:
    """Two toy runs differing in one hyperparameter; the first rerun once (a resume at its end)."""
    root = tmp_path_factory.mktemp("tb")
    recipe = write_recipe(root / "toy.yaml", {
        "stage": "toy_stage:ToyStage", "run": {"name": "toy", "out": str(root / "runs"), "dist_timeout": 60},
        "train": {"steps": 4, "checkpoint_every": 4, "micro_batch": 2, "grad_accum": 2},
        "deepspeed": {"zero_stage": 2, "param_persistence_threshold": 0},
        "logging": {"every": 1, "progress": False}})
    for overrides in RUNS.values():
        run_recipe(recipe, overrides)
    (root / "runs/toy/toy/DONE").unlink()
    run_recipe(recipe, RUNS["toy"])
    return root


def _leaves(node, prefix: str = ""):
    for key, value in node.items():
        if isinstance(value, dict):
            yield from _leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def test_each_run_records_its_resolved_recipe_and_final_scalars(toy_runs):
    sessions = Board(toy_runs / "runs").sessions()
    assert set(sessions) == {f"{name}/tb/toy" for name in RUNS}  # the stage folders themselves
    for name, overrides in RUNS.items():
        hparams, metrics = sessions[f"{name}/tb/toy"]
        cfg = OmegaConf.to_container(load_recipe(toy_runs / "toy.yaml", overrides), resolve=True)
        want = {k: json.dumps(v) if isinstance(v, list) else v for k, v in _leaves(cfg)
                if v is not None and k not in MACHINE_KEYS and not k.endswith(".path")}
        assert hparams == want
        assert "run.out" not in hparams and hparams["run.name"] == name
        assert hparams["logging.progress"] is False and hparams["train.steps"] == 4
        tb = toy_runs / "runs" / name / "tb/toy"
        for tag in ("toy/critic/loss", "toy/generator/loss"):  # the stage's final scalars
            points = read_scalars(tb, tag)
            assert metrics[tag] == pytest.approx(points[max(points)])
    assert sessions["toy/tb/toy"][0]["optim.critic.lr"] == 1e-4
    assert sessions["toy-lr/tb/toy"][0]["optim.critic.lr"] == 3e-4


def test_resume_writes_the_info_again_but_tensorboard_shows_one_run(toy_runs):
    tb = toy_runs / "runs/toy/tb/toy"
    assert len(list(tb.glob(f"*{RUN_INFO_SUFFIX}"))) == 2
    board = Board(toy_runs / "runs")
    assert set(board.mux.Runs()) == {f"{name}/tb/toy" for name in RUNS}
    assert len(board.sessions()) == len(RUNS)
    assert sorted(read_scalars(tb, "toy/critic/loss")) == [1, 2, 3, 4]


def test_one_layout_read_from_every_run(toy_runs):
    layout = Board(toy_runs / "runs").layout()
    read = {c["title"]: {ch["title"]: ch["multiline"]["tag"] for ch in c["chart"]}
            for c in layout["category"]}
    # written by three stage starts, merged by TensorBoard into one copy
    assert read == {title: {name: tags for name, (_, tags) in charts.items()}
                    for title, charts in custom_scalars_layout().items()}


# ---------------------------------------------------------------- tags the stages log, from their code

def _key(node: ast.AST) -> str | None:
    """A dict key as a template: "name", or "name_{when}" for an f-string."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr):
        return "".join(v.value if isinstance(v, ast.Constant) else "{" + ast.unparse(v.value) + "}"
                       for v in node.values)
    return None


def _dict_keys(node: ast.AST) -> set[str]:
    if isinstance(node, ast.Dict):
        return {k for k in map(_key, node.keys) if k}
    if isinstance(node, ast.DictComp):
        return {k for k in [_key(node.key)] if k}
    return set()


def returned_keys(func) -> set[str]:
    """Keys of the dicts `func` returns: literals, or a name filled by assignment / update."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(func)))
    keys, names = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Return) and node.value is not None:
            keys |= _dict_keys(node.value)
            if isinstance(node.value, ast.Name):
                names.add(node.value.id)
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign):
            for target in node.targets:
                if isinstance(target, ast.Name) and target.id in names:
                    keys |= _dict_keys(node.value)
                if isinstance(target, ast.Subscript) and getattr(target.value, "id", None) in names:
                    keys |= {k for k in [_key(target.slice)] if k}
        if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "update" \
                and getattr(node.func.value, "id", None) in names:
            keys |= _dict_keys(node.args[0])
    return keys


def string_args(func, callee: str) -> set[str]:
    """String literals passed positionally to `callee` (a name or method) inside `func`."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(func)))
    return {a.value for n in ast.walk(tree) if isinstance(n, ast.Call)
            and callee in (getattr(n.func, "id", None), getattr(n.func, "attr", None))
            for a in n.args if isinstance(a, ast.Constant) and isinstance(a.value, str)}


def expand(templates: set[str], **choices: set[str]) -> set[str]:
    out = set()
    for template in templates:
        names = re.findall(r"\{(\w+)\}", template)
        for values in itertools.product(*(sorted(choices[n]) for n in names)):
            out.add(template.format(**dict(zip(names, values))))
    return out


def trainer_tags(cls, per_model: set[str], every: set[str], extra: set[str]) -> set[str]:
    """What the trainer logs for a stage class: <model>/<suffix>, the step's other scalars, the
    trainer's own (`every`) and the stage's `extra` final scores."""
    models = set(string_args(cls.run, "TrainedModel"))
    return {f"{m}/{s}" for m in models for s in per_model} | (returned_keys(cls.step) - models) | every | extra


def stage_tags(toy_tags: set[str]) -> tuple[dict[str, set[str]], set[str]]:
    """{folder: tags (without the folder)} of every registered stage that logs scalars, derived from
    the code, and the trainer's stage-wide tags; the trainer's own names come from the toy run."""
    from distill.eval import metrics, scoring
    from distill.eval.probes import distance_scores, multishot_colour, next_shot_colour
    from distill.stages.causal_init import CausalInitStage
    from distill.stages.dmd import DMDInterStage, DMDIntraStage, DMDStage
    from distill.stages.eval import EvalStage
    from distill.stages.ode_pairs import OdePairsStage
    from distill.stages.prepare import PrepareStage
    from distill.stages.teacher import StratifiedTimesteps, TeacherStage

    per_model = {t.split("/")[1] for t in toy_tags if t.count("/") == 1 and t.startswith("critic/")}
    every = {t for t in toy_tags if "/" not in t}
    assert per_model >= {"loss", "grad_norm", "lr"} and every >= {"step_time", "bad_steps"}
    t = load_recipe(REPO / "recipes/tiny/teacher.yaml")
    buckets = set(StratifiedTimesteps(t.teacher.loss_buckets, t.teacher.timestep_shift, 1).names)
    colour = returned_keys(multishot_colour)
    dmd_scores = expand(returned_keys(DMDStage.evaluate), k=colour, when=string_args(DMDStage.run, "evaluate"))
    dmd = trainer_tags(DMDStage, per_model, every, dmd_scores)
    module = ast.parse(inspect.getsource(scoring))
    eval_keys = set().union(*(_dict_keys(n) for n in ast.walk(module)))
    assert {"fps", "latency_s"} <= eval_keys  # the throughput chart's two tags
    scores = {"fps", "latency_s", *scoring.FACT_METRICS, *returned_keys(metrics.score_video),
              *returned_keys(metrics.fact_scores)}
    evaluated = load_recipe(REPO / "recipes/tiny/eval.yaml").eval.stages  # logged as eval/<stage>/<name>
    assert evaluated
    return {
        PrepareStage.folder: returned_keys(PrepareStage.run),
        OdePairsStage.folder: returned_keys(OdePairsStage.run),
        TeacherStage.folder: trainer_tags(TeacherStage, per_model, every,
                                          buckets | returned_keys(next_shot_colour)),
        CausalInitStage.folder: trainer_tags(CausalInitStage, per_model, every, expand(
            returned_keys(distance_scores), when=string_args(CausalInitStage.run, "distance_scores"))),
        DMDIntraStage.folder: dmd, DMDInterStage.folder: dmd,
        EvalStage.folder: scores | {f"{stage}/{name}" for stage in evaluated for name in scores},
    }, every


def test_layout_regexes_chart_every_tag_the_stages_log(toy_runs, tmp_path):
    board = Board(toy_runs / "runs")
    toy_tags = {tag.split("/", 1)[1] for tag in board.mux.PluginRunToTagToContent("scalars")["toy/tb/toy"]}
    tags, every = stage_tags(toy_tags)
    assert any(tag.startswith("loss_t0-") for tag in tags["teacher"]) and "exit_step" in tags["dmd-inter"]  # derived
    assert "eval_distance_after" in tags["causal-init"] and "student_colour_all_before" in tags["dmd-intra"]
    assert tags["prepare"] and tags["ode-pairs"]
    from distill.stages.dmd import DMDStage
    media = string_args(DMDStage._media, "histogram") | string_args(DMDStage._media, "gif")
    # a tag that is both a scalar and a histogram makes the HParams tab fail for the whole logdir
    assert media and not media & tags["dmd-inter"]
    for folder, names in tags.items():
        logger = StageLogger(tmp_path / "tb" / folder, folder, main=True, tensorboard=True, progress=False,
                             total_steps=1, start_step=0)
        logger.scalars(1, {name: 1.0 for name in names})
        logger.close()
    logged = Board(tmp_path / "tb")
    layout = board.layout()
    for category in layout["category"]:
        runs = [category["title"]] if category["title"] in tags else sorted(tags)
        charted = set()
        for chart in category["chart"]:
            for regex in chart["multiline"]["tag"]:
                hits = {tag for run in runs for tag in logged.matched(run, regex)}
                assert hits, f"{category['title']} / {chart['title']}: {regex} matches no logged tag"
                assert not hits & charted, f"{category['title']}: {hits & charted} drawn twice"
                charted |= hits
        if category["title"] in tags:
            assert charted == {f"{category['title']}/{n}" for n in tags[category["title"]] - every}
        else:
            assert charted == {f"{run}/{n}" for run in tags for n in tags[run] & every}
    assert {c["title"] for c in layout["category"]} >= set(tags)
