"""A run as the stages that train and rate blocks see it (dna.context): its params, paths, device, data and search
space, and its block supervision, which reads the blocks before the one it trains."""
from __future__ import annotations

from typing import TYPE_CHECKING

from dna.checkpoint import digest, file_digest
from dna.context import shared
from dna.spaces.context import SpaceContext

if TYPE_CHECKING:
    import pandas as pd
    import torch

    from dna.supervision import BlockSupervision


class Run(SpaceContext):
    """A run's params, paths, device, data and search space, and its block supervision (params supervision.kind):
    what the features, distill, rate, rank and rounds stages read."""

    @shared
    def supervision(self) -> BlockSupervision:
        """What the blocks learn and how candidates are rated; needs the teacher stage's output for the teacher
        kind."""
        from dna.supervision import build_supervision

        return build_supervision(self)

    # what a progressive supervision reads of the blocks before the one it trains
    def rating(self, block: int) -> pd.DataFrame:
        """The block's rating (the rate stage's table), made now when it is not yet."""
        import pandas as pd

        from dna.stages.rate import stage_rate

        if not self.paths.rating(block).is_file():
            stage_rate(self, block)
        return pd.read_csv(self.paths.rating(block), dtype={"path": str})

    def trained_supernet(self, block: int, shapes: list[tuple[int, int, int]]) -> torch.nn.Module:
        """The block's supernet as the distill stage of these settings left it (dna.stages.distill)."""
        from dna.stages.distill import trained_supernet

        return trained_supernet(self, block, shapes)

    def block_fingerprint(self, block: int) -> str:
        """What determines a block's distillation, so that a checkpoint of another configuration is not resumed."""
        p = self.params
        seen = {"context": {"fingerprint": True}}
        space = p.space.model_dump(exclude={"blocks"}, **seen) | {"block": p.space.blocks[block].model_dump(**seen)}
        return digest(self.distill_seed, p.data, file_digest(self.paths.splits), p.supervision,
                      self.supervision.fingerprint(), space, p.distill, block)
