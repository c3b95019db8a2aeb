"""The order in which a run writes into its directory, for a method whose setup writes a cache
there (SLiC's ``reference_samples/``, issue 11): ``overwrite`` clears the earlier run BEFORE the
setup writes (so the new samples are kept), and the run's record (``run.json``, ``config.yaml``)
is written only once the reference is built, so a run that fails in between leaves no record,
only its cache, which a rerun with ``resume=true`` reuses.
"""

from __future__ import annotations

import json

import pytest

from dpokit import train
from dpokit.engine import Trainer
from dpokit.reference import ReferenceBuilder
from dpokit.steps import slic as slic_step
from helpers import make_config

SAMPLED = dict(method="slic", target="reference_sample", max_new_tokens=6, lam=0.5, max_steps=1)


@pytest.fixture()
def pairs(tmp_path) -> str:
    rows = [
        {"prompt": f"Human: {t}? Assistant:", "chosen": f" yes, {t}.", "rejected": " no."}
        for t in ["apples", "bananas", "cherries", "the fox"]
    ]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def test_a_run_failing_after_its_setup_leaves_its_cache_and_no_record(
    tiny_dir, pairs, tmp_path, monkeypatch
):
    run = tmp_path / "run"
    train(make_config(tiny_dir, pairs, tmp_path, **SAMPLED))  # a finished earlier run
    samples = run / "reference_samples" / "train.jsonl"
    assert (run / "final").is_dir() and samples.exists()

    def fail(*args, **kwargs):
        raise RuntimeError("the reference could not be built")

    monkeypatch.setattr(ReferenceBuilder, "build", fail)
    changed = {**SAMPLED, "temperature": 0.7}  # other samples: this run draws its own
    with pytest.raises(RuntimeError, match="could not be built"):
        Trainer(make_config(tiny_dir, pairs, tmp_path, overwrite=True, **changed))
    # Cleared before the setup wrote (the earlier run is gone, as overwrite=true asked); this
    # run's samples are there; no record of a run that never started.
    assert sorted(p.name for p in run.iterdir()) == ["reference_samples"]
    header = json.loads(samples.read_text().splitlines()[0])
    monkeypatch.undo()

    def no_sampling(*args, **kwargs):
        raise AssertionError("sampled again")

    monkeypatch.setattr(slic_step, "draw_samples", no_sampling)
    result = train(make_config(tiny_dir, pairs, tmp_path, resume=True, **changed))
    assert result.global_step == 1
    assert json.loads(samples.read_text().splitlines()[0]) == header  # reused, not redrawn
    assert (run / "run.json").exists() and (run / "config.yaml").exists()
