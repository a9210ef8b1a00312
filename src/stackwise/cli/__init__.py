"""The `stackwise` command: train, plan, prepare, plot, eval, generate, consolidate, export.

Every user error (bad config, data, checkpoint or arguments) prints one message and exits 2.
Ctrl-C at any moment, the first imports included, prints one line and exits 130: this module
imports nothing heavy at its top, `main` imports the rest inside its guard.
"""

from __future__ import annotations

import argparse
import math
import sys
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from stackwise.config import StackWiseConfig

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
MAX_NEW_TOKENS = 1_000_000  # `generate` keeps every id in one buffer: a bound on what one call may ask


class UsageError(Exception):
    """A command-line problem the user can fix; printed without a traceback."""


def builtin_demo_path() -> Path:
    return Path(str(resources.files("stackwise") / "configs" / "demo.yaml"))


def _load_config(path: str | None, overrides: list[str]) -> StackWiseConfig:
    from stackwise.config import StackWiseConfig

    source = path if path is not None else builtin_demo_path()
    config = StackWiseConfig.from_yaml(source)
    return config.with_overrides(overrides) if overrides else config


def _split_config_and_overrides(items: list[str]) -> tuple[str | None, list[str]]:
    """`train [CONFIG.yaml] [key=value ...]`: the first item is the config unless it is an override."""
    if items and "=" not in items[0]:
        return items[0], items[1:]
    return None, items


def cmd_train(args: argparse.Namespace) -> int:
    from stackwise.training.machine import TrainingMachine

    path, overrides = _split_config_and_overrides(args.items)
    if args.resume:
        run_dir = Path(args.resume)
        if not (run_dir / "config.yaml").is_file():
            raise UsageError(f"{run_dir}: not a run directory (no config.yaml); nothing to resume")
        config = _load_config(path or str(run_dir / "config.yaml"), overrides)
        machine = TrainingMachine(config, total_steps=args.steps, resume=run_dir, extend=args.extend)
    else:
        if args.extend:
            raise UsageError("--extend appends phases to an existing run: use it with --resume RUN_DIR")
        config = _load_config(path, overrides)
        if path is None:
            print(f"stackwise: no config given, running the built-in demo ({builtin_demo_path()})", file=sys.stderr)
        machine = TrainingMachine(config, total_steps=args.steps)
    if not machine.dist.is_main:  # under torchrun, rank 0 speaks for the run
        machine.train()
        return 0
    print(f"run directory: {machine.run_dir}", file=sys.stderr)
    result = machine.train()
    if result.nothing_to_do:  # nothing ran and nothing in the run directory was touched (no new plot either)
        print(f"nothing to do: {machine.run_dir} has run all {result.steps} steps; to train it longer: "
              f"stackwise train --resume {machine.run_dir} --steps N")
        return 0
    if result.stopped:
        print(f"stopped by {result.stopped} after {result.steps} steps; resume with: stackwise train --resume {machine.run_dir}")
        return 0
    # matplotlib is imported only now: its style parsing swallows a Ctrl-C that lands in its import.
    from stackwise.cli.plot import plot_run

    plot = plot_run(machine.run_dir) if machine.run_dir else None
    val = f"{result.final_val_loss:.4f} ({result.final_val_bpb:.4f} bits/byte)" if result.final_val_loss is not None else "n/a"
    print(f"done: {result.steps} steps, {result.tokens_seen:,} tokens in {result.wall_time:.1f}s; "
          f"final train loss {result.final_train_loss:.4f}, validation {val}")
    print(f"run directory: {machine.run_dir}")
    if plot:
        print(f"plot: {plot}")
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    import torch

    from stackwise.cli.plan import flops_summary, format_table, memory_table, plan_rows
    from stackwise.training.init_from import resolve_init_from
    from stackwise.training.progressive import with_growth_schedule
    from stackwise.training.schedule import resolve_time, train_token_counter

    config = with_growth_schedule(resolve_init_from(_load_config(args.config, args.overrides)))
    if args.steps is not None and args.steps < 1:
        raise UsageError(f"--steps must be a positive count, got {args.steps}")
    if args.steps is None and config.training.length is None:
        raise UsageError("the run length is unknown: set training.total_steps, total_tokens or total_epochs in the "
                         "config, or pass --steps N")
    epochs = config.epoch_keys(args.steps)
    if epochs and args.no_data:
        raise UsageError(f"{epochs[0]} is in epochs, which count passes over the training split: plan reads the "
                         "corpus to convert them; drop --no-data (or give the time in steps or tokens)")
    corpus = None if args.no_data else _corpus(config)
    # Tokens and epochs to steps, as `train` converts them (docs/schedule.md).
    config = resolve_time(config, args.steps, corpus)
    steps = config.training.total_steps
    device = args.device or config.run.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    _warn_if_too_large(config, steps, device)
    rows = plan_rows(config, steps, device=device, windows=_windows(corpus) if corpus else None,
                     train_tokens=train_token_counter(corpus) if corpus else None)
    print(format_table(rows))
    print(flops_summary(rows))
    if args.memory:
        print()
        print(memory_table(rows, device))
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    from stackwise.cli.prepare import prepare_report
    from stackwise.training.init_from import resolve_init_from
    from stackwise.training.loader import ProgressiveDataLoader
    from stackwise.training.progressive import with_growth_schedule

    config = with_growth_schedule(resolve_init_from(_load_config(args.config, args.overrides)))
    if config.data.use_dummy_data:
        raise UsageError("data.use_dummy_data is true: there is no corpus to prepare")
    print(prepare_report(ProgressiveDataLoader(config)))
    return 0


