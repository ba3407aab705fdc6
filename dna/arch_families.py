"""Architecture families: how an architecture's block strings become a network, and the build settings its file states.

A family is one entry of FAMILIES (dna.registry): `build` makes the whole network of an Arch, `build_layers` makes one
stage of layers from block strings with the same settings (search spaces make their candidate layers with it). The
families read timm's EfficientNet block strings; widths are taken as written (no channel rounding) and the stem width
is fixed (timm's `fix_stem`), so the numbers in the file are the network's.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields
from functools import partial
from typing import TYPE_CHECKING

from timm.layers import GroupNorm1, LayerNorm2d, get_act_layer, get_norm_act_layer
from timm.layers.create_act import _ACT_LAYER_DEFAULT
from timm.models._efficientnet_blocks import SqueezeExcite
from timm.models._efficientnet_builder import EfficientNetBuilder, decode_arch_def
from timm.models.efficientnet import EfficientNet
from torch import nn

from dna.registry import Registry

if TYPE_CHECKING:
    from dna.arch import Arch

DEFAULT_FAMILY = "efficientnet"
ACTS = tuple(sorted(_ACT_LAYER_DEFAULT))  # every name timm's get_act_layer knows
NORMS: dict[str, type[nn.Module]] = {"batchnorm": nn.BatchNorm2d, "groupnorm1": GroupNorm1, "layernorm2d": LayerNorm2d}
SE_GATES: dict[str, type[nn.Module]] = {"sigmoid": nn.Sigmoid, "hard_sigmoid": nn.Hardsigmoid}


def same_width(channels: int, *_, **__) -> int:
    """timm's `round_chs_fn` that keeps every width as written."""
    return int(channels)


@dataclass(frozen=True)
class BuildSettings:
    """The layer types a network is built with: activation, normalisation, and the gate of squeeze-excitation."""

    act: str = "swish"
    norm: str = "batchnorm"
    se_gate: str = "sigmoid"

    def __post_init__(self) -> None:
        allowed = {"act": ACTS, "norm": tuple(NORMS), "se_gate": tuple(SE_GATES)}
        for key, names in allowed.items():
            value = getattr(self, key)
            if value not in names:
                raise ValueError(f"arch: build setting {key}={value!r} is unknown; allowed: {', '.join(names)}")

    @classmethod
    def from_dict(cls, raw: dict | None) -> BuildSettings:
        """Settings from a file's `build` mapping; missing keys take their defaults."""
        if raw is None:
            return cls()
        if not isinstance(raw, dict):
            raise ValueError(f"arch: `build` must be a mapping of settings, got {raw!r}")
        keys = [f.name for f in fields(cls)]
        unknown = sorted(set(raw) - set(keys))
        if unknown:
            raise ValueError(f"arch: unknown build setting(s) {unknown}; allowed: {', '.join(keys)}")
        return cls(**{k: str(v) for k, v in raw.items()})

    def to_dict(self) -> dict[str, str]:
        return asdict(self)

    def act_layer(self) -> type[nn.Module]:
        return get_act_layer(self.act)

    def norm_act_layer(self) -> Callable[..., nn.Module]:
        """timm's fused norm + activation layer, as the stem and head of the network use it."""
        return get_norm_act_layer(NORMS[self.norm], self.act_layer())

    def timm_kwargs(self) -> dict:
        """The keyword arguments of timm's EfficientNet builder (and the models built on it) for these settings."""
        return {"act_layer": self.act_layer(), "norm_layer": NORMS[self.norm], "round_chs_fn": same_width,
                "se_layer": partial(SqueezeExcite, gate_layer=SE_GATES[self.se_gate])}


def build_timm_layers(block_strings: Sequence[str], in_chs: int, settings: BuildSettings) -> nn.Sequential:
    """One stage of layers from block strings, made exactly as timm's EfficientNet builder makes them."""
    builder = EfficientNetBuilder(**settings.timm_kwargs())
    return builder(in_chs, decode_arch_def([list(block_strings)]))[0]


@dataclass(frozen=True)
class Family:
    """How the networks of one family are made: `build(arch, num_classes, in_chans, drop_rate, drop_path_rate)` the
    whole network (drop_path_rate: stochastic depth, the deepest layer's rate), `build_layers(block_strings, in_chs,
    settings)` one stage of it."""

    build: Callable[[Arch, int, int, float, float], nn.Module]
    build_layers: Callable[[Sequence[str], int, BuildSettings], nn.Sequential] = build_timm_layers


FAMILIES: Registry[Family] = Registry("architecture family", "arch: family")  # the `family:` of architecture files


def get_family(name: str) -> Family:
    return FAMILIES.get(name)


def build_efficientnet(arch: Arch, num_classes: int, in_chans: int, drop_rate: float = 0.0,
                       drop_path_rate: float = 0.0) -> EfficientNet:
    return EfficientNet(
        decode_arch_def([list(s) for s in arch.stages]), num_classes=num_classes, num_features=arch.head,
        in_chans=in_chans, stem_size=arch.stem, fix_stem=True, drop_rate=drop_rate, drop_path_rate=drop_path_rate,
        **arch.settings.timm_kwargs())


FAMILIES.register(DEFAULT_FAMILY, Family(build=build_efficientnet))
