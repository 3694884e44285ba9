"""``TrainConfig``: every knob of ``snpo train``, named as TRL and diffusers users expect."""

from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from dataclasses import dataclass, field

from snpo.backbones.flow import FLOW_WEIGHTING_SCHEMES
from snpo.errors import ConfigError
from snpo.methods import METHODS, get_method
from snpo.methods.single import objective_config
from snpo.objectives import OBJECTIVES, ObjectiveConfig

LR_SCHEDULERS = (
    "constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial",
)
MIXED_PRECISION = ("no", "fp16", "bf16")
REPORT_TO = ("tensorboard", "wandb", "none", "all")
ADAM_IMPLEMENTATIONS = ("fused", "foreach", "forloop")
OPTIMIZERS = ("adamw", "adafactor", "adamw8bit")
REFERENCE_DTYPES = ("auto", "fp32", "bf16", "fp16")
#: what ``method: single`` (the old spelling: one network, trained with ``objective``) meant
#: when no objective was given
OLD_DEFAULT_OBJECTIVE = "snpo"


@dataclass
class TrainConfig:
    """Configuration of one preference-alignment run (any registered method)."""

    # model and data
    model_name_or_path: str = ""  # a diffusers pipeline folder or hub id (SD1.5, SDXL, SD3, FLUX, toy)
    pretrained_vae_model_name_or_path: str | None = None  # another VAE, e.g. an fp16-safe SDXL VAE
    revision: str | None = None  # git revision of a hub model
    variant: str | None = None  # e.g. "fp16" weight files
    dataset_name: str = ""  # Pick-a-Pic parquet folder/glob, HF dataset (hub id or folder), JSONL/CSV
    dataset_split: str | None = None  # e.g. train; null = the source's default
    output_dir: str = "snpo-output"  # weights, model card, metrics.jsonl, logs and checkpoints/
    cache_dir: str | None = None  # a latent/text cache written by `snpo cache`
    cache_shard_size: int = 512  # pairs per cache shard file
    cache_batch_size: int = 8  # pairs encoded at once by `snpo cache`
    max_train_samples: int | None = None  # use only the first N usable pairs
    drop_ties: bool = True  # drop pairs labelled as ties (as the original Diffusion-DPO code)
    max_caption_chars: int | None = 2000  # longer captions are skipped as overlong_caption
    resolution: int = 512  # training image side in pixels (multiple of 8)
    center_crop: bool = True  # center crop (true) or random crop (false), the same for both images
    random_flip: bool = True  # flip both images of a pair together, with probability 1/2
    dataloader_num_workers: int = 0  # DataLoader worker processes

    # method and objective
    method: str = "snpo"  # sft | dpo | bdpo | snpo-naive | snpo | npo-negative | chats | kto | mapo (snpo.methods)
    # older configs: `objective: X` (with `method: single`) means `method: X`
    objective: str | None = field(default=None, metadata={"alias_of": "method"})
    beta: float = 2000.0  # KL strength, Diffusion-DPO convention (logit = beta/2 * error gap; SDXL 5000)
    mix_lambda: float = 0.9  # bdpo/snpo: weight of the policy in the loser's mixture (1 = unbounded)
    mix_scale: float | None = None  # bdpo/snpo: likelihood scale k of the bound; null = beta/2
    cfg_dropout: float = 0.2  # p: share of pairs on the null branch (prompt dropped; snpo: roles swap)
    chats_lose_prompt_dropout: float = 0.5  # CHATS: share of pairs whose lose prompt is blanked

    # beyond the paper: SDPO safeguard, KTO, MaPO
    safeguard: bool = False  # Diffusion-SDPO: scale the loser's gradient so the winner's error does not rise (dpo, bdpo, snpo-naive, snpo)
    safeguard_mu: float = 0.9  # Diffusion-SDPO's mu in [0, 1]: share of the winner's own descent kept (larger = more conservative; its SD1.5 DPO script: 0.9, SDXL: 0.6)
    safeguard_scope: str = "pair"  # pair: one factor per pair | batch: one per micro-batch (the public code)
    kto_desirable_weight: float = 1.0  # kto: lambda_D, weight of the desirable (label 1) images' loss
    kto_undesirable_weight: float = 1.0  # kto: lambda_U, weight of the undesirable (label 0) images' loss
    mapo_beta: float = 0.1  # mapo: weight of the margin (log-odds) term next to the chosen image's error
    mapo_snr: float = 0.5  # mapo: s of its likelihood proxy s e / (exp(s e) - 1) (the code's snr_value)

    # optimisation
    max_steps: int = 2000  # optimizer steps
    per_device_train_batch_size: int = 1  # pairs per process per micro-batch
    gradient_accumulation_steps: int = 1  # micro-batches per optimizer step
    learning_rate: float = 1e-8  # per-step rate, or per-pair rate with scale_lr
    scale_lr: bool = False  # multiply learning_rate by batch x accumulation x processes (Diffusion-DPO)
    lr_scheduler: str = "constant_with_warmup"  # constant | constant_with_warmup | linear | cosine | ...
    lr_warmup_steps: int = 0  # warm-up steps of the schedule
    adam_beta1: float = 0.9  # AdamW beta1
    adam_beta2: float = 0.999  # AdamW beta2
    adam_weight_decay: float = 1e-2  # AdamW decoupled weight decay
    adam_epsilon: float = 1e-8  # AdamW epsilon
    max_grad_norm: float = 1.0  # clip the gradient norm to this; 0 = no clipping
    max_nonfinite_steps: int = 5  # stop after this many consecutive non-finite steps (each is skipped)
    adam_implementation: str = "fused"  # fused | foreach | forloop (fused falls back where absent)

    # model mode and precision
    lora_rank: int = 0  # LoRA rank on the attention projections; 0 = full fine-tune (frozen copy as reference)
    mixed_precision: str = "no"  # no | fp16 | bf16 (accelerate's)
    upcast_vae: bool | None = None  # VAE in float32 under mixed precision; null = the family's rule
    gradient_checkpointing: bool = False  # recompute activations in backward: less memory, more time
    allow_tf32: bool = False  # TF32 matmuls on Ampere+ GPUs

    # memory: optimizers, reference placement
    optimizer: str = "adamw"  # adamw (kernel: adam_implementation) | adafactor (no moments; Diffusion-DPO's SDXL choice) | adamw8bit (bitsandbytes: both moments in 8 bits)
    reference_dtype: str = "auto"  # full fine-tune: the frozen reference copy in auto (the frozen weights' dtype) | fp32 | bf16 | fp16
    reference_offload: bool = False  # full fine-tune: keep the reference copy on the CPU, moved to the device for its forward only

    # flow-matching models (SD3 / FLUX)
    weighting_scheme: str = "logit_normal"  # sigma sampling: logit_normal | mode | uniform (none = uniform), as diffusers' flow scripts
    logit_mean: float = 0.0  # logit_normal: mean of the normal whose sigmoid is the (unshifted) sigma
    logit_std: float = 1.0  # logit_normal: its standard deviation
    mode_scale: float = 1.29  # mode: the scale of the mode density
    max_sequence_length: int | None = None  # T5 tokens of the prompt; null = the pipeline's default (SD3 256, FLUX 512); sample with the same
    use_t5: bool = True  # SD3: encode prompts with T5 (false: zeros in its place, as the pipeline without text_encoder_3)
    embedded_guidance_scale: float = 3.5  # FLUX.1-dev: the guidance value its transformer takes as an input (pipeline default 3.5)
    true_cfg: bool = False  # FLUX: train for true CFG (a null branch on the empty prompt at sampling); needed by snpo, snpo-naive, chats, npo-negative

    # speed options, all opt-in (measured side by side in BENCHMARKS.md)
    channels_last: bool = False  # NHWC denoiser weights and inputs
    torch_compile: bool = False  # torch.compile the denoiser (and a full fine-tune's reference)
    precompute_reference: bool = False  # reuse reference errors across runs of a sweep
    reference_errors_dir: str | None = None  # where they live; null = <cache_dir>/reference-errors

    # watching a run: validation images, collapse signal, sharing
    validation_prompt: str | None = None  # one validation prompt (diffusers' --validation_prompt; commas are part of it)
    validation_prompts: list[str] = field(default_factory=list)  # validation prompts, a YAML list (command line: '["a, b", "c"]'; bare a,b splits at commas); none = no images
    validation_prompts_file: str | None = None  # more validation prompts, a prompt set as `snpo sample --prompts` reads it (.txt: one a line)
    validation_steps: int = 200  # draw the validation grid every N optimizer steps (also at step 0 and the last step)
    validation_seeds: list[int] = field(default_factory=lambda: [0])  # one validation image per prompt per seed (as `snpo sample --seeds`)
    validation_num_inference_steps: int | None = None  # denoising steps of the validation images; null = snpo sample's default for the family
    validation_guidance_scale: float | None = None  # guidance scale of the validation images; null = snpo sample's default for the family
    validation_scheduler: str | None = None  # sampler of the validation images (ddim, euler, ...); null = snpo sample's default for the family
    validation_null_branch: bool = False  # also draw the null branch alone (guidance 0: what the negative branch generates), one image per seed
    collapse_patience: int = 3  # note in the log when logratio/chosen has fallen for N checkpoints in a row; 0 = never
    push_to_hub: bool = False  # at the end, upload the final weights, model card, validation grids and curves to the hub
    hub_model_id: str | None = None  # hub repository (owner/name); null = the output folder's name under your account
    hub_token: str | None = field(default=None, repr=False, metadata={"secret": True})  # hub token; null = HF_TOKEN or `hf auth login` (better); never logged or written
    hub_private_repo: bool = False  # create the hub repository as private

    # checkpoints, logging, reproducibility
    checkpointing_steps: int = 500  # checkpoint every N steps (and at the end); 0 = never
    checkpoints_total_limit: int | None = None  # keep only the newest N checkpoints
    resume_from_checkpoint: str | None = None  # latest, or a checkpoint folder: continue bitwise
    logging_steps: int = 1  # write metrics every N steps
    report_to: str = "tensorboard"  # tensorboard | wandb | all | none
    tracker_project_name: str = "snpo"  # tensorboard/wandb project name
    seed: int = 0  # data order, LoRA init, and every pair's noise, timestep and branch label

    def __post_init__(self) -> None:
        self.notes: list[str] = []  # said once by the CLI (old spellings read as new ones)
        self._resolve_objective_alias()

    def _resolve_objective_alias(self) -> None:
        """``method: single`` + ``objective: X`` (the old layout) means ``method: X``; so does
        ``objective: X`` alone. The dual-model presets used to say ``objective: dpo``."""
        objective, self.objective = self.objective, None
        if objective is not None and objective not in METHODS:
            raise ConfigError(f"objective: expected one of {', '.join(METHODS)}, got {objective!r}")
        if self.method == "single":
            self.method = objective or OLD_DEFAULT_OBJECTIVE
            self.notes.append(f"method: 'single' is read as method: {self.method!r} "
                              "(each objective is a method of its own now)")
            return
        if objective is None or objective == self.method:
            return
        spec = get_method(self.method) if isinstance(self.method, str) else None
        if spec is not None and spec.objective is None:  # npo-negative, chats
            if objective != "dpo":
                raise ConfigError(f"objective: method {self.method} has its own loss; drop objective "
                                  f"(got objective {objective!r})")
            self.notes.append(f"objective: ignored with method {self.method!r} (its loss is its own)")
            return
        if self.method != "snpo":  # an explicit single-network method that disagrees
            raise ConfigError(f"objective: an alias of method; got method {self.method!r} and "
                              f"objective {objective!r}")
        self.method = objective
        self.notes.append(f"objective: read as method: {objective!r} (objective is an alias of method)")

    def validate(self) -> None:
        """One-line errors naming the field, the value and what is allowed."""
        _check_types(self)
        spec = get_method(self.method)
        spec.validate(self)
        checks = [
            ("cfg_dropout", 0 <= self.cfg_dropout < 1, "a probability in [0, 1)"),
            ("chats_lose_prompt_dropout", 0 <= self.chats_lose_prompt_dropout <= 1, "a probability in [0, 1]"),
            ("max_steps", self.max_steps >= 1, "an integer >= 1"),
            ("per_device_train_batch_size", self.per_device_train_batch_size >= 1, "an integer >= 1"),
            ("gradient_accumulation_steps", self.gradient_accumulation_steps >= 1, "an integer >= 1"),
            ("learning_rate", self.learning_rate > 0, "a number > 0"),
            ("lr_warmup_steps", self.lr_warmup_steps >= 0, "an integer >= 0"),
            ("max_grad_norm", self.max_grad_norm >= 0, "a number >= 0 (0 disables clipping)"),
            ("max_nonfinite_steps", self.max_nonfinite_steps >= 1, "an integer >= 1"),
            ("lora_rank", self.lora_rank >= 0, "an integer >= 0 (0 = full fine-tune)"),
            ("resolution", self.resolution >= 8 and self.resolution % 8 == 0, "a multiple of 8, >= 8"),
            ("checkpointing_steps", self.checkpointing_steps >= 0, "an integer >= 0 (0 = only at the end)"),
            ("logging_steps", self.logging_steps >= 1, "an integer >= 1"),
            ("dataloader_num_workers", self.dataloader_num_workers >= 0, "an integer >= 0"),
            ("cache_shard_size", self.cache_shard_size >= 1, "an integer >= 1"),
            ("cache_batch_size", self.cache_batch_size >= 1, "an integer >= 1"),
            ("logit_std", self.logit_std > 0, "a number > 0"),
            ("max_sequence_length", self.max_sequence_length is None or self.max_sequence_length >= 1,
             "an integer >= 1 or null"),
            ("embedded_guidance_scale", self.embedded_guidance_scale >= 0, "a number >= 0"),
            ("adam_beta1", 0 <= self.adam_beta1 < 1, "a number in [0, 1)"),
            ("adam_beta2", 0 <= self.adam_beta2 < 1, "a number in [0, 1)"),
            ("adam_weight_decay", self.adam_weight_decay >= 0, "a number >= 0"),
            ("adam_epsilon", self.adam_epsilon > 0, "a number > 0"),
            # per-pair seeds and the data order are drawn from generators that take 32-bit seeds
            ("seed", 0 <= self.seed < 2**32, "an integer in [0, 2**32)"),
            ("tracker_project_name", bool(self.tracker_project_name.strip())
             and not set("/\\") & set(self.tracker_project_name), "a non-empty name without slashes"),
        ]
        for name, ok, allowed in checks:
            if not ok:
                raise ConfigError(f"{name}: expected {allowed}, got {getattr(self, name)!r}")
        check_beyond_paper_config(self, spec)
        if self.checkpoints_total_limit is not None and self.checkpoints_total_limit < 1:
            raise ConfigError(
                f"checkpoints_total_limit: expected an integer >= 1 or null, got {self.checkpoints_total_limit!r}"
            )
        if self.max_caption_chars is not None and self.max_caption_chars < 1:
            raise ConfigError(f"max_caption_chars: expected an integer >= 1 or null, got {self.max_caption_chars!r}")
        if self.precompute_reference and not (self.reference_errors_dir or self.cache_dir):
            raise ConfigError(
                "reference_errors_dir: precompute_reference needs a folder shared by the runs of a "
                "sweep (default <cache_dir>/reference-errors), got nothing"
            )
        if self.max_train_samples is not None and self.max_train_samples < 1:
            raise ConfigError(f"max_train_samples: expected an integer >= 1 or null, got {self.max_train_samples!r}")
        for name, value, allowed in [
            ("adam_implementation", self.adam_implementation, ADAM_IMPLEMENTATIONS),
            ("optimizer", self.optimizer, OPTIMIZERS),
            ("reference_dtype", self.reference_dtype, REFERENCE_DTYPES),
            ("lr_scheduler", self.lr_scheduler, LR_SCHEDULERS),
            ("mixed_precision", self.mixed_precision, MIXED_PRECISION),
            ("report_to", self.report_to, REPORT_TO),
            ("weighting_scheme", self.weighting_scheme, FLOW_WEIGHTING_SCHEMES),
        ]:
            if value not in allowed:
                raise ConfigError(f"{name}: expected one of {', '.join(allowed)}, got {value!r}")
        if self.lora_rank > 0 and (self.reference_dtype != "auto" or self.reference_offload):
            name = "reference_dtype" if self.reference_dtype != "auto" else "reference_offload"
            raise ConfigError(f"{name}: applies to a full fine-tune's reference copy (lora_rank 0); with LoRA "
                              f"the reference is the same network with its adapters off, got lora_rank {self.lora_rank}")
        from snpo.training.hub import check_hub_config
        from snpo.training.validation import check_validation_config

        check_validation_config(self)
        if self.collapse_patience < 0:
            raise ConfigError(f"collapse_patience: expected an integer >= 0 (0 = never), got {self.collapse_patience!r}")
        check_hub_config(self)
        if self.precompute_reference and not spec.reuses_reference_errors:
            raise ConfigError(
                f"precompute_reference: stored reference errors assume one network on the "
                f"dataset's own labels (a single-network method), got method {self.method!r}"
            )

    @property
    def objective_config(self) -> ObjectiveConfig:
        """The objective settings of a single-network method (npo-negative: its dpo)."""
        spec = get_method(self.method)
        return objective_config(self, spec.objective or "dpo")


