"""The one table of stages: what each reads, runs and writes, in run order.

The `dna` command's stage commands, `dna run`'s order and report, and (through flows/steps.py) the Prefect flows,
the MLflow metric files, the pipeline report, the checks of dvc.yaml and the run's file layout (dna/paths.py) all
come from this table. Adding a stage is one entry here plus its function; the table is a dna.registry.Registry like
the other plugin surfaces, in run order. A stage's function is named as "module:attribute" and imported only when
the stage runs, so reading the table costs no imports.
"""
from __future__ import annotations

import functools
import importlib
import itertools
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Callable, Literal

from dna.registry import Registry


@dataclass(frozen=True)
class Plot:
    """A plot of a stage's tables, for the tools that draw them (DVC's plots): `y`'s columns of each of `files`
    (under `outputs`; a folder: one plot per file, e.g. per block) against the column `x` (or a params key,
    "${key}"), named `name` (a single file or folder names its own plot); without x, a picture the stage drew."""

    files: tuple[str, ...]
    x: str | None = None
    y: tuple[str, ...] = ()
    kind: Literal["line", "scatter"] = "line"
    name: str | None = None
    y_label: str | None = None
    note: str | None = None  # what it shows, when its name does not say


@dataclass(frozen=True)
class Stage:
    name: str
    help: str
    function: str  # "module:attribute": function(run) -> dict, or function(run, block) for a per-block stage
    params: tuple[str, ...]  # the params.yaml keys that decide its result
    outputs: tuple[str, ...]  # files and folders it writes, under `outputs`
    metrics: str | None = None  # its metrics file under `outputs`
    inputs: tuple[str, ...] = ()  # files and folders of earlier stages it reads, under `outputs`
    checkpoints: tuple[str, ...] = ()  # of its outputs, those a rerun resumes from (never deleted before it runs)
    reports: tuple[str, ...] = ()  # of its outputs, small tables and pictures people read (not versioned as data)
    headline: tuple[str, ...] = ()  # the metrics a report shows
    per_block: bool = False
    # once per search target (search.targets): its outputs, metrics and inputs hold "{target}", the target's name
    per_target: bool = False
    prepare: str | None = None  # "module:attribute" run once before a per-block stage's blocks
    makes_profile: bool = False  # validated without the latency profile, which it makes
    step: str | None = None  # the pipeline step (DVC stage, Prefect flow) it runs in, when not one of its own
    data_parallel: bool = False  # trains in several processes when asked (`--nproc N`: torchrun, dna/ddp.py)
    # the params key of its epoch count: it trains epoch by epoch (its function takes on_epoch, called with each
    # epoch's row) and writes a history (its report named history.csv)
    epochs: str | None = None
    default: bool = True  # part of `dna run` and of the default pipeline (dvc.yaml); False: run only when asked
    runs_default_stages: bool = False  # its function runs the stages of a later round (its code deps hold theirs)
    # draws pictures of other stages' files and nothing else: a round after the first leaves it out (a later round's
    # pictures: `dna <stage> -S outputs=<that round's outputs>`), so that how pictures look reruns no round
    pictures: bool = False
    # "module:attribute": the class of the run its function (and preparation) gets, the narrowest that has what they
    # read (dna.context): its DVC code dependencies are what the function and this class import
    context: str = "dna.run:Run"
    # the files and folders, among its outputs or inside them, that code reaches by name (`paths.<name>`,
    # dna/paths.py; its metrics file is `paths.<stage>_metrics`): "{target}" stands for a search target's name,
    # "{block}" for a block's index
    named: Mapping[str, str] = field(default_factory=dict, hash=False)
    plots: tuple[Plot, ...] = ()  # of its tables and pictures

    def files(self) -> tuple[str, ...]:
        """Everything it writes under `outputs`: its outputs and its metrics file."""
        return self.outputs + ((self.metrics,) if self.metrics else ())

    def at(self, target: str) -> Stage:
        """A per-target stage with its paths for one target (a stage of all targets as it is)."""
        return at_target(self, target)

    @property
    def pipeline_step(self) -> str:
        return self.step or self.name

    def load(self) -> Callable:
        """The stage's function, run holding the stage's lock on the outputs folder (dna/locks.py), whether or not
        its module took it."""
        from dna.locks import locked

        function = _attribute(self.function)
        if getattr(function, "stage_lock", None) == self.name:
            return function
        return locked(self.name, per_block=self.per_block, per_target=self.per_target)(function)

    def load_prepare(self) -> Callable | None:
        return _attribute(self.prepare) if self.prepare else None

    def load_context(self) -> type:
        return _attribute(self.context)


