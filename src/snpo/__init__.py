"""snpo: preference alignment for text-to-image diffusion models.

The flagship method is Diff-SNPO (single-network negative preference optimisation): the
classifier-free-guidance null branch is trained on reversed preferences, with a bounded
(Bounded-DPO) loser term. See ``docs/method.md`` for the exact math.
"""

__version__ = "0.1.0"
