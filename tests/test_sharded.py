"""dpokit's own FSDP2 (``sharding=fsdp``, :mod:`dpokit.sharding`) on CPU over gloo, 2 processes.

Parity: 2 sharded processes x batch b == 1 unsharded process x batch 2b (same rows per step, see
tests/test_distributed.py): the logged losses and the final weights agree to 1e-5, for DPO with a
pre-computed reference, TDPO2 with a separate frozen reference model (sharded too), TDPO2 with
LoRA (adapter-off reference; adapters saved), KTO and one SPIN iteration. The chunked LM head is
kept under sharding (log-probs and token KL equal a direct full-logits computation), checkpoints
are sharded (torch.distributed.checkpoint) and a run killed with SIGKILL resumes to the
uninterrupted run's weights; ``final/`` holds gathered, loadable weights.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import psutil
import pytest
import torch
from accelerate.utils import DistributedType
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from conftest import CORPUS
from dpokit import train
from dpokit.config import ConfigError, TrainConfig
from dpokit.distributed import own_sharding
from dpokit.logprobs import full_logits_logps
from dpokit.metrics import read_metrics
from dpokit.sharding import check_layout
from dpokit.tiny import build_tiny_model, build_tiny_tokenizer
from multiproc import REPO, child_env, free_port, run, torchrun_command
from test_distributed import (
    COMMON,
    cached_table,
    cli_args,
    train_losses,
    write_pairs,
    write_sft,
    write_unpaired,
)

SHARDED = {"sharding": "fsdp"}


def two_sharded(values: dict, out: Path, batch_size: int, tmp_path: Path) -> str:
    """``torchrun --nproc_per_node 2 -m dpokit.cli train ... sharding=fsdp``; its output."""
    args = cli_args(dict(values, **SHARDED, output_dir=out, batch_size=batch_size))
    return run(torchrun_command(2, free_port(), args), child_env(tmp_path), timeout=300)


def one_process(values: dict, out: Path, batch_size: int):
    """The same run on one process, unsharded, with the global batch."""
    model = str(values["model"])
    return train(
        TrainConfig.from_dict(dict(values, model=model, output_dir=str(out), batch_size=batch_size))
    )


def assert_same_weights(file_a: Path, file_b: Path, atol: float = 1e-5) -> None:
    a, b = load_file(str(file_a)), load_file(str(file_b))
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=atol, rtol=0, msg=name)


def assert_same_losses(dir_a: Path, dir_b: Path, keys=("loss",)) -> list[dict]:
    a = [r for r in read_metrics(dir_a) if r["split"] == "train"]
    b = [r for r in read_metrics(dir_b) if r["split"] == "train"]
    assert [r["step"] for r in a] == [r["step"] for r in b] and a
    for key in keys:
        assert [r[key] for r in a] == pytest.approx([r[key] for r in b], rel=1e-5, abs=1e-6), key
    return b


# ---- which runs dpokit shards itself -----------------------------------------------------------


def fake(processes: int, kind=DistributedType.MULTI_CPU):
    return SimpleNamespace(num_processes=processes, distributed_type=kind)


def test_own_sharding_is_chosen_by_the_config_and_accelerates_fsdp_config(monkeypatch):
    config = SimpleNamespace(sharding="fsdp")
    assert own_sharding(config, fake(2))
    assert not own_sharding(config, fake(1))  # one process: nothing to shard over
    assert not own_sharding(SimpleNamespace(sharding="none"), fake(2))
    auto = SimpleNamespace(sharding="auto")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    assert not own_sharding(auto, fake(2))
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # accelerate launch with fsdp.yaml
    assert own_sharding(auto, fake(2)) == (not torch.cuda.is_available())
    with pytest.raises(ConfigError, match="both shard"):
        own_sharding(config, fake(2, DistributedType.FSDP))


# ---- the chunked LM head under sharding ---------------------------------------------------------


def test_sharded_chunked_logps_and_token_kl_equal_full_logits(tiny_dir, other_model_dir, tmp_path):
    out = tmp_path / "logps.json"
    worker = str(REPO / "tests" / "sharded_logps.py")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2"]
    command += [
        f"--master_port={free_port()}",
        worker,
        str(tiny_dir),
        str(other_model_dir),
        str(out),
    ]
    run(command, child_env(tmp_path, PYTHONPATH=os.pathsep.join(sys.path)))
    got = json.loads(out.read_text())
    assert got["head_sharded_before"] and got["head_whole_after_forward"]

    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(4, 300, (4, 12), generator=generator)
    completion = torch.zeros(4, 12, dtype=torch.bool)
    completion[:, 5:] = True
    completion[1, 9:] = False
    policy = AutoModelForCausalLM.from_pretrained(str(tiny_dir))
    reference = AutoModelForCausalLM.from_pretrained(str(other_model_dir))
    with torch.no_grad():
        expected = full_logits_logps(policy, ids, None, completion)
        logp_pol = policy(input_ids=ids).logits[:, :-1].log_softmax(-1)
        logp_ref = reference(input_ids=ids).logits[:, :-1].log_softmax(-1)
    token_kl = (logp_ref.exp() * (logp_ref - logp_pol)).sum(-1)  # (N, T-1)
    expected_kl = token_kl.masked_fill(~completion[:, 1:], 0.0).sum(1)
    torch.testing.assert_close(torch.tensor(got["logps"]), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.tensor(got["kl"]), expected_kl, rtol=1e-5, atol=1e-5)
    assert expected_kl.min() > 0.01  # two different models: the KL is not trivially zero


# ---- loading: only process 0 reads the weights ------------------------------------------------


@pytest.mark.parametrize("tied,lora", [(True, "none"), (False, "lora")])
def test_sharded_loading_reads_weights_on_process_0_only(tied, lora, tmp_path):
    """Process 1 builds on meta (0 bytes before fully_shard); after loading, every parameter
    (gathered) and buffer (RoPE's non-persistent inv_freq too) on both processes equals the
    unsharded checkpoint exactly, tied embeddings stay one parameter, and LoRA's adapters (seeded
    differently per process) are process 0's."""
    tokenizer = build_tiny_tokenizer(CORPUS, tmp_path / "model", vocab_size=300)
    build_tiny_model(tokenizer, tmp_path / "model", tie_word_embeddings=tied)
    worker = str(REPO / "tests" / "sharded_load.py")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2"]
    command += [
        f"--master_port={free_port()}",
        worker,
        str(tmp_path / "model"),
        lora,
        str(tmp_path),
    ]
    run(command, child_env(tmp_path, PYTHONPATH=os.pathsep.join(sys.path)))
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    assert ranks[1]["all_meta_before"] and ranks[1]["bytes_before"] == 0
    assert not ranks[0]["all_meta_before"] and ranks[0]["bytes_before"] > 100_000  # it loaded
    unsharded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "model"))
    expected = dict(unsharded.named_parameters()) | dict(unsharded.named_buffers())
    prefix = "base_model.model." if lora == "lora" else ""
    for got in ranks:
        assert got["sharded"] and got["tied"] == tied
        tensors = got["parameters"] | got["buffers"]
        base = {k.removeprefix(prefix).replace(".base_layer", ""): v for k, v in tensors.items()}
        adapters = {k for k in base if "lora_" in k}
        assert len(adapters) == (8 if lora == "lora" else 0)  # A and B of q, v in 2 layers
        assert set(base) - adapters == set(expected)
        for name, value in expected.items():
            assert torch.equal(base[name], value.detach()), name
    first, second = ranks[0]["parameters"], ranks[1]["parameters"]
    for name in (k for k in first if "lora_A" in k):  # seeds 100 and 101: broadcast, not drawn
        assert torch.equal(second[name], first[name]) and first[name].abs().sum() > 0, name
    # RoPE's inverse frequencies, worked out directly: 1 / theta^(2i/d), i < d/2.
    config = unsharded.config
    dim = config.hidden_size // config.num_attention_heads
    inv_freq = 1.0 / config.rope_parameters["rope_theta"] ** (torch.arange(0, dim, 2).float() / dim)
    buffer = f"{prefix}model.rotary_emb.inv_freq"
    torch.testing.assert_close(ranks[1]["buffers"][buffer], inv_freq, rtol=0, atol=0)


