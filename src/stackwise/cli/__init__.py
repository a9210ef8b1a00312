"""The `stackwise` command: train, plan, plot, eval.

Every user error (bad config, data, checkpoint or arguments) prints one message and exits 2.
"""

from __future__ import annotations

import argparse
import sys
from importlib import resources
from pathlib import Path

from stackwise.config import ConfigError, StackWiseConfig
from stackwise.data.errors import DataError
from stackwise.specs import SpecError

EXIT_USAGE = 2


class UsageError(Exception):
    """A command-line problem the user can fix; printed without a traceback."""


def builtin_demo_path() -> Path:
    return Path(str(resources.files("stackwise") / "configs" / "demo.yaml"))


def _load_config(path: str | None, overrides: list[str]) -> StackWiseConfig:
    source = path if path is not None else builtin_demo_path()
    config = StackWiseConfig.from_yaml(source)
    return config.with_overrides(overrides) if overrides else config


def _split_config_and_overrides(items: list[str]) -> tuple[str | None, list[str]]:
    """`train [CONFIG.yaml] [key=value ...]`: the first item is the config unless it is an override."""
    if items and "=" not in items[0]:
        return items[0], items[1:]
    return None, items


def cmd_train(args: argparse.Namespace) -> int:
    from stackwise.cli.plot import plot_run
    from stackwise.training.machine import TrainingMachine

    path, overrides = _split_config_and_overrides(args.items)
    if args.resume:
        run_dir = Path(args.resume)
        if not (run_dir / "config.yaml").is_file():
            raise UsageError(f"{run_dir}: not a run directory (no config.yaml); nothing to resume")
        config = _load_config(path or str(run_dir / "config.yaml"), overrides)
        machine = TrainingMachine(config, total_steps=args.steps, resume=run_dir)
    else:
        config = _load_config(path, overrides)
        if path is None:
            print(f"stackwise: no config given, running the built-in demo ({builtin_demo_path()})", file=sys.stderr)
        machine = TrainingMachine(config, total_steps=args.steps)
    print(f"run directory: {machine.run_dir}", file=sys.stderr)
    result = machine.train()
    plot = plot_run(machine.run_dir) if machine.run_dir else None
    val = f"{result.final_val_loss:.4f} ({result.final_val_bpb:.4f} bits/byte)" if result.final_val_loss is not None else "n/a"
    print(f"done: {result.steps} steps, {result.tokens_seen:,} tokens in {result.wall_time:.1f}s; "
          f"final train loss {result.final_train_loss:.4f}, validation {val}")
    print(f"run directory: {machine.run_dir}")
    if plot:
        print(f"plot: {plot}")
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from stackwise.cli.plan import format_table, plan_rows

    config = _load_config(args.config, args.overrides)
    steps = args.steps or config.training.total_steps
    if steps is None:
        raise UsageError("the run length is unknown: set training.total_steps in the config or pass --steps N")
    print(format_table(plan_rows(config, steps)))
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from stackwise.cli.plot import plot_run

    run_dir = Path(args.run_dir)
    if not run_dir.is_dir():
        raise UsageError(f"{run_dir}: no such run directory")
    print(plot_run(run_dir, args.out))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from stackwise.training.machine import TrainingMachine

    run_dir = Path(args.run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise UsageError(f"{run_dir}: not a run directory (no config.yaml)")
    machine = TrainingMachine.for_evaluation(run_dir, data_paths=[args.data] if args.data else None)
    result = machine.evaluate(max_batches=args.batches)
    print(f"validation loss {result['val_loss']:.4f}, {result['val_bpb']:.4f} bits/byte (step {machine.step}, {run_dir})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="stackwise", description="Train transformers along an explicit timeline.")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="run a config (no config: the built-in demo)")
    train.add_argument("items", nargs="*", metavar="[CONFIG.yaml] [key=value ...]")
    train.add_argument("--resume", metavar="RUN_DIR", help="continue this run from its newest good checkpoint")
    train.add_argument("--steps", type=int, help="total steps (default: training.total_steps)")
    train.set_defaults(func=cmd_train)

    plan = sub.add_parser("plan", help="print the timeline of a config without training")
    plan.add_argument("config", metavar="CONFIG.yaml")
    plan.add_argument("overrides", nargs="*", metavar="key=value")
    plan.add_argument("--steps", type=int, help="total steps (default: training.total_steps)")
    plan.set_defaults(func=cmd_plan)

    plot = sub.add_parser("plot", help="write a PNG of loss against t with phase bands")
    plot.add_argument("run_dir", metavar="RUN_DIR")
    plot.add_argument("--out", help="PNG path (default: RUN_DIR/loss.png)")
    plot.set_defaults(func=cmd_plot)

    ev = sub.add_parser("eval", help="validation loss and bits per byte of a run's newest checkpoint")
    ev.add_argument("run_dir", metavar="RUN_DIR")
    ev.add_argument("--data", metavar="PATH", help="evaluate on this corpus instead of the run's")
    ev.add_argument("--batches", type=int, default=None, help="validation batches (default: all)")
    ev.set_defaults(func=cmd_eval)
    return parser


def main(argv: list[str] | None = None) -> int:
    from stackwise.training.checkpoint import CheckpointError
    from stackwise.training.machine import TrainingError

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, DataError, SpecError, CheckpointError, TrainingError, UsageError) as err:
        print(f"stackwise {args.command}: {err}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("stackwise: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
