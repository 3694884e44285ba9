"""The model card (``README.md``) written next to a trained model: how to load it, how it was
trained (the full config), the final metrics and what the data layer skipped."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import yaml

from snpo.configuration import config_to_dict

TITLES = {
    "snpo": "Diff-SNPO", "snpo-naive": "naive Diff-SNPO", "dpo": "Diffusion-DPO",
    "bdpo": "Diff-BDPO", "sft": "supervised fine-tuning on the chosen images",
}
CARD_METRICS = (
    "loss", "rewards/accuracies", "rewards/margins", "rewards/chosen", "rewards/rejected",
    "logratio/chosen", "logratio/rejected", "branch/negative_fraction", "grad_norm", "lr",
    "pairs_per_second", "peak_memory_gb", "nonfinite_skipped",
)


METHOD_TITLES = {
    "npo-negative": "Diff-NPO's negative model (dpo on reversed labels)",
    "chats": "CHATS (win and lose networks)",
}


def _usage(pipeline_class: str, output_dir: str, base: str, files: list[str], method: str) -> str:
    if method == "chats":
        return (f"# both networks, CHATS' proxy-prompt guidance (snpo.methods.chats.chats_guide)\n"
                f"snpo sample --model_name_or_path {base} --chats {output_dir} --prompts PROMPTS.txt")
    if method == "npo-negative":
        return (f"# Diff-NPO: the positive run on the prompt, this network (merged with it, as\n"
                f"# Diff-NPO does) on the null branch\n"
                f"snpo sample --model_name_or_path {base} --lora POSITIVE_RUN "
                f"--npo_negative {output_dir} --prompts PROMPTS.txt\n"
                f"# the merged weights themselves:\n"
                f"snpo merge --reference {base} --positive POSITIVE_RUN --negative {output_dir}")
    if "pytorch_lora_weights.safetensors" in files:
        return (
            f"import torch\nfrom diffusers import {pipeline_class}\n\n"
            f"pipe = {pipeline_class}.from_pretrained({base!r})\n"
            f"pipe.load_lora_weights({output_dir!r})\n"
            'image = pipe("a photo of a cat", guidance_scale=7.5).images[0]'
        )
    if "unet" in files:
        return (
            f"from diffusers import {pipeline_class}, UNet2DConditionModel\n\n"
            f"unet = UNet2DConditionModel.from_pretrained({output_dir!r}, subfolder=\"unet\")\n"
            f"pipe = {pipeline_class}.from_pretrained({base!r}, unet=unet)\n"
            'image = pipe("a photo of a cat", guidance_scale=7.5).images[0]'
        )
    return f"# files written: {', '.join(files)}"


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
    tags = ["text-to-image", "diffusers", "snpo", c.get("objective", ""),
            "" if c.get("method", "single") == "single" else c["method"], "lora" if lora else "full-fine-tune"]
    front = {"library_name": "diffusers", "base_model": base, "tags": list(dict.fromkeys(t for t in tags if t))}
    method = c.get("method", "single")
    title = METHOD_TITLES.get(method) or TITLES.get(c.get("objective", ""), c.get("objective", ""))
    pipeline_class = backbone.get("pipeline_class", "DiffusionPipeline")
    metrics = info.get("final_metrics") or {}
    data = info.get("data") or {}
    lines = [
        "---", yaml.safe_dump(front, sort_keys=False).strip(), "---", "",
        f"# {base} aligned with {title}", "",
        f"{'LoRA (rank ' + str(c['lora_rank']) + ')' if lora else 'Full fine-tune of the UNet'} of "
        f"`{base}` ({backbone.get('family', '?')} family, {backbone.get('prediction_type', '?')} prediction), "
        f"trained with `snpo train` for {info.get('global_step', c.get('max_steps'))} steps on "
        f"`{c.get('dataset_name') or c.get('cache_dir')}`.", "",
        "## Use it", "", "```bash" if method in METHOD_TITLES else "```python", _usage(pipeline_class, str(Path(c["output_dir"]).resolve()), base, files, method),
        "```", "",
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
