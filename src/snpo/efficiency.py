"""Parameter accounting for the paper's efficiency comparison (its Table 4), per method.

Counts cover the denoisers only (text encoders and VAE are the same for every method). A
parameter shared by two modules is counted once, so a LoRA policy whose reference is the same
network with adapters off costs base + adapters, while a full fine-tune's frozen reference
copy costs a second network.

- single network (Diff-DPO, BDPO, SNPO, SFT): policy + reference while training; the policy
  alone while sampling (one batched forward per denoising step);
- Diff-NPO: two training runs (positive, then negative on reversed labels), each a single-
  network run; the positive model and the merged negative model while sampling (two
  networks per step);
- CHATS: win + lose + reference in ONE training run; win + lose while sampling.

Count outside a ``with backbone.reference()`` block: peft switches ``requires_grad`` off on
adapters while they are disabled, so trainable counts read inside it would be zero.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class Footprint:
    """What one method holds and trains (denoiser parameters)."""

    method: str
    trainable: int  # updated by an optimizer, summed over the method's training runs
    training_resident: int  # held in memory by one training run (the largest, if several)
    sampling_resident: int  # held in memory while sampling
    training_runs: int  # separate training runs the method needs
    sampling_networks: int  # distinct networks evaluated per denoising step


def count_parameters(*modules: nn.Module, trainable_only: bool = False) -> int:
    """Number of distinct parameters (by identity) in ``modules``."""
    seen: dict[int, int] = {}
    for module in modules:
        for p in module.parameters():
            if not trainable_only or p.requires_grad:
                seen[id(p)] = p.numel()
    return sum(seen.values())


def single_network_footprint(
    policy: nn.Module, reference: nn.Module, method: str = "snpo"
) -> Footprint:
    """One trained network against a frozen reference (a copy, or the adapters-off policy)."""
    return Footprint(
        method=method,
        trainable=count_parameters(policy, trainable_only=True),
        training_resident=count_parameters(policy, reference),
        sampling_resident=count_parameters(policy),
        training_runs=1,
        sampling_networks=1,
    )


def npo_footprint(
    positive_run: Footprint,
    negative_run: Footprint,
    positive: nn.Module,
    merged_negative: nn.Module,
) -> Footprint:
    """Diff-NPO from its two single-network training runs and its two sampling networks."""
    return Footprint(
        method="diff-npo",
        trainable=positive_run.trainable + negative_run.trainable,
        training_resident=max(positive_run.training_resident, negative_run.training_resident),
        sampling_resident=count_parameters(positive, merged_negative),
        training_runs=positive_run.training_runs + negative_run.training_runs,
        sampling_networks=2,
    )


def chats_footprint(win: nn.Module, lose: nn.Module, reference: nn.Module) -> Footprint:
    """CHATS: two trained networks and the frozen reference in one run."""
    return Footprint(
        method="chats",
        trainable=count_parameters(win, lose, trainable_only=True),
        training_resident=count_parameters(win, lose, reference),
        sampling_resident=count_parameters(win, lose),
        training_runs=1,
        sampling_networks=2,
    )
