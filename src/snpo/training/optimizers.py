"""The optimizers of ``optimizer:``: AdamW (torch; ``adam_implementation`` picks its kernel),
Adafactor (transformers; what the Diffusion-DPO code uses for SDXL full fine-tunes: factored
second moments and no first moment, so almost no optimizer state) and 8-bit AdamW
(bitsandbytes: both moments in 8 bits, 2 bytes a parameter instead of 8).

Bytes of optimizer state per trained parameter (float32 weights): AdamW 8, 8-bit AdamW about
2, Adafactor about 0 (one row and one column vector per matrix). BENCHMARKS.md measures them.
"""

from __future__ import annotations

import importlib.util
from typing import Any

import torch
from torch import nn

from snpo.errors import ConfigError

ADAM_FLAGS = {"fused": {"fused": True}, "foreach": {"foreach": True},
              "forloop": {"foreach": False, "fused": False}}
BITSANDBYTES_HINT = "pip install bitsandbytes (or 'snpo[memory]')"


def check_optimizer_available(config: Any) -> None:
    """One line naming ``optimizer`` when its package cannot be imported (before any load)."""
    if config.optimizer != "adamw8bit":
        return
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError(f"optimizer: adamw8bit needs bitsandbytes, which is not installed ({BITSANDBYTES_HINT}); "
                          "or use optimizer: adafactor")
    try:
        import bitsandbytes  # noqa: F401
    except Exception as exc:  # installed but broken on this machine (no kernels for its device)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"optimizer: adamw8bit: bitsandbytes does not load here ({first}); "
                          "use optimizer: adamw or adafactor") from None


def make_optimizer(config: Any, params: list[nn.Parameter], lr: float) -> torch.optim.Optimizer:
    """The optimizer of ``config.optimizer`` over ``params`` at rate ``lr``: AdamW and 8-bit
    AdamW take the ``adam_*`` keys; Adafactor takes ``adam_weight_decay`` and runs without a
    first moment (``beta1=None``), as in the Diffusion-DPO code."""
    c = config
    if c.optimizer == "adafactor":
        from transformers.optimization import Adafactor

        # Diffusion-DPO's SDXL settings: a fixed learning rate, no parameter scaling, no warm-up init
        return Adafactor(params, lr=lr, scale_parameter=False, relative_step=False, warmup_init=False,
                         weight_decay=c.adam_weight_decay)
    kwargs: dict[str, Any] = dict(lr=lr, betas=(c.adam_beta1, c.adam_beta2), weight_decay=c.adam_weight_decay,
                                  eps=c.adam_epsilon)
    if c.optimizer == "adamw8bit":
        check_optimizer_available(c)
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, **kwargs)
    # fused AdamW: 5x faster than the for-loop one on CPU for LoRA, 3.6x for a full UNet
    # (BENCHMARKS.md); devices without a fused kernel take the default implementation
    try:
        return torch.optim.AdamW(params, **ADAM_FLAGS[c.adam_implementation], **kwargs)
    except (RuntimeError, ValueError):
        return torch.optim.AdamW(params, **kwargs)
