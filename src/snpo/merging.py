"""Diff-NPO weight merging, on full weights and on LoRA adapters.

The network Diff-NPO uses on the null branch at sampling time (its "negative model"; snpo
calls it the merged NPO model, since "negative" names the null-branch label) is
(docs/method.md, the Diff-NPO merge)::

    theta_merged = theta_ref + a (theta_pos - theta_ref) + b (theta_npo - theta_ref)

``theta_pos`` is the positively aligned model (e.g. Diff-DPO), ``theta_npo`` the model trained
on reversed preferences; the public Diff-NPO code builds ``(1 - w) theta_pos + w theta_ref``
and fuses the NPO LoRA at weight 1, i.e. ``a = 1 - w`` (``w = 0`` by default) and ``b = 1``.

Every model enters as a DELTA from the reference, per weight tensor ``k``:

- full weights: ``delta[k] = theta[k] - theta_ref[k]``;
- a LoRA adapter: ``delta[k] = scale * B @ A`` for each adapted weight, zero elsewhere, with
  ``scale = lora_alpha / r`` (``/ sqrt(r)`` with rsLoRA). The merge must act on these
  products, never on ``A`` and ``B`` separately: ``(a B1 + b B2)(a A1 + b A2)`` is not
  ``a B1 A1 + b B2 A2``. The sum of two rank-r deltas has rank up to 2r, so the result is
  always a FULL-WEIGHT state dict (a merged LoRA of the same rank would be wrong).

A LoRA's scale comes from, in order: the ``scale`` argument; per-module ``.alpha`` tensors
(kohya/diffusers "network alphas": ``alpha / r``); the ``lora_adapter_metadata`` that
diffusers writes into the safetensors header (``lora_alpha``, ``use_rslora``,
``alpha_pattern``); else 1 (diffusers' and peft's convention ``lora_alpha = r`` when a file
carries no alpha, which is also what ``Backbone.prepare_for_training`` uses).

Arithmetic is done in float32 at least (float64 stays float64) and the result is cast back to
the reference's dtype. IO is safetensors only; weights are read lazily (memory-mapped) so a
merge holds about one model in memory besides the output.
"""

from __future__ import annotations

import copy
import json
import math
import re
import shutil
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from snpo.dtypes import DTYPE_SPELLINGS, DTYPES, torch_dtype
from snpo.errors import ConfigError, UserError

StateDict = Mapping[str, Tensor]

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
UNET_WEIGHT_NAME = "diffusion_pytorch_model.safetensors"
LORA_METADATA_KEY = "lora_adapter_metadata"  # diffusers' safetensors header key

# peft keys (``m.lora_A.weight``, or ``m.lora_A.<adapter>.weight`` in a raw module state
# dict) and diffusers keys (``m.lora.down.weight``, ``m.lora_linear_layer.down.weight``).
_LORA_KEY = re.compile(
    r"^(?P<module>.+?)\."
    r"(?:lora_(?P<peft>[AB])(?:\.[^.]+)?|lora(?:_linear_layer)?\.(?P<diffusers>down|up))"
    r"\.weight$"
)
_ALPHA_KEY = re.compile(r"^(?P<module>.+)\.alpha$")
#: prefixes of the denoiser's component in a pipeline's LoRA file (SD: ``unet.``; SD3 and
#: FLUX: ``transformer.``) and of peft's wrapper, stripped to the plain denoiser's keys
_STRIPPED_PREFIXES = ("unet.", "transformer.", "base_model.model.")
_FOREIGN_PREFIXES = ("text_encoder", "lora_te", "lora_unet_")
#: the denoiser's subfolder in a pipeline (or training output) folder, by family
DENOISER_SUBFOLDERS = ("unet", "transformer")


