"""Text round-trips through every JSONL file dpokit writes and reads back (issue 11, section 4b),
and the run-directory caches (SLiC samples, SPIN generations, stepwise plans) are verified.

The issue's repro: a SPIN iteration whose model generated U+0085 (NEL) crashed with a JSON
traceback, because the generations file kept non-ASCII raw and was read back with
``str.splitlines()``, which also splits on U+0085, U+2028, U+2029 and more.
"""

from __future__ import annotations

import logging
import math

import pytest

from dpokit import jsonl, train
from dpokit.cache import manifest_path, write_verified
from dpokit.data.sft import SFTExample
from dpokit.metrics import MetricsWriter, read_metrics
from dpokit.recipes import spin
from dpokit.recipes.stepwise import _saved_plan
from dpokit.steps.slic import load_samples, save_samples
from helpers import run_config
from test_spin import write_sft

# Every character str.splitlines() splits on, "\r\n", and strings UTF-8 cannot hold.
SEPARATORS = ["\u0085", "\u2028", "\u2029", "\x1c", "\x1d", "\x1e", "\x0b", "\x0c", "\r", "\r\n"]
LONE_SURROGATES = ["\ud800", "\udfff", b"caf\xe9 \xff".decode("utf-8", "surrogateescape")]
ODD = [*SEPARATORS, *LONE_SURROGATES, "\n", "\t", '"\\', "\x00", "é ü 日本 🙂", ""]


@pytest.mark.parametrize("odd", ODD, ids=ascii)
def test_any_string_round_trips(odd):
    records = [{"generated": f"a{odd}b", "list": [odd, {"k": odd}]}, f"{odd}", {odd: 1}]
    data = jsonl.encode(records)
    assert jsonl.parse(data) == records
    text = data.decode("utf-8")  # always valid UTF-8, lone surrogates included
    assert len(text.splitlines()) == len(records)  # even a reader using splitlines() is safe
    assert text.count("\n") == len(records)


def test_non_ascii_is_written_as_text_and_separators_as_escapes():
    line = jsonl.dumps_line({"a": "é\u2028\u0085\ud800"})
    assert line == '{"a": "é\\u2028\\u0085\\ud800"}\n'


def test_undecodable_bytes_and_broken_lines_name_the_file_and_line():
    with pytest.raises(jsonl.JsonlError, match=r"^gen\.jsonl, line 2: not UTF-8 \(byte 0xff"):
        jsonl.parse(b'{"a": 1}\n"\xff"\n', "gen.jsonl")
    with pytest.raises(jsonl.JsonlError, match=r"^gen\.jsonl, line 3: invalid JSON"):
        jsonl.parse(b'1\n\n{"a": \n', "gen.jsonl")
    # The half record a killed append-only writer leaves (even mid-character) is dropped.
    assert jsonl.parse(b'1\n{"a": "\xc3', "m.jsonl", partial_tail=True) == [1]


def test_metrics_log_round_trips_and_skips_a_half_line(tmp_path):
    writer = MetricsWriter(tmp_path)
    records = [{"step": 1, "loss": 0.5, "stage": "iter\u20280"}, {"step": 2, "loss": math.inf}]
    for record in records:
        writer.write(record)
    with writer.path.open("ab") as handle:
        handle.write(b'{"step": 3, "lo')
    assert read_metrics(tmp_path) == records
    writer.truncate_after(1)
    assert read_metrics(tmp_path) == records[:1]


def test_spin_generations_with_every_separator_become_pairs():
    examples = [
        SFTExample(kind="text", prompt=f"Q{i}?", completion=f" A{i}.") for i in range(len(ODD))
    ]
    answers = [f" x{odd}y" for odd in ODD]
    text = spin.generations_jsonl(examples, answers, [True] * len(ODD))
    records = jsonl.parse(text.encode())
    assert [r["generated"] for r in records] == answers
    assert [r["real"] for r in records] == [e.completion for e in examples]


# ---- the repro: a SPIN iteration whose model writes U+0085 -----------------------------


def test_spin_iteration_whose_model_writes_nel_trains(tiny_dir, tmp_path, monkeypatch):
    data = write_sft(tmp_path / "sft.jsonl")
    rows = jsonl.read(data)
    answers = [f" no{odd}pe" for odd in (SEPARATORS * 2)[: len(rows)]]
    assert "\u0085" in answers[0]

    def generate(config, model, tokenizer, prompts, seed):
        assert len(prompts.examples) == len(answers)
        return answers, [True] * len(answers)

    monkeypatch.setattr(spin, "generate_answers", generate)
    config = run_config(tiny_dir, data, tmp_path / "run", method="spin", iterations=1)
    result = train(config)
    assert result.global_step == 2
    first = [r for r in result.history if r["split"] == "train"][0]
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-5)  # policy == reference
    iteration = tmp_path / "run" / "iter-0"
    generations = jsonl.read(iteration / "generations.jsonl")
    assert [g["generated"] for g in generations] == answers
    pairs = jsonl.read(iteration / "pairs.jsonl")
    assert [p["rejected"] for p in pairs] == answers
    assert [p["chosen"] for p in pairs] == [r["completion"] for r in rows]
    assert manifest_path(iteration / "generations.jsonl").exists()


# ---- run-directory caches: verified, removed and recomputed ------------------------------------


def warnings_of(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "dpokit.cache"]


def test_damaged_slic_samples_are_a_reported_miss(tmp_path, caplog):
    path = tmp_path / "reference_samples" / "train.jsonl"
    save_samples(path, "key", [[1, 2], [3]])
    assert load_samples(path, "key", 2) == [[1, 2], [3]]
    path.write_bytes(path.read_bytes().replace(b"[1, 2]", b"[1, 3]"))
    with caplog.at_level(logging.WARNING, logger="dpokit.cache"):
        assert load_samples(path, "key", 2) is None
    (message,) = warnings_of(caplog)
    assert message.startswith(f"SLiC reference samples: {path} is corrupt")
    assert not path.exists() and not manifest_path(path).exists()


def test_damaged_spin_generations_are_refused_with_one_line(tmp_path, caplog):
    path = tmp_path / "generations.jsonl"
    examples = [SFTExample(kind="text", prompt="Q?", completion=" A.")]
    write_verified(path, spin.generations_jsonl(examples, [" B\u0085."], [True]).encode())
    assert spin.pair_rows(path) == [{"prompt": "Q?", "chosen": " A.", "rejected": " B\u0085."}]
    path.write_bytes(path.read_bytes()[:-5])
    damaged = pytest.raises(RuntimeError, match="missing or damaged; start the run again")
    with caplog.at_level(logging.WARNING, logger="dpokit.cache"), damaged:
        spin.pair_rows(path)
    (message,) = warnings_of(caplog)
    assert f"SPIN generations: {path} is truncated" in message


def test_a_stepwise_plan_without_checksum_is_made_again(tmp_path, caplog):
    path = tmp_path / "chunks.json"
    path.write_text('{"rows": [[0]], "labels": [1]}')  # an older dpokit's plan, or a torn one
    with caplog.at_level(logging.WARNING, logger="dpokit.cache"):
        assert _saved_plan(path, config=None, source=None) is None
    (message,) = warnings_of(caplog)
    assert f"stepwise chunk plan: {path} has no checksum file chunks.json.sha256.json" in message
    assert not path.exists()
