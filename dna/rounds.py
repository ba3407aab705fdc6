"""DNA+: progressive teachers. `rounds.count` rounds of the whole search, each a complete run of the default stages.

Round 1 is the params as written, under `outputs`. Round r >= 2 is the same params but for its outputs, which go to
<outputs>/round_<r>, and its teacher: the network round r-1 found and retrained, taken as it is (teacher.source arch,
with that round's search/arch.yaml and retrain/model.pt, no further training), split at the ends of its searched
stages. Each round's stages fingerprint their inputs, so a run stopped in round r starts again inside round r: the
rounds before it find their results in place, and the round it was in resumes its stages from their checkpoints.
"""
from __future__ import annotations

import json
from pathlib import Path

from dna.config import Params, parse_params
from dna.paths import Paths

SUMMARY = "rounds.json"


def round_dir(params: Params, round_: int) -> Path:
    return Path(params.outputs) if round_ == 1 else Path(params.outputs) / f"round_{round_}"


def round_params(params: Params, round_: int, check_paths: bool = True) -> Params:
    """The params of round `round_` (from 1) of `params`: a one-round config. check_paths=False validates a later
    round before the round before it has written its network."""
    if not 1 <= round_ <= params.rounds.count:
        raise ValueError(f"round {round_} of rounds.count={params.rounds.count}")
    raw = params.model_dump(mode="json")
    raw.pop("rounds", None)
    if round_ == 1:
        return parse_params(raw, check_paths)
    previous = Paths(round_dir(params, round_ - 1))
    teacher = {k: v for k, v in raw["teacher"].items() if k not in ("model", "boundaries", "output_stride")}
    teacher["train"] = teacher["train"] | {"epochs": 0}  # trained on this data already: taken as it is, not tuned
    raw["teacher"] = teacher | {"source": "arch", "arch": str(previous.arch), "checkpoint": str(previous.model)}
    raw["outputs"] = str(round_dir(params, round_))
    return parse_params(raw, check_paths)


def all_rounds(params: Params) -> list[Params]:
    """Every round's params, validated before any work: the later rounds without the files earlier rounds write."""
    return [round_params(params, r, check_paths=r == 1) for r in range(1, params.rounds.count + 1)]


def round_summary(params: Params, round_: int) -> dict:
    """One round's teacher, the network it found, and that network's accuracy and cost (from its metrics files)."""
    paths = Paths(round_dir(params, round_))

    def metrics(stage: str) -> dict:
        path = paths.root / stage / "metrics.json"
        return json.loads(path.read_text()) if path.is_file() else {}

    from dna.arch import Arch

    teacher, retrain, export = metrics("teacher"), metrics("retrain"), metrics("export")
    return {"round": round_, "outputs": str(paths.root),
            "teacher": teacher.get("model"), "teacher_test_accuracy": teacher.get("test_accuracy"),
            "arch": Arch.load(paths.arch).tag() if paths.arch.is_file() else None,
            "test_accuracy": retrain.get("test_accuracy"), "onnx_test_accuracy": export.get("onnx_test_accuracy"),
            "params": retrain.get("params"), "macs": retrain.get("macs")}


def write_summary(params: Params) -> list[dict]:
    """<outputs>/rounds.json: every round's summary, round over round."""
    from dna.checkpoint import atomic_write_text

    rows = [round_summary(params, r) for r in range(1, params.rounds.count + 1)]
    atomic_write_text(Path(params.outputs) / SUMMARY, json.dumps(rows, indent=2) + "\n")
    return rows