# ---- parity: 2 sharded processes == 1 process ---------------------------------------------------


def test_dpo_sharded_equals_one_process_and_saves_loadable_weights(tiny_dir, tmp_path):
    """15 rows: the last step gives one process 2 rows and the other 1; with decoder passes of
    16 tokens each row would be a pass of its own, so the processes would gather their layers a
    different number of times (a hang): under FSDP2 the decoder runs one pass per batch."""
    values = dict(
        COMMON,
        method="dpo",
        model=tiny_dir,
        max_steps=4,
        save_steps=2,
        decoder_pass_tokens=16,
        data=write_pairs(tmp_path / "pairs.jsonl", rows=15),
    )
    two, one = tmp_path / "two", tmp_path / "one"
    output = two_sharded(dict(values, reference_cache_dir=tmp_path / "c2"), two, 2, tmp_path)
    assert "FSDP2: 2 LlamaDecoderLayer units + root over 2 processes" in output
    assert "scoring LlamaForCausalLM with full logits" not in output  # the chunked head ran
    one_process(dict(values, reference_cache_dir=str(tmp_path / "c1")), one, 4)
    train_records = assert_same_losses(two, one, ("loss", "logps/chosen", "rewards/margins"))
    assert train_records[-1]["loss"] < train_records[0]["loss"] - 0.01  # it trained
    # The reference table was scored by the sharded policy on its chunked path.
    two_table, one_table = cached_table(tmp_path / "c2", 15), cached_table(tmp_path / "c1", 15)
    torch.testing.assert_close(two_table["logps"], one_table["logps"], atol=1e-5, rtol=0)
    assert_same_weights(two / "final" / "model.safetensors", one / "final" / "model.safetensors")
    AutoModelForCausalLM.from_pretrained(str(two / "final"))  # gathered, plain checkpoint
    step = two / "checkpoints" / "step-4"
    assert (step / "sharded" / ".metadata").exists()  # torch.distributed.checkpoint
    assert sorted(p.name for p in step.glob("sharded/*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]


def test_tdpo2_with_a_separate_sharded_reference_equals_one_process(tiny_dir, tmp_path):
    """TDPO2 without LoRA: the frozen reference model is sharded as well (forward only)."""
    values = dict(
        COMMON,
        method="tdpo2",
        model=tiny_dir,
        max_steps=3,
        data=write_pairs(tmp_path / "pairs.jsonl", rows=12),
    )
    output = two_sharded(values, tmp_path / "two", 2, tmp_path)
    assert "reference: model" in output
    assert output.count("LlamaDecoderLayer units + root") == 4  # policy and reference, 2 each
    one_process(values, tmp_path / "one", 4)
    assert_same_losses(tmp_path / "two", tmp_path / "one", ("loss", "kl/chosen", "kl/rejected"))
    final = "final/model.safetensors"
    assert_same_weights(tmp_path / "two" / final, tmp_path / "one" / final)


def test_tdpo2_lora_sharded_saves_adapters_equal_to_one_process(tiny_dir, tmp_path):
    values = dict(
        COMMON,
        method="tdpo2",
        model=tiny_dir,
        max_steps=3,
        lora=True,
        lora_r=4,
        lora_target_modules="q_proj,v_proj",
        merge_lora=True,
        data=write_pairs(tmp_path / "pairs.jsonl", rows=12),
    )
    output = two_sharded(values, tmp_path / "two", 2, tmp_path)
    assert "reference: adapter" in output
    one_process(values, tmp_path / "one", 4)
    assert_same_losses(tmp_path / "two", tmp_path / "one", ("loss", "kl/chosen"))
    adapters = "final/adapter_model.safetensors"
    assert_same_weights(tmp_path / "two" / adapters, tmp_path / "one" / adapters)
    assert not (tmp_path / "two" / "final" / "model.safetensors").exists()  # adapters only
    merged = "final-merged/model.safetensors"
    assert_same_weights(tmp_path / "two" / merged, tmp_path / "one" / merged)


def test_kto_sharded_equals_one_process(tiny_dir, tmp_path):
    values = dict(
        COMMON,
        method="kto",
        model=tiny_dir,
        max_steps=3,
        data=write_unpaired(tmp_path / "unpaired.jsonl", rows=16),
    )
    two_sharded(values, tmp_path / "two", 2, tmp_path)
    one_process(values, tmp_path / "one", 4)
    assert_same_losses(tmp_path / "two", tmp_path / "one", ("loss", "kl/mismatched"))
    final = "final/model.safetensors"
    assert_same_weights(tmp_path / "two" / final, tmp_path / "one" / final)


def test_spin_iteration_sharded_equals_one_process(tiny_dir, tmp_path):
    values = dict(
        COMMON,
        method="spin",
        model=tiny_dir,
        iterations=1,
        temperature=1.0,
        max_new_tokens=6,
        generation_batch_size=2,
        max_steps=2,
        data=write_sft(tmp_path / "sft.jsonl", rows=12),
    )
    two_sharded(values, tmp_path / "two", 2, tmp_path)
    one_process(values, tmp_path / "one", 4)
    expected = train_losses(tmp_path / "one" / "iter-0")
    assert len(expected) == 2
    assert train_losses(tmp_path / "two" / "iter-0") == pytest.approx(expected, rel=1e-5, abs=1e-6)
    final = "iter-0/final/model.safetensors"
    assert_same_weights(tmp_path / "two" / final, tmp_path / "one" / final)


# ---- sharded checkpoints: kill -9, resume ------------------------------------------------------


def logged_steps(metrics: Path) -> int:
    steps = 0
    for line in metrics.read_text().splitlines() if metrics.exists() else []:
        try:
            steps = max(steps, json.loads(line)["step"])
        except (json.JSONDecodeError, KeyError):
            continue  # the line being written right now
    return steps


def kill_tree(pid: int) -> None:
    """SIGKILL a torchrun launcher and every process under it. torch 2.13 starts each worker in
    a session of its own (``start_new_session``), so killing the launcher's process group would
    leave the workers training on."""
    try:
        launcher = psutil.Process(pid)
        processes = [*launcher.children(recursive=True), launcher]
    except psutil.NoSuchProcess:
        return
    for process in processes:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.send_signal(signal.SIGKILL)
    _, alive = psutil.wait_procs(processes[:-1], timeout=30)  # the launcher is proc.wait()ed
    assert not alive, f"still running after SIGKILL: {alive}"


def test_sigkill_of_a_sharded_run_then_resume_equals_an_uninterrupted_run(tiny_dir, tmp_path):
    values = dict(
        COMMON,
        method="dpo",
        model=tiny_dir,
        max_steps=8,
        save_steps=1,
        data=write_pairs(tmp_path / "pairs.jsonl", rows=32),
        reference_cache_dir=tmp_path / "cache",
    )
    run_dir = tmp_path / "killed"
    args = cli_args(dict(values, **SHARDED, output_dir=run_dir, batch_size=2))
    command = torchrun_command(2, free_port(), args)
    log = (tmp_path / "killed.log").open("w")
    proc = subprocess.Popen(
        command, env=child_env(tmp_path), cwd=REPO, stdout=log, stderr=log, start_new_session=True
    )
    deadline = time.monotonic() + 240
    try:
        while logged_steps(run_dir / "metrics.jsonl") < 3:
            assert proc.poll() is None, (tmp_path / "killed.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the run never reached step 3"
            time.sleep(0.01)
        kill_tree(proc.pid)  # the launcher and both workers, no cleanup
    finally:
        if proc.poll() is None:
            kill_tree(proc.pid)
        proc.wait(timeout=60)
        log.close()
    logged = logged_steps(run_dir / "metrics.jsonl")
    time.sleep(2)  # nothing trains on: the workers are gone, not only the launcher
    assert logged_steps(run_dir / "metrics.jsonl") == logged
    assert not (run_dir / "final").exists()
    assert 3 <= logged < 8

    command = torchrun_command(2, free_port(), [*args, "--resume"])
    assert "resumed from" in run(command, child_env(tmp_path), timeout=300)
    one_process(values, tmp_path / "one", 4)
    assert_same_losses(run_dir, tmp_path / "one")
    final = "final/model.safetensors"
    assert_same_weights(run_dir / final, tmp_path / "one" / final)


def test_a_checkpoint_of_the_other_layout_is_refused_in_one_line(tmp_path):
    """A sharded checkpoint (FSDP2's ``sharded/``) resumed unsharded, e.g. on 1 process with
    resume=force, used to fail looking for pytorch_model.bin; and the other way round."""
    sharded, whole = tmp_path / "step-2", tmp_path / "step-3"
    (sharded / "sharded").mkdir(parents=True)
    whole.mkdir()
    check_layout(sharded, True)
    check_layout(whole, False)
    with pytest.raises(ConfigError, match=r"holds sharded .* this run is unsharded"):
        check_layout(sharded, False)
    with pytest.raises(ConfigError, match=r"holds unsharded .* this run is sharded"):
        check_layout(whole, True)
