"""A run as the stages that read the search space see it (dna.context)."""
from __future__ import annotations

from typing import TYPE_CHECKING

from dna.context import Context, shared

if TYPE_CHECKING:
    from dna.spaces.base import SearchSpace


class SpaceContext(Context):
    """A run's params, paths, device and data, and its search space."""

    @shared
    def space(self) -> SearchSpace:
        from dna.spaces import build_space

        d = self.params.data
        return build_space(self.params.space, d.channels, d.image_size, self.num_classes)
