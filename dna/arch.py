"""The architecture value type: a whole network as timm block strings, with the family and build settings that
make it (dna.arch_families)."""
from __future__ import annotations

import json
import re
import reprlib
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from timm.models._efficientnet_builder import _decode_block_str, _scale_stage_depth, decode_arch_def, round_channels
from torch import nn

from dna.arch_families import DEFAULT_FAMILY, BuildSettings, build_timm_layers, get_family

DEFAULT_SETTINGS = BuildSettings()
ACT = DEFAULT_SETTINGS.act  # the default activation, for modules that build with the default settings
KEYS = ("family", "build", "stem", "head", "arch")


def _token_key(token: str) -> str | None:
    """The option a token of a block string sets, read as timm's `_decode_block_str` reads it."""
    if token in ("skip", "noskip") or token.startswith("n"):
        return None
    parts = re.split(r"(\d.*)", token)
    return parts[0] if len(parts) >= 2 else None


def expand_repeats(block: str) -> list[str]:
    """`ir_r2_k3_s2_e3_c40` -> [`ir_r1_k3_s2_e3_c40`, `ir_r1_k3_s1_e3_c40`]: one string per layer.

    The repeat count is timm's; copies after the first get stride 1, as timm's builder gives them. Every other token
    is kept, in its place.
    """
    kind, *tokens = block.split("_")
    repeats = _decode_block_str(block)[1]

    def layer(first: bool) -> str:
        out = ["r1" if _token_key(t) == "r" else t if first or _token_key(t) != "s" else "s1" for t in tokens]
        return "_".join([kind, *out])

    return [layer(i == 0) for i in range(repeats)]


def build_layers(block_strings: list[str], in_chs: int, settings: BuildSettings = DEFAULT_SETTINGS) -> nn.Sequential:
    """One stage of layers from block strings, made exactly as EfficientNet's builder makes them."""
    return build_timm_layers(block_strings, in_chs, settings)


