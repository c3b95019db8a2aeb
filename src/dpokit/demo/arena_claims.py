"""The arena's checks of the catalogue methods' claims (APO, MPO, DiscoPOP, ORPO/CPO), each a
sentence with its measured numbers; :func:`dpokit.demo.arena.claim_sentences` appends them."""

from __future__ import annotations

from collections.abc import Callable

# The combined row the arena runs: MPO's published mix (Wang et al. 2024, arXiv:2411.10442).
MPO_RUN = "combined (MPO: 0.8 dpo + 0.2 bco_pair + 1 sft)"
MPO_SETTINGS = {"losses": "dpo,bco_pair,sft", "loss_weights": "0.8,0.2,1.0"}
NAMED_RUNS = {"combined": (MPO_RUN, MPO_SETTINGS)}


def _holds(holds: bool) -> str:
    return "holds" if holds else "does NOT hold"


def catalogue_claims(names: set[str], mean: Callable[[str, str], float]) -> list[str]:
    """Sentences for the claims whose runs are in ``names``; ``mean(run, metric)`` over seeds."""
    sentences = []
    if {"apo_zero", "apo_down"} <= names:
        zero, down = mean("apo_zero", "chosen_logp_change"), mean("apo_down", "chosen_logp_change")
        sentences.append(
            f"APO-zero vs APO-down, chosen log-prob change on held-out pairs: {zero:+.3f} vs "
            f"{down:+.3f} -- the design (zero raises the chosen answers' likelihood, down lowers "
            f"it) {_holds(zero > 0 > down)} here."
        )
    for name, claim in (
        (MPO_RUN, "MPO (DPO + BCO + SFT) beats DPO alone"),
        ("discopop", "DiscoPOP beats DPO"),
        ("cdpo", "cDPO matches DPO on clean labels"),
    ):
        if {"dpo", name} <= names:
            gain, dpo = mean(name, "judge_reward"), mean("dpo", "judge_reward")
            holds = abs(gain - dpo) < 0.05 if name == "cdpo" else gain > dpo
            sentences.append(
                f"{claim}: judge reward {gain:.3f} vs {dpo:.3f} (DPO) -- {_holds(holds)} here."
            )
    for name in ("orpo", "cpo", "cpo_simpo"):
        if name in names:
            sentences.append(
                f"{name} trains with no reference model (an NLL term in place of the SFT "
                f"stage): judge reward {mean(name, 'judge_reward'):.3f}, KL "
                f"{mean(name, 'kl'):.3f}."
            )
    return sentences


__all__ = ["MPO_RUN", "MPO_SETTINGS", "NAMED_RUNS", "catalogue_claims"]
