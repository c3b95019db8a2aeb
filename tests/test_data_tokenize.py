"""Exact token ids from prepare_pairs: string pairs, chat pairs, implicit prompts, truncation."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from dpokit.data import DataConfig, DataError, prepare_pairs
from dpokit.tiny import CHAT_TEMPLATE


@pytest.fixture()
def bos_tokenizer(tiny_bos_dir):
    return AutoTokenizer.from_pretrained(str(tiny_bos_dir))


def ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def only_row(prepared) -> dict:
    assert len(prepared.dataset) == 1
    return prepared.dataset[0]


PAIR = {"prompt": "Hello there! How are you", "chosen": " I am fine.", "rejected": " I am bad."}


def test_string_pair_is_prompt_then_completion_with_one_eos(tiny_tokenizer):
    row = only_row(prepare_pairs([PAIR], tiny_tokenizer))
    eos = tiny_tokenizer.eos_token_id
    assert row["prompt_input_ids"] == ids(tiny_tokenizer, PAIR["prompt"])
    assert row["chosen_input_ids"] == ids(tiny_tokenizer, PAIR["chosen"]) + [eos]
    assert row["rejected_input_ids"] == ids(tiny_tokenizer, PAIR["rejected"]) + [eos]
    assert row["index"] == 0
    assert tiny_tokenizer.bos_token_id not in row["prompt_input_ids"]


def test_bos_tokenizer_gets_bos_once_on_the_prompt_only(bos_tokenizer):
    bos, eos = bos_tokenizer.bos_token_id, bos_tokenizer.eos_token_id
    row = only_row(prepare_pairs([PAIR], bos_tokenizer))
    # What the tokenizer itself produces with special tokens: exactly one BOS in front.
    assert row["prompt_input_ids"] == bos_tokenizer(PAIR["prompt"])["input_ids"]
    assert row["prompt_input_ids"] == [bos] + ids(bos_tokenizer, PAIR["prompt"])
    assert row["chosen_input_ids"] == ids(bos_tokenizer, PAIR["chosen"]) + [eos]
    assert bos not in row["chosen_input_ids"] + row["rejected_input_ids"]


def test_prompt_text_that_already_has_bos_is_not_given_a_second(bos_tokenizer):
    bos = bos_tokenizer.bos_token_id
    pair = dict(PAIR, prompt="<s>" + PAIR["prompt"])
    row = only_row(prepare_pairs([pair], bos_tokenizer))
    assert row["prompt_input_ids"] == [bos] + ids(bos_tokenizer, PAIR["prompt"])


def test_completion_that_ends_with_eos_text_gets_no_second_eos(tiny_tokenizer):
    eos = tiny_tokenizer.eos_token_id
    pair = dict(PAIR, chosen=PAIR["chosen"] + "</s>", rejected=PAIR["rejected"] + "</s></s>")
    row = only_row(prepare_pairs([pair], tiny_tokenizer))
    assert row["chosen_input_ids"] == ids(tiny_tokenizer, PAIR["chosen"]) + [eos]
    assert row["rejected_input_ids"] == ids(tiny_tokenizer, PAIR["rejected"]) + [eos]


PROMPT_MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]
CHOSEN_TURN = [{"role": "assistant", "content": "Paris is the capital of France."}]
REJECTED_TURN = [{"role": "assistant", "content": "I like apples."}]


def chat_ids(tokenizer, messages, **kwargs) -> list[int]:
    return tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, **kwargs)[
        "input_ids"
    ]


def assert_chat_row(tokenizer, row, bos: list[int]):
    """Prompt = rendered prompt with the generation prompt; prompt + completion = the rendered
    conversation without the template's newline after the closing EOS."""
    eos = tokenizer.eos_token_id
    newline = ids(tokenizer, "\n")
    prompt = chat_ids(tokenizer, PROMPT_MESSAGES, add_generation_prompt=True)
    assert row["prompt_input_ids"] == bos + prompt
    for key, turn in (("chosen_input_ids", CHOSEN_TURN), ("rejected_input_ids", REJECTED_TURN)):
        full = chat_ids(tokenizer, PROMPT_MESSAGES + turn)
        assert full[-2:] == [eos, *newline]
        assert row["prompt_input_ids"] + row[key] == bos + full[:-1]
        assert row[key].count(eos) == 1 and row[key][-1] == eos
        assert row[key] == ids(tokenizer, turn[0]["content"]) + [eos]


