"""The pipeline's DVC bookkeeping on a project of two plain stages per target: a target's chain records every step
it ran in one write of dvc.lock, as `dvc commit --force` would record each, also when a later step fails; and the
flow takes over the `dvc status` the command line just took instead of taking it again."""
from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from flows import dvc_stages
from flows.targets import chain_task

PYTHON = sys.executable
DVC_YAML = """\
stages:
  first:
    foreach: [a]
    do:
      cmd: echo first > first_${item}.txt
      outs:
        - first_${item}.txt
  second:
    foreach: [a]
    do:
      cmd: cat first_${item}.txt > second_${item}.txt
      deps:
        - first_${item}.txt
      outs:
        - second_${item}.txt
"""


@dataclass(frozen=True)
class FakeStep:
    """A pipeline step whose flow writes the stage's output as its command would, or fails."""

    name: str
    root: Path
    fails: bool = False

    def flow(self):
        def run(params_file, overrides, target):
            if self.fails:
                raise RuntimeError(f"{self.name}@{target} failed")
            source = self.root / f"first_{target}.txt"
            text = source.read_text() if self.name == "second" else "first\n"
            (self.root / f"{self.name}_{target}.txt").write_text(text)
        return run


@pytest.fixture
def project(tmp_path) -> Path:
    for args in (["git", "init", "-q"], [PYTHON, "-m", "dvc", "init", "-q"],
                 [PYTHON, "-m", "dvc", "config", "core.analytics", "false"]):
        subprocess.run(args, cwd=tmp_path, check=True, capture_output=True)
    (tmp_path / "dvc.yaml").write_text(DVC_YAML)
    return tmp_path


def locked(root: Path) -> set[str]:
    lock = root / "dvc.lock"
    return set(yaml.safe_load(lock.read_text())["stages"]) if lock.is_file() else set()


def asked_dvc(monkeypatch) -> list[str]:
    """The stages the chain asks `dvc status` of, from now on."""
    asked = []
    real = dvc_stages.out_of_date
    monkeypatch.setattr(dvc_stages, "out_of_date", lambda root, *addresses: (asked.extend(addresses),
                                                                             real(root, *addresses))[1])
    return asked


def test_a_chain_records_every_step_it_ran_in_one_write(project, monkeypatch):
    writes = []
    real = dvc_stages.record
    monkeypatch.setattr(dvc_stages, "record", lambda root, *addresses: (writes.append(addresses),
                                                                        real(root, *addresses)))
    asked = asked_dvc(monkeypatch)
    stale = {"first@a": ["changed outs"], "second@a": ["changed outs"]}
    ran = chain_task.fn(project, [FakeStep("first", project), FakeStep("second", project)], "a", False, stale)
    assert ran == ["first@a", "second@a"] and writes == [("first@a", "second@a")]
    assert asked == []  # neither had run before: no need to ask DVC after the first ran
    assert locked(project) == {"first@a", "second@a"}
    assert dvc_stages.out_of_date(project, "first@a", "second@a") == []  # as `dvc commit --force` leaves them


def test_a_step_that_ran_before_a_failure_is_still_recorded(project):
    stale = {"first@a": ["changed outs"], "second@a": ["changed outs"]}
    with pytest.raises(RuntimeError, match="second@a failed"):
        chain_task.fn(project, [FakeStep("first", project), FakeStep("second", project, fails=True)], "a", False,
                      stale)
    assert locked(project) == {"first@a"} and dvc_stages.out_of_date(project, "first@a") == []
    assert dvc_stages.out_of_date(project, "second@a")  # the failed step is still to do


def test_the_flow_takes_over_the_status_the_command_line_took_once(project):
    dvc_stages.taken[(str(project), ("dvc.yaml",))] = {"first@a": ["taken"]}
    snapshot = dvc_stages.Snapshot(project, ["dvc.yaml"])
    assert snapshot.changes("first@a") == ["taken"] and not dvc_stages.taken  # taken over, and only once
    asked = ["changed outs first_a.txt"]  # what DVC says of a stage that never ran
    assert dvc_stages.Snapshot(project, ["dvc.yaml"]).changes("first@a") == asked
    snapshot.ran()
    assert snapshot.changes("first@a") == asked  # after a step ran, DVC is asked again


def test_after_a_step_ran_a_recorded_step_is_asked_again_and_skipped_when_it_holds(project, monkeypatch):
    """first@a reruns and writes what it wrote before: second@a, recorded, is asked again and found up to date."""
    steps = [FakeStep("first", project), FakeStep("second", project)]
    chain_task.fn(project, steps, "a", False, {"first@a": ["new"], "second@a": ["new"]})
    asked = asked_dvc(monkeypatch)
    ran = chain_task.fn(project, steps, "a", False, {"first@a": ["changed params"]})
    assert ran == ["first@a"] and asked == ["second@a"]


def test_an_experiment_saved_after_the_flow_recorded_its_steps_commits_only_the_last_again(project, monkeypatch):
    """`dvc exp save` commits every stage again unless given targets: given the last step the flow recorded, only
    that one; the experiment holds the lock all the same."""
    from dvc.repo import Repo

    steps = [FakeStep("first", project), FakeStep("second", project)]
    chain_task.fn(project, steps, "a", False, {"first@a": ["new"], "second@a": ["new"]})
    for args in (["git", "add", "-A"], ["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "base"]):
        subprocess.run(args, cwd=project, check=True, capture_output=True)
    committed = []
    real = Repo.commit
    monkeypatch.setattr(Repo, "commit", lambda self, target, *a, **k: (committed.append((target, k.get("data_only"))),
                                                                       real(self, target, *a, **k))[1])
    name = dvc_stages.save_experiment(project, ["dvc.lock"], "second@a")
    assert [target for target, data_only in committed if not data_only] == ["second@a"]  # (data-only: .dvc files)
    listed = subprocess.run([PYTHON, "-m", "dvc", "exp", "list", "--name-only"], cwd=project, capture_output=True,
                            text=True, check=True).stdout.split()
    assert name in listed
