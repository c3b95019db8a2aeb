"""Several processes: DDP over gloo on CPU equals one process with the same global batch.

With P processes and ``batch_size=b`` per process, an optimizer step sees P*b rows per
micro-batch; accelerate's seedable sampler draws ONE permutation and deals consecutive batches of
it to the processes in turn (process r gets batches r, r+P, ...), so step k of the P-process run
covers exactly the rows of step k of a one-process run with ``batch_size=P*b`` (``shuffle=true``
included). The logged loss is averaged over processes, so the trajectories must agree to float
noise. Also here: which path the engine picks when the parameters are sharded (FSDP, ZeRO-3),
which cannot run on this CPU-only machine, and the shipped accelerate / run configs.
"""

from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from accelerate.commands.config.config_args import load_config_from_file
from accelerate.utils import DistributedType
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from dpokit import train
from dpokit.config import ConfigError, TrainConfig
from dpokit.distributed import cpu_only_multiprocess, parameter_sharding
from dpokit.engine import Trainer
from dpokit.metrics import read_metrics
from dpokit.reference import AdapterOffReference, StartingPolicyReference
from multiproc import REPO, accelerate_command, child_env, free_port, run, torchrun_command

TOPICS = ["apples", "bananas", "cherries", "the fox", "the dog", "today", "France", "Paris"]

COMMON = {
    "learning_rate": 1e-3,
    "warmup_ratio": 0.0,
    "lr_scheduler": "constant",
    "max_length": 64,
    "max_prompt_length": 32,
    "progress": False,
    "shuffle": True,
}


def write_pairs(path: Path, rows: int, seed: int = 0) -> str:
    rng = random.Random(seed)
    with open(path, "w") as handle:
        for _ in range(rows):
            topic = rng.choice(TOPICS)
            row = {
                "prompt": f"Human: Do you like {topic}? Assistant:",
                "chosen": f" yes, I like {topic}.",
                "rejected": f" no, I do not like {topic}!",
            }
            handle.write(json.dumps(row) + "\n")
    return str(path)


def cli_args(values: dict) -> list[str]:
    """``train --flag value ... key=value ...`` for ``dpokit`` from one dict of settings."""
    flags = {"method", "model", "data", "eval_data", "output_dir"}
    args = ["train"]
    for key in flags & values.keys():
        args += [f"--{key.replace('_', '-')}", str(values[key])]
    for key, value in values.items():
        if key not in flags:
            args.append(f"{key}={str(value).lower() if isinstance(value, bool) else value}")
    return args


def train_losses(run_dir) -> list[float]:
    return [r["loss"] for r in read_metrics(run_dir) if r["split"] == "train"]


def cached_table(cache_dir: Path, rows: int) -> dict[str, torch.Tensor]:
    """The one cached reference table with ``rows`` rows (train and eval have one each)."""
    tables = [load_file(str(f)) for f in sorted(cache_dir.glob("*.safetensors"))]
    [table] = [t for t in tables if t["logps"].shape == (rows, 2)]
    return table


# ---- DPO: two processes == one process --------------------------------------------------------


