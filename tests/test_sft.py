"""SFT data (formats, tokens, errors, collation) and SFT training through the engine."""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from dpokit.cli import main
from dpokit.config import TrainConfig
from dpokit.data import DataConfig, DataError
from dpokit.data.sft import SFTCollator, prepare_sft
from dpokit.evaluation import completion_logps
from dpokit.logprobs import CompletionScorer, full_logits_logps
from dpokit.recipes.sft import run_sft
from dpokit.steps import StepContext
from dpokit.steps.sft import SFT_SPEC, SFT_STEP, sft_batch_loss

ROWS = [
    {"prompt": "Do you like apples?", "completion": " yes, I like apples."},
    {"prompt": "Do you like the dog?", "completion": " yes, I like the dog."},
    {"prompt": "Hello there!", "completion": " How are you doing today?"},
    {"prompt": "What is the capital of France?", "completion": " Paris is the capital."},
] * 4


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


# ---- data ---------------------------------------------------------------------------------------


def test_text_rows_tokenize_prompt_and_completion_separately(tiny_tokenizer, tmp_path):
    prepared = prepare_sft(write_jsonl(tmp_path / "sft.jsonl", ROWS[:2]), tiny_tokenizer)
    eos = tiny_tokenizer.eos_token_id
    row = prepared.dataset[0]
    assert row["prompt_input_ids"] == ids(tiny_tokenizer, "Do you like apples?")
    assert row["completion_input_ids"] == ids(tiny_tokenizer, " yes, I like apples.") + [eos]
    assert prepared.dataset["index"] == [0, 1]
    assert prepared.summary.format_name == "sft_prompt_completion"
    assert (prepared.summary.rows_read, prepared.summary.rows_kept) == (2, 2)


def test_messages_rows_train_the_last_assistant_turn(tiny_tokenizer):
    conversation = [
        {"role": "user", "content": "Hello there!"},
        {"role": "assistant", "content": "Hi."},
        {"role": "user", "content": "Do you like apples?"},
        {"role": "assistant", "content": "yes"},
    ]
    prepared = prepare_sft([{"messages": conversation}], tiny_tokenizer)
    row = prepared.dataset[0]
    prompt = tiny_tokenizer.apply_chat_template(
        conversation[:3], tokenize=False, add_generation_prompt=True
    )
    assert tiny_tokenizer.decode(row["prompt_input_ids"]) == prompt
    # The Zephyr-like template closes the turn with EOS + newline; the newline is cut.
    assert tiny_tokenizer.decode(row["completion_input_ids"]) == "yes</s>"
    assert prepared.summary.format_name == "sft_messages"


def test_chat_prompt_completion_rows_match_the_messages_layout(tiny_tokenizer):
    user = {"role": "user", "content": "Hello there!"}
    answer = {"role": "assistant", "content": "Hi."}
    as_pair = prepare_sft([{"prompt": [user], "completion": [answer]}], tiny_tokenizer)
    as_string_prompt = prepare_sft(
        [{"prompt": "Hello there!", "completion": [answer]}], tiny_tokenizer
    )
    as_messages = prepare_sft([{"messages": [user, answer]}], tiny_tokenizer)
    expected = as_messages.dataset[0]
    for prepared in (as_pair, as_string_prompt):
        assert prepared.dataset[0] == expected


def test_bos_tokenizer_gets_exactly_one_bos(tiny_bos_dir):
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_bos_dir))
    row = prepare_sft(ROWS[:1], tokenizer).dataset[0]
    assert row["prompt_input_ids"] == [tokenizer.bos_token_id] + ids(tokenizer, ROWS[0]["prompt"])
    assert tokenizer.bos_token_id not in row["completion_input_ids"]


def test_truncation_is_counted_and_keeps_the_completion_start(tiny_tokenizer):
    long = {"prompt": "Hello there!", "completion": " good bad great terrible" * 10}
    config = DataConfig(max_length=12, max_prompt_length=4)
    short = {"prompt": "Hi", "completion": " yes"}
    prepared = prepare_sft([long, short], tiny_tokenizer, config)
    row = prepared.dataset[0]
    assert len(row["prompt_input_ids"]) + len(row["completion_input_ids"]) == 12
    full = ids(tiny_tokenizer, long["completion"])
    assert row["completion_input_ids"] == full[: len(row["completion_input_ids"])]
    assert prepared.summary.truncated_completions == 1
    assert prepared.summary.truncated_prompts == 0  # "Hello there!" is 4 tokens at most
    with pytest.raises(DataError, match="row 0.*max_length=12"):
        prepare_sft(
            [long],
            tiny_tokenizer,
            DataConfig(max_length=12, max_prompt_length=4, truncation="error"),
        )


@pytest.mark.parametrize(
    "bad_row, message",
    [
        ({"prompt": "Hi", "completion": "   "}, "empty completion in field 'completion'"),
        ({"prompt": "Hi", "completion": 3}, "field 'completion' must be a string"),
    ],
)
def test_bad_rows_name_file_and_line(tiny_tokenizer, tmp_path, bad_row, message):
    path = write_jsonl(tmp_path / "bad.jsonl", [ROWS[0], ROWS[1], bad_row])
    with pytest.raises(DataError) as info:
        prepare_sft(path, tiny_tokenizer)
    assert str(info.value).startswith(f"{path}, line 3: ")
    assert message in str(info.value)


def test_conversation_without_assistant_turn_is_refused(tiny_tokenizer):
    rows = [
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "A"}]}
    ]
    rows.append({"messages": [{"role": "user", "content": "Hi"}]})
    with pytest.raises(DataError, match="row 1: field 'messages' has no assistant turn"):
        prepare_sft(rows, tiny_tokenizer)


