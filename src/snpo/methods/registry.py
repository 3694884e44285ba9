"""The method registry: everything snpo knows about a ``method:``, in one record.

A method is what ``method:`` names in a training config: ``sft``, ``dpo``, ``bdpo``,
``snpo-naive``, ``snpo`` (one network, one objective each), ``npo-negative`` (Diff-NPO's
negative model) and ``chats`` (CHATS' two networks). Every caller asks the registry instead of
testing names: ``snpo train`` and ``snpo bench`` build the method with ``spec.build``, the
config is checked with ``spec.validate``, ``snpo sample`` and the toy demo sample with
``spec.make_guide``, the model card says how to load the output with ``spec.usage`` and the
efficiency table counts parameters by ``spec.trained_networks`` / ``spec.sampling_networks``.

A new method is one file that defines a :class:`MethodSpec` plus one ``register_method(...)``
line in ``snpo/methods/__init__.py``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from torch import Tensor, nn

from snpo.errors import ConfigError


class Method(Protocol):
    """What the trainer needs from a method: one batch of pairs -> loss and metrics."""

    def compute_loss(
        self, model: nn.Module, batch: dict[str, Any], pair_seeds: list[int]
    ) -> tuple[Tensor, dict[str, Tensor]]: ...


@dataclass
class BuiltMethod:
    """A method ready for the trainer.

    ``model`` is the module the trainer prepares and trains (None: ``backbone.denoiser``);
    ``trainable_parameters`` None means the trainer asks ``backbone.prepare_for_training``.
    A method that trains several networks (CHATS) prepares them itself and gives both.
    """

    method: Method
    model: nn.Module | None = None
    trainable_parameters: list[nn.Parameter] | None = None


@dataclass(frozen=True)
class UsageContext:
    """What the model card knows when it says how to load a run's output."""

    pipeline_class: str
    output_dir: str
    base: str
    files: list[str]
    denoiser_class: str = "UNet2DConditionModel"
    denoiser_subfolder: str = "unet"


#: ``guide(backbone, networks, settings)``: networks by role (``spec.sampling_roles``),
#: settings with ``guidance_scale`` (and the method's own sampling keys)
GuideFactory = Callable[[Any, dict[str, nn.Module], Any], Callable]


def _no_checks(config: Any) -> None:
    return None


def lora_or_full_usage(ctx: UsageContext) -> str:
    """How a single trained denoiser loads into its diffusers pipeline (LoRA or full)."""
    if "pytorch_lora_weights.safetensors" in ctx.files:
        return (
            f"import torch\nfrom diffusers import {ctx.pipeline_class}\n\n"
            f"pipe = {ctx.pipeline_class}.from_pretrained({ctx.base!r})\n"
            f"pipe.load_lora_weights({ctx.output_dir!r})\n"
            'image = pipe("a photo of a cat").images[0]'
        )
    if ctx.denoiser_subfolder in ctx.files:
        sub = ctx.denoiser_subfolder
        return (
            f"from diffusers import {ctx.pipeline_class}, {ctx.denoiser_class}\n\n"
            f"{sub} = {ctx.denoiser_class}.from_pretrained({ctx.output_dir!r}, subfolder={sub!r})\n"
            f"pipe = {ctx.pipeline_class}.from_pretrained({ctx.base!r}, {sub}={sub})\n"
            'image = pipe("a photo of a cat").images[0]'
        )
    return f"# files written: {', '.join(ctx.files)}"


def cfg_guide(backbone: Any, networks: dict[str, nn.Module], settings: Any) -> Callable:
    """Plain CFG with the trained network on both branches (the single-network methods)."""
    from snpo.sampling import single_network_guide

    return single_network_guide(backbone, networks["policy"], settings.guidance_scale)


@dataclass(frozen=True)
class MethodSpec:
    """One ``method:``; see the module docstring for who reads which field."""

    name: str
    title: str  # model card title, e.g. "Diff-SNPO"
    build: Callable[[Any, Any], BuiltMethod]  # (TrainConfig, Backbone) -> BuiltMethod
    validate: Callable[[Any], None] = _no_checks  # checks of the TrainConfig beyond types
    #: the networks one training run trains, and the networks one sampling step evaluates
    trained_networks: tuple[str, ...] = ("policy",)
    sampling_roles: tuple[str, ...] = ("policy",)
    training_runs: int = 1  # separate training runs the whole method needs (Diff-NPO: 2)
    make_guide: GuideFactory = cfg_guide
    guide_name: str = "cfg"  # recorded in sample manifests
    usage: Callable[[UsageContext], str] = lora_or_full_usage
    usage_language: str = "python"
    #: stored reference errors (``precompute_reference``) are exact for this method
    reuses_reference_errors: bool = False
    #: the objective of a single-network method (None for the others)
    objective: str | None = None
    #: it trains what the sampler's null (unconditional) branch evaluates (the SNPO swap, the
    #: NPO model, CHATS' lose network): meaningless for a model sampled without a null
    #: branch (guidance-distilled FLUX without true CFG); :func:`check_sampler_fits`
    trains_null_branch: bool = False
    summary: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def sampling_networks(self) -> int:
        return len(self.sampling_roles)


def check_sampler_fits(spec: MethodSpec, config: Any, *, has_null_branch: bool, family: str) -> None:
    """Refuse to train what the model's sampler never uses: a method that trains the null
    branch, or prompt dropout (``cfg_dropout > 0``), for a model sampled without a null branch
    (FLUX.1 without ``true_cfg``: guidance-distilled, or timestep-distilled schnell)."""
    if has_null_branch:
        return
    if spec.trains_null_branch:
        raise ConfigError(
            f"method: {spec.name} trains the network of CFG's null (unconditional) branch, which this "
            f"{family} model never runs when sampling (guidance-distilled, no true CFG); set true_cfg: true "
            f"to train and sample with true CFG on the empty prompt, or use dpo, bdpo or sft"
        )
    if getattr(config, "cfg_dropout", 0) > 0:
        raise ConfigError(
            f"cfg_dropout: this {family} model samples without a null branch (no true_cfg), so dropping "
            f"the prompt trains a branch the sampler never runs; set cfg_dropout: 0 (as the flux presets "
            f"do) or true_cfg: true, got {config.cfg_dropout!r}"
        )


METHODS: dict[str, MethodSpec] = {}


def register_method(spec: MethodSpec) -> MethodSpec:
    """Add a method under its name (a name registered twice is a bug)."""
    if spec.name in METHODS and METHODS[spec.name] is not spec:
        raise ValueError(f"method {spec.name!r} is registered already")
    METHODS[spec.name] = spec
    return spec


def get_method(name: str) -> MethodSpec:
    if name not in METHODS:
        raise ConfigError(f"method: expected one of {', '.join(METHODS)}, got {name!r}")
    return METHODS[name]