@pytest.mark.parametrize(
    "layout",
    ["completion_only", "full_conversations", "string_prompt_ultrafeedback", "no_prompt_field"],
)
def test_conversational_pair_through_the_chat_template(tiny_tokenizer, layout):
    full_chosen, full_rejected = PROMPT_MESSAGES + CHOSEN_TURN, PROMPT_MESSAGES + REJECTED_TURN
    row = {
        "completion_only": {
            "prompt": PROMPT_MESSAGES,
            "chosen": CHOSEN_TURN,
            "rejected": REJECTED_TURN,
        },
        "full_conversations": {
            "prompt": PROMPT_MESSAGES,
            "chosen": full_chosen,
            "rejected": full_rejected,
        },
        "string_prompt_ultrafeedback": {
            "prompt": PROMPT_MESSAGES[0]["content"],
            "chosen": full_chosen,
            "rejected": full_rejected,
        },
        "no_prompt_field": {"chosen": full_chosen, "rejected": full_rejected},
    }[layout]
    prepared = prepare_pairs([row], tiny_tokenizer)
    assert prepared.summary.format_name == "conversational"
    assert_chat_row(tiny_tokenizer, only_row(prepared), bos=[])


def test_string_prompt_with_completion_only_turns_becomes_a_user_turn(tiny_tokenizer):
    row = {
        "prompt": PROMPT_MESSAGES[0]["content"],
        "chosen": CHOSEN_TURN,
        "rejected": REJECTED_TURN,
    }
    assert_chat_row(tiny_tokenizer, only_row(prepare_pairs([row], tiny_tokenizer)), bos=[])


def test_chat_with_bos_tokenizer_adds_bos_unless_the_template_renders_it(bos_tokenizer):
    bos = bos_tokenizer.bos_token_id
    row = {"prompt": PROMPT_MESSAGES, "chosen": CHOSEN_TURN, "rejected": REJECTED_TURN}
    # The tiny template has no BOS text: the prompt gets the tokenizer's BOS once.
    assert_chat_row(bos_tokenizer, only_row(prepare_pairs([row], bos_tokenizer)), bos=[bos])
    # A Llama-style template renders BOS itself: still exactly one.
    config = DataConfig(chat_template="{{ bos_token }}" + CHAT_TEMPLATE)
    prepared = only_row(prepare_pairs([row], bos_tokenizer, config))
    assert prepared["prompt_input_ids"][:2] == [bos, ids(bos_tokenizer, "<|")[0]]
    assert prepared["prompt_input_ids"].count(bos) == 1


def test_multi_turn_shared_history_is_prompt(tiny_tokenizer):
    history = [
        {"role": "user", "content": "Hello there!"},
        {"role": "assistant", "content": "How are you doing today?"},
        {"role": "user", "content": "I am fine."},
    ]
    row = {"chosen": history + CHOSEN_TURN, "rejected": history + REJECTED_TURN}
    out = only_row(prepare_pairs([row], tiny_tokenizer))
    assert out["prompt_input_ids"] == chat_ids(tiny_tokenizer, history, add_generation_prompt=True)


HH_PROMPT = "\n\nHuman: What is the capital of France?\n\nAssistant:"


def test_hh_implicit_prompt_is_shared_text_through_last_assistant_marker(tiny_tokenizer):
    eos = tiny_tokenizer.eos_token_id
    history = "\n\nHuman: Hello there!\n\nAssistant: How are you doing today?"
    row = {
        "chosen": history + HH_PROMPT + " Paris is the capital of France.",
        "rejected": history + HH_PROMPT + " I like apples.",
    }
    prepared = prepare_pairs([row], tiny_tokenizer)
    out = only_row(prepared)
    assert prepared.summary.format_name == "implicit_prompt"
    assert out["prompt_input_ids"] == ids(tiny_tokenizer, history + HH_PROMPT)
    assert out["chosen_input_ids"] == ids(tiny_tokenizer, " Paris is the capital of France.") + [
        eos
    ]
    assert out["rejected_input_ids"] == ids(tiny_tokenizer, " I like apples.") + [eos]


