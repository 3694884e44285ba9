"""The ``snpo`` command line: one entry point, one subcommand per job.

    snpo demo [--quick] [--config FILE.yaml] [--key value ...]
    snpo train --config FILE.yaml [--key value ...]
    snpo cache --config FILE.yaml [--key value ...]      (the same config as train)
    snpo merge --reference PATH --positive PATH --npo PATH [--a 1.0] [--b 1.0] --output_dir OUT
    snpo sample --model_name_or_path M [--lora DIR | --unet DIR | --chats DIR] [--npo_negative DIR]
                --prompts SET [--seeds 0,1,2,3] --output_dir SAMPLES      (resumable)
    snpo score --samples SAMPLES[,SAMPLES...] --scorers hpsv2,pickscore,... --hpsv2 PATH ...
    snpo report --runs SAMPLES,SAMPLES,... [--names a,b,...] [--baseline a] --output_dir REPORT

Multi-GPU and multi-node runs go through accelerate, with a config from configs/accelerate/:

    accelerate launch --config_file configs/accelerate/multi_gpu.yaml -m snpo.cli train --config ...

Each subcommand's keys are the fields of its config dataclass; a YAML file gives defaults
and ``--key value`` pairs override them. Bad keys and values stop with one line before
anything loads.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from importlib import import_module

from snpo.configuration import load_config
from snpo.errors import ConfigError, UserError

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
    print(f"report written to {out / ('calibration.md' if config.calibrate else 'report.md')}")
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
    where = next((out / d for d in ("transformer", "unet") if (out / d).is_dir()), out / "unet")
    print(f"merged denoiser written to {where}")
    return 0


@command("train", "align a diffusion model (SD1.5, SDXL, SD3/SD3.5, FLUX.1, toy) with preference pairs")
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


@command("sample", "images for a prompt set from a model, LoRA, fine-tune, Diff-NPO or CHATS pair")
def _sample(args: argparse.Namespace, rest: list[str]) -> int:
    from snpo.evaluate.sample import SampleConfig, run_sample

    config = load_config(SampleConfig, args.config, rest)
    result = run_sample(config)
    print(f"{result.drawn} images drawn, {result.skipped} already there ({result.total} in all): "
          f"{result.output_dir}")
    return 0


@command("score", "score sample folders with PickScore, HPSv2, ImageReward, aesthetic, CLIP score")
def _score(args: argparse.Namespace, rest: list[str]) -> int:
    from snpo.configuration import config_from_dict, load_yaml, parse_overrides
    from snpo.evaluate.score import ScoreConfig, config_key, run_score

    # the scorer modules' flags (--hpsv2.1, --clip-score) as config keys (hpsv2_1, clip_score)
    values = load_yaml(args.config) if args.config else {}
    values.update(parse_overrides(rest))
    config = config_from_dict(ScoreConfig, {config_key(k): v for k, v in values.items()},
                              args.config or "command line")
    for result in run_score(config):
        print(f"{result.folder}: {result.scored} scores computed, {result.skipped} already there")
    return 0


@command("report", "tables in the paper's layout, win rates against a baseline, a sample grid")
def _report(args: argparse.Namespace, rest: list[str]) -> int:
    from snpo.evaluate.report import ReportConfig, run_report

    config = load_config(ReportConfig, args.config, rest)
    out = run_report(config)
    print(f"report written to {out / 'report.md'}")
    return 0


@command("bench", "training speed and memory vs the reference Diffusion-DPO script (BENCHMARKS.md)")
def _bench(args: argparse.Namespace, rest: list[str]) -> int:
    from snpo.bench import BenchConfig, run_bench

    config = load_config(BenchConfig, args.config, rest)  # --quick: the tiny architecture, seconds
    out = run_bench(config)
    print(f"benchmark written to {out / 'results.md'}")
    return 0


#: subcommand -> its config dataclass ("module:Class"), whose keys --help lists
CONFIG_CLASSES = {
    "demo": "snpo.toy.demo:DemoConfig",
    "train": "snpo.training.config:TrainConfig",
    "cache": "snpo.training.config:TrainConfig",
    "merge": "snpo.merging:MergeConfig",
    "sample": "snpo.evaluate.sample:SampleConfig",
    "score": "snpo.evaluate.score:ScoreConfig",
    "report": "snpo.evaluate.report:ReportConfig",
    "bench": "snpo.bench.config:BenchConfig",
}


def config_class(name: str) -> type:
    module, cls = CONFIG_CLASSES[name].split(":")
    return getattr(import_module(module), cls)


def keys_help(name: str) -> str | None:
    """Every config key of a subcommand: type, default and meaning (from the dataclass)."""
    if name not in CONFIG_CLASSES:
        return None
    from snpo.configuration import describe_fields

    lines = ["config keys (in a --config YAML file, or --key value):"]
    for key, type_name, default, text in describe_fields(config_class(name)):
        lines.append(f"  --{key} ({type_name}, default {default})")
        lines.append(f"      {text}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="snpo",
        description="Preference alignment for text-to-image diffusion models (Diff-SNPO and baselines).",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (help_text, _) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text, epilog=keys_help(name),
                           formatter_class=argparse.RawDescriptionHelpFormatter)
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
    except UserError as err:  # one line meant for the user; anything else is a bug
        print(f"snpo {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