# ---- LoRA adapters ------------------------------------------------------------------------
@dataclass
class LoraWeights:
    """A LoRA adapter as factors per adapted weight: ``delta[k] = scale[k] * up[k] @ down[k]``.

    Keys are the ADAPTED WEIGHT's key in the plain model state dict (``...to_q.weight``).
    ``down`` (A) has shape ``(r, in)`` or ``(r, in, kh, kw)``; ``up`` (B) ``(out, r)`` or
    ``(out, r, 1, 1)``.
    """

    down: dict[str, Tensor]
    up: dict[str, Tensor]
    scale: dict[str, float] = field(default_factory=dict)

    def __contains__(self, key: object) -> bool:
        return key in self.down

    def keys(self) -> list[str]:
        return list(self.down)

    def delta(self, key: str, dtype: torch.dtype = torch.float32) -> Tensor:
        """``scale * B @ A`` reshaped to the adapted weight's shape, in ``dtype``."""
        down, up = self.down[key], self.up[key]
        product = up.flatten(1).to(dtype) @ down.flatten(1).to(dtype)
        return (product * self.scale.get(key, 1.0)).reshape(up.shape[0], *down.shape[1:])


def _normalise_lora_key(key: str) -> str:
    for prefix in _STRIPPED_PREFIXES:
        if key.startswith(prefix):
            return key[len(prefix) :]
    if key.startswith(_FOREIGN_PREFIXES):
        raise ValueError(
            f"LoRA key {key!r}: only denoiser (UNet or transformer) LoRAs in peft or diffusers "
            "format can be merged (no text-encoder or kohya LoRAs)"
        )
    return key


def _pattern_value(patterns: Mapping[str, Any], module: str) -> Any | None:
    """peft's ``alpha_pattern`` lookup: a key matches a module name ending in it."""
    for pattern, value in patterns.items():
        if re.fullmatch(rf"(.*\.)?{pattern}", module):
            return value
    return None


def lora_from_state_dict(
    state_dict: StateDict,
    *,
    metadata: Mapping[str, Any] | None = None,
    scale: float | None = None,
) -> LoraWeights:
    """Parse a LoRA state dict (peft or diffusers keys, optional ``unet.`` prefix).

    ``metadata`` is a peft ``LoraConfig`` as a dict (diffusers' header metadata, with or
    without the ``unet.`` prefix on its keys); ``scale`` overrides everything.
    """
    meta = {k.removeprefix("unet.").removeprefix("transformer."): v for k, v in (metadata or {}).items()}
    factors: dict[str, dict[str, Tensor]] = {"down": {}, "up": {}}
    alphas: dict[str, float] = {}
    for raw_key, tensor in state_dict.items():
        key = _normalise_lora_key(raw_key)
        if match := _LORA_KEY.match(key):
            kind = match["peft"] or match["diffusers"]
            side = "down" if kind in ("A", "down") else "up"
            factors[side][f"{match['module']}.weight"] = tensor
        elif match := _ALPHA_KEY.match(key):
            alphas[f"{match['module']}.weight"] = float(tensor)
        else:
            raise ValueError(f"LoRA key {raw_key!r}: not a peft or diffusers LoRA weight")
    down, up = factors["down"], factors["up"]
    if not down:
        raise ValueError("LoRA: no LoRA weights found")
    if set(down) != set(up):
        missing = sorted(set(down) ^ set(up))[0]
        raise ValueError(f"LoRA: {missing!r} has only one of its two factors (A/down, B/up)")

    scales = {}
    for key, a_factor in down.items():
        rank = a_factor.shape[0]
        if up[key].shape[1] != rank:
            raise ValueError(f"LoRA: {key!r} factors have ranks {rank} and {up[key].shape[1]}")
        if scale is not None:
            scales[key] = float(scale)
        elif key in alphas:
            scales[key] = alphas[key] / rank
        elif meta:
            module = key.removesuffix(".weight")
            alpha = _pattern_value(meta.get("alpha_pattern") or {}, module)
            alpha = float(meta.get("lora_alpha", rank) if alpha is None else alpha)
            scales[key] = alpha / (math.sqrt(rank) if meta.get("use_rslora") else rank)
        else:
            scales[key] = 1.0
    return LoraWeights(down=down, up=up, scale=scales)


def load_lora(path: str | Path, *, scale: float | None = None) -> LoraWeights:
    """A LoRA from a ``.safetensors`` file or a folder holding ``pytorch_lora_weights.safetensors``."""
    path = Path(path)
    file = path / LORA_WEIGHT_NAME if path.is_dir() else path
    with safe_open(str(file), framework="pt") as f:
        header = f.metadata() or {}
        state = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 (safe_open is no dict)
    metadata = json.loads(header[LORA_METADATA_KEY]) if LORA_METADATA_KEY in header else None
    return lora_from_state_dict(state, metadata=metadata, scale=scale)


