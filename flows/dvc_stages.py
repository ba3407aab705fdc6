"""DVC's view of the pipeline's stages, through DVC's own Python API, for the pipeline flow that runs the stages in
its own process: whether a stage is out of date (`dvc status`), its outputs removed as `dvc repro` removes them
before a stage runs (checkpoints, `persist: true`, are kept), its run recorded in dvc.lock and the cache (`dvc commit
--force`), the `-S` overrides applied to params.yaml (as `dvc exp run -S` applies them) and the workspace saved as
an experiment (`dvc exp save`). So `dvc repro` after the flow, or the flow after `dvc repro`, finds every stage up to
date.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def dvc_repo(root: Path) -> Iterator:
    """The DVC repository at root, with root as the working directory (DVC resolves outputs from it)."""
    from dvc.repo import Repo

    with contextlib.chdir(root):
        repo = Repo(str(root))
        try:
            yield repo
        finally:
            repo.close()


def out_of_date(root: Path, *addresses: str) -> list[str]:
    """What `dvc status` finds changed in the stages (e.g. "changed deps", "changed outs"); [] when they are up to
    date."""
    with dvc_repo(root) as repo:
        found = repo.status(targets=list(addresses))
    return [text for entries in found.values() for entry in entries for text in _described(entry)]


def stale(root: Path, files: list[str]) -> dict[str, list[str]]:
    """What `dvc status` finds changed in every stage of the pipeline files (dvc.yaml, rounds/dvc.yaml), by address,
    in one call: reading dvc.lock once rather than once per stage. Up-to-date stages are left out."""
    with dvc_repo(root) as repo:
        found = repo.status(targets=files)
    return {address: [text for entry in entries for text in _described(entry)] for address, entries in found.items()}


def recorded(root: Path, lock: str = "dvc.lock") -> set[str]:
    """The addresses of the stages a lock file records (none without it): one it does not record has never run, so
    it is out of date whatever runs before it, and DVC need not be asked."""
    import yaml

    path = root / lock
    if not path.is_file():
        return set()
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the lock of a run with several targets: 2,000 lines
    return set((yaml.load(path.read_text(), Loader=loader) or {}).get("stages") or {})


# a status the command line just took, for the flow it starts in this process to take over (once; the command
# clears it when it ends, whatever happened)
taken: dict[tuple[str, tuple[str, ...]], dict[str, list[str]]] = {}


class Snapshot:
    """`dvc status` of every stage of the pipeline files, taken once (or taken over from the command line that just
    took it) and again only after a stage ran: a stage's status changes only when it or a stage before it runs (its
    code, params, deps or outputs)."""

    def __init__(self, root: Path, files: list[str]):
        self.root, self.files = root, files
        self._found: dict[str, list[str]] | None = taken.pop((str(root), tuple(files)), None)

    def changes(self, address: str) -> list[str]:
        if self._found is None:
            self._found = stale(self.root, self.files)
        return self._found.get(address, [])

    def ran(self) -> None:
        self._found = None


def _described(entry) -> list[str]:
    """One entry of `dvc status`: {"changed deps": {path: state}} or a word such as "always changed"."""
    if isinstance(entry, dict):
        return [f"{kind} {', '.join(map(str, what))}" for kind, what in entry.items()]
    return [str(entry)]


def remove_outputs(root: Path, address: str) -> None:
    """Remove the stage's outputs as `dvc repro` does before it runs the stage, keeping those that persist."""
    from dvc.repo import lock_repo

    with dvc_repo(root) as repo, lock_repo(repo):
        for stage in repo.stage.collect(address):
            stage.remove_outs(ignore_remove=False, force=False)


def record(root: Path, *addresses: str) -> None:
    """Record the stages' deps, params and outputs in dvc.lock and their outputs in the cache, as `dvc commit --force`
    does for each, writing each lock file once for them all (it is rewritten whole: about 0.4 s for a run's)."""
    from dvc.repo import lock_repo

    with dvc_repo(root) as repo, lock_repo(repo):
        stages = [stage for address in addresses for stage in repo.stage.collect(address)]
        for stage in stages:
            stage.save()
            stage.commit()
        by_file: dict[str, list] = {}
        for stage in stages:
            by_file.setdefault(stage.dvcfile.path, []).append(stage)
        for group in by_file.values():
            group[0].dvcfile.dump_stages(group, update_pipeline=False)


def apply_overrides(root: Path, overrides: list[str]) -> None:
    """Write `key=value` overrides into params.yaml with DVC's own parser (what `dvc exp run -S` does)."""
    from dvc.utils.hydra import apply_overrides as apply

    apply(root / "params.yaml", overrides)


def save_experiment(root: Path, files: list[str], last_recorded: str | None = None) -> str | None:
    """The workspace as a DVC experiment (`dvc exp save`), with the given files (lock files, metrics: what `dvc exp
    run` records too) even where git does not track them; its name, listed by `dvc exp show`. `dvc exp save` first
    commits every stage again (`dvc commit --force`, about a second); given the last stage the flow recorded, it
    commits that one only (the flow recorded each stage it ran in dvc.lock already)."""
    with dvc_repo(root) as repo:
        rev = repo.experiments.save(targets=[last_recorded] if last_recorded else None, force=True,
                                    include_untracked=[f for f in files if (root / f).is_file()])
        if rev is None:
            return None
        return repo.experiments.get_exact_name([rev]).get(rev) or rev
