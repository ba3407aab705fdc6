"""Where each stage's files go under `outputs`, as the stage table names them (dna.stages, `Stage.named`):
`paths.<name>` for a file or folder, `paths.<name>(block)` for one of a block's, `paths.<stage>_metrics` for a
stage's metrics file. A light module: reading results needs no torch."""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path

from dna.stages import STAGES, Stage

DEFAULT_TARGET = "default"  # the one target of search.budgets


def templates(table: Iterable[Stage] = STAGES) -> dict[str, str]:
    """Every name the table gives a file or folder, with its path under `outputs` ("{target}", "{block}" unfilled)."""
    out: dict[str, str] = {}
    for stage in table:
        metrics = {f"{stage.name}_metrics": stage.metrics} if stage.metrics else {}
        for name, template in {**stage.named, **metrics}.items():
            if out.setdefault(name, template) != template:
                raise ValueError(f"stage {stage.name!r} names {name!r} {template!r}, another stage {out[name]!r}")
    return out


TEMPLATES = templates()


@dataclass
class Paths:
    """A run's files; those of one search target (its network, retraining and export) for `target`."""

    root: Path
    target: str = DEFAULT_TARGET

    def at(self, target: str) -> Paths:
        """The same run's paths for another target."""
        return replace(self, target=target)

    def file(self, name: str, block: int | None = None) -> Path:
        """The file or folder the table names `name`, of this run and target (and of `block`, for a block's)."""
        return self._base(name) / TEMPLATES[name].format(target=self.target, block=block)

    def _base(self, name: str) -> Path:
        return self.root


def _accessor(name: str, template: str):
    if "{block}" in template:
        def of_block(self: Paths, block: int) -> Path:
            return self.file(name, block)
        return of_block
    return property(lambda self: self.file(name), doc=f"outputs/{template}")


for _name, _template in TEMPLATES.items():
    setattr(Paths, _name, _accessor(_name, _template))


REPLICATED = ("supernet", "distill_history", "ratings_dir", "rating")  # a replicate's own files


@dataclass
class ReplicatePaths(Paths):
    """A run's paths, but its block supernets and ratings in `folder`: the same blocks distilled and rated again
    with another seed (the rank stage's measure of the rating's own noise), on the run's data, teacher and cache."""

    folder: Path = Path()

    def _base(self, name: str) -> Path:
        return self.folder if name in REPLICATED else self.root
