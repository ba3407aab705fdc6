"""DNA+: progressive teachers. `rounds.count` rounds of the whole search, each a complete run of the default stages.

Round 1 is the params as written, under `outputs` (the default stages). Round r >= 2 is the same params but for its
outputs, which go to <outputs>/rounds/round_<r>, and its teacher: the network round r-1 found and retrained for its
first search target, taken as it is (teacher.source arch, no further training), split at the ends of its searched
stages; or, with rounds.width_multiplier or depth_multiplier above 1, that network scaled
up by them (Arch.scaled) and trained from scratch with round 1's teacher recipe. Each round's stages fingerprint
their inputs, so a run stopped in round r starts again inside round r: the rounds before it find their results in
place, and the round it was in resumes its stages from their checkpoints.

`dna run` runs every round; the rounds stage (`dna rounds`, rounds/dvc.yaml, flows/rounds.py) runs rounds 2 and on
after the default stages ran round 1. <outputs>/rounds.json sums the rounds up.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable, TypeVar

from dna.config import Params, parse_params
from dna.errors import ConfigError
from dna.paths import Paths

SUMMARY = "rounds.json"
T = TypeVar("T")


def primary_target(params: Params) -> str:
    """The search target whose network teaches the next round: the first."""
    return next(iter(params.search.named_targets()))


def round_dir(params: Params, round_: int) -> Path:
    return Path(params.outputs) if round_ == 1 else Path(params.outputs) / "rounds" / f"round_{round_}"


def round_params(params: Params, round_: int, check_paths: bool = True) -> Params:
    """The params of round `round_` (from 1) of `params`: a one-round config. check_paths=False validates a later
    round before the round before it has written its network."""
    if not 1 <= round_ <= params.rounds.count:
        raise ValueError(f"round {round_} of rounds.count={params.rounds.count}")
    raw = params.model_dump(mode="json")
    raw.pop("rounds", None)
    if round_ == 1:
        return parse_params(raw, check_paths)
    previous = Paths(round_dir(params, round_ - 1), primary_target(params))
    teacher = {k: v for k, v in raw["teacher"].items() if k not in ("model", "boundaries", "output_stride")}
    teacher |= {"source": "arch", "arch": str(previous.arch)}
    scale = {"width_multiplier": params.rounds.width_multiplier, "depth_multiplier": params.rounds.depth_multiplier}
    if scale != {"width_multiplier": 1.0, "depth_multiplier": 1.0}:  # scaled up, then trained as round 1's teacher
        teacher |= scale | {"checkpoint": None}
    else:  # trained on this data already: taken as it is, not tuned
        teacher |= {"checkpoint": str(previous.model), "train": teacher["train"] | {"epochs": 0}}
    raw["teacher"] = teacher
    raw["outputs"] = str(round_dir(params, round_))
    return parse_params(raw, check_paths)


def all_rounds(params: Params) -> list[Params]:
    """Every round's params, validated before any work: the later rounds without the files earlier rounds write."""
    from dna.supervision import uses_teacher

    if params.rounds.count > 1 and not uses_teacher(params):
        raise ConfigError(f"rounds.count={params.rounds.count}: each round after the first is taught by the network "
                          f"the round before found, but supervision.kind={params.supervision.kind!r} uses no "
                          "teacher; set rounds.count: 1")
    return [round_params(params, r, check_paths=r == 1) for r in range(1, params.rounds.count + 1)]


def each_round(params: Params, run_one: Callable[[Params, int], T], first: int = 2, last: int | None = None
               ) -> list[T]:
    """The one loop over rounds: rounds `first` to `last` (default rounds.count) in order, each run by
    `run_one(its params, its number)`; `dna run` and `dna rounds` give it the stages (run_stages), the pipeline flow
    its steps (flows/rounds.py). Every round is checked before any work (all_rounds), and a later round again once
    the round before it wrote its network; round 1 is the params as given, checked by the caller."""
    from dna.checks import validate

    all_rounds(params)
    out = []
    for round_ in range(first, (params.rounds.count if last is None else last) + 1):
        config = round_params(params, round_)
        if round_ > 1:
            validate(config, check_profile=False)  # its profile stage makes its profile
        out.append(run_one(config, round_))
    return out


def run_stages(config: Params, round_: int):
    """Every default stage of a round in order, on the round's params (of a later round, all but the pictures:
    later_round_stages). Returns the round's Run and the seconds each stage took."""
    from dna.run import Run
    from dna.stages import default_stages, later_round_stages, run_stage

    run, times = Run(config), {}
    for stage in default_stages() if round_ == 1 else later_round_stages():
        start = time.perf_counter()
        run_stage(stage, run)
        times[stage.name] = time.perf_counter() - start
    return run, times


def run_round(params: Params, round_: int):
    """Round `round_` alone (its stages: run_stages), once the rounds before it ran."""
    return each_round(params, run_stages, first=round_, last=round_)[0]


def stage_rounds(run) -> dict:
    """The rounds stage: rounds 2 to rounds.count, once round 1 (the default stages on the params as written) ran.
    Returns the summary of every round (what rounds.json holds)."""
    each_round(run.params, run_stages)
    return summary(write_summary(run.params))


def round_summary(params: Params, round_: int) -> dict:
    """One round's teacher, the network it found, and that network's accuracy and cost (from its metrics files)."""
    paths = Paths(round_dir(params, round_), primary_target(params))

    def metrics(folder: Path) -> dict:
        path = folder / "metrics.json"
        return json.loads(path.read_text()) if path.is_file() else {}

    from dna.arch import Arch

    teacher, retrain, export = (metrics(paths.teacher_dir), metrics(paths.retrain_dir), metrics(paths.export_dir))
    return {"round": round_, "outputs": str(paths.root),
            "teacher": teacher.get("model"), "teacher_test_accuracy": teacher.get("test_accuracy"),
            "arch": Arch.load(paths.arch).tag() if paths.arch.is_file() else None,
            "test_accuracy": retrain.get("test_accuracy"), "onnx_test_accuracy": export.get("onnx_test_accuracy"),
            "params": retrain.get("params"), "macs": retrain.get("macs")}


def summary(rows: list[dict]) -> dict:
    """The rounds as a metrics file has them: the round whose network scored best on the test split, and every
    round's row under round_<r>."""
    scored = [row for row in rows if row["test_accuracy"] is not None]
    best = max(scored, key=lambda row: row["test_accuracy"], default=None)
    return {"rounds": len(rows), "best_round": best and best["round"],
            "best_test_accuracy": best and best["test_accuracy"]} | {f"round_{row['round']}": row for row in rows}


def write_summary(params: Params) -> list[dict]:
    """<outputs>/rounds.json: every round's summary, round over round (`summary`); returns the rows."""
    from dna.checkpoint import atomic_write_text

    rows = [round_summary(params, r) for r in range(1, params.rounds.count + 1)]
    atomic_write_text(Path(params.outputs) / SUMMARY, json.dumps(summary(rows), indent=2) + "\n")
    return rows


def summary_rows(outputs: str | Path) -> list[dict]:
    """The rows of <outputs>/rounds.json, round 1 first; none when it is not there."""
    path = Path(outputs) / SUMMARY
    if not path.is_file():
        return []
    data = json.loads(path.read_text())
    return [data[key] for key in sorted((k for k in data if k.startswith("round_")), key=lambda k: int(k[6:]))]
