"""A step's entry point: the config loaded and checked before any work, and the command line
`python -m flows.<module> [--params FILE] [--set KEY=VALUE ...]` with dna's one exit-code policy (dna/errors.py)."""
from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from dna.config import ConfigError, Params, load_params, parse_overrides
from flows.steps import STAGE_PARAMS


def load(params_file: str | Path = "params.yaml", overrides: dict | None = None,
         check_profile: bool = True) -> Params:
    """Load and deep-validate the config (raises ConfigError, one line naming the key, before any work);
    check_profile=False for the stage that makes the latency profile."""
    from dna.pipeline import validate

    params = load_params(params_file, overrides)
    validate(params, check_profile=check_profile)
    return params


def missing_dvc_params(raw: dict) -> list[str]:
    """Keys dvc.yaml tracks (or interpolates) that a params mapping lacks; DVC needs them written out, defaults
    are not enough."""
    missing = []
    for key in sorted({k for keys in STAGE_PARAMS.values() for k in keys} | {"outputs", "search.front_axis"}):
        node = raw
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                missing.append(key)
                break
            node = node[part]
    return missing


def check_dvc_params(params_file: str | Path = "params.yaml") -> None:
    """Raise ConfigError naming every key dvc.yaml needs that the params file does not spell out."""
    raw = yaml.safe_load(Path(params_file).read_text()) or {}
    missing = missing_dvc_params(raw)
    if missing:
        raise ConfigError(f"{params_file}: dvc.yaml tracks {', '.join(missing)} but the file does not set "
                          f"{'it' if len(missing) == 1 else 'them'}; write the values out (defaults are not enough "
                          f"for DVC)")


def with_absolute_outputs(params: Params) -> Params:
    """The same params with `outputs` as an absolute path, so worker processes elsewhere write to the same place."""
    return params.model_copy(update={"outputs": str(Path(params.outputs).resolve())})


def cli(run: Callable[[str, dict], Any], description: str, argv: list[str] | None = None) -> int:
    """Exit 0; 2 with one line on a bad config; 1 with one line on a detected fault (corrupt checkpoint, diverging
    loss, failed ONNX parity, missing input, failed blocks)."""
    from dna.errors import exit_code
    from dna.logs import setup_logging

    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--params", "-p", default="params.yaml", help="params file (default: params.yaml)")
    parser.add_argument("--set", "-S", dest="sets", action="append", metavar="KEY=VALUE",
                        help="override a key, e.g. -S retrain.train.epochs=5")
    args = parser.parse_args(argv)
    setup_logging()
    try:
        run(args.params, parse_overrides(args.sets))
    except Exception as exc:
        code = exit_code(exc)
        if code is None:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return code
    return 0
