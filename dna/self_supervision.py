"""Block targets without a teacher (DNA++), supervision kind "ssl": ensemble bootstrapping, as in BossNAS.

Every block trains against a momentum (EMA) copy of its own cells on two augmented views of the same images (random
resized crops). A cell's output on view 1, pooled and passed through a predictor (a small MLP shared by the block's
cells), is pulled towards the ensemble target: the mean of the normalised pooled outputs of `ensemble` sampled paths
of every cell of the EMA copy on view 2. The loss is 2 - 2 cos(prediction, target); the EMA copy follows the cells
after every optimizer step (momentum `momentum`). A candidate is rated by the same loss on the rating split, with
fixed, seeded views and target paths, so every candidate sees the same targets.

Toward BossNAS's recipe, as options: `rating_target: all` rates against the mean of every path of every cell (no
candidate is favoured by being one of a few drawn target paths), `rating_views` averages the score over several
seeded crop pairs per image, and `momentum_schedule: cosine` moves the EMA's momentum from `momentum` to 1 over the
block's training, `projector` passes pooled outputs through a projector MLP before the predictor (the EMA copy
has its own, an EMA of the online one), `symmetric` trains each cell on both directions (view 1 against view 2's
target and view 2 against view 1's, as one batch of both), and `augment: byol` adds BYOL's view augmentations after
the crop (flip, brightness and contrast jitter, Gaussian blur, solarisation; asymmetric between the two views).

Blocks are trained progressively: block i's input is the output of the best-rated candidate of every block before
it (its layers and adapter, BatchNorm calibrated as rating does), so block i needs blocks 0..i-1 trained and rated
first. Within a block, its cells train together as with a teacher. Blocks cannot run in parallel (the Prefect flow
runs them one after the other; `progressive`), and no teacher is built, trained or downloaded (`uses_teacher`).
A block's target width is its widest cell's width, at the block's resolution.
"""
from __future__ import annotations

import copy
import itertools
import math
from functools import cached_property
from typing import TYPE_CHECKING, Hashable, Iterator, Literal

import torch
import torch.nn.functional as F
from pydantic import ConfigDict, Field
from torch import nn
from torchvision.ops import roi_align

from dna.checkpoint import digest, load_checkpoint
from dna.fingerprint_keys import Fingerprinted

if TYPE_CHECKING:
    from dna.supervision import SupervisionContext

RATING_SEED = 7_919  # views and target paths of rating (and calibration), the same for every candidate


class SslOptions(Fingerprinted):
    model_config = ConfigDict(extra="forbid", frozen=True)
    momentum: float = Field(0.99, gt=0.0, lt=1.0)  # of the EMA copy, per optimizer step
    ensemble: int = Field(2, ge=1, le=16)  # sampled paths of each cell of the EMA copy in a target
    crop_scale: float = Field(0.5, gt=0.0, le=1.0)  # smallest area of a random crop, as a fraction of the image
    predictor: int = Field(128, ge=8, le=4096)  # hidden width of the predictor
    # the rating's target: `sampled` (`ensemble` seeded paths of every cell) or `all` (every path of every cell of
    # the EMA copy, as BossNAS rates: no candidate is favoured by being one of the target's paths)
    rating_target: Literal["sampled", "all"] = "sampled"
    rating_views: int = Field(1, ge=1, le=16)  # seeded crop pairs per rating image, the score averaged over them
    # the EMA copy's momentum: `constant`, or `cosine` from `momentum` to 1 over the block's training (BYOL)
    momentum_schedule: Literal["constant", "cosine"] = "constant"
    projector: int = Field(0, ge=0, le=8192)  # hidden width of a projector MLP before the predictor; 0: none
    projection: int = Field(256, ge=8, le=4096)  # the projector's output width (BYOL: 4096 hidden, 256 out)
    symmetric: bool = False  # both views through the online cells, each against the other's target (BYOL's loss)
    augment: Literal["crop", "byol"] = "crop"  # crop: random resized crops only; byol: and BYOL's augmentations