# ---- full weights -------------------------------------------------------------------------
class SafetensorsStateDict(Mapping[str, Tensor]):
    """A read-only state dict over one or more safetensors files, read tensor by tensor."""

    def __init__(self, files: list[Path]) -> None:
        self._handles = [safe_open(str(f), framework="pt") for f in files]
        self._where: dict[str, Any] = {}
        for handle in self._handles:
            for key in handle.keys():  # noqa: SIM118 (safe_open is no dict)
                self._where[key] = handle

    def __getitem__(self, key: str) -> Tensor:
        return self._where[key].get_tensor(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)


def _unet_files(folder: Path) -> list[Path]:
    index = folder / f"{UNET_WEIGHT_NAME}.index.json"
    if (folder / UNET_WEIGHT_NAME).is_file():
        return [folder / UNET_WEIGHT_NAME]
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [folder / shard for shard in shards]
    candidates = sorted(folder.glob("*.safetensors"))
    if len(candidates) == 1:
        return candidates
    raise ValueError(
        f"{folder}: expected {UNET_WEIGHT_NAME} (or a sharded index, or {LORA_WEIGHT_NAME}, "
        "or a unet/ or transformer/ subfolder); convert .bin weights to safetensors first"
    )


def resolve_weights(path: str | Path) -> tuple[str, Path]:
    """``("lora", file)`` or ``("full", denoiser folder or file)`` for a model path.

    Accepts a ``.safetensors`` file, a folder with ``pytorch_lora_weights.safetensors``, a
    diffusers (or snpo toy) model folder with ``unet/`` (SD) or ``transformer/`` (SD3, FLUX),
    or a denoiser folder.
    """
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such file or folder")
    if path.is_file():
        if path.suffix != ".safetensors":
            raise UserError(f"{path}: expected a .safetensors file (convert .bin weights first)")
        with safe_open(str(path), framework="pt") as f:
            keys = list(f.keys())
        is_lora = any(_LORA_KEY.match(k.removeprefix("unet.").removeprefix("transformer.")) for k in keys)
        return ("lora" if is_lora else "full"), path
    if (path / LORA_WEIGHT_NAME).is_file():
        return "lora", path / LORA_WEIGHT_NAME
    for sub in DENOISER_SUBFOLDERS:
        if (path / sub).is_dir():
            return resolve_weights(path / sub)
    _unet_files(path)  # raises a one-line error when the folder holds no weights
    return "full", path


def load_weights(path: str | Path, *, lora_scale: float | None = None) -> StateDict | LoraWeights:
    """Full weights (a lazy state dict) or a LoRA adapter, whichever ``path`` holds."""
    kind, where = resolve_weights(path)
    if kind == "lora":
        return load_lora(where, scale=lora_scale)
    return SafetensorsStateDict([where] if where.is_file() else _unet_files(where))


def effective_state_dict(module: nn.Module) -> dict[str, Tensor]:
    """The plain weights a module computes with: peft LoRA layers folded in.

    For a module carrying peft adapters (``Backbone.prepare_for_training(lora_rank > 0)``)
    the keys are the plain model's (``...to_q.weight``, not ``...base_layer.weight``) and
    each adapted weight is ``base + scale * B @ A`` for its active adapters (nothing is added
    while adapters are disabled, or when they are already merged into the base weight).
    """
    state = {
        key.replace(".base_layer.", "."): value.detach()
        for key, value in module.state_dict().items()
        if ".lora_" not in key
    }
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:  # pragma: no cover - peft is a dependency
        return state
    for name, layer in module.named_modules():
        if not isinstance(layer, LoraLayer) or layer.disable_adapters or layer.merged:
            continue
        key = f"{name}.weight"
        for adapter in layer.active_adapters:
            if adapter in layer.lora_A:
                delta = layer.get_delta_weight(adapter).detach()
                state[key] = state[key] + delta.to(state[key].dtype)
    return state


