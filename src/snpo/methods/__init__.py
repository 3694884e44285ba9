"""Methods: how a batch of preference pairs becomes a loss, and the registry of ``method:`` names.

A new method is one file defining a ``MethodSpec`` plus one ``register_method(...)`` line
below; a new single-network method is ``register_method(single_network_method("<objective>"))``
once its objective is registered in ``snpo.objectives``.
"""

from snpo.methods.chats import CHATS
from snpo.methods.kto import KTO
from snpo.methods.mapo import MAPO
from snpo.methods.npo import NPO_NEGATIVE
from snpo.methods.registry import (
    METHODS,
    BuiltMethod,
    Method,
    MethodSpec,
    UsageContext,
    check_sampler_fits,
    get_method,
    register_method,
)
from snpo.methods.single import SingleNetworkMethod, single_network_method

register_method(single_network_method("sft"))
register_method(single_network_method("dpo"))
register_method(single_network_method("bdpo"))
register_method(single_network_method("snpo-naive"))
register_method(single_network_method("snpo"))
register_method(NPO_NEGATIVE)
register_method(CHATS)
register_method(KTO)  # beyond the paper: Diffusion-KTO (unpaired feedback)
register_method(MAPO)  # beyond the paper: MaPO (reference-free)

__all__ = [
    "METHODS",
    "BuiltMethod",
    "Method",
    "MethodSpec",
    "SingleNetworkMethod",
    "UsageContext",
    "check_sampler_fits",
    "get_method",
    "register_method",
    "single_network_method",
]
