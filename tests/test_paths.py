"""A run's file layout comes from the stage table alone: each name `dna.paths.Paths` answers is one that a stage
declares, inside what that stage writes (and so what DVC versions for it)."""
from __future__ import annotations

from pathlib import Path, PurePosixPath

import pytest

from dna.paths import TEMPLATES, Paths, ReplicatePaths, templates
from dna.stages import STAGES, Stage


def _among(path: str, written: tuple[str, ...]) -> bool:
    """Whether `path` is, holds, lies in or sits beside (the teacher's training state) one of `written`."""
    p = PurePosixPath(path)
    return any(p == w or w in p.parents or p in w.parents or p.parent == w.parent != PurePosixPath(".")
               for w in map(PurePosixPath, written))


@pytest.mark.parametrize("stage", STAGES, ids=lambda s: s.name)
def test_every_name_a_stage_gives_is_among_what_it_writes(stage):
    written = stage.at("t").files()
    for name, template in stage.named.items():
        path = template.format(target="t", block=0)
        assert _among(path, written), f"{stage.name}: {name} = {template} is not among {written}"


def test_a_run_reaches_each_stages_files_by_the_names_the_table_gives():
    paths = Paths(Path("/run"), "small")
    assert paths.splits == Path("/run/data/splits.json")
    assert paths.supernet(2) == Path("/run/distill/block_2.pt")
    assert paths.arch == Path("/run/search/targets/small/arch.yaml")
    assert paths.at("large").onnx == Path("/run/targets/large/export/model.onnx")
    assert paths.export_metrics == Path("/run/targets/small/export/metrics.json")  # every metrics file, by its stage
    assert {f"{s.name}_metrics" for s in STAGES if s.metrics} <= set(TEMPLATES)
    with pytest.raises(AttributeError):
        paths.register_dir  # noqa: B018 - registration is the pipeline's step, not a stage of the method


def test_two_stages_giving_one_name_two_paths_are_refused():
    clash = (Stage("a", "", "m:f", (), ("a",), named={"table": "a/table.csv"}),
             Stage("b", "", "m:f", (), ("b",), named={"table": "b/table.csv"}))
    with pytest.raises(ValueError, match=r"stage 'b' names 'table' 'b/table.csv', another stage 'a/table.csv'"):
        templates(clash)


def test_a_replicate_has_its_own_supernets_and_ratings_on_the_runs_data_teacher_and_feature_cache():
    run, folder = Paths(Path("/run")), Path("/run/rank/replicates/1")
    again = ReplicatePaths(run.root, run.target, folder)
    assert (again.supernet(0), again.distill_history(0)) == (folder / "distill/block_0.pt",
                                                             folder / "distill/history_0.csv")
    assert (again.ratings_dir, again.rating(1)) == (folder / "ratings", folder / "ratings/block_1.csv")
    assert (again.splits, again.teacher, again.features) == (run.splits, run.teacher, run.features)
