"""The model card (``README.md``) written next to a trained model: how to load it, how it was
trained (the full config), the final metrics and what the data layer skipped."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import yaml

from snpo.configuration import config_to_dict
from snpo.files import is_hub_id
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


def base_license(base: str) -> str | None:
    """The ``license`` of a local base model's own card (YAML front matter), if it has one."""
    path = Path(str(base)).expanduser() / "README.md"
    if not base or not path.is_file():
        return None
    text = path.read_text(errors="replace")
    end = text.find("\n---", 3)
    if not text.startswith("---") or end < 0:
        return None
    try:
        meta = yaml.safe_load(text[3:end])
    except yaml.YAMLError:
        return None
    value = meta.get("license") if isinstance(meta, dict) else None
    return str(value) if value else None


def _watch_sections(info: dict[str, Any]) -> list[str]:
    """The training curves and the validation grids (``snpo.training.watch``), as images
    relative to the card (they sit next to it, locally and on the hub)."""
    lines: list[str] = []
    if info.get("training_curves"):
        lines += ["", "## Training curves", "",
                  "`logratio/chosen` and `logratio/rejected` (with the chosen one per checkpoint), "
                  "`rewards/margins` and the accuracy per branch; a falling `logratio/chosen` is the "
                  "collapse signal.", "", f"![training curves]({info['training_curves']})"]
    validation = info.get("validation")
    if validation:
        settings = validation.get("settings") or {}
        prompts = validation.get("prompts") or []
        grids = validation.get("grids") or []
        seeds = ", ".join(map(str, validation.get("seeds") or []))
        reference = "; step 0 is before any update (the reference)" if grids and grids[0][0] == 0 else ""
        lines += ["", "## Validation images", "",
                  f"One row per prompt, one column per seed ({seeds}); {settings.get('scheduler', '?')}, "
                  f"{settings.get('num_inference_steps', '?')} steps, guidance {settings.get('guidance_scale', '?')}, "
                  f"guide `{settings.get('guide', '?')}`{reference}.", ""]
        lines += [f"{i + 1}. {p}" for i, p in enumerate(prompts)]
        for step, path in grids:
            lines += ["", f"![validation images, step {step}]({path})"]
        for step, path in validation.get("null_grids") or []:
            lines += ["", f"Null branch alone (guidance 0), step {step}:", "", f"![null branch, step {step}]({path})"]
    return lines


def _flow_sampling_note(backbone: dict[str, Any]) -> list[str]:
    """How a flow model must be sampled to match its training: T5 length, FLUX guidance."""
    if "max_sequence_length" not in backbone:
        return []
    note = f"Sample with `max_sequence_length={backbone['max_sequence_length']}` (the T5 length it was trained with)"
    if backbone.get("true_cfg"):
        note += (", true CFG on the empty prompt (`negative_prompt=\"\"`, `true_cfg_scale` > 1: the null "
                 "branch it was trained for)")
    if backbone.get("guidance_distilled"):
        note += f" and `guidance_scale={backbone.get('embedded_guidance_scale')}` (its embedded guidance)"
    return [note + ".", ""]


def render_model_card(config: Any, backbone: dict[str, Any], info: dict[str, Any]) -> str:
    """Markdown with YAML front matter, from the run's config, backbone and end-of-run info."""
    c = config_to_dict(config)
    files = list(info.get("files") or [])
    base = c.get("model_name_or_path", "")
    lora = c.get("lora_rank", 0) > 0
    spec = get_method(c["method"])
    tags = ["text-to-image", "diffusers", "diffusers-training", "snpo", spec.name, "lora" if lora else "full-fine-tune"]
    front = {"library_name": "diffusers", "base_model": base, "tags": list(dict.fromkeys(t for t in tags if t))}
    license_ = info.get("license") or base_license(base)  # the base model's, when its card says
    if license_:
        front["license"] = license_
    if c.get("dataset_name") and is_hub_id(c["dataset_name"]):
        front["datasets"] = [c["dataset_name"]]
    pipeline_class = backbone.get("pipeline_class", "DiffusionPipeline")
    usage = spec.usage(UsageContext(
        pipeline_class=pipeline_class, base=base,
        # pushed to the hub: diffusers' loaders read the repository id (snpo's commands a folder)
        output_dir=(info.get("hub_model_id") if spec.usage_language == "python" else None)
        or str(Path(c["output_dir"]).resolve()),
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
        *_flow_sampling_note(backbone),
        "## Final metrics", "", "| metric | value |", "| --- | --- |",
    ]
    lines += [f"| `{k}` | {_format(metrics[k])} |" for k in CARD_METRICS if k in metrics]
    lines += _watch_sections(info)
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