def test_unknown_columns_list_the_sft_formats(tiny_tokenizer):
    with pytest.raises(DataError, match="sft_prompt_completion: prompt/completion strings"):
        prepare_sft([{"question": "a", "answer": "b"}], tiny_tokenizer)


def test_prepared_rows_are_cached_for_files(tiny_tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "sft.jsonl", ROWS)
    first = prepare_sft(path, tiny_tokenizer)
    second = prepare_sft(path, tiny_tokenizer)
    assert not first.from_cache and second.from_cache
    assert second.fingerprint == first.fingerprint
    assert second.dataset[:] == first.dataset[:]


def test_collator_pads_right_and_marks_completion_tokens():
    rows = [
        {"prompt_input_ids": [5, 6], "completion_input_ids": [7, 2], "index": 3},
        {"prompt_input_ids": [8], "completion_input_ids": [9, 10, 2], "index": 0},
    ]
    batch = SFTCollator(pad_token_id=0)(rows)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 2], [8, 9, 10, 2]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 1, 1]]
    assert batch["completion_mask"].tolist() == [
        [False, False, True, True],
        [False, True, True, True],
    ]
    assert batch["index"].tolist() == [3, 0]
    rows[0]["completion_input_ids"] = [2]
    batch = SFTCollator(pad_token_id=0, pad_to_multiple_of=8)(rows)
    assert batch["input_ids"].shape == (2, 8)
    assert batch["input_ids"][0].tolist() == [5, 6, 2, 0, 0, 0, 0, 0]
    assert batch["attention_mask"][0].tolist() == [1, 1, 1, 0, 0, 0, 0, 0]


# ---- the step and training ----------------------------------------------------------------------


def test_sft_step_is_the_token_mean_nll(tiny_model, tiny_tokenizer):
    prepared = prepare_sft(ROWS[:3], tiny_tokenizer)
    batch = SFTCollator(tiny_tokenizer.pad_token_id)([prepared.dataset[i] for i in range(3)])
    context = StepContext(
        spec=SFT_SPEC, hyperparameters={}, policy=CompletionScorer(tiny_model), reference=None
    )
    out = sft_batch_loss(context, batch)
    with torch.no_grad():
        naive = full_logits_logps(
            tiny_model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"]
        )
    counts = batch["completion_mask"].sum(1)
    assert float(out.loss.detach()) == pytest.approx(float(-naive.sum() / counts.sum()), rel=1e-5)
    assert out.losses.tolist() == pytest.approx((-naive / counts).tolist(), rel=1e-5)
    out.loss.backward()
    assert tiny_model.lm_head.weight.grad is not None


def test_sft_lowers_the_nll_of_its_data(tiny_dir, tiny_tokenizer, tmp_path):
    data = write_jsonl(tmp_path / "sft.jsonl", ROWS)
    config = TrainConfig.from_dict(
        dict(
            model=str(tiny_dir),
            data=data,
            output_dir=str(tmp_path / "run"),
            learning_rate=5e-3,
            lr_scheduler="constant",
            warmup_ratio=0.0,
            max_steps=12,
            batch_size=4,
            max_length=64,
            max_prompt_length=32,
            progress=False,
        )
    )
    result = run_sft(config)
    assert result.global_step == 12
    prepared = prepare_sft(data, tiny_tokenizer)
    prompts, completions = (
        prepared.dataset["prompt_input_ids"],
        prepared.dataset["completion_input_ids"],
    )
    tokens = sum(len(c) for c in completions)
    pad = tiny_tokenizer.pad_token_id
    before = (
        -completion_logps(
            AutoModelForCausalLM.from_pretrained(str(tiny_dir)), prompts, completions, pad
        ).sum()
        / tokens
    )
    after_model = AutoModelForCausalLM.from_pretrained(str(result.final_dir))
    after = -completion_logps(after_model, prompts, completions, pad).sum() / tokens
    assert float(before) == pytest.approx(
        result.history[0]["loss"], rel=0.05
    )  # step 1 is on the start
    assert float(after) < float(before) - 1.0
    assert math.isfinite(float(after))
    assert all(record["split"] == "train" for record in result.history)


def test_sft_procedure_is_not_a_preference_method():
    from dpokit.losses import METHODS
    from dpokit.steps import STEPS

    assert SFT_SPEC.name not in METHODS and SFT_SPEC.reference == "none"
    # SFT is a step the SFT spec names; no method of the table does (SPIN's rows are SFT data,
    # but its rounds train pairs).
    assert SFT_STEP.prepare is prepare_sft and STEPS[SFT_SPEC.step] is SFT_STEP
    assert all(spec.step != SFT_SPEC.step for spec in METHODS.values())
    assert METHODS["spin"].step == "pairwise"


def test_cli_sft_trains_and_refuses_method_hyperparameters(tiny_dir, tmp_path, capsys):
    data = write_jsonl(tmp_path / "sft.jsonl", ROWS[:4])
    out = tmp_path / "cli-run"
    argv = ["sft", "--model", str(tiny_dir), "--data", data, "--output-dir", str(out)]
    assert main(argv + ["max_steps=2", "batch_size=2", "progress=false"]) == 0
    assert (out / "final" / "config.json").exists()
    assert "trained 2 steps" in capsys.readouterr().out
    assert main(argv + ["beta=0.2"]) == 2
    assert "takes no method hyperparameters" in capsys.readouterr().err
    torch.manual_seed(0)
