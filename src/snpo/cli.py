"""The ``snpo`` command line: one entry point, one subcommand per job.

    snpo demo [--quick] [--config FILE.yaml] [--key value ...]
    snpo train --config FILE.yaml [--key value ...]
    snpo cache --config FILE.yaml [--key value ...]      (the same config as train)
    snpo merge --reference PATH --positive PATH --negative PATH [--a 1.0] [--b 1.0] --output_dir OUT

Multi-GPU and multi-node runs go through accelerate, with a config from configs/accelerate/:

    accelerate launch --config_file configs/accelerate/multi_gpu.yaml -m snpo.cli train --config ...

Each subcommand's keys are the fields of its config dataclass; a YAML file gives defaults
and ``--key value`` pairs override them. Bad keys and values stop with one line before
anything loads.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import sys
from collections.abc import Callable, Sequence
from importlib import import_module

from snpo.configuration import ConfigError, load_config

COMMANDS: dict[str, tuple[str, Callable[[argparse.Namespace, list[str]], int]]] = {}


def command(name: str, help_text: str):
    def register(fn):
        COMMANDS[name] = (help_text, fn)
        return fn

    return register


@command("demo", "the paper's comparison on the offline toy world (no downloads)")
def _demo(args: argparse.Namespace, rest: list[str]) -> int:
    from snpo.configuration import parse_overrides
    from snpo.toy.demo import QUICK_OVERRIDES, DemoConfig, run_demo

    overrides = {**(QUICK_OVERRIDES if args.quick else {}), **parse_overrides(rest)}
    config = load_config(DemoConfig, args.config, overrides)
    out = run_demo(config)
    print(f"report written to {out / 'report.md'}")
    return 0


@command(
    "merge", "Diff-NPO merge: theta_ref + a (theta_pos - theta_ref) + b (theta_npo - theta_ref)"
)
def _merge(args: argparse.Namespace, rest: list[str]) -> int:
    from snpo.merging import MergeConfig, run_merge

    config = load_config(MergeConfig, args.config, rest)
    try:
        out = run_merge(config)
    except (ValueError, OSError) as err:  # bad paths or mismatched weights: one line
        raise ConfigError(str(err)) from None
    print(f"merged denoiser written to {out / 'unet'}")
    return 0


@command("train", "align a diffusion model (SD1.5, SDXL, toy) with preference pairs")
def _train(args: argparse.Namespace, rest: list[str]) -> int:
    from snpo.training.config import TrainConfig
    from snpo.training.run import run_train

    config = load_config(TrainConfig, args.config, rest)
    result = run_train(config)
    if result.output_dir is not None and int(os.environ.get("RANK", "0")) == 0:
        print(f"trained {result.global_step} steps; saved to {result.output_dir}")
    return 0


@command("cache", "encode a dataset's images and prompts once into cache_dir (resumable)")
def _cache(args: argparse.Namespace, rest: list[str]) -> int:
    from snpo.training.config import TrainConfig
    from snpo.training.run import run_cache

    config = load_config(TrainConfig, args.config, rest)
    run_cache(config)
    return 0


#: errors whose message is one line meant for the user: printed without a traceback
USER_ERRORS = (
    ("snpo.configuration", "ConfigError"),
    ("snpo.data.records", "DataSourceError"),
    ("snpo.data.cache", "CacheError"),
    ("snpo.backbones", "ModelNotFoundError"),
    ("snpo.training.trainer", "NonFiniteError"),
)


FIELD_MESSAGE = re.compile(r"^[a-z][a-z0-9_]*: [^\n]*$")


def is_user_error(err: BaseException) -> bool:
    for module, name in USER_ERRORS:
        if module in sys.modules and isinstance(err, getattr(import_module(module), name)):
            return True
    # checks that need the data or the model (e.g. a batch larger than the dataset) raise a
    # plain ValueError whose one-line message starts with the config field it is about
    return type(err) is ValueError and FIELD_MESSAGE.match(str(err)) is not None


def _keys_epilog(name: str) -> str | None:
    """The config keys of ``train`` and ``cache``, listed under their --help."""
    if name not in ("train", "cache"):
        return None
    from snpo.training.config import TrainConfig

    keys = ", ".join(f.name for f in dataclasses.fields(TrainConfig))
    return f"config keys (YAML or --key value): {keys}"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="snpo",
        description="Preference alignment for text-to-image diffusion models (Diff-SNPO and baselines).",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (help_text, _) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text, epilog=_keys_epilog(name))
        p.add_argument("--config", default=None, help="YAML file with config keys")
        if name == "demo":
            p.add_argument("--quick", action="store_true", help="tiny sizes: the whole pipeline in about a minute")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(list(sys.argv[1:] if argv is None else argv))
    if args.command is None:
        parser.print_help()
        return 2
    _, fn = COMMANDS[args.command]
    try:
        return fn(args, rest)
    except ConfigError as err:
        print(f"snpo {args.command}: error: {err}", file=sys.stderr)
        return 2
    except Exception as err:
        if not is_user_error(err):
            raise
        print(f"snpo {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
