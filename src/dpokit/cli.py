"""The ``dpokit`` command: train, sft, eval, demo, arena, methods, plot.

A user error prints one line, ``dpokit: error: ...``, and exits with its kind's code
(:mod:`dpokit.errors`: 2 config/usage, 3 data, 4 model/files, 5 non-finite, 6 out of memory);
``--debug`` (anywhere on the line) or ``DPOKIT_DEBUG=1`` also prints the traceback. ``key=value``
settings may come before, between or after the flags; later ones win.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import re
import sys
import traceback

from dpokit.config import ConfigError, TrainConfig
from dpokit.errors import exit_code, one_line
from dpokit.keyhelp import train_help
from dpokit.paths import check_model_path, check_run_paths, check_writable_dir, read_text_file
from dpokit.trl_names import TRL_NAMES

# A ``key=value`` setting: an identifier, then "=" (flags start with "-").
SETTING = re.compile(r"^[A-Za-z_][\w.-]*=")
DEBUG_VARIABLE = "DPOKIT_DEBUG"


def _common() -> argparse.ArgumentParser:
    """Flags every subcommand takes; SUPPRESS keeps `dpokit --debug train` from being reset."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--debug",
        action="store_true",
        default=argparse.SUPPRESS,
        help=f"print the traceback of an error (or set {DEBUG_VARIABLE}=1)",
    )
    return common


def _train_parser(sub, help_method: str | None = None) -> None:
    parser = sub.add_parser(
        "train",
        parents=[_common()],
        help="train a model on preference data with a method",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train MODEL on DATA with METHOD. Any config key, and any hyperparameter of "
        "the method (see `dpokit methods`), can be set as key=value after the flags.",
        epilog=train_help(help_method),
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
        "--chat-template",
        dest="chat_template",
        help="Jinja chat template file (for tokenizers without one, or to replace it)",
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        default=None,
        help="continue from the newest complete checkpoint in the run directory",
    )
    parser.add_argument("overrides", nargs="*", metavar="key=value")


def _run_train(args) -> int:
    from dpokit.recipes import run

    keys = ("method", "model", "data", "reference", "eval_data", "output_dir", "chat_template")
    values = {k: getattr(args, k) for k in (*keys, "resume")}
    config = TrainConfig.load(args.config, args.overrides, **values)
    if not config.model or not config.data:
        raise ConfigError("`dpokit train` needs --model and --data (or model:/data: in --config)")
    result = run(config)  # checks the run's paths first (dpokit.paths)
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


def _sft_parser(sub) -> None:
    parser = sub.add_parser(
        "sft",
        parents=[_common()],
        help="supervised fine-tuning (completion NLL) on prompt/completion or messages data",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Fine-tune MODEL on SFT DATA (rows prompt+completion, strings or message "
        "lists, or messages whose last assistant turn is the completion). Takes the config keys "
        "of `dpokit train` as key=value; method hyperparameters do not apply.",
        epilog=train_help(hyperparameters=False),
    )
    parser.add_argument("--model", help="path or hub id of the starting model")
    parser.add_argument("--data", help="SFT data: JSONL/JSON/Parquet/CSV, dataset dir or name")
    parser.add_argument("--config", help="YAML run config; flags and key=value override it")
    parser.add_argument("--eval-data", dest="eval_data", help="held-out SFT data")
    parser.add_argument("--output-dir", dest="output_dir", help="run directory")
    parser.add_argument("--resume", action="store_true", default=None)
    parser.add_argument("overrides", nargs="*", metavar="key=value")


def _run_sft(args) -> int:
    from dpokit.losses import get_method
    from dpokit.recipes.sft import run_sft

    method_keys = set(get_method(TrainConfig.method).hyperparameters)
    given = {item.partition("=")[0].strip().replace("-", "_") for item in args.overrides}
    if given & (method_keys | {"method", "method_args"}):
        raise ConfigError(
            f"`dpokit sft` takes no method hyperparameters: {sorted(given & method_keys)}"
        )
    values = {k: getattr(args, k) for k in ("model", "data", "eval_data", "output_dir", "resume")}
    values["output_dir"] = values["output_dir"] or "runs/sft"
    config = TrainConfig.load(args.config, args.overrides, **values)
    if not config.model or not config.data:
        raise ConfigError("`dpokit sft` needs --model and --data (or model:/data: in --config)")
    check_run_paths(config)
    result = run_sft(config)
    print(f"trained {result.global_step} steps; model saved to {result.final_dir}")
    return 0


def _eval_parser(sub) -> None:
    parser = sub.add_parser(
        "eval",
        parents=[_common()],
        help="evaluate a model: reward accuracy on pairs, samples, judge reward, win rate, KL",
        description="Evaluate MODEL. --pairs + --reference: implicit-reward accuracy and the "
        "change of the chosen/rejected log-probs. --prompts (or --task): samples; with --task "
        "also the mean judge reward, the win rate against --baseline and KL to --reference.",
    )
    parser.add_argument("--model", required=True, help="the model to evaluate")
    parser.add_argument("--reference", help="reference model (the SFT model)")
    parser.add_argument("--pairs", help="held-out preference pairs (any `dpokit train` format)")
    parser.add_argument("--prompts", help="JSONL with a `prompt` field, or a text file (one/line)")
    parser.add_argument(
        "--task", choices=["review"], help="the built-in task: its judge and held-out prompts"
    )
    parser.add_argument("--task-seed", type=int, default=0, help="seed the task was built with")
    parser.add_argument("--baseline", help="model to compare samples with (win rate)")
    parser.add_argument("--per-prompt", type=int, default=4, help="samples per prompt")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="directory for metrics.json and samples.jsonl")