def _warn_if_too_large(config: StackWiseConfig, steps: int, device: str) -> None:
    """`stackwise plan` shows a run that would not fit (training/fits.py) with a warning rather than
    refusing it: plan is where one explores sizes. `train` refuses the same run."""
    from stackwise.config import ConfigError, shown_value
    from stackwise.training.fits import check_fits

    try:
        check_fits(config, steps, device)
    except ConfigError as err:
        for path, message, value in err.problems:
            print(f"stackwise plan: warning: {path}={shown_value(value)} is {message}; `stackwise train` refuses "
                  "this run", file=sys.stderr)


def _corpus(config: StackWiseConfig):
    """The run's data loader (the corpus read and tokenized, as `train` reads it)."""
    from stackwise.training.loader import ProgressiveDataLoader

    return ProgressiveDataLoader(config)


def _windows(loader):
    """Training windows per sequence length (the activation cache's size), from the corpus."""
    tokens = loader.n_train_tokens
    return lambda seq_len: tokens // (seq_len + 1)


def cmd_plot(args: argparse.Namespace) -> int:
    from stackwise.cli.plot import plot_run

    run_dir = Path(args.run_dir)
    if not run_dir.is_dir():
        raise UsageError(f"{run_dir}: no such run directory")
    print(plot_run(run_dir, args.out, x=args.x))  # a bad --out is refused before anything is drawn
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from stackwise.training.machine import TrainingMachine

    run_dir = Path(args.run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise UsageError(f"{run_dir}: not a run directory (no config.yaml)")
    if args.mask_range and not 0 < args.mask_range[0] <= args.mask_range[1] <= 1:
        raise UsageError(f"--mask-range needs 0 < LO <= HI <= 1, got {args.mask_range}")
    if args.mask_rate is not None and not 0 < args.mask_rate <= 1:
        raise UsageError(f"--mask-rate must lie in (0, 1], got {args.mask_rate}")
    if args.batches is not None and args.batches < 1:
        raise UsageError(f"--batches must be a positive count, got {args.batches}")
    # --data FILE scores all of FILE; the run's own corpus, its validation split (docs/data.md).
    split = args.split or ("all" if args.data else "validation")
    machine = TrainingMachine.for_evaluation(
        run_dir, paths=[args.data] if args.data else None, objective=args.objective,
        mask_range=tuple(args.mask_range) if args.mask_range else None, mask_rate=args.mask_rate,
        validation="all" if split == "all" else "split",
    )
    if not args.data:
        _check_run_corpus(run_dir, machine)
    loader = getattr(machine.data, "loader", None)
    batches = args.batches
    if batches is None:
        every = split == "all" and loader is not None
        batches = -(-loader.n_val_windows // loader.settings.batch_size) if every else machine.config.run.eval_batches
    result = machine.evaluate(max_batches=batches)
    if not math.isfinite(result["val_loss"]):  # weights that overflow give NaN/Inf: a broken checkpoint, not a score
        raise UsageError(f"{run_dir}: the checkpoint of step {machine.step} gives a non-finite validation loss "
                         f"({result['val_loss']}): its weights overflow and cannot be scored")
    print(f"validation loss {result['val_loss']:.4f}, {result['val_bpb']:.4f} bits/byte (step {machine.step}, {run_dir})")
    if hasattr(loader, "validation_coverage"):
        scope = loader.validation_coverage(batches)
        what = "every document of" if split == "all" else "the validation split of"
        print(f"scored {scope['bytes']:,} of {scope['total_bytes']:,} bytes in {scope['documents']:,} of "
              f"{scope['total_documents']:,} documents ({what} {scope['corpus']}; {scope['windows']:,} windows of "
              f"{loader.settings.seq_len + 1} tokens)")
    return 0


def _check_run_corpus(run_dir: Path, machine) -> None:
    """`eval RUN` scores the validation split of the corpus the run trained on: say so plainly
    when that corpus is not here (a run folder copied elsewhere), instead of a bare path error."""
    paths = machine.data.settings.get("paths", machine.config.data.paths)
    missing = [p for p in paths or () if not Path(p).expanduser().exists()]
    if missing:
        raise UsageError(f"{run_dir} trained on {', '.join(map(str, paths))}, and {missing[0]} is not here: `eval` "
                         "without --data scores that corpus's validation split; pass --data FILE to score a file, or "
                         "run it where the corpus is")


def _check_generate_args(args: argparse.Namespace) -> None:
    if not args.prompt:
        raise UsageError("--prompt is empty; give the text to continue")
    if not math.isfinite(args.temperature) or args.temperature < 0:
        raise UsageError(f"--temperature must be a finite number >= 0 (0 = greedy), got {args.temperature}")
    if args.seed is not None and not 0 <= args.seed < 2**63:
        raise UsageError(f"--seed must lie in [0, 2**63), got {args.seed}")
    if args.max_new_tokens > MAX_NEW_TOKENS:
        raise UsageError(f"--max-new-tokens may be at most {MAX_NEW_TOKENS:,}, got {args.max_new_tokens:,}")
    for flag, value in (("--max-new-tokens", args.max_new_tokens), ("--top-k", args.top_k), ("--steps", args.steps)):
        if value is not None and value < 1:
            raise UsageError(f"{flag} must be a positive count, got {value}")


def cmd_generate(args: argparse.Namespace) -> int:
    from stackwise.model.sampling import generate_text
    from stackwise.training.machine import TrainingMachine

    _check_generate_args(args)
    run_dir = Path(args.run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise UsageError(f"{run_dir}: not a run directory (no config.yaml)")
    machine = TrainingMachine.for_evaluation(run_dir)
    # The checkpoint's phase decides the objective: a run may switch it between phases.
    objective = machine.data.settings.get("objective", machine.config.data.objective)
    try:
        text = generate_text(
            machine.model, machine.data.tokenizer, args.prompt, objective=objective,
            max_new_tokens=args.max_new_tokens, steps=args.steps, temperature=args.temperature,
            top_k=args.top_k, seed=args.seed,
        )
    except ValueError as err:  # e.g. prompt + tokens longer than the model's max_seq_len
        raise UsageError(str(err)) from None
    print(args.prompt + text)
    return 0


def cmd_consolidate(args: argparse.Namespace) -> int:
    from stackwise.training.consolidate import consolidate

    run_dir = Path(args.run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise UsageError(f"{run_dir}: not a run directory (no config.yaml)")
    check_writable_parent(Path(args.out), "--out")
    try:
        path = consolidate(run_dir, args.out, args.checkpoint)
    except OSError as err:  # the disk filled or the folder turned read-only while writing
        raise UsageError(f"--out {args.out}: cannot write there: {err.strerror or err}") from None
    print(f"wrote {path} (one-process format); resume with: stackwise train --resume {args.out}")
    return 0


def check_writable_parent(path: Path, flag: str) -> None:
    """Refuse, naming `path` and the cause, an output that cannot be written, before any work."""
    from stackwise.cli.outputs import output_folder_problem

    problem = output_folder_problem(path)
    if problem:
        raise UsageError(f"{flag} {path}: {problem}")


def cmd_export(args: argparse.Namespace) -> int:
    from stackwise.interop.hf_export import ExportError, export_hf

    def warn(message: str) -> None:
        print(f"stackwise export: warning: {message}", file=sys.stderr)

    try:
        path = export_hf(args.run_dir, args.hf, checkpoint=args.checkpoint, dtype=args.dtype,
                         max_shard_size=args.max_shard_size, allow_bidirectional=args.allow_bidirectional, warn=warn)
    except ExportError as err:
        raise UsageError(str(err)) from None
    print(f"wrote {path} (Hugging Face Llama, {args.dtype}); load it with "
          f"transformers.AutoModelForCausalLM.from_pretrained({str(path)!r})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="stackwise", description="Train transformers along an explicit timeline.")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="run a config (no config: the built-in demo)")
    train.add_argument("items", nargs="*", metavar="[CONFIG.yaml] [key=value ...]")
    train.add_argument("--resume", metavar="RUN_DIR", help="continue this run from its newest good checkpoint")
    train.add_argument("--steps", type=int,
                       help="total steps (default: the config's run length: total_steps, total_tokens or "
                            "total_epochs); with --resume, more than the run's extends it")
    train.add_argument("--extend", metavar="EXT.yaml",
                       help="with --resume: append the phases of this file's `schedule` after the run's end")
    train.set_defaults(func=cmd_train)

    plan = sub.add_parser("plan", help="print the timeline of a config without training (warns when it would not fit)")
    plan.add_argument("config", metavar="CONFIG.yaml")
    plan.add_argument("overrides", nargs="*", metavar="key=value")
    plan.add_argument("--steps", type=int,
                      help="total steps (default: the config's run length: total_steps, total_tokens or total_epochs)")
    plan.add_argument("--device", choices=["cpu", "cuda"], help="estimate memory for this device (default: run.device)")
    plan.add_argument("--memory", action="store_true", help="also print where each phase's memory goes")
    plan.add_argument("--no-data", action="store_true",
                      help="do not read the corpus (the cache size and epochs are then unknown)")
    plan.set_defaults(func=cmd_plan)

    prep = sub.add_parser("prepare", help="prepare the corpora of a config (tokenizer and token shards) without training")
    prep.add_argument("config", metavar="CONFIG.yaml")
    prep.add_argument("overrides", nargs="*", metavar="key=value")
    prep.set_defaults(func=cmd_prepare)

    plot = sub.add_parser("plot", help="write a PNG of loss against t (or steps, tokens, FLOPs, time) with phase bands")
    plot.add_argument("run_dir", metavar="RUN_DIR")
    plot.add_argument("--out", help="PNG path (default: RUN_DIR/loss.png)")
    plot.add_argument("--x", choices=["t", "step", "tokens", "flops", "time"], default="t",
                      help="the x axis: normalized time t (default), step, tokens seen, training FLOPs, or wall-clock seconds")
    plot.set_defaults(func=cmd_plot)

    ev = sub.add_parser("eval", help="validation loss and bits per byte of a run's newest checkpoint")
    ev.add_argument("run_dir", metavar="RUN_DIR")
    ev.add_argument("--data", metavar="PATH", help="evaluate on this corpus (all of it) instead of the run's")
    ev.add_argument("--split", choices=["all", "validation"],
                    help="score every document, or only the validation split (default: all with --data, "
                         "else validation)")
    ev.add_argument("--batches", type=int, default=None,
                    help="at most this many batches (default: every batch with --split all, else run.eval_batches)")
    ev.add_argument("--objective", choices=["clm", "mlm", "diffusion"], help="score with this objective instead of the run's")
    ev.add_argument("--mask-range", type=float, nargs=2, metavar=("LO", "HI"), help="diffusion: per-sample rate range")
    ev.add_argument("--mask-rate", type=float, help="mlm: mask rate")
    ev.set_defaults(func=cmd_eval)

    gen = sub.add_parser("generate", help="continue a prompt with a run's newest checkpoint")
    gen.add_argument("run_dir", metavar="RUN_DIR")
    gen.add_argument("--prompt", required=True, help="text to continue")
    gen.add_argument("--max-new-tokens", type=int, default=100, help="tokens to generate (default: 100)")
    gen.add_argument("--temperature", type=float, default=0.8, help="0 = greedy (default: 0.8)")
    gen.add_argument("--top-k", type=int, default=50, help="sample among the k likeliest tokens (default: 50)")
    gen.add_argument("--steps", type=int, default=16, help="mlm/diffusion: unmasking rounds (default: 16)")
    gen.add_argument("--seed", type=int, default=None, help="makes the output reproducible (default: random)")
    gen.set_defaults(func=cmd_generate)
    cons = sub.add_parser("consolidate", help="rewrite a sharded (torchrun) checkpoint in the one-process format")
    cons.add_argument("run_dir", metavar="RUN_DIR")
    cons.add_argument("--out", required=True, metavar="NEW_RUN_DIR", help="a new run directory to write")
    cons.add_argument("--checkpoint", metavar="STEP_DIR", help="this checkpoint folder (default: the newest good one)")
    cons.set_defaults(func=cmd_consolidate)
    exp = sub.add_parser("export", help="write a run's checkpoint as a Hugging Face Llama folder")
    exp.add_argument("run_dir", metavar="RUN_DIR")
    exp.add_argument("--hf", required=True, metavar="OUT", help="the folder to write (new or empty)")
    exp.add_argument("--checkpoint", metavar="STEP_DIR", help="this checkpoint folder (default: the newest good one)")
    exp.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32", help="weights' dtype (default: fp32)")
    exp.add_argument("--max-shard-size", default="5GB", metavar="SIZE",
                     help="cut the weights into files of at most this size, e.g. 5GB, 200MB (default: 5GB)")
    exp.add_argument("--allow-bidirectional", action="store_true",
                     help="export a model trained only with mlm/diffusion (a Llama runs it causally)")
    exp.set_defaults(func=cmd_export)
    parser.intermixed = {"train": train, "plan": plan}  # type: ignore[attr-defined]
    return parser


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """`train` and `plan` take their options anywhere among the config and the key=value
    overrides (`plan cur.yaml --steps 20 run.name=x`); argparse cannot intermix through
    subparsers, so these two commands are parsed by their own parser."""
    argv = sys.argv[1:] if argv is None else list(argv)
    command = getattr(parser, "intermixed", {}).get(argv[0]) if argv else None
    if command is None:
        return parser.parse_args(argv)
    args = command.parse_intermixed_args(argv[1:])
    args.command = argv[0]
    return args


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(argv)
    except KeyboardInterrupt:  # Ctrl-C during the imports or argument parsing, before _main's own guard
        print("stackwise: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


def _main(argv: list[str] | None) -> int:
    from stackwise.cli.plot import PlotError
    from stackwise.config import ConfigError
    from stackwise.data.errors import DataError
    from stackwise.specs import SpecError
    from stackwise.training.checkpoint import CheckpointError
    from stackwise.training.distributed import shutdown
    from stackwise.training.machine import TrainingError

    parser = build_parser()
    args = parse_args(parser, argv)
    try:
        code = args.func(args)
        shutdown(together=True)
        return code
    except (ConfigError, DataError, SpecError, CheckpointError, TrainingError, PlotError, UsageError) as err:
        print(f"stackwise {args.command}: {err}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("stackwise: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        shutdown(together=False)  # after an error (a no-op when already left, or in a plain process)


if __name__ == "__main__":
    sys.exit(main())
