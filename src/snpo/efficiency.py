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
- CHATS: win + lose + reference in ONE training run; win + lose while sampling;
- MaPO (reference-free): the policy alone, while training and sampling.

Count outside a ``with backbone.reference()`` block: peft switches ``requires_grad`` off on
adapters while they are disabled, so trainable counts read inside it would be zero.
"""

from __future__ import annotations

from collections.abc import Sequence
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


def method_footprint(method: str, trained: Sequence[nn.Module], reference: nn.Module,
                     *, label: str | None = None) -> Footprint:
    """What one training run of the registered ``method`` holds and trains: the networks it
    trains (``trained``, as many as ``spec.trained_networks``) and the frozen reference (a
    copy, or the adapters-off policy). Sampling evaluates ``spec.sampling_networks``."""
    from snpo.methods import get_method

    spec = get_method(method)
    if len(trained) != len(spec.trained_networks):
        raise ValueError(f"{method} trains {len(spec.trained_networks)} network(s), got {len(trained)}")
    return Footprint(
        method=label or method,
        trainable=count_parameters(*trained, trainable_only=True),
        # a reference-free method (MaPO: ``extra["reference"] = False``) holds no reference
        training_resident=count_parameters(*trained, *([reference] if spec.extra.get("reference", True) else [])),
        sampling_resident=count_parameters(*trained),
        training_runs=1,
        sampling_networks=spec.sampling_networks,
    )


def single_network_footprint(
    policy: nn.Module, reference: nn.Module, method: str = "snpo"
) -> Footprint:
    """One trained network against a frozen reference (a copy, or the adapters-off policy)."""
    return method_footprint("snpo", [policy], reference, label=method)


def npo_footprint(
    positive_run: Footprint,
    negative_run: Footprint,
    positive: nn.Module,
    merged_negative: nn.Module,
) -> Footprint:
    """Diff-NPO from its two single-network training runs and its two sampling networks."""
    from snpo.methods import get_method

    return Footprint(
        method="diff-npo",
        trainable=positive_run.trainable + negative_run.trainable,
        training_resident=max(positive_run.training_resident, negative_run.training_resident),
        sampling_resident=count_parameters(positive, merged_negative),
        training_runs=positive_run.training_runs + negative_run.training_runs,
        sampling_networks=get_method("npo-negative").sampling_networks,
    )


def chats_footprint(win: nn.Module, lose: nn.Module, reference: nn.Module) -> Footprint:
    """CHATS: two trained networks and the frozen reference in one run."""
    return method_footprint("chats", [win, lose], reference)
