"""The model card (``README.md``) written next to a trained model: how to load it, how it was
trained (the full config), the final metrics and what the data layer skipped."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import yaml

from snpo.configuration import config_to_dict
from snpo.methods import UsageContext, get_method

CARD_METRICS = (
    "loss", "rewards/accuracies", "rewards/margins", "rewards/chosen", "rewards/rejected",
    "logratio/chosen", "logratio/rejected", "branch/negative_fraction", "grad_norm", "lr",
    "pairs_per_second", "peak_memory_gb", "nonfinite_skipped",
)


def _format(value: Any) -> str:
    if isinstance(value, float):
        return "n/a" if not math.isfinite(value) else f"{value:.4g}"
    return str(value)


def render_model_card(config: Any, backbone: dict[str, Any], info: dict[str, Any]) -> str:
    """Markdown with YAML front matter, from the run's config, backbone and end-of-run info."""
    c = config_to_dict(config)
    files = list(info.get("files") or [])
    base = c.get("model_name_or_path", "")
    lora = c.get("lora_rank", 0) > 0
    spec = get_method(c["method"])
    tags = ["text-to-image", "diffusers", "snpo", spec.name, "lora" if lora else "full-fine-tune"]
    front = {"library_name": "diffusers", "base_model": base, "tags": list(dict.fromkeys(t for t in tags if t))}
    pipeline_class = backbone.get("pipeline_class", "DiffusionPipeline")
    usage = spec.usage(UsageContext(
        pipeline_class=pipeline_class, output_dir=str(Path(c["output_dir"]).resolve()), base=base,
        files=files, denoiser_class=backbone.get("denoiser_class", "UNet2DConditionModel"),
        denoiser_subfolder=backbone.get("denoiser_subfolder", "unet"),
    ))
    denoiser = backbone.get("denoiser_subfolder", "unet")
    denoiser = "UNet" if denoiser == "unet" else denoiser
    metrics = info.get("final_metrics") or {}
    data = info.get("data") or {}
    lines = [
        "---", yaml.safe_dump(front, sort_keys=False).strip(), "---", "",
        f"# {base} aligned with {spec.title}", "",
        f"{'LoRA (rank ' + str(c['lora_rank']) + ')' if lora else 'Full fine-tune of the ' + denoiser} of "
        f"`{base}` ({backbone.get('family', '?')} family, {backbone.get('prediction_type', '?')} prediction), "
        f"trained with `snpo train` for {info.get('global_step', c.get('max_steps'))} steps on "
        f"`{c.get('dataset_name') or c.get('cache_dir')}`.", "",
        "## Use it", "", f"```{spec.usage_language}", usage, "```", "",
        "## Final metrics", "", "| metric | value |", "| --- | --- |",
    ]
    lines += [f"| `{k}` | {_format(metrics[k])} |" for k in CARD_METRICS if k in metrics]
    if data:
        lines += ["", "## Data", "", data.get("summary", "") or json.dumps(data)]
        counts = data.get("counts") or {}
        if counts:  # every skipped row, per kind: nothing is dropped silently
            lines += ["", "| skipped | count |", "| --- | --- |"]
            lines += [f"| `{kind}` | {n} |" for kind, n in counts.items()]
    lines += ["", "## Training config", "", "```yaml", yaml.safe_dump(c, sort_keys=False).strip(), "```", ""]
    return "\n".join(lines)


def write_model_card(output_dir: str | Path, config: Any, backbone: dict[str, Any], info: dict[str, Any]) -> Path:
    path = Path(output_dir) / "README.md"
    path.write_text(render_model_card(config, backbone, info))
    return path