def test_dpo_two_processes_equal_one_process_with_the_global_batch(tiny_dir, tmp_path):
    """2 processes x batch 1 x accumulation 2 == 1 process x batch 4, launched with the repo's
    configs/accelerate/ddp.yaml; the reference log-probs are pre-computed half per process."""
    values = dict(
        COMMON,
        method="dpo",
        model=tiny_dir,
        data=write_pairs(tmp_path / "pairs.jsonl", rows=32),
        eval_data=write_pairs(tmp_path / "eval.jsonl", rows=8, seed=5),
        max_steps=4,
    )
    two_dir, two_cache = tmp_path / "two", tmp_path / "two-cache"
    output = run(
        accelerate_command(
            2,
            free_port(),
            cli_args(
                dict(
                    values,
                    output_dir=two_dir,
                    reference_cache_dir=two_cache,
                    batch_size=1,
                    gradient_accumulation_steps=2,
                )
            ),
        ),
        child_env(tmp_path),
    )
    # The pre-computation was sharded: each process scored half of the 32 training rows.
    assert "process 0 scored 16 of 32 rows" in output
    assert "process 1 scored 16 of 32 rows" in output

    one = train(
        TrainConfig.from_dict(
            dict(
                values,
                model=str(tiny_dir),
                output_dir=str(tmp_path / "one"),
                reference_cache_dir=str(tmp_path / "one-cache"),
                batch_size=4,
            )
        )
    )
    one_train = [r for r in one.history if r["split"] == "train"]
    two_records = read_metrics(two_dir)
    two_train = [r for r in two_records if r["split"] == "train"]
    assert [r["step"] for r in two_train] == [1, 2, 3, 4]
    for key in ("loss", "rewards/margins", "logps/chosen"):
        expected = [r[key] for r in one_train]
        assert [r[key] for r in two_train] == pytest.approx(expected, rel=1e-5, abs=1e-6), key
    assert one_train[-1]["loss"] < one_train[0]["loss"] - 0.01  # it trained: a real trajectory
    [two_eval] = [r for r in two_records if r["split"] == "eval"]
    [one_eval] = [r for r in one.history if r["split"] == "eval"]
    assert two_eval["loss"] == pytest.approx(one_eval["loss"], rel=1e-5)

    # The gathered table (written once, by the main process) is the one-process table.
    two_table, one_table = cached_table(two_cache, 32), cached_table(tmp_path / "one-cache", 32)
    torch.testing.assert_close(two_table["logps"], one_table["logps"], atol=1e-5, rtol=0)
    assert torch.equal(two_table["token_counts"], one_table["token_counts"])
    assert (two_dir / "final" / "model.safetensors").exists()


# ---- parameter sharding (FSDP / ZeRO-3): the path the engine picks ------------------------------


def fake_accelerator(kind: DistributedType, zero_stage: int | None = None):
    plugin = None if zero_stage is None else SimpleNamespace(zero_stage=zero_stage)
    return SimpleNamespace(distributed_type=kind, state=SimpleNamespace(deepspeed_plugin=plugin))


