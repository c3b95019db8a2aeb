"""Every user error is one line on stderr and an exit code per kind; --debug shows the traceback.

Exit codes (dpokit.errors): 2 config/usage, 3 data, 4 model/files/IO, 5 non-finite numbers,
6 out of memory, 130 interrupted; a bug still raises (traceback, exit 1).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

from dpokit import cli
from dpokit.cli import main
from dpokit.config import TrainConfig
from dpokit.errors import (
    EXIT_CONFIG,
    EXIT_DATA,
    EXIT_FILES,
    EXIT_INTERRUPTED,
    EXIT_NONFINITE,
)

ROWS = [{"prompt": f"Question {i}?", "chosen": " yes", "rejected": " no"} for i in range(8)]
SRC = str(Path(__file__).resolve().parents[1] / "src")


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def error_line(capsys) -> str:
    """The one error line: the last line of stderr (progress bars and logs come before it)."""
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.strip().splitlines() if line.startswith("dpokit: error: ")]
    assert len(lines) == 1, err
    return lines[0].removeprefix("dpokit: error: ")


def train_argv(model, data, out, *settings) -> list[str]:
    argv = ["train", "--model", str(model), "--data", str(data), "--output-dir", str(out)]
    return [*argv, "progress=false", "batch_size=4", "max_steps=1", *settings]


# ---- config and usage (2) -----------------------------------------------------------------------


@pytest.mark.parametrize("value", ["nan", "inf", ".nan", ".inf"])
def test_non_finite_learning_rate_is_a_config_error(capsys, value):
    code = main(
        ["train", "--model", "no/such/model", "--data", "x.jsonl", f"learning_rate={value}"]
    )
    assert code == EXIT_CONFIG
    assert "learning_rate" in error_line(capsys)


def test_yaml_syntax_error_names_file_line_and_column(tmp_path, capsys):
    path = tmp_path / "run.yaml"
    path.write_text("beta: 1\n  max_steps: 3\n")  # the ':' of line 2 is its 12th character
    assert main(["train", "--config", str(path)]) == EXIT_CONFIG
    assert error_line(capsys) == (
        f"{path}, line 2, column 12: invalid YAML: mapping values are not allowed here"
    )


def test_yaml_that_is_not_utf8_names_the_line(tmp_path, capsys):
    path = tmp_path / "run.yaml"
    path.write_bytes(b"beta: 1\nmax_steps: 3\nmodel: caf\xe9\n")
    assert main(["train", "--config", str(path)]) == EXIT_CONFIG
    assert error_line(capsys) == f"{path}, line 3: not UTF-8 text (byte 0xe9)"


def test_missing_yaml_file(tmp_path, capsys):
    path = tmp_path / "nope.yaml"
    assert main(["train", "--config", str(path)]) == EXIT_CONFIG
    assert error_line(capsys) == f"{path}: cannot read the config file: No such file or directory"


def test_override_that_is_not_yaml(capsys):
    assert main(["train", "--model", "m", "--data", "d", "beta=[1,"]) == EXIT_CONFIG
    assert error_line(capsys).startswith("override 'beta=[1,': the value is not valid YAML (")


def test_a_config_key_given_as_a_flag_gets_a_hint(capsys):
    with pytest.raises(SystemExit) as info:
        main(["train", "--model", "m", "--data", "d", "--max_steps", "3"])
    assert info.value.code == EXIT_CONFIG
    assert "(config keys are set as key=value: max_steps=...)" in capsys.readouterr().err


def test_settings_before_between_and_after_flags_later_wins():
    parser = cli.build_parser()
    argv = ["train", "beta=0.2", "--model", "m", "max_steps=3", "--data", "d", "beta=0.3"]
    args = cli.parse_args(parser, argv)
    assert args.overrides == ["beta=0.2", "max_steps=3", "beta=0.3"]
    config = TrainConfig.load(None, args.overrides, model=args.model, data=args.data)
    assert (config.method_args["beta"], config.max_steps, config.model) == (0.3, 3, "m")


@pytest.mark.parametrize("spelling", ["none", "None", "null", "~", ""])
def test_max_lengths_can_be_unset_from_the_command_line(spelling):
    overrides = [f"max_length={spelling}", f"max_prompt_length={spelling}"]
    config = TrainConfig.load(None, overrides)
    assert (config.max_length, config.max_prompt_length) == (None, None)
    only_prompt = TrainConfig.load(None, ["max_length=64", f"max_prompt_length={spelling}"])
    assert (only_prompt.max_length, only_prompt.max_prompt_length) == (64, None)


def test_yaml_none_unsets_max_length_too(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("max_length: none\nmax_prompt_length: null\n")
    config = TrainConfig.load(path)
    assert (config.max_length, config.max_prompt_length) == (None, None)


# ---- model, files and I/O (4) -------------------------------------------------------------------


def test_output_dir_that_is_a_file(tmp_path, tiny_dir, capsys):
    target = tmp_path / "file.txt"
    target.write_text("not a directory")
    assert main(train_argv(tiny_dir, "d.jsonl", target)) == EXIT_FILES  # a model that exists
    assert error_line(capsys) == f"output_dir={target}: is a file, not a directory"


def test_output_dir_under_a_file(tmp_path, tiny_dir, capsys):
    parent = tmp_path / "file.txt"
    parent.write_text("not a directory")
    target = parent / "runs" / "dpo"
    assert main(train_argv(tiny_dir, "d.jsonl", target)) == EXIT_FILES  # a model that exists
    assert error_line(capsys) == (
        f"output_dir={target}: {parent} is a file, so no directory can be made in it"
    )
    assert parent.read_text() == "not a directory"


def unwritable_directory(tmp_path: Path) -> Path:
    """A directory no file can be created in: read-only mode, or /sys when running as root
    (root ignores the mode bits); skips when neither refuses a file."""
    for directory in (tmp_path / "read-only", Path("/sys")):
        if directory.parent == tmp_path:
            directory.mkdir()
            directory.chmod(0o555)
        try:
            handle, probe = tempfile.mkstemp(dir=directory)
        except OSError:
            return directory
        os.close(handle)
        os.unlink(probe)
    pytest.skip("no directory here refuses new files")


def test_output_dir_that_cannot_be_written(tmp_path, tiny_dir, capsys):
    locked = unwritable_directory(tmp_path)
    target = locked / "run"
    assert main(train_argv(tiny_dir, "d.jsonl", target)) == EXIT_FILES  # a model that exists
    line = error_line(capsys)
    assert line.startswith(f"output_dir={target}: cannot write in {locked} (")
    assert not target.exists()


@pytest.mark.parametrize("key", ["model", "reference"])
def test_missing_local_model_path(tmp_path, tiny_dir, capsys, key):
    missing = tmp_path / "no-such-model"
    model, extra = (missing, []) if key == "model" else (tiny_dir, ["--reference", str(missing)])
    argv = [*train_argv(model, "d.jsonl", tmp_path / "run"), *extra]
    assert main(argv) == EXIT_FILES
    assert error_line(capsys) == f"{key}={missing}: no such directory"
    assert not (tmp_path / "run").exists()


def test_hub_model_id_while_offline(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hub-cache"))
    assert main(train_argv("someone/some-model", "d.jsonl", tmp_path / "run")) == EXIT_FILES
    assert error_line(capsys) == (
        "model=someone/some-model: not a local directory, and not in the Hugging Face cache; "
        "HF_HUB_OFFLINE is set, so it cannot be downloaded (give a local path, or download it "
        "first)"
    )


def test_model_path_that_is_a_file(tmp_path, tiny_dir, capsys):
    weights = tiny_dir / "model.safetensors"
    assert main(train_argv(weights, "d.jsonl", tmp_path / "run")) == EXIT_FILES
    assert error_line(capsys).startswith(f"model={weights}: is a file; give the directory")


def test_conversational_prompts_are_named_not_called_missing(tmp_path, tiny_dir, capsys):
    prompts = tmp_path / "prompts.jsonl"
    messages = [{"role": "user", "content": "Hi?"}]
    prompts.write_text(json.dumps({"prompt": "Hello"}) + "\n" + json.dumps({"prompt": messages}))
    assert main(["eval", "--model", str(tiny_dir), "--prompts", str(prompts)]) == EXIT_CONFIG
    assert error_line(capsys) == (
        f"{prompts}, line 2: `prompt` must be a string, got list; message lists are not taken "
        "by `dpokit eval` (render them with the model's chat template first)"
    )


def test_prompts_file_that_is_not_utf8(tmp_path, tiny_dir, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_bytes(b"first prompt\nsecond \xff prompt\n")
    assert main(["eval", "--model", str(tiny_dir), "--prompts", str(prompts)]) == EXIT_FILES
    assert error_line(capsys) == f"--prompts={prompts}, line 2: not UTF-8 text (byte 0xff)"


def test_an_os_error_anywhere_is_one_line(monkeypatch, capsys):
    def denied(args):
        raise PermissionError(13, "Permission denied", "/data/x.jsonl")

    monkeypatch.setitem(cli.COMMANDS, "methods", denied)
    assert main(["methods"]) == EXIT_FILES
    assert error_line(capsys) == "Permission denied: /data/x.jsonl"


# ---- data (3) -----------------------------------------------------------------------------------


def test_data_that_is_not_utf8(tmp_path, tiny_dir, capsys):
    data = tmp_path / "prefs.jsonl"
    good = json.dumps(ROWS[0]).encode()
    data.write_bytes(good + b"\n" + good.replace(b"Question", b"Qu\xe9stion") + b"\n")
    assert main(train_argv(tiny_dir, data, tmp_path / "run")) == EXIT_DATA
    assert error_line(capsys) == (
        f"{data}, line 2: not UTF-8 text: byte 0xe9 at byte 15 of the line (invalid continuation "
        "byte); save the file as UTF-8"
    )


def test_conversation_ending_in_a_user_turn(tmp_path, tiny_dir, capsys):
    user, answer = {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}
    rows = [{"chosen": [user, answer], "rejected": [user, answer | {"content": "Go."}]}] * 3
    rows.append({"chosen": [user, answer, user], "rejected": [user, answer]})
    data = write_jsonl(tmp_path / "chats.jsonl", rows)
    assert main(train_argv(tiny_dir, data, tmp_path / "run")) == EXIT_DATA
    assert error_line(capsys).startswith(
        f"{data}, line 4: field 'chosen' message 2 is a 'user' turn in the completion"
    )


# ---- non-finite numbers (5) ---------------------------------------------------------------------


def poisoned_copy(tiny_dir: Path, out: Path, token_id: int) -> Path:
    """The tiny model with NaN in the input embedding of ``token_id``: exactly the rows that hold
    that token score NaN (causal attention, rows computed independently)."""
    model = AutoModelForCausalLM.from_pretrained(str(tiny_dir))
    with torch.no_grad():
        model.get_input_embeddings().weight[token_id] = float("nan")
    model.save_pretrained(str(out))
    AutoTokenizer.from_pretrained(str(tiny_dir)).save_pretrained(str(out))
    return out


def rows_with_a_rare_token(tiny_dir: Path, rare_rows: set[int]) -> tuple[list[dict], int]:
    """ROWS with " wonderful" as the chosen answer of ``rare_rows``; the id of a token of it that
    no other row (prompt, chosen, rejected) holds."""
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_dir))
    rows = [dict(row, chosen=" wonderful") if i in rare_rows else row for i, row in enumerate(ROWS)]

    def ids(i):
        row = rows[i]
        texts = (row["prompt"], row["chosen"], row["rejected"])
        return {t for text in texts for t in tokenizer(text, add_special_tokens=False)["input_ids"]}

    others = set().union(*(ids(i) for i in range(len(rows)) if i not in rare_rows))
    rare = sorted(set.intersection(*(ids(i) for i in rare_rows)) - others)
    assert rare, "the premise: ' wonderful' has a token no other row has"
    return rows, rare[0]


def test_nan_reference_weights_are_named_with_the_rows(tmp_path, tiny_dir, capsys):
    rows, token = rows_with_a_rare_token(tiny_dir, {2, 5})
    data = write_jsonl(tmp_path / "prefs.jsonl", rows)
    model = poisoned_copy(tiny_dir, tmp_path / "nan-model", token)
    cache = tmp_path / "ref-cache"
    argv = train_argv(model, data, tmp_path / "run", "packing=none", "shuffle=false")
    assert main([*argv, f"reference_cache_dir={cache}"]) == EXIT_NONFINITE
    assert error_line(capsys) == (
        "reference log-probs are NaN/inf for 2 of 8 rows (rows 2, 5) while pre-computing them; "
        "the reference model's weights hold NaN/inf (model.model.embed_tokens.weight): use a "
        "checkpoint saved before the values diverged. Nothing was cached"
    )
    assert not list(cache.glob("*.safetensors"))


def test_nan_loss_in_training_stops_with_one_line(tmp_path, tiny_dir, capsys):
    rows, token = rows_with_a_rare_token(tiny_dir, {1})
    data = write_jsonl(tmp_path / "prefs.jsonl", rows)
    policy = poisoned_copy(tiny_dir, tmp_path / "nan-policy", token)
    out = tmp_path / "run"
    argv = train_argv(policy, data, out, "packing=none", "shuffle=false", "--reference")
    argv += [str(tiny_dir), f"reference_cache_dir={tmp_path / 'cache'}"]
    assert main(argv) == EXIT_NONFINITE
    assert error_line(capsys) == (
        "loss is NaN/inf at step 1 (epoch 0, batch 1, rows [0, 1, 2, 3]). The weights before "
        f"it are saved in {out / 'checkpoints' / 'step-0'}; set nonfinite=skip to skip such "
        "batches"
    )


# ---- interrupts, bugs, --debug ------------------------------------------------------------------


def test_interrupt_exits_130(monkeypatch, capsys):
    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setitem(cli.COMMANDS, "methods", interrupted)
    assert main(["methods"]) == EXIT_INTERRUPTED
    assert error_line(capsys) == "interrupted"


def test_a_bug_still_raises(monkeypatch):
    def bug(args):
        raise ZeroDivisionError("a bug")

    monkeypatch.setitem(cli.COMMANDS, "methods", bug)
    with pytest.raises(ZeroDivisionError):
        main(["methods"])


def run_cli(*argv: str, **env: str) -> subprocess.CompletedProcess:
    environ = {**os.environ, "PYTHONPATH": SRC, **env}
    environ.pop("DPOKIT_DEBUG", None) if "DPOKIT_DEBUG" not in env else None
    command = [sys.executable, "-m", "dpokit.cli", *argv]
    return subprocess.run(command, capture_output=True, text=True, env=environ, timeout=300)


def test_debug_flag_and_variable_show_the_traceback():
    argv = ("train", "--model", "m", "--data", "d", "learning_rat=1")
    plain = run_cli(*argv)
    assert plain.returncode == EXIT_CONFIG
    assert "Traceback" not in plain.stderr
    assert plain.stderr.strip().splitlines()[-1].startswith("dpokit: error: unknown config key")
    for debug in (
        run_cli(*argv, "--debug"),
        run_cli("--debug", *argv),
        run_cli(*argv, DPOKIT_DEBUG="1"),
    ):
        assert debug.returncode == EXIT_CONFIG  # the same code, with the traceback
        assert "Traceback (most recent call last)" in debug.stderr
        assert "ConfigError: unknown config key 'learning_rat'" in debug.stderr


# ---- settings anywhere, max_length unset: a whole run -------------------------------------------


def test_run_with_settings_before_flags_and_no_max_length(tmp_path, tiny_dir):
    data = write_jsonl(tmp_path / "prefs.jsonl", ROWS)
    out = tmp_path / "run"
    argv = ["train", "max_length=none", "beta=2.5", "--method", "simpo", "--model", str(tiny_dir)]
    argv += ["max_prompt_length=none", "--data", str(data), "--output-dir", str(out)]
    argv += ["max_steps=1", "batch_size=4", "progress=false"]
    assert main(argv) == 0
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert (saved["max_length"], saved["max_prompt_length"]) == (None, None)
    assert (saved["method_args"]["beta"], saved["max_steps"]) == (2.5, 1)
    assert (out / "final" / "model.safetensors").exists()