def at_target(spec, target: str):
    """A per-target stage or pipeline step (its outputs, inputs, checkpoints, reports and metrics holding
    "{target}") with its paths for one target; any other as it is."""
    if not spec.per_target:
        return spec

    def fill(paths: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(p.replace("{target}", target) for p in paths)

    return replace(spec, outputs=fill(spec.outputs), inputs=fill(spec.inputs), checkpoints=fill(spec.checkpoints),
                   reports=fill(spec.reports), metrics=spec.metrics and spec.metrics.replace("{target}", target))


def _attribute(spec: str) -> Callable:
    module, _, name = spec.partition(":")
    return getattr(importlib.import_module(module), name)


PLAIN, WITH_SPACE = "dna.context:Context", "dna.spaces.context:SpaceContext"  # the narrower Stage.context

def _well_formed(name: str, stage: Stage) -> None:
    """What the table's readers take for granted of an entry: its own name, one fan-out, that what it resumes from
    and the reports it writes are among its outputs, and that it plots only what it writes."""
    problems = [f"registered as {name!r}"] if stage.name != name else []
    if stage.per_block and stage.per_target:
        problems.append("both per block and per target")
    for kind, given in (("checkpoints", stage.checkpoints), ("reports", stage.reports)):
        if outside := sorted(set(given) - set(stage.outputs)):
            problems.append(f"{kind} {outside} not among its outputs")
    plotted = {f for plot in stage.plots for f in plot.files}
    if outside := sorted(f for f in plotted if not any(f == o or f.startswith(f"{o}/") for o in stage.outputs)):
        problems.append(f"plots of {outside}, which it does not write")
    if unnamed := [p.files for p in stage.plots if p.x and p.name is None and (len(p.files), len(p.y)) != (1, 1)]:
        problems.append(f"plots of {unnamed} without a name: only one file's one column names its own plot")
    if templated := sorted(f for f in plotted if "{" in f):
        problems.append(f"plots of {templated}: a plot is of the whole run (a folder of every target's or block's)")
    if problems:
        raise ValueError(f"stage {stage.name!r}: {'; '.join(problems)}")


# The one table, in run order: `STAGES.register(stage.name, stage)` adds an entry after these.
STAGES: Registry[Stage] = Registry("stage", "stage", on_register=_well_formed)
for _stage in (
    Stage("data", "Make the fixed train / rate / test splits.", "dna.stages.data:stage_data",
          ("seed", "data"), ("data/splits.json",), metrics="data/metrics.json",
          headline=("train_images", "rate_images", "test_images", "num_classes"), context=PLAIN,
          named={"splits": "data/splits.json"}),
    Stage("teacher", "Train, download or load the teacher; report its test accuracy.",
          "dna.stages.teacher:stage_teacher",
          ("seed", "data", "teacher"),
          ("teacher/teacher.pt", "teacher/history.csv"),  # train_state.pt too when trained here (resumes; not an
          # output DVC tracks, since a teacher taken as it is has none, and never deleted by DVC)
          metrics="teacher/metrics.json", headline=("test_accuracy",), data_parallel=True,
          epochs="teacher.train.epochs",
          inputs=("data/splits.json",), reports=("teacher/history.csv",), context=PLAIN,
          named={"teacher_dir": "teacher", "teacher": "teacher/teacher.pt", "teacher_history": "teacher/history.csv",
                 "teacher_state": "teacher/train_state.pt"},
          plots=(Plot(("teacher/history.csv",), "epoch", ("loss", "rate_accuracy"), name="teacher-training"),)),
    Stage("distill", "Train each block's supernet on its targets (resumes from the last epoch).",
          "dna.stages.distill:stage_distill",
          ("seed", "data", "teacher.model", "teacher.boundaries", "space", "supervision", "distill"),
          ("distill",), per_block=True, prepare="dna.stages.distill:stage_features", data_parallel=True,
          inputs=("data/splits.json", "teacher/teacher.pt"), checkpoints=("distill",),
          named={"distill_dir": "distill", "features": "distill/features", "supernet": "distill/block_{block}.pt",
                 "distill_history": "distill/history_{block}.csv"},
          plots=(Plot(("distill/curves",), "epoch", ("loss",),
                      note="one plot per block: mean distillation loss of its cells per epoch"),)),
    Stage("rate", "Rate every candidate of every cell of each block.", "dna.stages.rate:stage_rate",
          ("rating",), ("ratings",), per_block=True, step="distill",
          named={"ratings_dir": "ratings", "rating": "ratings/block_{block}.csv"},
          plots=(Plot(("ratings",), "macs", ("score",), "scatter", note="one plot per block: every candidate's rating "
                      "against its cost (the spread of each block's ratings)"),)),
    Stage("profile", "Time every candidate layer, the stem and the head in ONNX Runtime on this machine.",
          "dna.stages.latency_profile:stage_profile", ("data.image_size", "data.channels", "space", "profile"),
          ("profile/latency.csv", "profile/profile.json"), makes_profile=True, inputs=("data/splits.json",),
          reports=("profile/profile.json",), context=WITH_SPACE,
          named={"profile_dir": "profile", "latency": "profile/latency.csv", "profile_record": "profile/profile.json"}),
    Stage("search", "Choose each target's network under its budgets and compute the Pareto front.",
          "dna.stages.search:stage_search", ("data.image_size", "data.channels", "space", "search"),
          ("search/targets", "search/front.csv", "search/chosen.csv", "search/targets.csv"),
          metrics="search/metrics.json", headline=("score", "params", "macs", "latency_ms"),
          inputs=("data/splits.json", "ratings", "profile/latency.csv"),
          reports=("search/front.csv", "search/chosen.csv", "search/targets.csv"), context=WITH_SPACE,
          named={"search_dir": "search", "arch": "search/targets/{target}/arch.yaml", "front": "search/front.csv",
                 "chosen": "search/chosen.csv", "targets_table": "search/targets.csv"},
          plots=(Plot(("search/front.csv", "search/chosen.csv"), "${search.front_axis}", ("score",), "scatter",
                      "pareto-front", "rating (lower is better)",
                      "the Pareto front (rating against cost) and every target's network on it"),)),
    Stage("retrain", "Train each target's network (from scratch or from the supernets; optionally with KD).",
          "dna.stages.retrain:stage_retrain", ("seed", "data", "teacher.model", "retrain"),
          ("targets/{target}/retrain/model.pt", "targets/{target}/retrain/train_state.pt",
           "targets/{target}/retrain/history.csv"),
          metrics="targets/{target}/retrain/metrics.json", headline=("test_accuracy",), data_parallel=True,
          epochs="retrain.train.epochs", per_target=True,
          inputs=("data/splits.json", "search/targets/{target}/arch.yaml", "teacher/teacher.pt", "distill"),
          checkpoints=("targets/{target}/retrain/train_state.pt",), reports=("targets/{target}/retrain/history.csv",),
          context=WITH_SPACE,
          named={"target_dir": "targets/{target}", "retrain_dir": "targets/{target}/retrain",
                 "model": "targets/{target}/retrain/model.pt", "train_state": "targets/{target}/retrain/train_state.pt",
                 "retrain_history": "targets/{target}/retrain/history.csv"}),
    Stage("export", "Export each target's retrained network to ONNX and check it against PyTorch.",
          "dna.stages.export:stage_export",
          ("data", "export"), ("targets/{target}/export/model.onnx",), metrics="targets/{target}/export/metrics.json",
          headline=("onnx_test_accuracy", "max_abs_diff"), per_target=True,
          inputs=("data/splits.json", "targets/{target}/retrain/model.pt", "targets/{target}/retrain/metrics.json"),
          context=WITH_SPACE,
          named={"export_dir": "targets/{target}/export", "onnx": "targets/{target}/export/model.onnx"}),
    Stage("figures", "Draw the run's pictures: the Pareto front with every target's network, budget and accuracy, "
          "every block's rating spread and the retraining curves (a stage of its own: how pictures look reruns "
          "nothing that trains).",
          "dna.stages.figures:stage_figures", (),
          ("search/front.png", "search/rating_spread.png", "search/curves.png"),
          inputs=("search/front.csv", "search/targets.csv", "search/metrics.json", "ratings", "targets"),
          reports=("search/front.png", "search/rating_spread.png", "search/curves.png"), pictures=True,
          context=WITH_SPACE,
          named={"front_plot": "search/front.png", "spread_plot": "search/rating_spread.png",
                 "curves_plot": "search/curves.png"},
          plots=(Plot(("search/front.png",)), Plot(("search/rating_spread.png",)),
                 Plot(("search/curves.png",), note="every target's retraining"))),
    Stage("rank", "Measure how well the rating ranks networks: train a stratified sample, the searched network and "
          "random networks under the budgets from scratch; rate them with a single-path one-shot supernet too.",
          "dna.rank:stage_rank", ("seed", "data", "space", "supervision", "distill", "rating", "search", "rank"),
          ("rank/networks", "rank/spos", "rank/replicates", "rank/predictor.json", "rank/plan.csv", "rank/bands.json",
           "rank/networks.csv", "rank/rank.png"),
          metrics="rank/metrics.json",
          headline=("kendall_tau", "kendall_tau_in_band", "spos_kendall_tau", "seed_kendall_tau",
                    "rating_seed_kendall_tau", "searched_accuracy", "random_median_accuracy"), default=False,
          inputs=("data/splits.json", "teacher/teacher.pt", "distill", "ratings", "profile/latency.csv",
                  "search/targets"),
          checkpoints=("rank/networks", "rank/spos", "rank/replicates"),
          reports=("rank/predictor.json", "rank/plan.csv", "rank/bands.json", "rank/networks.csv", "rank/rank.png"),
          named={"rank_dir": "rank", "rank_networks": "rank/networks", "rank_spos": "rank/spos",
                 "rank_replicates": "rank/replicates", "spos_ratings": "rank/spos/ratings.csv",
                 "predictor": "rank/predictor.json", "rank_plan": "rank/plan.csv",
                 "rank_bands": "rank/bands.json", "rank_table": "rank/networks.csv", "rank_plot": "rank/rank.png"},
          plots=(Plot(("rank/networks.csv",), "rating", ("test_accuracy",), "scatter", "rank-rating",
                      "test accuracy, trained from scratch", "rating against test accuracy of every trained network"),
                 Plot(("rank/networks.csv",), "rating", ("rating_replicate_1",), "scatter", "rank-rating-noise",
                      "rating, blocks distilled again from another seed (rank.rating_seeds)",
                      "the rating's own noise: each network's rating against its rating by blocks distilled again "
                      "from another seed"),
                 Plot(("rank/rank.png",)))),
    Stage("rounds", "DNA+: rounds 2 to rounds.count after round 1 (the default stages), each every default stage "
          "with the network the round before found and retrained as its teacher.", "dna.rounds:stage_rounds",
          ("seed", "data", "teacher", "space", "supervision", "distill", "rating", "profile", "search", "retrain",
           "export", "rounds"), ("rounds",), metrics="rounds.json", headline=("best_round", "best_test_accuracy"),
          default=False, inputs=("search/targets", "targets"), checkpoints=("rounds",),
          runs_default_stages=True, named={"rounds_dir": "rounds"}),
):
    STAGES.register(_stage.name, _stage)


def run_stage(stage: Stage, run, blocks: list[int] | None = None, targets: list[str] | None = None) -> list:
    """Run one stage of the table on a run: once, per block (after its preparation), every block even when one
    fails (dna.fan_out; in several processes the first failure stops them all), or per search target, each in
    order; returns its results. The stage gets the run as its own context (Stage.context), sharing what is loaded."""
    run = run.view(stage.load_context())
    if stage.per_target:
        from dna.fan_out import each, raise_unfinished

        names = list(run.params.search.named_targets()) if targets is None else targets
        function = stage.load()
        results, failed = each({t: functools.partial(function, run.for_target(t)) for t in names},
                               f"{stage.name}: target", log_failures=False)
        raise_unfinished(stage.name, "target", failed, results)
        return [results[t] for t in names]
    if not stage.per_block:
        return [stage.load()(run)]
    from dna.ddp import rank_and_world
    from dna.fan_out import each, raise_unfinished

    if prepare := stage.load_prepare():
        prepare(run)
    function, blocks = stage.load(), list(range(run.space.num_blocks) if blocks is None else blocks)
    if rank_and_world()[1] > 1:  # a rank that went on after a failure would wait for the others forever
        return [function(run, b) for b in blocks]
    results, failed = each({b: functools.partial(function, run, b) for b in blocks}, f"{stage.name}: block",
                           log_failures=False)  # a lone failure is reported once, as it is raised
    raise_unfinished(stage.name, "block", failed, results)
    return [results[b] for b in blocks]


# The sections whose checks build the teacher or the space (and so import timm, torchvision and torch.fx).
MODEL_SECTIONS = ("teacher", "space", "supervision", "search")


def step_keys(stage: Stage, table: Iterable[Stage] = STAGES) -> tuple[str, ...]:
    """The params keys of the stage's pipeline step (every stage that runs with it)."""
    return tuple(dict.fromkeys(k for s in table if s.pipeline_step == stage.pipeline_step for k in s.params))


def checks(keys: tuple[str, ...], makes_profile: bool = False) -> dict[str, bool]:
    """What to check of a config before work that reads these keys (dna.run.validate's flags): the data when it
    reads data, the models when it reads the teacher or the space, the latency profile unless it makes it."""
    sections = {key.split(".")[0] for key in keys}
    return {"data": "data" in sections, "models": bool(sections & set(MODEL_SECTIONS)),
            "check_profile": not makes_profile}


def default_stages(table: Iterable[Stage] = STAGES) -> tuple[Stage, ...]:
    """The stages of `dna run` and of the default pipeline, in run order."""
    return tuple(s for s in table if s.default)


def search_stages(table: Iterable[Stage] = STAGES) -> tuple[Stage, ...]:
    """The default stages up to the search: those before the first one that runs per target."""
    return tuple(itertools.takewhile(lambda s: not s.per_target, default_stages(table)))


def later_round_stages(table: Iterable[Stage] = STAGES) -> tuple[Stage, ...]:
    """The stages of a DNA+ round after the first: the default stages but those that only draw pictures."""
    return tuple(s for s in default_stages(table) if not s.pictures)


def steps(table: Iterable[Stage] = STAGES, default: bool = True) -> dict[str, list[Stage]]:
    """The stages grouped into pipeline steps (each a DVC stage and a Prefect flow), in run order: those of the
    default pipeline, or (default=False) those run only when asked."""
    out: dict[str, list[Stage]] = {}
    for s in table:
        if s.default == default:
            out.setdefault(s.pipeline_step, []).append(s)
    return out


def accuracy_line(teacher: dict, export: dict) -> str:
    """The headline of a run's report: the teacher's test accuracy (if the supervision had a teacher) and the
    exported network's in ONNX Runtime, from the teacher and export stages' metrics."""
    onnx = f"exported network in ONNX Runtime {export['onnx_test_accuracy']:.4f}"
    if teacher.get("test_accuracy") is None:
        return f"no teacher (teacher.source: none); {onnx}"
    gap = (export["onnx_test_accuracy"] - teacher["test_accuracy"]) * 100
    return f"teacher test accuracy {teacher['test_accuracy']:.4f}; {onnx} ({gap:+.2f} points against the teacher)"