def check_beyond_paper_config(config: TrainConfig, spec) -> None:
    """The keys of the "beyond the paper" block (Diffusion-SDPO, Diffusion-KTO, MaPO)."""
    from snpo.objectives.sdpo import validate_safeguard_args

    validate_safeguard_args(config.safeguard_mu, config.safeguard_scope)
    if config.safeguard and not (spec.objective and OBJECTIVES[spec.objective].has_logit):
        raise ConfigError(f"safeguard: Diffusion-SDPO's safeguard applies to one network trained on a pair "
                          f"logit (dpo, bdpo, snpo-naive, snpo), got method {config.method!r}")
    for name in ("kto_desirable_weight", "kto_undesirable_weight", "mapo_beta", "mapo_snr"):
        value = getattr(config, name)
        if not value > 0:
            raise ConfigError(f"{name}: expected a number > 0, got {value!r}")


def _type_problem(value: object, annotation: object) -> str | None:
    """What ``value`` should be when it does not match ``annotation`` (None when it does)."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(annotation)
        if value is None and type(None) in args:
            return None
        problems = [_type_problem(value, a) for a in args if a is not type(None)]
        if any(p is None for p in problems):
            return None
        return " or ".join(p for p in problems if p) + (" or null" if type(None) in args else "")
    if annotation is bool:
        return None if isinstance(value, bool) else "true or false"
    if annotation is int:
        return None if isinstance(value, int) and not isinstance(value, bool) else "an integer"
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            return "a number"
        return None if math.isfinite(value) else "a finite number"
    if annotation is str:  # paths given as Path objects are fine
        return None if isinstance(value, str | os.PathLike) else "a string"
    return None


def _check_types(config: TrainConfig) -> None:
    """Types first, so that a config built in Python (not through ``load_config``) fails with
    the same one-line message instead of a TypeError deep inside training."""
    hints = typing.get_type_hints(type(config))
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        expected = _type_problem(value, hints[f.name])
        if expected:
            raise ConfigError(f"{f.name}: expected {expected}, got {value!r}")
