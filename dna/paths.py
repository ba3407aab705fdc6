"""Where each stage's files go under `outputs` (a light module: reading results needs no torch)."""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

DEFAULT_TARGET = "default"  # the one target of search.budgets


@dataclass
class Paths:
    """A run's files; those of one search target (its network, retraining, export and registration) for `target`."""

    root: Path
    target: str = DEFAULT_TARGET

    def at(self, target: str) -> Paths:
        """The same run's paths for another target."""
        return replace(self, target=target)

    @property
    def splits(self) -> Path: return self.root / "data" / "splits.json"
    @property
    def teacher_dir(self) -> Path: return self.root / "teacher"
    @property
    def teacher(self) -> Path: return self.teacher_dir / "teacher.pt"
    @property
    def distill_dir(self) -> Path: return self.root / "distill"
    @property
    def features(self) -> Path: return self.distill_dir / "features"
    def supernet(self, block: int) -> Path: return self.distill_dir / f"block_{block}.pt"
    def distill_history(self, block: int) -> Path: return self.distill_dir / f"history_{block}.csv"
    @property
    def ratings_dir(self) -> Path: return self.root / "ratings"
    def rating(self, block: int) -> Path: return self.ratings_dir / f"block_{block}.csv"
    @property
    def search_dir(self) -> Path: return self.root / "search"
    @property
    def arch(self) -> Path: return self.search_dir / "targets" / self.target / "arch.yaml"
    @property
    def targets_table(self) -> Path: return self.search_dir / "targets.csv"
    @property
    def target_dir(self) -> Path: return self.root / "targets" / self.target
    @property
    def retrain_dir(self) -> Path: return self.target_dir / "retrain"
    @property
    def model(self) -> Path: return self.retrain_dir / "model.pt"
    @property
    def export_dir(self) -> Path: return self.target_dir / "export"
    @property
    def register_dir(self) -> Path: return self.root / "register" / self.target
    @property
    def onnx(self) -> Path: return self.export_dir / "model.onnx"
    @property
    def profile_dir(self) -> Path: return self.root / "profile"
    @property
    def latency(self) -> Path: return self.profile_dir / "latency.csv"
    @property
    def rank_dir(self) -> Path: return self.root / "rank"


@dataclass
class ReplicatePaths(Paths):
    """A run's paths, but its block supernets and ratings in `folder`: the same blocks distilled and rated again
    with another seed (the rank stage's measure of the rating's own noise), on the run's data, teacher and cache."""

    folder: Path = Path()

    def supernet(self, block: int) -> Path: return self.folder / "distill" / f"block_{block}.pt"
    def distill_history(self, block: int) -> Path: return self.folder / "distill" / f"history_{block}.csv"
    @property
    def ratings_dir(self) -> Path: return self.folder / "ratings"
