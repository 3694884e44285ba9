"""What a user watches during a run, wired into ``build_job``: validation images
(``snpo.training.validation``), the live collapse signal (``snpo.training.collapse``) and
sharing the result (``snpo.training.hub``).

    watch = RunWatch(config)                     # before the data scan: reads the prompt file
    callbacks = watch.callbacks(backbone, ...)   # once the model is loaded
    info = {**info, **watch.card_info(out)}      # the model card shows the grids and curves
    watch.after_save(out, info)                  # push_to_hub, once weights and card are written

Nothing is added when the keys are off, except the training-curves plot and the collapse
note at checkpoints (cheap; ``collapse_patience: 0`` silences the note).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from snpo.training.trainer import Callback


class RunWatch:
    def __init__(self, config: Any) -> None:
        from snpo.training.validation import validation_prompt_list

        self.config = config
        self.prompts = validation_prompt_list(config)
        self.hub: Any = None

    def callbacks(self, backbone: Any, *, write_logs: bool = True, save_model: bool = True) -> list[Callback]:
        """Hub repository first (a bad token stops before anything is drawn), then the
        validation images, then the curves; none of them when the run writes no logs."""
        from snpo.training.collapse import CollapseWatch
        from snpo.training.hub import HubRepo
        from snpo.training.validation import ValidationImages

        out: list[Callback] = []
        if self.config.push_to_hub and save_model:
            self.hub = HubRepo(self.config)
            out.append(self.hub)
        if not write_logs:
            return out
        if self.prompts:
            out.append(ValidationImages(self.config, backbone, self.prompts))
        out.append(CollapseWatch(self.config))
        return out

    def card_info(self, output_dir: str | Path) -> dict[str, Any]:
        """The validation grids, the curves and the hub repository, for the model card."""
        from snpo.training.collapse import CURVES_FILE
        from snpo.training.validation import validation_card_info

        info: dict[str, Any] = {}
        validation = validation_card_info(output_dir) if self.prompts else None
        if validation:
            info["validation"] = validation
        if (Path(output_dir) / CURVES_FILE).is_file():
            info["training_curves"] = CURVES_FILE
        if self.hub is not None and self.hub.repo_id:
            info["hub_model_id"] = self.hub.repo_id
        return info

    def after_save(self, output_dir: str | Path, info: dict[str, Any]) -> None:
        """``push_to_hub`` (main process, after the weights and the card are written)."""
        if self.hub is not None:
            self.hub.push(output_dir, info)
