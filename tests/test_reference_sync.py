"""TR-DPO (sync_ref_model): the reference after k steps equals the mix computed by hand from the
saved policy and reference tensors, full model and LoRA (second adapter); the pre-computed
reference refused or switched; resume == uninterrupted. Plus the options end to end: the first
loss with nll_weight / use_weighting / ld_alpha on a tiny model."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file

from dpokit import train
from dpokit.config import ConfigError
from dpokit.engine import Trainer
from dpokit.logprobs import scorer_kwargs
from dpokit.reference import FrozenReference
from dpokit.reference_sync import SyncedAdapterReference
from helpers import make_config
from test_engine import losses_of, write_pairs

ALPHA = 0.3


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory):
    return write_pairs(tmp_path_factory.mktemp("data") / "pairs.jsonl", rows=16)


def _params(module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters()}


def test_full_model_reference_is_the_hand_mixed_weights(tiny_dir, pairs_file, tmp_path):
    config = make_config(
        tiny_dir,
        pairs_file,
        tmp_path,
        max_steps=3,
        sync_ref_model=True,
        ref_model_mixup_alpha=ALPHA,
        ref_model_sync_steps=2,
    )
    trainer = Trainer(config)
    assert trainer.reference_mode == "model"  # auto would have pre-computed
    reference = trainer.references["train"]
    assert isinstance(reference, FrozenReference)
    ref0 = _params(reference.scorer.model)
    policy = trainer.accelerator.unwrap_model(trainer.policy).model
    snapshots = {}
    original = trainer.reference_sync.after_step

    def spy(step):
        snapshots[step] = _params(policy)  # the policy right after optimizer step `step`
        return original(step)

    trainer.reference_sync.after_step = spy
    result = trainer.train()
    # Synced once, at step 2: ref = ALPHA * policy_2 + (1 - ALPHA) * ref_0; step 3 leaves it.
    ref = _params(reference.scorer.model)
    for name, value in ref.items():
        want = ALPHA * snapshots[2][name] + (1 - ALPHA) * ref0[name]
        torch.testing.assert_close(value, want, atol=1e-6, rtol=0)
    assert trainer.reference_sync.syncs == 1
    assert not torch.equal(snapshots[3]["lm_head.weight"], snapshots[2]["lm_head.weight"])
    assert losses_of(result.history)[0] == pytest.approx(math.log(2), abs=1e-5)


def test_precomputed_reference_is_refused(tiny_dir, pairs_file, tmp_path):
    config = make_config(
        tiny_dir, pairs_file, tmp_path, sync_ref_model=True, reference_mode="precomputed"
    )
    with pytest.raises(ConfigError, match="stale"):
        Trainer(config)


def test_lora_reference_is_a_second_adapter_mixed_by_hand(tiny_dir, pairs_file, tmp_path):
    config = make_config(
        tiny_dir,
        pairs_file,
        tmp_path,
        max_steps=2,
        lora=True,
        lora_r=4,
        lora_target_modules="q_proj,v_proj",
        sync_ref_model=True,
        ref_model_mixup_alpha=ALPHA,
        ref_model_sync_steps=2,
    )
    trainer = Trainer(config)
    assert trainer.reference_mode == "adapter"
    assert isinstance(trainer.references["train"], SyncedAdapterReference)
    model = trainer.accelerator.unwrap_model(trainer.policy).model
    before = _params(model)
    result = trainer.train()
    after = _params(model)
    adapter = [n for n in after if ".reference." in n]
    assert adapter
    for name in adapter:
        policy_name = name.replace(".reference.", ".default.")
        want = ALPHA * after[policy_name] + (1 - ALPHA) * before[name]
        torch.testing.assert_close(after[name], want, atol=1e-6, rtol=0)
        assert torch.equal(before[name], before[policy_name])  # started as the policy's
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".default." in n for n in trainable)
    assert losses_of(result.history)[0] == pytest.approx(math.log(2), abs=1e-5)
    # The synced reference scores as the policy with the mixed adapter would: compare with a
    # policy whose adapter is set to the reference's factors.
    batch = next(iter(trainer.train_loader))
    ref_logps = trainer.references["train"].score(batch).logps
    with torch.no_grad():
        for name in adapter:
            dict(model.named_parameters())[name.replace(".reference.", ".default.")].copy_(
                after[name]
            )
        trainer.policy.eval()
        inputs = (batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
        mixed = trainer.policy(*inputs, **scorer_kwargs(batch)).logps
    torch.testing.assert_close(ref_logps, mixed, atol=1e-5, rtol=0)


def test_resume_equals_uninterrupted(tiny_dir, pairs_file, tmp_path):
    common = dict(sync_ref_model=True, ref_model_mixup_alpha=0.5, ref_model_sync_steps=2)
    full = train(make_config(tiny_dir, pairs_file, tmp_path / "full", max_steps=5, **common))

    def make(**kw):
        return make_config(tiny_dir, pairs_file, tmp_path / "split", save_steps=3, **common, **kw)

    train(make(max_steps=3))
    resumed = train(make(max_steps=5, resume=True))
    assert losses_of(resumed.history) == pytest.approx(losses_of(full.history)[3:], rel=1e-6)
    a = load_file(str(full.final_dir / "model.safetensors"))
    b = load_file(str(resumed.final_dir / "model.safetensors"))
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-6, rtol=0)


# ---- the options end to end -------------------------------------------------------------------


def _first_batch_terms(trainer):
    """Per-pair plain chosen NLL per token and WPO weights of the first batch, by full logits."""
    batch = next(iter(trainer.train_loader))
    model = trainer.accelerator.unwrap_model(trainer.policy).model
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logits = logits[:, :-1].float()
    mask = (batch["completion_mask"] & batch["attention_mask"].bool())[:, 1:]
    logp = logits.log_softmax(-1).gather(2, batch["input_ids"][:, 1:, None]).squeeze(2)
    aligned = logp - torch.logsumexp(2 * logits.log_softmax(-1), dim=-1)
    sums = (logp * mask).sum(1)
    counts = mask.sum(1)
    pairs = len(batch["index"])
    nll = -sums[:pairs] / counts[:pairs]
    mean_aligned = (aligned * mask).sum(1) / counts
    weights = torch.exp(mean_aligned[:pairs] + mean_aligned[pairs:])
    return nll, weights


@pytest.mark.parametrize(
    "options",
    [
        {"nll_weight": 0.5},
        {"use_weighting": True},
        {"ld_alpha": 0.5},
        {"ld_alpha": 0.5, "f_divergence_type": "js_divergence", "nll_weight": 1.0},
    ],
)
def test_first_loss_with_options(tiny_dir, pairs_file, tmp_path, options):
    # Pre-computed reference (auto); packing=none: one batch layout for the direct check.
    config = make_config(
        tiny_dir, pairs_file, tmp_path, max_steps=1, method_args=options, packing="none"
    )
    trainer = Trainer(config)
    nll, weights = _first_batch_terms(trainer)
    want = torch.full_like(nll, math.log(2)) + options.get("nll_weight", 0.0) * nll
    if options.get("use_weighting"):
        want = want * weights
    result = trainer.train()
    assert losses_of(result.history)[0] == pytest.approx(float(want.mean()), abs=1e-5)