# BYOL's augmentations after the crop, per view (Grill et al. 2020, table 6): jitter, blur and solarisation chances
BYOL_VIEWS = ({"blur": 1.0, "solarize": 0.0}, {"blur": 0.1, "solarize": 0.2})
JITTER_CHANCE, BRIGHTNESS, CONTRAST = 0.8, 0.4, 0.4


def byol_augment(x: torch.Tensor, view: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """BYOL's view augmentations on a batch of normalised images, each image its own draw: horizontal flip,
    brightness and contrast jitter, Gaussian blur (sigma 0.1..2 px) and solarisation (values above the image's mean
    mirrored about it: inversion of the bright part, in normalised units). `view` (0 or 1) picks BYOL's asymmetric
    chances of blur and solarisation."""
    n, c, h, w = x.shape
    draw = torch.rand(n, 8, generator=generator).to(x.device)
    flip = (draw[:, 0] < 0.5).view(n, 1, 1, 1)
    x = torch.where(flip, x.flip(3), x)
    jitter = (draw[:, 1] < JITTER_CHANCE).view(n, 1, 1, 1)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    scale = x.std(dim=(1, 2, 3), keepdim=True) + 1e-6
    brightness = ((draw[:, 2] * 2 - 1) * BRIGHTNESS).view(n, 1, 1, 1) * scale
    contrast = (1 + (draw[:, 3] * 2 - 1) * CONTRAST).view(n, 1, 1, 1)
    x = torch.where(jitter, (x - mean) * contrast + mean + brightness, x)
    chances = BYOL_VIEWS[view]
    blur = (draw[:, 4] < chances["blur"]).view(n, 1, 1, 1)
    if bool(blur.any()):
        sigma = 0.1 + 1.9 * draw[:, 5]
        radius = max(1, min(h, w) // 10)
        offsets = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
        kernel = torch.exp(-offsets[None] ** 2 / (2 * sigma[:, None].to(x.dtype) ** 2))
        kernel = kernel / kernel.sum(1, keepdim=True)  # (n, taps): one separable kernel per image
        taps = kernel.repeat_interleave(c, 0)  # image-major, as the channels of the flattened batch
        flat = F.pad(x.reshape(1, n * c, h, w), (radius, radius, 0, 0), mode="reflect")
        flat = F.conv2d(flat, taps[:, None, None, :], groups=n * c)
        flat = F.pad(flat, (0, 0, radius, radius), mode="reflect")
        flat = F.conv2d(flat, taps[:, None, :, None], groups=n * c)
        blurred = flat.reshape(n, c, h, w)
        x = torch.where(blur, blurred, x)
    solarize = (draw[:, 6] < chances["solarize"]).view(n, 1, 1, 1)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return torch.where(solarize & (x > mean), 2 * mean - x, x)


def crops(x: torch.Tensor, scale: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """A random resized crop of every image (area scale..1 of the image, aspect ratio 3/4..4/3), resized back to
    the image size by bilinear sampling (one roi_align call for the batch)."""
    n, _, h, w = x.shape
    draw = torch.rand(n, 4, generator=generator).to(x.device)
    area = (scale + (1 - scale) * draw[:, 0]) * h * w
    ratio = torch.exp(math.log(3 / 4) + (math.log(4 / 3) - math.log(3 / 4)) * draw[:, 1])
    cw, ch = (area * ratio).sqrt().clamp(max=w), (area / ratio).sqrt().clamp(max=h)
    x0, y0 = draw[:, 2] * (w - cw), draw[:, 3] * (h - ch)
    boxes = torch.stack([torch.arange(n, device=x.device, dtype=x.dtype), x0, y0, x0 + cw, y0 + ch], dim=1)
    return roi_align(x.contiguous(), boxes.to(x.dtype), (h, w), aligned=True)


def pooled(features: torch.Tensor) -> torch.Tensor:
    return features.float().mean(dim=(2, 3))


class BootstrapCriterion(nn.Module):
    """The ensemble-bootstrapping loss of one block's cells: the predictor (trained with them) and their EMA copy
    (updated after every optimizer step); checkpointed with the block, so a resumed block continues exactly."""

    def __init__(self, cells: nn.ModuleDict, channels: int, options: SslOptions, total_updates: int = 0):
        super().__init__()
        self.target = copy.deepcopy(cells).requires_grad_(False)
        width = channels
        if options.projector:  # BYOL's projector: pooled output -> projection, in both networks
            self.projector = nn.Sequential(nn.Linear(channels, options.projector), nn.BatchNorm1d(options.projector),
                                           nn.ReLU(inplace=True), nn.Linear(options.projector, options.projection))
            self.target_projector = copy.deepcopy(self.projector).requires_grad_(False)
            width = options.projection
        self.predictor = nn.Sequential(nn.Linear(width, options.predictor), nn.BatchNorm1d(options.predictor),
                                       nn.ReLU(inplace=True), nn.Linear(options.predictor, width))
        self.momentum, self.ensemble, self.options = options.momentum, options.ensemble, options
        self.total_updates = total_updates  # of the block's training, for the cosine momentum schedule
        self._online = [cells]  # not a submodule: the cells are saved as the block's model

    def momentum_at(self, updates: int) -> float:
        """The EMA's momentum after `updates` optimizer steps: constant, or BYOL's cosine schedule from `momentum`
        to 1 over the block's training."""
        if self.options.momentum_schedule == "constant" or not self.total_updates:
            return self.momentum
        progress = min(updates / self.total_updates, 1.0)
        return 1 - (1 - self.momentum) * (math.cos(math.pi * progress) + 1) / 2

    def predict(self, output: torch.Tensor) -> torch.Tensor:
        vector = pooled(output)
        if self.options.projector:
            vector = self.projector(vector)
        return F.normalize(self.predictor(vector), dim=1)

    def target_vector(self, output: torch.Tensor) -> torch.Tensor:
        vector = pooled(output)
        if self.options.projector:
            self.target_projector.train()
            vector = self.target_projector(vector)
        return F.normalize(vector, dim=1)

    @torch.no_grad()
    def ensemble_target(self, view: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """The normalised mean of the normalised pooled outputs of `ensemble` sampled paths of every cell of the
        EMA copy (in training mode: batch statistics, as BYOL's target network)."""
        self.target.train()
        vectors = []
        for cell in self.target.values():
            for path in self.target_paths(cell, generator):
                vectors.append(self.target_vector(cell(view, path)))
        return F.normalize(torch.stack(vectors).mean(0), dim=1)

    def target_paths(self, cell: nn.Module, generator: torch.Generator | None) -> list[tuple[int, ...]]:
        """The paths of a cell of the EMA copy in a target: `ensemble` drawn at random, or every path when rating
        with rating_target `all` (a rating generator is given)."""
        num_ops, depth = len(cell.layers[-1]), len(cell.layers) - cell.num_fixed
        if generator is not None and self.options.rating_target == "all":
            return list(itertools.product(range(num_ops), repeat=depth))
        return [tuple(torch.randint(num_ops, (depth,), generator=generator).tolist()) for _ in range(self.ensemble)]

    def losses(self, outputs: list[torch.Tensor], view: torch.Tensor) -> list[torch.Tensor]:
        target = self.ensemble_target(view)
        return [(2 - 2 * (self.predict(output) * target).sum(dim=1)).mean() for output in outputs]

    @torch.no_grad()
    def after_step(self, updates: int) -> None:
        online, momentum = self._online[0], self.momentum_at(updates)
        for ours, theirs in zip(self.target.parameters(), online.parameters()):
            ours.mul_(momentum).add_(theirs.detach(), alpha=1 - momentum)
        for ours, theirs in zip(self.target.buffers(), online.buffers()):
            ours.copy_(theirs)
        if self.options.projector:
            for ours, theirs in zip(self.target_projector.parameters(), self.projector.parameters()):
                ours.mul_(momentum).add_(theirs.detach(), alpha=1 - momentum)
            for ours, theirs in zip(self.target_projector.buffers(), self.projector.buffers()):
                ours.copy_(theirs)


class BootstrapScore:
    """The rating: mean over the rating images of 2 - 2 cos(prediction of the candidate's output, ensemble target)."""

    def __init__(self, criterion: BootstrapCriterion):
        self.criterion = criterion.eval()
        self.sums: dict[Hashable, float] = {}
        self.count = 0

    def add_target(self, target: torch.Tensor) -> None:
        self.count += len(target)

    def add_error(self, key: Hashable, pred: torch.Tensor, target: torch.Tensor) -> None:
        self.sums[key] = self.sums.get(key, 0.0) + float((2 - 2 * (self.criterion.predict(pred) * target).sum(1)).sum())

    def result(self) -> dict[Hashable, float]:
        return {key: s / self.count for key, s in self.sums.items()}


class SelfSupervised:
    """Supervision kind "ssl" (see the module's docstring). `rating`: views and target paths drawn from a fixed seed,
    the training split under eval transforms, and each block's trained criterion loaded from its checkpoint."""

    Options = SslOptions
    uses_teacher = False
    progressive = True

    def __init__(self, run: SupervisionContext, rating: bool = False):
        from dna.data import eval_view

        self.run, self.rating = run, rating
        self.options: SslOptions = SslOptions.model_validate(dict(run.params.supervision.model_extra or {}))
        self.data = eval_view(run.data) if rating else run.data
        self.device = run.device
        self._fronts: dict[int, list[nn.Module]] = {}
        self._criteria: dict[int, BootstrapCriterion] = {}

    @classmethod
    def from_run(cls, run: SupervisionContext) -> SelfSupervised:
        return cls(run)

    def for_rating(self) -> SelfSupervised:
        return SelfSupervised(self.run, rating=True)

    def fingerprint(self) -> str:
        """The options, the whole space and the rating section: a block's input is made by the blocks before it, each
        the best candidate as `rating` rates it, BatchNorm calibrated on `rating.calibration_size` images. The rating
        is left out at its defaults, so blocks trained before it was fingerprinted (all at the defaults) resume."""
        rating = self.run.params.rating
        return digest("ssl", self.options, self.run.params.space, *([rating] if rating != type(rating)() else []))

    def prepare(self) -> None:
        """Nothing to prepare: the targets are made while the blocks train."""

    @cached_property
    def _shapes(self) -> list[tuple[int, int, int]]:
        with torch.random.fork_rng(devices=[]):  # the space measures its stem on a module it builds
            sizes = self.run.space.block_resolutions()
        widths = [max(w for _, w in block.cell_choices()) for block in self.run.params.space.blocks]
        return [(w, s, s) for w, s in zip(widths, sizes[1:])]

    def shapes(self) -> list[tuple[int, int, int]]:
        return self._shapes

    def criterion(self, block: int, cells: nn.ModuleDict) -> BootstrapCriterion:
        d = self.run.params.distill
        updates = d.epochs * math.ceil(len(self.run.data.train) / d.batch_size)
        return BootstrapCriterion(cells, self.shapes()[block][0], self.options, total_updates=updates)

    # block inputs --------------------------------------------------------------------------------------------
    def front(self, block: int) -> list[nn.Module]:
        """The best-rated candidate of every block before `block` (rated now if it is not yet), calibrated. Made
        without drawing from torch's random state (its modules are built, then loaded), so a block trains alike
        whether or not its front was made before the block's seed was set."""
        if block not in self._fronts:
            with torch.random.fork_rng(devices=[]):
                self._fronts[block] = [*self.front(block - 1), self._best_path(block - 1)] if block > 0 else []
        return self._fronts[block]

    def _best_path(self, block: int) -> nn.Module:
        from dna.rate import calibrate

        table = self.run.rating(block)
        best = table.loc[table["score"].idxmin()]
        ops = tuple(int(o) for o in str(best["path"]).split("-"))
        supernet = self.run.trained_supernet(block, self.shapes())
        cell = supernet[best["cell"]]
        path = nn.Sequential(*[choices[i] for choices, i in zip(cell.layers, cell.full_path(ops))], cell.adapter)
        path = path.to(self.device)
        images = self._images("train", self.run.params.rating.calibration_size)
        with torch.no_grad():
            calibrate(path, self._through(self.front(block), images))
        return path.eval().requires_grad_(False)

    @torch.no_grad()
    def _through(self, front: list[nn.Module], x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device, non_blocking=True)
        for module in front:
            x = module(x)
        return x

    def _images(self, split: str, count: int) -> torch.Tensor:
        return self.data.images(split, positions=self.data.stratified(split, count, self.run.params.seed))

    def _views(self, block: int, images: torch.Tensor,
               generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
        images = images.to(self.device, non_blocking=True)
        scale, front = self.options.crop_scale, self.front(block)
        views = []
        for view in (0, 1):
            x = crops(images, scale, generator)
            if self.options.augment == "byol":
                x = byol_augment(x, view, generator)
            views.append(self._through(front, x))
        return views[0], views[1]

    def _rated(self, block: int, x1: torch.Tensor, x2: torch.Tensor,
               generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """(view 1's block input, the trained block's ensemble target on view 2), for rating."""
        return x1, self._criterion(block).ensemble_target(x2, generator)

    def _criterion(self, block: int) -> BootstrapCriterion:
        """The block's trained criterion (EMA copy and predictor), from its checkpoint."""
        if block not in self._criteria:
            from dna.distill import load_block

            supernet = load_block(self.run.space, block, self.shapes(), self.run.data.in_chans,
                                  self.run.paths.supernet(block))
            criterion = self.criterion(block, supernet)
            criterion.load_state_dict(load_checkpoint(self.run.paths.supernet(block))["states"]["criterion"])
            self._criteria[block] = criterion.to(self.device).eval()
        return self._criteria[block]

    def pairs(self, block: int, split: str, batch_size: int, shuffle: bool = False,
              generator: torch.Generator | None = None,
              sharded: bool = False) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Training: (block input on view 1, on view 2), crops from torch's global random state (checkpointed by the
        engine). Rating: (block input on view 1, ensemble target on view 2), from a fixed seed."""
        fixed = torch.Generator().manual_seed(self.run.params.seed * 1_000 + RATING_SEED) if self.rating else None
        for images, _ in self.data.loader(split, batch_size, shuffle=shuffle, generator=generator, sharded=sharded):
            for _ in range(self.options.rating_views if self.rating else 1):  # a score's mean over every view
                x1, x2 = self._views(block, images, fixed)
                if self.rating:
                    yield self._rated(block, x1, x2, fixed)
                elif self.options.symmetric:  # each view against the other's target, as one batch of both
                    yield torch.cat([x1, x2]), torch.cat([x2, x1])
                else:
                    yield x1, x2

    def sample(self, block: int, split: str, count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        fixed = torch.Generator().manual_seed(seed * 1_000 + RATING_SEED)
        images = self.data.images(split, positions=self.data.stratified(split, count, seed))
        x1, x2 = self._views(block, images, fixed)
        return self._rated(block, x1, x2, fixed) if self.rating else (x1, x2)

    def scorer(self, block: int) -> BootstrapScore:
        return BootstrapScore(self._criterion(block))