@dataclass(frozen=True)
class Arch:
    """A whole network: stem width, stages of timm block strings, head width, and the family and build settings
    (activation, normalisation, squeeze-excitation gate) that make it.

    Files without `family` or `build` (older ones) load with the defaults; files and tags always state them.
    Repeats (`_rN`) are expanded on construction, so every layer is one `_r1` string: the same network compares
    equal however its repeats were written, and files and tags carry this canonical form.
    """

    stem: int
    stages: tuple[tuple[str, ...], ...]
    head: int
    family: str = DEFAULT_FAMILY
    settings: BuildSettings = DEFAULT_SETTINGS

    def __post_init__(self) -> None:
        for key in ("stem", "head"):
            width = getattr(self, key)
            if isinstance(width, bool) or not isinstance(width, int) or width < 1:
                raise ValueError(f"arch: {key} must be a whole number of channels, at least 1; got {width!r}")
        if not isinstance(self.family, str):
            raise ValueError(f"arch: family must be a name, got {self.family!r}")
        get_family(self.family)  # raises on an unregistered family, naming the registered ones
        if isinstance(self.settings, dict):
            object.__setattr__(self, "settings", BuildSettings.from_dict(self.settings))
        if not isinstance(self.settings, BuildSettings):
            raise ValueError(f"arch: settings must be BuildSettings or a mapping, got {self.settings!r}")
        object.__setattr__(self, "stages", tuple(tuple(s) for s in self.stages))
        for i, stage in enumerate(self.stages):
            if not stage:
                raise ValueError(f"arch: stage {i} is empty; every stage needs at least one block string")
            for block in stage:
                try:
                    decode_arch_def([[block]])
                except Exception as exc:  # timm raises assertion/key/value errors on malformed strings
                    raise ValueError(f"arch: invalid timm block string {block!r} in stage {i} ({exc!r})") from None
        expanded = tuple(tuple(layer for block in stage for layer in expand_repeats(block)) for stage in self.stages)
        object.__setattr__(self, "stages", expanded)

    def to_dict(self) -> dict:
        return {"family": self.family, "build": self.settings.to_dict(), "stem": self.stem, "head": self.head,
                "arch": [list(s) for s in self.stages]}

    @classmethod
    def from_dict(cls, raw: dict) -> Arch:
        if raw is not None and not isinstance(raw, dict):
            raise ValueError(f"arch file: expected a mapping with keys stem, head and arch, got a "
                             f"{type(raw).__name__}")
        missing = {"stem", "head", "arch"} - set(raw or {})
        if missing:
            raise ValueError(f"arch file lacks key(s) {sorted(missing)}; expected stem, head and arch")
        unknown = sorted(set(raw) - set(KEYS))
        if unknown:
            raise ValueError(f"arch file has unknown key(s) {unknown}; allowed: {', '.join(KEYS)}")
        stages = raw["arch"]
        if not isinstance(stages, list) or not all(isinstance(stage, list) and all(isinstance(b, str) for b in stage)
                                                   for stage in stages):
            raise ValueError(f"arch file: arch must be a list of stages, each a list of timm block strings; got "
                             f"{reprlib.repr(stages)}")
        return cls(stem=raw["stem"], head=raw["head"], stages=stages,
                   family=raw.get("family", DEFAULT_FAMILY), settings=BuildSettings.from_dict(raw.get("build")))

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=None, width=1000)

    @classmethod
    def from_yaml(cls, text: str) -> Arch:
        try:
            raw = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ValueError(f"not valid YAML ({' '.join(str(exc).split())})") from None
        return cls.from_dict(raw)

    def save(self, path: str | Path) -> Path:
        from dna.checkpoint import atomic_write_text

        atomic_write_text(path, self.to_yaml())
        return Path(path)

    @classmethod
    def load(cls, path: str | Path) -> Arch:
        return cls.from_yaml(Path(path).read_text())

    def tag(self) -> str:
        """One-line form for tags and metadata."""
        return json.dumps(self.to_dict(), separators=(",", ":"))

    def scaled(self, width: float = 1.0, depth: float = 1.0) -> Arch:
        """The same network made wider and deeper as timm scales EfficientNets: every width (stem, layers, head)
        times `width`, rounded to a multiple of 8 (timm's round_channels); every stage's depth times `depth`,
        rounded up, the added layers copies of the stage's layers from the last back (timm's _scale_stage_depth)."""
        if width == 1.0 and depth == 1.0:
            return self

        def wider(layer: str) -> str:
            return "_".join(f"c{round_channels(int(t[1:]), width)}" if _token_key(t) == "c" else t
                            for t in layer.split("_"))

        def deeper(stage: tuple[str, ...]) -> list[str]:
            counts = _scale_stage_depth(list(range(len(stage))), [1] * len(stage), depth, "ceil")
            return [re.sub(r"_r1(?=_|$)", f"_r{counts.count(i)}", wider(layer)) for i, layer in enumerate(stage)]

        return Arch(stem=round_channels(self.stem, width), stages=tuple(deeper(s) for s in self.stages),
                    head=round_channels(self.head, width), family=self.family, settings=self.settings)

    def build(self, num_classes: int, in_chans: int, drop_rate: float = 0.0, drop_path_rate: float = 0.0) -> nn.Module:
        """The network, made by the arch's family with its build settings."""
        return get_family(self.family).build(self, num_classes, in_chans, drop_rate, drop_path_rate)


def _cpu_attention_flops(query_shape, key_shape, value_shape, *_, out_shape=None, **__) -> int:
    from torch.utils.flop_counter import sdpa_flop_count

    return sdpa_flop_count(query_shape, key_shape, value_shape)


def count_cost(module: nn.Module, input_shape: tuple[int, ...]) -> tuple[int, int, torch.Size]:
    """(parameters, multiply-adds, output shape) of a module on one input, with torch's FLOP counter.

    The counter knows the GPU kernels of scaled-dot-product attention but not the CPU one; it is told, so attention
    costs its two matrix products on either."""
    from torch.utils.flop_counter import FlopCounterMode

    was_training = module.training
    module.eval()
    cpu_attention = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    counter = FlopCounterMode(display=False, custom_mapping={cpu_attention: _cpu_attention_flops})
    with counter, torch.no_grad():
        out = module(torch.zeros(input_shape))
    module.train(was_training)
    params = sum(p.numel() for p in module.parameters())
    return params, counter.get_total_flops() // 2, out.shape
