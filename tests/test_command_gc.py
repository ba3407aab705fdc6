"""The cyclic collector in a command's process (dna/command_gc.py): off while the command imports and checks, on
again once its work begins, and no last pass over what it imported at exit; untouched in a program that imports dna.
"""
import gc
import os
import subprocess
import sys
import textwrap

import pytest
import yaml

from dna import command_gc
from tests.conftest import ROOT, tiny_raw


@pytest.fixture
def as_a_command(monkeypatch):
    """This process as a command that has started: the collector off, as `start` leaves it."""
    enabled = gc.isenabled()
    monkeypatch.setattr(command_gc, "_started", True)
    gc.disable()
    yield
    gc.unfreeze()
    (gc.enable if enabled else gc.disable)()


def test_settle_turns_the_collector_back_on_and_freezes_what_was_imported(as_a_command):
    frozen = gc.get_freeze_count()
    command_gc.settle()
    assert gc.isenabled()
    assert gc.get_freeze_count() > frozen


def test_outside_a_command_the_collector_is_left_alone():
    assert not command_gc._started  # this test runner imported dna, it did not run a command
    frozen, enabled = gc.get_freeze_count(), gc.isenabled()
    command_gc.settle()
    assert (gc.get_freeze_count(), gc.isenabled()) == (frozen, enabled)


def test_training_turns_the_collector_back_on(as_a_command, tmp_path):
    """A training run never goes on with the collector off, whichever command started it (the one engine)."""
    from tests.test_engine import engine, tiny_model

    engine(tmp_path / "ckpt.pt", tiny_model(), epochs=1).fit()
    assert gc.isenabled()


def run_command(script: str, cwd) -> str:
    """Run a Python snippet as a command's process would be; what it printed from its last exit handler (registered
    first, so it runs after every other one)."""
    probe = textwrap.dedent("""
        import atexit, gc
        atexit.register(lambda: print("at exit: collector on", gc.isenabled(), "frozen", gc.get_freeze_count() > 0,
                                      flush=True))
    """)
    done = subprocess.run([sys.executable, "-c", probe + textwrap.dedent(script)], cwd=cwd, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.strip().splitlines()[-1]


def test_the_dna_command_runs_its_stage_with_the_collector_on_and_freezes_at_exit(tmp_path):
    """`dna data` (its console script's main): the stage's work turned the collector back on; the exit froze."""
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(tiny_raw(tmp_path / "outputs")))
    last = run_command("""
        import sys
        from dna.cli import main
        sys.argv = ["dna", "data", "--params", "params.yaml"]
        try:
            main()
        except SystemExit as exit:
            assert not exit.code, exit.code
    """, tmp_path)
    assert (tmp_path / "outputs" / "data" / "splits.json").is_file()
    assert last == "at exit: collector on True frozen True"


def test_a_command_that_does_no_stage_work_still_freezes_at_exit(tmp_path):
    last = run_command("""
        from dna.command_gc import start
        start()
        garbage = [{} for _ in range(1000)]
    """, tmp_path)
    assert last == "at exit: collector on False frozen True"
