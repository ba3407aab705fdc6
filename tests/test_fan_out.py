"""Work over several items in dna (dna/fan_out.py, dna.stages.run_stage): every block of a per-block stage runs even
when one fails; a lone failure is raised as it was (its exit code kept), several are named together and what
finished is kept."""
from __future__ import annotations

from types import SimpleNamespace

import pytest

from dna.errors import ConfigError, exit_code
from dna.fan_out import Unfinished
from dna.stages import Stage, run_stage

CALLS: list[int] = []
FAILING: dict[int, Exception] = {}


def per_block(run, block: int) -> dict:
    CALLS.append(block)
    if block in FAILING:
        raise FAILING[block]
    (run.paths.root / f"block_{block}.txt").write_text("done")
    return {"block": block}


STAGE = Stage("widgets", "A per-block stage.", f"{__name__}:per_block", (), ("widgets",), per_block=True)


@pytest.fixture()
def run(tmp_path):
    CALLS.clear()
    FAILING.clear()
    stand_in = SimpleNamespace(space=SimpleNamespace(num_blocks=3), paths=SimpleNamespace(root=tmp_path))
    stand_in.view = lambda cls: stand_in  # as the stage's own context: itself
    return stand_in


def test_every_block_runs_and_several_failures_are_named_together(run):
    FAILING.update({0: ConfigError("block 0: stale supernet"), 2: ConfigError("block 2: stale supernet")})
    with pytest.raises(Unfinished) as failure:
        run_stage(STAGE, run)
    assert CALLS == [0, 1, 2] and (run.paths.root / "block_1.txt").is_file()
    message = str(failure.value)
    assert message.startswith("widgets: 2 block(s) failed (block 0: ConfigError: block 0: stale supernet; block 2:")
    assert "blocks 1 finished and are kept" in message and exit_code(failure.value) == 1


def test_a_lone_failure_is_raised_as_it_was_and_a_bug_keeps_its_type(run):
    FAILING[1] = ConfigError("space.ops: unknown")
    with pytest.raises(ConfigError, match="space.ops"):  # exit code 2, as when it stopped the stage
        run_stage(STAGE, run)
    assert CALLS == [0, 1, 2]
    CALLS.clear()
    FAILING.update({0: KeyError("a bug")})  # a bug among several failures keeps its type and traceback
    with pytest.raises(KeyError):
        run_stage(STAGE, run)
    assert CALLS == [0, 1, 2]


def test_the_blocks_asked_for_run_in_order_and_their_results_return(run):
    assert run_stage(STAGE, run, [2, 0]) == [{"block": 2}, {"block": 0}] and CALLS == [2, 0]
