"""The built-in task: prompts and data from a seed, the judge on known strings, data builders."""

from __future__ import annotations

import pytest

from dpokit.demo.builders import (
    Group,
    noisy_rows,
    pair_rows,
    session_rows,
    unpaired_rows,
)
from dpokit.demo.task import MAX_WORDS, MIN_WORDS, ReviewTask, judge


@pytest.mark.parametrize(
    "text, expected",
    [
        (" great good lovely it.", 0.75),  # (3 - 0) / 4, well formed
        (" GREAT good fine.", 2 / 3),  # case does not matter; "fine" is no sentiment word
        (" bad it is", -1 / 3 - 0.5),  # no final "."
        (" great great.", 1.0 - 0.5),  # 2 words < MIN_WORDS
        (" great" * 11 + ".", 1.0 - 0.5),  # 11 words > MAX_WORDS
        (" bad awful", -1.0),  # -1 - 0.5 - 0.5, clipped
        (" great good awful it is.", 0.2),  # (2 - 1) / 5
        ("", -1.0),
        ("...", -1.0),  # no words at all
    ],
)
def test_judge_scores_known_strings(text, expected):
    assert judge(text) == pytest.approx(expected, abs=1e-12)
    assert judge(text, prompt="Review of the red lamp:") == judge(text)  # prompt-independent


def test_word_bounds_are_inclusive():
    assert judge(" great" * MIN_WORDS + ".") == 1.0
    assert judge(" great" * MAX_WORDS + ".") == 1.0


def test_task_is_deterministic_for_a_seed_and_holds_out_prompts():
    task, same, other = ReviewTask(seed=0), ReviewTask(seed=0), ReviewTask(seed=1)
    assert task.sft_rows(50) == same.sft_rows(50)
    assert task.sft_rows(50) != other.sft_rows(50)
    assert task.eval_prompts != other.eval_prompts
    assert not set(task.train_prompts) & set(task.eval_prompts)
    assert len(task.train_prompts) + len(task.eval_prompts) == 240
    assert len(task.eval_prompts) == 60
    assert {row["prompt"] for row in task.sft_rows(500)} <= set(task.train_prompts)


def test_sft_data_have_a_spread_of_rewards_and_experts_are_good():
    task = ReviewTask(seed=0)
    rewards = [judge(row["completion"]) for row in task.sft_rows(2000)]
    mean = sum(rewards) / len(rewards)
    assert -0.2 < mean < 0.2  # a mixed distribution, centred
    assert min(rewards) == -1.0 and max(rewards) == 1.0
    assert sum(r > 0.5 for r in rewards) > 100 and sum(r < -0.5 for r in rewards) > 100
    experts = [judge(row["completion"]) for row in task.expert_rows(200)]
    assert min(experts) >= 0.0 and sum(experts) / len(experts) > 0.6


GROUPS = [
    Group("p0", [" a.", " b.", " c."], [0.1, 0.9, -0.5]),
    Group("p1", [" d.", " e.", " f."], [0.2, 0.2, 0.2]),  # all tied: no preference
    Group("p2", [" g.", "", " h."], [0.0, -1.0, 0.3]),  # the empty answer cannot be used
    Group("p3", [" i.", " j.", " k."], [-0.2, 0.0, 0.2]),
]


def test_pairs_are_best_vs_worst_with_scores_and_easy_first_steps():
    rows = pair_rows(GROUPS, chunks=2)
    assert [(r["prompt"], r["chosen"], r["rejected"]) for r in rows] == [
        ("p0", " b.", " c."),
        ("p2", " h.", " g."),
        ("p3", " k.", " i."),
    ]
    assert (rows[0]["score_chosen"], rows[0]["score_rejected"]) == (0.9, -0.5)
    # gaps 1.4, 0.3, 0.4: ranks 0, 2, 1 -> steps 0, 1, 0 (rank * 2 // 3)
    assert [r["chunk"] for r in rows] == [0, 1, 0]


def test_unpaired_rows_label_best_and_worst():
    rows = unpaired_rows(GROUPS)
    assert [(r["completion"], r["label"]) for r in rows] == [
        (" b.", True),
        (" c.", False),
        (" h.", True),
        (" g.", False),
        (" k.", True),
        (" i.", False),
    ]


def test_noisy_rows_flip_exactly_the_requested_fraction():
    pairs = [
        {"prompt": f"p{i}", "chosen": "w", "rejected": "l", "score_chosen": 1, "score_rejected": 0}
        for i in range(10)
    ]
    rows = noisy_rows(pairs, 0.3, seed=0)
    flipped = [r for r in rows if r["flipped"]]
    assert len(flipped) == 3
    assert all(r["chosen"] == "l" and r["score_chosen"] == 0 for r in flipped)
    assert all(r["chosen"] == "w" for r in rows if not r["flipped"])
    assert noisy_rows(pairs, 0.3, seed=0) == rows
    assert pairs[0]["chosen"] == "w"  # the input is not modified


def test_sessions_share_the_first_exchange_and_end_together():
    groups = [Group(f"p{i}", [" x.", " y."], [0.0, 0.5 + i]) for i in range(6)]
    rows = session_rows(groups, seed=0)
    assert len(rows) == 2
    chosen, rejected = rows[0]["chosen"], rows[0]["rejected"]
    assert len(chosen) == len(rejected) == 6
    assert chosen[:3] == rejected[:3]  # user, assistant, user: the shared prefix
    assert chosen[3] != rejected[3]  # the first differing agent turn starts the segment
    assert [m["role"] for m in chosen] == ["user", "assistant"] * 3
    assert (chosen[3]["content"], rejected[3]["content"]) == (" y.", " x.")