# ---- the merge ----------------------------------------------------------------------------
def _delta(
    source: StateDict | LoraWeights, key: str, ref: Tensor, dtype: torch.dtype
) -> Tensor | None:
    if isinstance(source, LoraWeights):
        return source.delta(key, dtype) if key in source else None
    value = source[key]
    if value.shape != ref.shape:  # never let broadcasting hide a different architecture
        raise ValueError(f"{key!r}: shape {tuple(value.shape)}, the reference {tuple(ref.shape)}")
    return value.to(dtype) - ref.to(dtype)


def _check_compatible(reference: StateDict, source: StateDict | LoraWeights, name: str) -> None:
    if isinstance(source, LoraWeights):
        for key in source.down:
            if key not in reference:
                raise ConfigError(f"{name}: LoRA adapts {key!r}, which the reference does not have")
            shape = (source.up[key].shape[0], *source.down[key].shape[1:])
            if tuple(reference[key].shape) != shape:
                raise ConfigError(
                    f"{name}: LoRA delta for {key!r} has shape {shape}, "
                    f"the reference weight {tuple(reference[key].shape)}"
                )
        return
    extra = sorted(set(source) - set(reference))
    missing = sorted(set(reference) - set(source))
    if extra or missing:
        which = f"extra key {extra[0]!r}" if extra else f"missing key {missing[0]!r}"
        raise ConfigError(f"{name}: state dict does not match the reference ({which})")


def merge_weights(
    reference: StateDict,
    positive: StateDict | LoraWeights,
    npo: StateDict | LoraWeights,
    a: float,
    b: float,
) -> dict[str, Tensor]:
    """``theta_ref + a (theta_pos - theta_ref) + b (theta_npo - theta_ref)``, key by key.

    ``positive`` and ``npo`` are each full weights (a state dict with the reference's
    keys) or a :class:`LoraWeights` (delta ``scale * B @ A`` on its adapted weights). Integer
    tensors (buffers such as counters) are copied from the reference. ``a = b = 0`` returns
    the reference exactly.
    """
    for name, value in (("a", a), ("b", b)):
        if not (isinstance(value, int | float) and math.isfinite(value)):
            raise ConfigError(f"{name}: expected a finite number, got {value!r}")
    _check_compatible(reference, positive, "positive")
    _check_compatible(reference, npo, "npo")
    merged = {}
    for key in reference:
        ref = reference[key]
        if not ref.is_floating_point():
            merged[key] = ref.clone()
            continue
        dtype = torch.promote_types(ref.dtype, torch.float32)
        value = ref.to(dtype)
        for coefficient, source in ((a, positive), (b, npo)):
            if coefficient == 0:
                continue  # exactly the reference, whatever the source holds
            delta = _delta(source, key, ref, dtype)
            if delta is not None:
                value = value + coefficient * delta
        merged[key] = value.to(ref.dtype)
    return merged


def merge_denoisers(
    reference: nn.Module, positive: nn.Module, npo: nn.Module, a: float, b: float
) -> nn.Module:
    """A new, frozen denoiser with the merged weights (modules may carry LoRA adapters).

    Each module contributes its :func:`effective_state_dict`, so an adapted network counts
    as ``base + scale * B @ A``. The result has the reference's class, config, dtype and
    device (built with ``from_config`` for diffusers models, so it carries no adapters).
    """
    ref_state = effective_state_dict(reference)
    merged = merge_weights(
        ref_state, effective_state_dict(positive), effective_state_dict(npo), a, b
    )
    config = getattr(reference, "config", None)
    if config is not None and hasattr(type(reference), "from_config"):
        out = type(reference).from_config(config)
    else:
        out = copy.deepcopy(reference)
    out.load_state_dict(merged)
    first = next(v for v in ref_state.values() if v.is_floating_point())
    return out.to(device=first.device, dtype=first.dtype).requires_grad_(False).eval()


# ---- `snpo merge` -------------------------------------------------------------------------