def test_parameter_sharding_is_read_from_the_accelerator():
    assert parameter_sharding(fake_accelerator(DistributedType.FSDP)) == "fsdp"
    assert parameter_sharding(fake_accelerator(DistributedType.DEEPSPEED, 3)) == "zero3"
    assert parameter_sharding(fake_accelerator(DistributedType.DEEPSPEED, 2)) is None
    assert parameter_sharding(fake_accelerator(DistributedType.MULTI_GPU)) is None
    assert parameter_sharding(fake_accelerator(DistributedType.NO)) is None


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only launch")
def test_torchrun_on_a_cpu_machine_asks_accelerate_for_gloo(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert not cpu_only_multiprocess()
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert cpu_only_multiprocess()


@pytest.fixture()
def zero3(monkeypatch):
    """Make the engine believe its parameters are sharded (DeepSpeed is not installed here)."""
    monkeypatch.setattr("dpokit.engine.parameter_sharding", lambda accelerator: "zero3")


def sharding_config(tiny_dir, tmp_path, **overrides) -> TrainConfig:
    data = write_pairs(tmp_path / "pairs.jsonl", rows=8)
    values = dict(COMMON, model=str(tiny_dir), data=data, batch_size=4, max_steps=1)
    values.update(output_dir=str(tmp_path / "run"), reference_cache_dir=str(tmp_path / "cache"))
    return TrainConfig.from_dict({**values, **overrides})


def test_sharded_run_scores_with_the_full_model_and_precomputes_with_the_policy(
    tiny_dir, tmp_path, zero3
):
    config = sharding_config(tiny_dir, tmp_path, method="dpo")
    trainer = Trainer(config)
    assert trainer.sharding == "zero3"
    assert trainer.accelerator.unwrap_model(trainer.policy).fast is False  # never reads W directly
    table = trainer.references["train"].logps  # scored by the policy, not a second model
    # The table holds what the policy (exact path: full logits) gives before any step.
    reference = StartingPolicyReference(trainer.accelerator.unwrap_model(trainer.policy))
    batch = next(iter(trainer.train_loader))
    torch.testing.assert_close(
        reference.score(batch).logps,
        torch.cat([table[batch["index"], 0], table[batch["index"], 1]]),
        atol=1e-5,
        rtol=0,
    )
    result = trainer.train()
    assert result.history[0]["loss"] == pytest.approx(0.6931471805599453, rel=1e-5)


def test_sharded_run_refuses_a_separate_reference_model(tiny_dir, tmp_path, zero3):
    with pytest.raises(ConfigError, match=r"ZeRO-3.*lora=true"):
        Trainer(sharding_config(tiny_dir, tmp_path, method="tdpo2"))
    other = tmp_path / "other"
    AutoModelForCausalLM.from_pretrained(str(tiny_dir)).save_pretrained(other)
    with pytest.raises(ConfigError, match=r"--reference .*other.*Pre-compute them once"):
        Trainer(sharding_config(tiny_dir, tmp_path, method="dpo", reference=str(other)))


def test_sharded_run_reads_a_table_precomputed_without_sharding(tiny_dir, tmp_path, monkeypatch):
    other = tmp_path / "other"
    AutoModelForCausalLM.from_pretrained(str(tiny_dir)).save_pretrained(other)
    config = sharding_config(tiny_dir, tmp_path, method="dpo", reference=str(other))
    unsharded = Trainer(config).references["train"].logps  # fills reference_cache_dir
    monkeypatch.setattr("dpokit.engine.parameter_sharding", lambda accelerator: "zero3")
    # A second run of its own (the first one's directory is taken), same cache: a hit, no refusal
    config = dataclasses.replace(config, output_dir=str(tmp_path / "second"))
    sharded = Trainer(config).references["train"].logps
    assert torch.equal(sharded, unsharded)


def test_sharded_lora_reference_runs_through_the_wrapper(tiny_dir, tmp_path, zero3):
    """TDPO's online reference under sharding: the adapter switched off, called through the
    prepared policy; the token KL then comes from the exact path's log-probs."""
    config = sharding_config(
        tiny_dir, tmp_path, method="tdpo2", lora=True, lora_r=4, lora_target_modules="q_proj"
    )
    trainer = Trainer(config)
    reference = trainer.references["train"]
    assert isinstance(reference, AdapterOffReference)
    assert reference.runner is trainer.policy
    result = trainer.train()
    assert result.history[0]["loss"] == pytest.approx(0.6931471805599453, rel=1e-5)
    assert result.history[0]["kl/chosen"] == pytest.approx(0.0, abs=1e-6)  # policy == reference


def test_fsdp_wraps_the_models_decoder_layers(tiny_dir, tmp_path, monkeypatch):
    monkeypatch.setattr("dpokit.engine.parameter_sharding", lambda accelerator: "fsdp")
    trainer = Trainer(sharding_config(tiny_dir, tmp_path, method="simpo"))
    assert trainer.accelerator.unwrap_model(trainer.policy)._no_split_modules == [
        "LlamaDecoderLayer"
    ]


# ---- shipped configs ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "kind", "check"),
    [
        ("ddp.yaml", DistributedType.MULTI_GPU, lambda c: True),
        ("fsdp.yaml", DistributedType.FSDP, lambda c: c.fsdp_config["fsdp_sharding_strategy"]),
        ("deepspeed_zero2.yaml", DistributedType.DEEPSPEED, lambda c: c.deepspeed_config),
        ("deepspeed_zero3.yaml", DistributedType.DEEPSPEED, lambda c: c.deepspeed_config),
    ],
)
def test_accelerate_configs_load(name, kind, check):
    config = load_config_from_file(str(REPO / "configs" / "accelerate" / name))
    assert config.distributed_type == kind
    expected = {
        "fsdp.yaml": "FULL_SHARD",
        "deepspeed_zero2.yaml": {"zero_stage": 2},
        "deepspeed_zero3.yaml": {"zero_stage": 3, "zero3_save_16bit_model": True},
    }.get(name, True)
    got = check(config)
    if isinstance(expected, dict):
        assert expected.items() <= got.items()
    else:
        assert got == expected


