"""Every row of an epoch is trained (and evaluated) exactly once, whatever the number of
processes, when the rows do not divide evenly (issue 11: "2 processes equal 1").

accelerate's default ``even_batches=True`` completes the last batches of an epoch with rows from
its start: with 5 pairs, batch 2 and 2 processes, step 2 trained row 4 AND rows 0, 1 again (and
the eval loss counted an eval row twice). dpokit deals each batch to one process and gives a
process with no batch left a weightless filler that only joins the collectives
(:mod:`dpokit.accumulation`). Each run below on 2 processes (one torchrun launch,
tests/uneven_runs.py) must equal one process with the global batch: losses at every step and
final weights to 1e-4 (see the test), and the rows of each step (``rows`` in metrics.jsonl)
those of the data.
"""

from __future__ import annotations

import json
import sys
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM

from dpokit import train
from dpokit.accumulation import epoch_micro_batches, epoch_slots
from dpokit.config import TrainConfig
from dpokit.metrics import read_metrics
from dpokit.recipes.sft import run_sft
from multiproc import REPO, child_env, free_port, run

COMMON = dict(
    learning_rate=0.01,
    warmup_ratio=0.0,
    lr_scheduler="constant",
    max_length=64,
    max_prompt_length=32,
    progress=False,
    shuffle=True,
)
TOPICS = ["apples", "bananas", "cherries", "the fox", "the dog", "Paris", "France"]