def test_hh_rows_without_a_shared_marker_name_the_row(tiny_tokenizer):
    rows = [
        {"chosen": HH_PROMPT + " yes", "rejected": HH_PROMPT + " no"},
        {"chosen": "The quick brown fox", "rejected": "The lazy dog"},
    ]
    with pytest.raises(DataError, match=r"row 1: .*share no prefix ending in") as info:
        prepare_pairs(rows, tiny_tokenizer)
    assert info.value.row == 1


LONG = {
    "prompt": "The quick brown fox jumps over the lazy dog. I like apples and bananas.",
    "chosen": " Hello there! How are you doing today? I am fine, thank you.",
    "rejected": " no",
}


@pytest.mark.parametrize("use_bos", [False, True])
def test_truncation_keeps_prompt_end_and_completion_start(tiny_tokenizer, bos_tokenizer, use_bos):
    tokenizer = bos_tokenizer if use_bos else tiny_tokenizer
    bos = [tokenizer.bos_token_id] if use_bos else []
    eos = tokenizer.eos_token_id
    config = DataConfig(max_length=12, max_prompt_length=5)
    prepared = prepare_pairs([LONG, dict(LONG, prompt="Hi")], tokenizer, config)
    first, second = prepared.dataset[0], prepared.dataset[1]
    full_prompt = ids(tokenizer, LONG["prompt"])
    assert len(full_prompt) > 5
    assert first["prompt_input_ids"] == bos + full_prompt[-(5 - len(bos)) :]
    chosen = ids(tokenizer, LONG["chosen"]) + [eos]
    assert first["chosen_input_ids"] == chosen[: 12 - 5]
    assert first["rejected_input_ids"] == ids(tokenizer, LONG["rejected"]) + [eos]
    short_prompt = bos + ids(tokenizer, "Hi")
    assert second["prompt_input_ids"] == short_prompt
    assert second["chosen_input_ids"] == chosen[: 12 - len(short_prompt)]
    summary = prepared.summary
    assert (summary.truncated_prompts, summary.truncated_completions) == (1, 2)
    assert (summary.rows_read, summary.rows_kept) == (2, 2)
    assert "truncated prompts 1, truncated completions 2" in summary.format()


def test_truncation_error_mode_names_the_row(tiny_tokenizer):
    short = {"prompt": "Hi", "chosen": " yes", "rejected": " no"}
    config = DataConfig(max_length=12, max_prompt_length=5, truncation="error")
    assert len(prepare_pairs([short], tiny_tokenizer, config)) == 1
    with pytest.raises(DataError, match=r"row 1: the prompt has \d+ tokens.*max_prompt_length=5"):
        prepare_pairs([short, LONG], tiny_tokenizer, config)
    config = DataConfig(max_length=12, max_prompt_length=None, truncation="error")
    long_completion = dict(short, chosen=LONG["chosen"])
    with pytest.raises(DataError, match=r"row 0: prompt \+ chosen completion .*max_length=12"):
        prepare_pairs([long_completion], tiny_tokenizer, config)


def test_config_rejects_inconsistent_lengths():
    with pytest.raises(ValueError, match="max_prompt_length"):
        DataConfig(max_length=10, max_prompt_length=10)
    with pytest.raises(ValueError, match="truncation"):
        DataConfig(truncation="cut")


def test_template_without_eos_gets_one_appended(tiny_tokenizer):
    eos = tiny_tokenizer.eos_token_id
    template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    row = {"prompt": PROMPT_MESSAGES, "chosen": CHOSEN_TURN, "rejected": REJECTED_TURN}
    out = only_row(prepare_pairs([row], tiny_tokenizer, DataConfig(chat_template=template)))
    expected = ids(tiny_tokenizer, f"assistant: {CHOSEN_TURN[0]['content']}\n") + [eos]
    assert out["chosen_input_ids"] == expected


def test_template_whose_prompt_is_not_a_prefix_is_an_error(tiny_tokenizer):
    template = (
        "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
        "{% if add_generation_prompt %}<assistant>\n{% endif %}"
    )
    row = {"prompt": PROMPT_MESSAGES, "chosen": CHOSEN_TURN, "rejected": REJECTED_TURN}
    with pytest.raises(DataError, match="row 0: the chat template does not render the prompt"):
        prepare_pairs([row], tiny_tokenizer, DataConfig(chat_template=template))