@dataclass
class MergeConfig:
    """``snpo merge``: Diff-NPO's merged null-branch model from a reference, a positive and an NPO model.

    Paths may be full-weight unet or transformer folders, diffusers/toy model folders
    (``unet/`` or ``transformer/`` inside),
    LoRA folders (``pytorch_lora_weights.safetensors``) or ``.safetensors`` files; the
    reference must hold full weights. Defaults ``a = b = 1`` are the public Diff-NPO code's.
    """

    reference: str = ""  # the frozen reference (full weights)
    positive: str = ""  # the positively aligned model (e.g. a dpo run)
    npo: str = ""  # the model trained on reversed preferences (`method: npo-negative`)
    negative: str | None = field(default=None, metadata={"alias_of": "npo"})
    a: float = 1.0  # weight of theta_pos - theta_ref
    b: float = 1.0  # weight of theta_npo - theta_ref
    output_dir: str = "snpo-merged"  # where unet/ (transformer/ for SD3 and FLUX) is written
    dtype: str = "reference"  # reference | fp32 | fp16 | bf16
    copy_pipeline: bool = False  # copy the reference's other components (text encoder, ...)

    def __post_init__(self) -> None:
        self.notes: list[str] = []
        if self.negative is not None:
            self.npo, self.negative = self.negative, None
            self.notes.append("negative: read as npo (the model trained on reversed preferences)")
        if isinstance(self.dtype, str):
            self.dtype = DTYPE_SPELLINGS.get(self.dtype, self.dtype)

    def validate(self) -> None:
        for name in ("reference", "positive", "npo"):
            if not getattr(self, name):
                raise ConfigError(f"{name}: required (a model folder, unet folder or LoRA)")
        for name in ("a", "b"):
            if not math.isfinite(getattr(self, name)):
                raise ConfigError(f"{name}: expected a finite number, got {getattr(self, name)!r}")
        if self.dtype != "reference" and self.dtype not in DTYPES:
            raise ConfigError(
                f"dtype: expected reference or one of {', '.join(DTYPES)}, got {self.dtype!r}"
            )


def run_merge(config: MergeConfig) -> Path:
    """Merge and write ``output_dir/unet/`` (``transformer/`` when the reference is a
    transformer folder: SD3, FLUX), safetensors + the reference's ``config.json``."""
    config.validate()
    kind, ref_where = resolve_weights(config.reference)
    if kind != "full":
        raise ConfigError(
            f"reference: {config.reference} holds a LoRA; the reference must be full weights"
        )
    reference = load_weights(config.reference)
    positive = load_weights(config.positive)
    npo = load_weights(config.npo)
    merged = merge_weights(reference, positive, npo, config.a, config.b)
    if config.dtype != "reference":
        merged = {
            k: v.to(torch_dtype(config.dtype)) if v.is_floating_point() else v for k, v in merged.items()
        }

    out = Path(config.output_dir)
    ref_folder = ref_where if ref_where.is_dir() else ref_where.parent
    subfolder = "transformer" if ref_folder.name == "transformer" else "unet"  # as the reference's
    unet_dir = out / subfolder
    unet_dir.mkdir(parents=True, exist_ok=True)
    save_file(
        {k: v.contiguous() for k, v in merged.items()},
        str(unet_dir / UNET_WEIGHT_NAME),
        metadata={"format": "pt"},
    )
    if (ref_folder / "config.json").is_file():
        shutil.copy2(ref_folder / "config.json", unet_dir / "config.json")
    if config.copy_pipeline and ref_folder.name in DENOISER_SUBFOLDERS:
        for item in ref_folder.parent.iterdir():
            if item.name == subfolder or (out / item.name).exists():
                continue
            copier = shutil.copytree if item.is_dir() else shutil.copy2
            copier(item, out / item.name)
    info = {
        "formula": "theta_ref + a (theta_pos - theta_ref) + b (theta_npo - theta_ref)",
        "a": config.a,
        "b": config.b,
        "reference": str(config.reference),
        "positive": str(config.positive),
        "npo": str(config.npo),
        "positive_kind": "lora" if isinstance(positive, LoraWeights) else "full",
        "npo_kind": "lora" if isinstance(npo, LoraWeights) else "full",
    }
    (out / "merge_info.json").write_text(json.dumps(info, indent=2))
    return out