def _read_prompts(path: str) -> list[str]:
    import json

    # "\n" only: str.splitlines() would also split a prompt at U+0085, U+2028, ...
    lines = [
        (number, line.removesuffix("\r"))
        for number, line in enumerate(read_text_file(path, "--prompts").split("\n"), 1)
        if line.strip()
    ]
    if not path.endswith((".jsonl", ".json")):
        return [line for _, line in lines]
    prompts = []
    for number, line in lines:
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ConfigError(f"{path}, line {number}: invalid JSON ({err.msg})") from None
        if not isinstance(row, dict) or "prompt" not in row:
            raise ConfigError(f"{path}, line {number}: expected an object with a `prompt`")
        if not isinstance(row["prompt"], str):
            raise ConfigError(
                f"{path}, line {number}: `prompt` must be a string, got "
                f"{type(row['prompt']).__name__}; message lists are not taken by `dpokit eval` "
                "(render them with the model's chat template first)"
            )
        prompts.append(row["prompt"])
    return prompts


def _run_eval(args) -> int:
    import json

    from dpokit.evaluation import evaluate_paths

    judge = prompts = None
    if args.task == "review":
        from dpokit.demo.task import ReviewTask

        task = ReviewTask(seed=args.task_seed)
        judge, prompts = task.judge, task.eval_prompts
    if args.prompts:
        prompts = _read_prompts(args.prompts)
    if args.pairs is None and prompts is None:
        raise ConfigError("`dpokit eval` needs --pairs and/or --prompts (or --task review)")
    for key in ("model", "reference", "baseline"):
        check_model_path(getattr(args, key), f"--{key}")
    if args.out:
        check_writable_dir(args.out, "--out")
    result = evaluate_paths(
        args.model,
        reference_path=args.reference,
        baseline_path=args.baseline,
        pairs=args.pairs,
        prompts=prompts,
        judge=judge,
        per_prompt=args.per_prompt,
        max_new_tokens=args.max_new_tokens,
        seed=args.seed,
    )
    if args.out:
        result.save(args.out)
    print(json.dumps(result.metrics, indent=2))
    return 0


def _demo_parser(sub) -> None:
    parser = sub.add_parser(
        "demo",
        parents=[_common()],
        help="the whole pipeline on the built-in task: tiny model, SFT, a method, before/after",
        description="Build the built-in review task, a tokenizer and a tiny model, run SFT, "
        "train METHOD from the SFT model, evaluate before and after, print a table and write a "
        "PNG. key=value sets any demo setting (steps=200 learning_rate=1e-3 beta=0.2 ...).",
    )
    parser.add_argument("--method", default="dpo", help="any method `dpokit train` runs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work-dir", dest="work_dir", default="runs/demo")
    parser.add_argument("overrides", nargs="*", metavar="key=value")


def _run_demo(args) -> int:
    from dpokit.demo.demo import run_demo
    from dpokit.demo.settings import demo_config

    config = demo_config(args.overrides, method=args.method, seed=args.seed, work_dir=args.work_dir)
    check_writable_dir(args.work_dir, "--work-dir")
    summary = run_demo(config)
    print(summary["table"])  # the numbers, once (win_rate: vs the SFT model's samples)
    print(
        f"{config.method}: evaluated on held-out prompts, before (SFT) and after; "
        f"{summary['total_seconds']:.0f} s"
    )
    print(f"plot: {summary['plot']}")
    return 0


def _arena_parser(sub) -> None:
    parser = sub.add_parser(
        "arena",
        parents=[_common()],
        help="every trainable method from the same SFT model: table (MD/CSV) + reward-vs-KL plot",
    )
    parser.add_argument("--methods", help="comma-separated subset (default: every trainable one)")
    parser.add_argument("--seeds", default="0", help="comma-separated seeds, e.g. 0,1,2")
    parser.add_argument("--work-dir", dest="work_dir", default="runs/arena")
    parser.add_argument("--out", help="where the table and plot go (default WORK_DIR)")
    parser.add_argument(
        "--no-claims", dest="claims", action="store_false", help="skip the extra claim runs"
    )
    parser.add_argument(
        "--no-untuned",
        dest="untuned",
        action="store_false",
        help="skip the untuned runs of the methods with task-specific settings",
    )
    parser.add_argument("--readme", help="also rewrite the arena block of this Markdown file")
    parser.add_argument("overrides", nargs="*", metavar="key=value")