@pytest.mark.parametrize("path", sorted((REPO / "configs" / "runs").glob("*.yaml")), ids=str)
def test_example_run_configs_are_valid(path):
    config = TrainConfig.load(path)
    raw = yaml.safe_load(path.read_text())
    assert config.method == raw["method"]
    assert config.model and config.data


def write_unpaired(path: Path, rows: int) -> str:
    with open(path, "w") as handle:
        for i in range(rows):
            topic, good = TOPICS[i % len(TOPICS)], i % 3 != 0
            answer = f" yes, I like {topic}." if good else f" no, I do not like {topic}!"
            row = {"prompt": f"Human: Do you like {topic}? Assistant:", "completion": answer}
            handle.write(json.dumps({**row, "label": good}) + "\n")
    return str(path)


def test_kto_two_processes_average_z0_and_equal_one_process(tiny_dir, tmp_path):
    """torchrun, 2 processes x batch 2 == 1 process x batch 4: the reference point z0 is the
    mean over BOTH processes' mismatched pairs, as one process computes it on the whole batch."""
    values = dict(
        COMMON,
        method="kto",
        model=tiny_dir,
        data=write_unpaired(tmp_path / "unpaired.jsonl", rows=16),
        max_steps=3,
    )
    two_dir = tmp_path / "two"
    args = cli_args(dict(values, output_dir=two_dir, batch_size=2))
    run(torchrun_command(2, free_port(), args), child_env(tmp_path))
    one = train(
        TrainConfig.from_dict(
            dict(values, model=str(tiny_dir), output_dir=str(tmp_path / "one"), batch_size=4)
        )
    )
    one_train = [r for r in one.history if r["split"] == "train"]
    two_train = [r for r in read_metrics(two_dir) if r["split"] == "train"]
    for key in ("loss", "kl/mismatched", "kl_baseline"):
        expected = [r[key] for r in one_train]
        assert [r[key] for r in two_train] == pytest.approx(expected, rel=1e-5, abs=1e-6), key
    assert one_train[-1]["kl/mismatched"] != 0.0  # z0's estimate moved: the check has teeth


def write_sft(path: Path, rows: int) -> str:
    with open(path, "w") as handle:
        for i in range(rows):
            topic = TOPICS[i % len(TOPICS)]
            row = {"prompt": f"Human: Do you like {topic}? Assistant:", "completion": " yes."}
            handle.write(json.dumps(row) + "\n")
    return str(path)


def test_spin_generation_is_sharded_and_the_iteration_equals_one_process(tiny_dir, tmp_path):
    """One SPIN iteration: 2 processes deal out the (sampled) generation batches and gather
    them: the same answers as one process, then the same training trajectory."""
    values = dict(
        COMMON,
        method="spin",
        model=tiny_dir,
        data=write_sft(tmp_path / "sft.jsonl", rows=12),  # >= 8 pairs left after empty answers
        iterations=1,
        temperature=1.0,
        max_new_tokens=6,
        generation_batch_size=2,
        max_steps=2,
    )
    two_dir = tmp_path / "two"
    args = cli_args(dict(values, output_dir=two_dir, batch_size=2))
    output = run(accelerate_command(2, free_port(), args), child_env(tmp_path))
    assert "process 0 generated 6 of 12 answers" in output  # batches 0, 2, 4 of 6
    assert "process 1 generated 6 of 12 answers" in output  # batches 1, 3, 5
    one_dir = tmp_path / "one"
    train(
        TrainConfig.from_dict(
            dict(values, model=str(tiny_dir), output_dir=str(one_dir), batch_size=4)
        )
    )

    def generations(run_dir: Path) -> list[str]:
        lines = (run_dir / "iter-0" / "generations.jsonl").read_text().splitlines()
        return [json.loads(line)["generated"] for line in lines]

    assert generations(two_dir) == generations(one_dir)
    assert len(set(generations(one_dir))) > 1  # sampled, not one answer repeated
    expected = train_losses(one_dir / "iter-0")
    assert len(expected) == 2
    assert train_losses(two_dir / "iter-0") == pytest.approx(expected, rel=1e-5, abs=1e-6)
