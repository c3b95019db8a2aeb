"""Segment-level DPO: turn-by-turn segment masks through a real chat template, and training."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch
from transformers import AutoModelForCausalLM

from dpokit import train
from dpokit.cli import main
from dpokit.config import TrainConfig
from dpokit.data import DataConfig, DataError
from dpokit.data.multiturn import SegmentCollator, SessionEncoder, prepare_segments, segment_of
from dpokit.engine import Trainer
from dpokit.logprobs import CompletionScorer, full_logits_logps
from dpokit.losses import get_method
from dpokit.metrics import read_metrics
from dpokit.reference import FrozenReference
from dpokit.steps import StepContext, pairwise_batch_loss
from dpokit.tiny import build_tiny_model
from helpers import make_config

SETTINGS = DataConfig(max_length=256, max_prompt_length=200)


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


HISTORY = [user("Hi"), assistant("Hello there"), user("Do you like apples?")]
CHOSEN = HISTORY + [assistant("yes I do"), user("Why?"), assistant("good")]
REJECTED = HISTORY + [assistant("no"), user("Why?"), assistant("bad")]


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def write_sessions(path, rows: int = 32, seed: int = 0) -> str:
    """An easy set: in the segment the chosen agent says 'yes ...', the rejected one 'no ...'."""
    rng = random.Random(seed)
    topics = ["apples", "bananas", "cherries", "the fox", "the dog", "today", "France", "Paris"]
    out = []
    for _ in range(rows):
        topic = rng.choice(topics)
        history = [user(f"Do you like {topic}?"), assistant("Let me think."), user("Well?")]
        out.append(
            {
                "chosen": history
                + [assistant(f"yes, I like {topic}."), user("OK"), assistant("yes")],
                "rejected": history
                + [assistant(f"no, I do not like {topic}!"), user("OK"), assistant("no")],
            }
        )
    return write_jsonl(path, out)


def segment_config(tiny_dir, data, tmp_path, **overrides) -> TrainConfig:
    overrides = {"method": "segment_dpo", "max_length": 160, "max_prompt_length": 100, **overrides}
    return make_config(tiny_dir, data, tmp_path, **overrides)


# ---- masks --------------------------------------------------------------------------------------


def test_exact_label_mask_of_a_three_turn_segment(tiny_tokenizer, tmp_path):
    """Segment = turns 3..5 (assistant, user, assistant): only the two assistant contents and
    their EOS are labelled. Expected pieces written out from the Zephyr-like template by hand."""

    def ids(text):
        return tiny_tokenizer(text, add_special_tokens=False)["input_ids"]

    history = [
        "<|user|>\nHi</s>\n",
        "<|assistant|>\n",
        "Hello there</s>",
        "\n",
        "<|user|>\nDo you like apples?</s>\n",
        "<|assistant|>\n",
    ]
    chosen = [("yes I do</s>", True), ("\n", False), ("<|user|>\nWhy?</s>\n", False)]
    chosen += [("<|assistant|>\n", False), ("good</s>", True)]
    expected_prompt = [token for piece in history for token in ids(piece)]
    expected_ids = [token for piece, _ in chosen for token in ids(piece)]
    expected_mask = [label for piece, label in chosen for _ in ids(piece)]

    encoded = SessionEncoder(tiny_tokenizer, SETTINGS).encode(segment_of(CHOSEN, REJECTED))
    assert encoded.prompt_input_ids == expected_prompt
    assert encoded.chosen_input_ids == expected_ids
    assert encoded.chosen_completion_mask == expected_mask
    labelled = [t for t, m in zip(encoded.chosen_input_ids, expected_mask, strict=True) if m]
    assert tiny_tokenizer.decode(labelled) == "yes I do</s>good</s>"
    rejected = encoded.rejected_input_ids
    labelled = [t for t, m in zip(rejected, encoded.rejected_completion_mask, strict=True) if m]
    assert tiny_tokenizer.decode(labelled) == "no</s>bad</s>"

    # The file pipeline and the collator give the same tokens, the mask at the right positions.
    data = write_jsonl(tmp_path / "one.jsonl", [{"chosen": CHOSEN, "rejected": REJECTED}])
    row = prepare_segments(data, tiny_tokenizer, SETTINGS).dataset[0]
    assert row["chosen_input_ids"] == expected_ids
    assert row["chosen_completion_mask"] == expected_mask
    batch = SegmentCollator(tiny_tokenizer.pad_token_id)([row])
    n = len(expected_prompt) + len(expected_ids)
    assert batch["input_ids"][0, :n].tolist() == expected_prompt + expected_ids
    assert batch["completion_mask"][0].tolist() == [False] * len(expected_prompt) + (
        expected_mask + [False] * (batch["input_ids"].shape[1] - n)
    )


def test_explicit_segment_bounds_cut_the_sessions(tiny_tokenizer):
    encoder = SessionEncoder(tiny_tokenizer, SETTINGS)
    encoded = encoder.encode(segment_of(CHOSEN, REJECTED, start=3, end=3))
    labelled = [
        t
        for t, m in zip(encoded.chosen_input_ids, encoded.chosen_completion_mask, strict=True)
        if m
    ]
    assert tiny_tokenizer.decode(labelled) == "yes I do</s>"
    assert tiny_tokenizer.decode(encoded.chosen_input_ids) == "yes I do</s>"  # turns 4, 5 gone
    # A segment that starts before the sessions differ: its shared turns are labelled too.
    early = encoder.encode(segment_of(CHOSEN, REJECTED, start=1))
    assert tiny_tokenizer.decode(early.prompt_input_ids) == "<|user|>\nHi</s>\n<|assistant|>\n"


@pytest.mark.parametrize(
    "bad, message",
    [
        (
            {"chosen": [user("A"), assistant("x")], "rejected": [user("B"), assistant("y")]},
            "share no",
        ),
        (
            {"chosen": CHOSEN, "rejected": REJECTED[:4]},
            "differ in turn count: from turn 3 to the end chosen has 3 turns and rejected 1",
        ),
        (
            {"chosen": CHOSEN, "rejected": HISTORY[:2] + [user("Hm?")] + REJECTED[3:]},
            "first differ at turn 2, which is not an assistant turn",
        ),
        ({"chosen": CHOSEN, "rejected": REJECTED, "segment_start": 4}, "already differ at turn 3"),
        ({"chosen": CHOSEN, "rejected": REJECTED, "segment_end": 9}, r"segment \[3, 9\]"),
    ],
)
def test_mismatched_sessions_raise_with_the_row_named(bad, message, tiny_tokenizer, tmp_path):
    good = {"chosen": CHOSEN, "rejected": REJECTED}
    data = write_jsonl(tmp_path / "sessions.jsonl", [good, bad, good])
    with pytest.raises(DataError, match=rf"sessions.jsonl, line 2: .*{message}"):
        prepare_segments(data, tiny_tokenizer, SETTINGS)


def test_identical_sessions_are_dropped_or_refused(tiny_tokenizer, tmp_path):
    rows = [{"chosen": CHOSEN, "rejected": REJECTED}, {"chosen": CHOSEN, "rejected": CHOSEN}]
    data = write_jsonl(tmp_path / "same.jsonl", rows)
    drop = DataConfig(max_length=256, max_prompt_length=200, identical_pairs="drop")
    prepared = prepare_segments(data, tiny_tokenizer, drop)
    assert len(prepared) == 1 and prepared.summary.dropped == {"identical pair": 1}
    with pytest.raises(DataError, match=r"line 2: .*same session"):
        prepare_segments(data, tiny_tokenizer, SETTINGS)


# ---- the loss -----------------------------------------------------------------------------------


def segment_step(policy, reference, rows, tokenizer, collator=SegmentCollator):
    prepared = prepare_segments(rows, tokenizer, SETTINGS)
    batch = collator(tokenizer.pad_token_id)(list(prepared.dataset))
    context = StepContext(
        spec=get_method("segment_dpo"),
        hyperparameters={"beta": 0.1},
        policy=CompletionScorer(policy),
        reference=FrozenReference(CompletionScorer(reference)),
    )
    with torch.no_grad():
        return pairwise_batch_loss(context, batch), batch


def test_a_shared_earlier_turn_leaves_the_loss_unchanged(tiny_tokenizer):
    """With bigram models (no layers: a token's distribution depends only on the token before
    it) the segment's log-probs cannot see earlier turns, so the per-pair loss, and each side's
    log-ratio, must be the same with or without an extra shared exchange in front."""
    policy = build_tiny_model(tiny_tokenizer, num_layers=0, seed=1)
    reference = build_tiny_model(tiny_tokenizer, num_layers=0, seed=2)
    extra = [user("Good morning!"), assistant("Morning. How can I help?")]
    rows = [
        {"chosen": CHOSEN, "rejected": REJECTED},
        {"chosen": extra + CHOSEN, "rejected": extra + REJECTED},
    ]
    out, batch = segment_step(policy, reference, rows, tiny_tokenizer)
    assert out.losses[0].item() == pytest.approx(out.losses[1].item(), abs=1e-6)
    assert abs(out.losses[0].item() - math.log(2)) > 1e-3  # not a vacuous h = 0
    scorer, masks = CompletionScorer(policy), batch["completion_mask"]
    ids, attention = batch["input_ids"], batch["attention_mask"]
    with torch.no_grad():
        logratios = (
            scorer(ids, attention, masks).logps
            - CompletionScorer(reference)(ids, attention, masks).logps
        )  # (4,): chosen 0, chosen 1, rejected 0, rejected 1
        torch.testing.assert_close(logratios[0], logratios[1], atol=1e-5, rtol=0)
        torch.testing.assert_close(logratios[2], logratios[3], atol=1e-5, rtol=0)
        # The extra turn itself has a policy/reference log-ratio: counting it would show.
        everything = attention.bool()
        everything[:, 0] = False  # no position predicts the first token
        whole = scorer(ids, attention, everything).logps
        whole = whole - CompletionScorer(reference)(ids, attention, everything).logps
        assert abs(float(whole[1] - whole[0])) > 1e-2


def test_scorer_and_precomputed_reference_on_non_contiguous_masks(tiny_dir, tmp_path):
    data = write_sessions(tmp_path / "sessions.jsonl", rows=8)
    trainer = Trainer(segment_config(tiny_dir, data, tmp_path, reference_mode="precomputed"))
    assert trainer.reference_mode == "precomputed"
    model = AutoModelForCausalLM.from_pretrained(str(tiny_dir))
    online = FrozenReference(CompletionScorer(model))
    for batch in trainer.train_loader:
        # Each row's mask has gaps (the partner's turn inside the segment).
        gaps = batch["completion_mask"].int().diff(dim=1).eq(1).sum(dim=1)
        assert bool((gaps == 2).all())
        naive = full_logits_logps(
            model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"]
        )
        expected = online.score(batch).logps
        torch.testing.assert_close(expected, naive.detach(), atol=1e-4, rtol=0)
        torch.testing.assert_close(
            trainer.references["train"].score(batch).logps, expected.float(), atol=1e-5, rtol=0
        )


# ---- training -----------------------------------------------------------------------------------


def test_training_on_an_easy_multiturn_set_raises_accuracy(tiny_dir, tmp_path):
    data = write_sessions(tmp_path / "sessions.jsonl", rows=32)
    config = segment_config(
        tiny_dir, data, tmp_path, max_steps=12, eval_fraction=0.25, eval_steps=12
    )
    result = train(config)
    first = result.history[0]
    evaluation = [r for r in result.history if r["split"] == "eval"][-1]
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-4)  # policy == reference
    assert evaluation["rewards/accuracies"] > 0.9
    assert evaluation["rewards/margins"] > first["rewards/margins"] + 0.05


def test_segment_dpo_end_to_end_through_the_cli(tiny_dir, tmp_path):
    data = write_sessions(tmp_path / "sessions.jsonl", rows=8)
    out = tmp_path / "run"
    argv = ["train", "--method", "segment_dpo", "--model", str(tiny_dir), "--data", data]
    argv += ["--output-dir", str(out), "max_steps=2", "batch_size=4", "progress=false"]
    argv += [f"reference_cache_dir={tmp_path / 'cache'}", "max_length=160", "beta=0.2"]
    argv += ["max_prompt_length=100"]
    assert main(argv) == 0
    assert (out / "final" / "model.safetensors").exists()
    assert [r["step"] for r in read_metrics(out)] == [1, 2]