def _run_arena(args) -> int:
    from dpokit.demo.arena import ArenaConfig, run_arena
    from dpokit.demo.settings import demo_config

    base = demo_config(args.overrides, work_dir=args.work_dir)
    check_writable_dir(args.work_dir, "--work-dir")
    config = ArenaConfig(
        demo=base,
        methods=[m.strip() for m in args.methods.split(",")] if args.methods else None,
        seeds=[int(s) for s in args.seeds.split(",")],
        out_dir=args.out,
        claims=args.claims,
        untuned=args.untuned,
        readme=args.readme,
    )
    report = run_arena(config)
    print(report["table"])
    for path in report["files"]:
        print(path)
    return 0


def build_parser(help_method: str | None = None) -> argparse.ArgumentParser:
    """The ``dpokit`` argument parser with every subcommand; ``help_method``: the method whose
    hyperparameters ``dpokit train --help`` lists (default: the default method)."""
    parser = argparse.ArgumentParser(
        prog="dpokit",
        description="Preference optimization: the DPO family, in one place.",
        epilog="exit codes: 0 done, 1 a bug (traceback), 2 config/usage, 3 data, "
        "4 model/files/IO, 5 non-finite numbers, 6 out of memory, 130 interrupted",
    )
    parser.add_argument(
        "--debug", action="store_true", default=False, help="print tracebacks of errors"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    _train_parser(sub, help_method)
    _sft_parser(sub)
    _eval_parser(sub)
    _demo_parser(sub)
    _arena_parser(sub)
    methods = sub.add_parser(
        "methods", parents=[_common()], help="list methods, formulas, needs and defaults"
    )
    methods.add_argument("-v", "--verbose", action="store_true", help="papers and details")
    plot = sub.add_parser("plot", parents=[_common()], help="PNG curves of a run's metrics")
    plot.add_argument("run_dir")
    plot.add_argument("--out", help="output directory (default RUN_DIR/plots)")
    return parser


COMMANDS = {
    "train": _run_train,
    "sft": _run_sft,
    "eval": _run_eval,
    "demo": _run_demo,
    "arena": _run_arena,
    "methods": _run_methods,
    "plot": _run_plot,
}


def main(argv: list[str] | None = None) -> int:
    """Run one ``dpokit`` command; returns the exit code (see the module docstring)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(_help_method(argv))
    args = parse_args(parser, argv)
    debug = args.debug or os.environ.get(DEBUG_VARIABLE, "").strip() not in ("", "0")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return COMMANDS[args.command](args)
    except (Exception, KeyboardInterrupt) as err:
        code = exit_code(err)
        if code is None:
            raise  # a bug: the traceback is the report
        if debug:
            traceback.print_exc()
        print(f"dpokit: error: {one_line(err)}", file=sys.stderr)
        return code


def parse_args(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """Parse ``argv`` with ``key=value`` settings allowed anywhere after the command.

    argparse binds a ``nargs="*"`` positional to one run of words only, so settings after a flag
    come back unrecognized; they are appended to ``overrides`` in the order given.
    """
    args, extra = parser.parse_known_args(argv)
    settings = [item for item in extra if SETTING.match(item)]
    unknown = [item for item in extra if not SETTING.match(item)]
    if settings and not hasattr(args, "overrides"):
        unknown = settings + unknown
    elif settings:
        args.overrides = list(args.overrides or []) + settings
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}{_flag_hint(unknown)}")
    return args


def _help_method(argv: list[str]) -> str | None:
    """The method named by ``--method X`` (or ``method=X``) when help is asked for: argparse
    prints help as soon as it meets ``-h``, before it has read ``--method``."""
    if not {"-h", "--help"} & set(argv):
        return None
    for index, item in enumerate(argv):
        if item == "--method" and index + 1 < len(argv):
            return argv[index + 1]
        if item.startswith(("--method=", "method=")):
            return item.partition("=")[2]
    return None


def _flag_hint(unknown: list[str]) -> str:
    """A config key given as a flag (``--max_steps 3``): say how keys are set."""
    keys = {f.name for f in dataclasses.fields(TrainConfig)} | TRL_NAMES
    for item in unknown:
        key = item.lstrip("-").partition("=")[0].replace("-", "_")
        if item.startswith("--") and key in keys:
            return f" (config keys are set as key=value: {key}=...)"
    return ""


if __name__ == "__main__":
    sys.exit(main())
