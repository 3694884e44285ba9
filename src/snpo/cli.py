"""The ``snpo`` command line: one entry point, one subcommand per job.

    snpo demo [--quick] [--config FILE.yaml] [--key value ...]
    snpo train --config FILE.yaml [--key value ...]

Each subcommand's keys are the fields of its config dataclass; a YAML file gives defaults
and ``--key value`` pairs override them. Bad keys and values stop with one line before
anything loads.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="snpo",
        description="Preference alignment for text-to-image diffusion models (Diff-SNPO and baselines).",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (help_text, _) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
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


if __name__ == "__main__":
    sys.exit(main())
