"""The ``dpokit`` command: ``train``, ``methods``, ``plot``."""

from __future__ import annotations

import argparse
import logging
import sys

from dpokit.config import ConfigError, TrainConfig, config_help


def _train_parser(sub) -> None:
    parser = sub.add_parser(
        "train",
        help="train a model on preference data with a method",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train MODEL on DATA with METHOD. Any config key, and any hyperparameter of "
        "the method (see `dpokit methods`), can be set as key=value after the flags.",
        epilog="config keys (key=default):\n" + config_help(),
    )
    parser.add_argument("--method", help="method name (dpo, simpo, ...; see `dpokit methods`)")
    parser.add_argument("--model", help="path or hub id of the starting policy")
    parser.add_argument(
        "--data", help="preference data: JSONL/JSON/Parquet/CSV, dataset dir or name"
    )
    parser.add_argument("--config", help="YAML run config; flags and key=value override it")
    parser.add_argument("--reference", help="reference model (default: the starting policy)")
    parser.add_argument("--eval-data", dest="eval_data", help="held-out preference data")
    parser.add_argument("--output-dir", dest="output_dir", help="run directory")
    parser.add_argument(
        "--resume",
        action="store_true",
        default=None,
        help="continue from the newest complete checkpoint in the run directory",
    )
    parser.add_argument("overrides", nargs="*", metavar="key=value")


def _run_train(args) -> int:
    from dpokit.engine import train

    values = {
        k: getattr(args, k)
        for k in ("method", "model", "data", "reference", "eval_data", "output_dir", "resume")
    }
    config = TrainConfig.load(args.config, args.overrides, **values)
    if not config.model or not config.data:
        raise ConfigError("`dpokit train` needs --model and --data (or model:/data: in --config)")
    result = train(config)
    print(f"trained {result.global_step} steps; model saved to {result.final_dir}")
    print(
        f"metrics: {result.output_dir / 'metrics.jsonl'} "
        f"(plot them: dpokit plot {result.output_dir})"
    )
    return 0


def _run_methods(args) -> int:
    from dpokit.losses import format_methods

    print(format_methods(verbose=args.verbose))
    return 0


def _run_plot(args) -> int:
    from dpokit.plot import plot_run

    for path in plot_run(args.run_dir, args.out):
        print(path)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dpokit", description="Preference optimization: the DPO family, in one place."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    _train_parser(sub)
    methods = sub.add_parser("methods", help="list methods, formulas, needs and defaults")
    methods.add_argument("-v", "--verbose", action="store_true", help="papers and details")
    plot = sub.add_parser("plot", help="PNG curves of a run's metrics")
    plot.add_argument("run_dir")
    plot.add_argument("--out", help="output directory (default RUN_DIR/plots)")
    return parser


COMMANDS = {"train": _run_train, "methods": _run_methods, "plot": _run_plot}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return COMMANDS[args.command](args)
    except (ConfigError, FileNotFoundError) as err:
        print(f"dpokit: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