def write_jsonl(path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def pairs(n: int, offset: int = 0) -> list[dict]:
    """``n`` pairs whose completions differ in length (a row counted twice shows in the loss)."""
    rows = []
    for i in range(offset, offset + n):
        topic = TOPICS[i % len(TOPICS)]
        chosen = f" yes, I like {topic}" + " very much" * (i % 3) + "."
        rows.append({"prompt": f"Human: {topic}? Assistant:", "chosen": chosen, "rejected": " no."})
    return rows


def unpaired(n: int) -> list[dict]:
    return [
        {
            "prompt": f"Human: {TOPICS[i]}? Assistant:",
            "completion": f" yes, {TOPICS[i]}" + "!" * i if i % 2 == 0 else " no.",
            "label": i % 2 == 0,
        }
        for i in range(n)
    ]


def sft(n: int) -> list[dict]:
    return [
        {"prompt": f"Human: {TOPICS[i]}? Assistant:", "completion": " ok" + ", ok" * (3 * i)}
        for i in range(n)
    ]


HALVED = (dict(batch_size=2), dict(batch_size=4), [4, 1])  # 2 x batch 2 == 1 x batch 4
# name: (entry, settings of both runs, 2-process settings, 1-process settings, rows per step)
# With 5 rows (M batches of the epoch, P = 2): "dpo" step 2 has one batch [row 4] on process 0
# and none on process 1 (as its eval: 3 rows of batch 1, process 1 has [1] then none);
# "accumulation": batch 1 x 2, process 1 has no micro-batch at all in step 2; "short_window":
# batch 1 x 3, process 1's only step has 2 micro-batches and a filler; "resumed": "accumulation"
# stopped after step 1 (a checkpoint in the middle of the epoch, before process 1's filler) and
# resumed: bit for bit the uninterrupted run.
CASES = {
    "dpo": (
        "train",
        dict(max_steps=4, eval_steps=2),
        dict(batch_size=2, eval_batch_size=1),
        dict(batch_size=4, eval_batch_size=4),
        [4, 1, 4, 1],
    ),
    "accumulation": (
        "train",
        dict(max_steps=2, shuffle=False),
        dict(batch_size=1, gradient_accumulation_steps=2),
        dict(batch_size=4),
        [4, 1],
    ),
    "short_window": (
        "train",
        dict(max_steps=2),
        dict(batch_size=1, gradient_accumulation_steps=3),
        dict(batch_size=6),
        [5, 5],
    ),
    "resumed": (
        "train",
        dict(max_steps=2, shuffle=False),
        dict(batch_size=1, gradient_accumulation_steps=2),
        dict(batch_size=4),
        [4, 1],
    ),
    "sft": ("sft", dict(max_steps=2), *HALVED),
    "kto": ("train", dict(max_steps=2, method="kto"), *HALVED),
    "bco": ("train", dict(max_steps=2, method="bco_pair"), *HALVED),
}
ENTRIES = {"train": train, "sft": run_sft}


def data_files(tmp_path) -> dict[str, dict]:
    """The data of each case: 5 rows (eval: 3 more pairs for "dpo")."""
    pair_file = write_jsonl(tmp_path / "pairs.jsonl", pairs(5))
    files = {name: {"data": pair_file} for name in CASES}
    files["dpo"]["eval_data"] = write_jsonl(tmp_path / "eval.jsonl", pairs(3, offset=5))
    files["kto"]["data"] = write_jsonl(tmp_path / "unpaired.jsonl", unpaired(5))
    files["sft"]["data"] = write_jsonl(tmp_path / "sft.jsonl", sft(5))
    return files


def configs(tiny_dir, tmp_path, processes: int) -> dict[str, dict]:
    files = data_files(tmp_path)
    out = {}
    for name, (_, both, two, one, _) in CASES.items():
        values = dict(COMMON, model=str(tiny_dir), **files[name], **both)
        values.update(two if processes == 2 else one)
        values["output_dir"] = str(tmp_path / f"{name}-{processes}")
        values["reference_cache_dir"] = str(tmp_path / f"cache-{processes}")
        out[name] = values
    return out


@pytest.fixture(scope="module")
def two_process_runs(tiny_dir, tmp_path_factory):
    """Every case on 2 processes, in one torchrun launch; returns the directory of the runs."""
    tmp_path = tmp_path_factory.mktemp("uneven")
    runs = []
    for name, config in configs(tiny_dir, tmp_path, 2).items():
        if name == "resumed":  # stop after step 1 with a checkpoint, then resume to the end
            runs.append({"entry": "train", "config": dict(config, max_steps=1, save_steps=1)})
            config = dict(config, resume="true")
        runs.append({"entry": CASES[name][0], "config": config})
    spec = tmp_path / "runs.json"
    spec.write_text(json.dumps(runs))
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2"]
    command += [f"--master_port={free_port()}", str(REPO / "tests" / "uneven_runs.py"), str(spec)]
    run(command, child_env(tmp_path), timeout=300)
    return tmp_path


def final_weights(final_dir) -> dict[str, torch.Tensor]:
    model = AutoModelForCausalLM.from_pretrained(str(final_dir))
    return {name: p.detach().clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("name", list(CASES))
def test_two_processes_train_every_row_once_and_equal_one(
    name, two_process_runs, tiny_dir, tmp_path
):
    entry, *_, rows = CASES[name]
    config = configs(tiny_dir, tmp_path, 1)[name]
    one = ENTRIES[entry](TrainConfig.from_dict(config))
    one_records = one.history
    two_records = read_metrics(two_process_runs / f"{name}-2")
    for split in ("train", "eval"):
        expected = [r for r in one_records if r["split"] == split]
        got = [r for r in two_records if r["split"] == split]
        assert [r["step"] for r in got] == [r["step"] for r in expected], split
        losses = [r["loss"] for r in expected]
        assert [r["loss"] for r in got] == pytest.approx(losses, abs=1e-5, rel=0), split
    train_rows = [r["rows"] for r in two_records if r["split"] == "train"]
    assert train_rows == [r["rows"] for r in one_records if r["split"] == "train"] == rows
    if name == "dpo":  # evaluated at steps 2 and 4: each of the 3 eval rows once
        assert [r["rows"] for r in two_records if r["split"] == "eval"] == [3, 3]
    assert one_records[-2 if name == "dpo" else -1]["loss"] < one_records[0]["loss"] - 1e-3
    two_weights = final_weights(two_process_runs / f"{name}-2" / "final")
    if name == "resumed":
        uninterrupted = final_weights(two_process_runs / "accumulation-2" / "final")
        assert all(torch.equal(two_weights[k], v) for k, v in uninterrupted.items())
    # Weights to 1e-4, not 1e-5: AdamW divides by sqrt(v) + eps, so an element whose gradient
    # is ~0 moves by up to lr x O(1) on float noise (seen once: 1.1e-5 at lr 0.01). The bug this
    # guards against (a row trained twice) moves the losses above by ~5e-3.
    for key, value in final_weights(one.final_dir).items():
        torch.testing.assert_close(
            two_weights[key], value, rtol=0, atol=1e-4, msg=lambda m, key=key: f"{key}: {m}"
        )


# ---- the slots of an epoch, one process's view ------------------------------------------------


class FakeLoader(list):
    """A process's prepared loader: its own batches (``len`` is their count)."""


def fake_accelerator():
    return SimpleNamespace(skip_first_batches=lambda loader, n: FakeLoader(loader[n:]))


@pytest.mark.parametrize(
    ("own", "slots", "done", "expected"),
    [
        (["b0", "b2", "b4"], 3, 0, ["b0", "b2", "b4"]),  # process 0 of 5 batches, P = 2
        (["b1", "b3"], 3, 0, ["b1", "b3", "filler"]),  # process 1: one filler at the end
        (["b1", "b3"], 3, 1, ["b3", "filler"]),  # resumed after 1 slot
        (["b1", "b3"], 3, 2, ["filler"]),  # resumed after its own batches
        (["b1", "b3"], 3, 3, []),  # resumed at the epoch's end (the filler was done)
        ([], 1, 0, ["filler"]),  # fewer batches than processes: a filler only
    ],
)
def test_epoch_micro_batches_fill_every_process_to_the_same_slots(own, slots, done, expected):
    micro = list(
        epoch_micro_batches(
            FakeLoader(own), slots, done, filler=lambda: "filler", accelerator=fake_accelerator()
        )
    )
    assert [m.batch for m in micro] == expected
    assert [m.real for m in micro] == [b != "filler" for b in expected]


def test_epoch_slots_are_the_batches_of_process_zero():
    assert [epoch_slots(m, 2) for m in (1, 2, 3, 5)] == [1, 1, 2, 3]
    assert epoch_slots(7, 3) == 3
