"""Validation images during training: a fixed grid of prompts x seeds, drawn every
``validation_steps`` with the method's own guide, so a run that starts to blur or drift is
seen hours before it ends.

What is drawn. The prompts are ``validation_prompt`` + ``validation_prompts`` + the prompts of
``validation_prompts_file`` (read as ``snpo sample --prompts`` reads a prompt set); one image
per prompt per seed of ``validation_seeds``. Each image is exactly what ``snpo sample`` draws
for that prompt and seed from the weights of that step: the same guide
(``MethodSpec.make_guide``), the same settings (``validation_num_inference_steps``,
``validation_guidance_scale``, ``validation_scheduler``; null = ``snpo sample``'s defaults for
the family), the training ``resolution``, the same initial noise (seed ``s`` ->
``torch.Generator("cpu").manual_seed(s)``) and the same batches (per seed, ``snpo sample``'s
default batch size of prompts). The trained network is sampled as it is, LoRA adapters on;
``snpo sample --lora`` fuses them into the weights, which equals it to float rounding.

The networks a method's guide evaluates come from the run: one network (``policy``) for the
single-network methods; CHATS' ``win`` and ``lose``; while training Diff-NPO's NPO model, the
reference serves as the positive network (``snpo sample --npo_negative OUT`` without a
positive LoRA: the Diff-NPO merge of the reference with the NPO model is the NPO model).

``validation_null_branch``: the null branch alone, i.e. the guide at guidance scale 0 (what
``snpo sample --guidance_scale 0`` draws: ``eps(x, null)`` of the network the method's guide
evaluates on the null condition, the SNPO-trained network or the NPO model), one image per
seed: what the negative branch has learnt to generate.

When. At step 0 (a fresh run, before any update: the reference grid), every
``validation_steps`` optimizer steps, and at the last step. Only the main process draws
(others wait); no FSDP / ZeRO-3 (sharded weights: a note says so and nothing is drawn).

Exact resume is unchanged: drawing takes no randomness from training. The initial noise
comes from per-seed generators; the global RNGs (python, numpy, torch CPU and the device's)
are saved before and restored after (inside, torch is seeded with the first validation seed,
so ancestral samplers draw the same noise at every validation); the networks are put in eval
mode under no_grad and every module's mode is restored afterwards
(``tests/test_validation.py`` checks final weights bitwise equal with and without validation,
across a resume too).

Files, under ``output_dir/validation/``: ``step-000010.png`` (the grid: one row per prompt,
one column per seed), ``step-000010-null.png`` (the null branch, one image per seed),
``step-000010/p00000_s0.png`` (each image, named as ``snpo sample`` names it; null branch:
``null_s0.png``) and ``index.json`` (prompts, seeds and settings). Each file is written
atomically. The grids are logged to TensorBoard (``validation/images``,
``validation/null_branch``) and wandb (one captioned image per prompt and seed).
"""

from __future__ import annotations

import contextlib
import dataclasses
import random
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from snpo.errors import ConfigError
from snpo.files import atomic_write_bytes, atomic_write_json
from snpo.training.trainer import Callback

VALIDATION_DIR = "validation"
INDEX_FILE = "index.json"
TB_IMAGES, TB_NULL = "validation/images", "validation/null_branch"
MAX_SEED = 2**63 - 1


def grid_name(step: int, *, null: bool = False) -> str:
    return f"step-{step:06d}{'-null' if null else ''}.png"


def image_name(prompt_index: int, seed: int) -> str:
    """As ``snpo sample`` names an image (``images/p00000_s0.png``), without the folder."""
    return f"p{prompt_index:05d}_s{seed}.png"


def null_image_name(seed: int) -> str:
    return f"null_s{seed}.png"


# ---- the prompts and what the config allows (no model needed) ------------------------------
def validation_prompt_list(config: Any) -> list[str]:
    """``validation_prompt``, then ``validation_prompts``, then the prompts of
    ``validation_prompts_file`` (empty: no validation images)."""
    prompts = [config.validation_prompt] if config.validation_prompt else []
    prompts += list(config.validation_prompts or [])
    if config.validation_prompts_file:
        from snpo.evaluate.prompts import load_prompts

        try:
            prompts += load_prompts(config.validation_prompts_file).prompts
        except ValueError as err:  # "prompts: ..." from the reader: name this key instead
            message = str(err).removeprefix("prompts: ")
            raise ConfigError(f"validation_prompts_file: {message}") from None
    return prompts


def null_branch_role(spec: Any) -> str | None:
    """The network the method's guide evaluates on the null condition (None: it has no plain
    null branch, e.g. CHATS' lose network sees a proxy prompt)."""
    roles = tuple(spec.sampling_roles)
    if "npo" in roles:
        return "npo"
    if roles == ("policy",):
        return "policy"
    return None


def check_validation_config(config: Any) -> None:
    """The checks of the validation keys that need no model (``TrainConfig.validate``)."""
    from snpo.methods import get_method

    if config.validation_prompt is not None and not str(config.validation_prompt).strip():
        raise ConfigError(f"validation_prompt: expected a prompt or null, got {config.validation_prompt!r}")
    prompts = config.validation_prompts
    if not isinstance(prompts, list | tuple) or not all(isinstance(p, str) and p.strip() for p in prompts):
        raise ConfigError(f"validation_prompts: expected a list of non-empty prompts, got {prompts!r}")
    if config.validation_prompts_file is not None and not Path(config.validation_prompts_file).expanduser().exists() \
            and not set("*?[") & set(str(config.validation_prompts_file)):
        raise ConfigError(f"validation_prompts_file: no such file or folder {str(config.validation_prompts_file)!r}")
    seeds = config.validation_seeds
    if (not isinstance(seeds, list | tuple) or not seeds
            or not all(isinstance(s, int) and not isinstance(s, bool) and 0 <= s <= MAX_SEED for s in seeds)):
        raise ConfigError(f"validation_seeds: expected a list of seeds in [0, 2**63), got {seeds!r}")
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"validation_seeds: each seed once, got {list(seeds)}")
    if config.validation_steps < 1:
        raise ConfigError(f"validation_steps: expected an integer >= 1, got {config.validation_steps!r}")
    steps = config.validation_num_inference_steps
    if steps is not None and steps < 1:
        raise ConfigError(f"validation_num_inference_steps: expected an integer >= 1 or null, got {steps!r}")
    scale = config.validation_guidance_scale
    if scale is not None and scale < 0:
        raise ConfigError(f"validation_guidance_scale: expected a number >= 0 or null, got {scale!r}")
    if config.validation_scheduler not in (None, "auto"):
        from snpo.sampling import make_scheduler

        try:
            make_scheduler(config.validation_scheduler, None)
        except ConfigError as err:
            raise ConfigError(f"validation_{err}") from None
    wanted = bool(config.validation_prompt or config.validation_prompts or config.validation_prompts_file)
    spec = get_method(config.method)
    if config.validation_null_branch:
        if not wanted:
            raise ConfigError("validation_null_branch: draws with the validation images; give "
                              "validation_prompt, validation_prompts or validation_prompts_file")
        if null_branch_role(spec) is None:
            raise ConfigError(f"validation_null_branch: method {spec.name} has no plain null branch to draw "
                              f"alone (its guide evaluates {', '.join(spec.sampling_roles)})")
    if not wanted:
        return
    if config.cache_dir:
        raise ConfigError("validation_prompts: a run from a latent/text cache (cache_dir) loads no VAE or "
                          "text encoder to draw images with; drop cache_dir or the validation prompts")
    roles = tuple(spec.sampling_roles)
    if not (roles == ("policy",) or set(roles) == {"policy", "npo"} or set(roles) <= set(spec.trained_networks)):
        raise ConfigError(f"validation_prompts: method {spec.name} samples with networks "
                          f"{', '.join(roles)} that one training run does not hold")


# ---- the networks of a run, by sampling role -------------------------------------------------
class ReferenceNetwork:
    """The frozen reference as a network: the frozen copy, or (LoRA) the trained network with
    its adapters off for the duration of each call (``Backbone.reference``)."""

    def __init__(self, backbone: Any) -> None:
        self.backbone = backbone

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with self.backbone.reference() as reference:
            return reference(*args, **kwargs)


def run_networks(spec: Any, backbone: Any, trained: nn.Module) -> dict[str, Any]:
    """The networks ``spec``'s guide evaluates, by role, from the run's trained module (see
    the module docstring)."""
    roles = tuple(spec.sampling_roles)
    if isinstance(trained, nn.ModuleDict) and all(role in trained for role in roles):
        return {role: trained[role] for role in roles}
    if roles == ("policy",):
        return {"policy": trained}
    if set(roles) == {"policy", "npo"}:
        return {"policy": ReferenceNetwork(backbone), "npo": trained}
    raise ConfigError(f"validation_prompts: method {spec.name} samples with networks {', '.join(roles)} "
                      "that this run does not hold")


# ---- settings, drawing, files --------------------------------------------------------------
def sample_config_for(config: Any) -> Any:
    """The ``snpo sample`` settings the validation images are drawn with: the validation keys
    where given, ``snpo sample``'s (family) defaults elsewhere, the training resolution."""
    from snpo.evaluate.sample import SampleConfig

    names = {f.name for f in dataclasses.fields(SampleConfig)}
    values: dict[str, Any] = {
        "model_name_or_path": config.model_name_or_path, "revision": config.revision,
        "prompts": "(validation prompts)", "seeds": list(config.validation_seeds),
        "resolution": config.resolution, "method": config.method, "show_progress": False,
        "num_inference_steps": config.validation_num_inference_steps,
        "guidance_scale": config.validation_guidance_scale, "scheduler": config.validation_scheduler,
    }
    # the family keys both configs have (flow models: T5 length, FLUX guidance, true CFG)
    values.update({k: getattr(config, k, None) for k in FAMILY_KEYS})
    sample_config = SampleConfig(**{k: v for k, v in values.items() if k in names and v is not None})
    resolve = getattr(sample_config, "resolve_defaults", None)
    if callable(resolve):  # null settings: the family's defaults, as snpo sample fills them
        resolve()
    return sample_config


#: keys of a training config that ``snpo sample`` must be given the same (flow models)
FAMILY_KEYS = ("use_t5", "max_sequence_length", "embedded_guidance_scale", "true_cfg")


def make_sampler(backbone: Any, networks: dict[str, Any], spec: Any, sample_config: Any, *,
                 guidance_scale: float | None = None) -> Any:
    """A ``snpo.evaluate.sample.Sampler`` over the run's own backbone and networks (as
    ``load_sampler`` builds one over loaded weights)."""
    from snpo.evaluate.sample import GuideSettings, Sampler, latent_geometry

    scale = sample_config.guidance_scale if guidance_scale is None else guidance_scale
    chats_scale = sample_config.resolved_chats_guidance_scale if guidance_scale is None else guidance_scale
    settings = GuideSettings(scale, chats_scale, sample_config.chats_proxy_alpha)
    guide = spec.make_guide(backbone, networks, settings)
    latent_shape, side = latent_geometry(backbone, sample_config.resolution)

    def condition_extras(n: int) -> dict[str, Tensor]:
        # as load_sampler: SDXL micro-conditioning with the sampled size
        if backbone.family == "sdxl":
            return {"target_size": torch.tensor([[side, side]] * n)}
        return {}

    return Sampler(backbone, guide, latent_shape, side, networks, condition_extras)


def draw(sampler: Any, prompts: Sequence[str], seeds: Sequence[int], sample_config: Any,
         batch_size: int) -> dict[tuple[int, int], Tensor]:
    """Images in [0, 1] by (prompt index, seed), in ``snpo sample``'s batches."""
    from snpo.evaluate.sample import plan_batches

    images: dict[tuple[int, int], Tensor] = {}
    for batch in plan_batches(len(prompts), seeds, batch_size):
        drawn = sampler.images([prompts[i] for i, _ in batch], [s for _, s in batch], sample_config)
        images.update({cell: image for cell, image in zip(batch, drawn)})
    return images


def to_uint8(image: Tensor) -> np.ndarray:
    """(3, H, W) in [0, 1] -> (H, W, 3) uint8, quantised as ``snpo sample`` saves images."""
    return (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()


def grid(rows: Sequence[Sequence[np.ndarray]], pad: int = 2) -> np.ndarray:
    """Equal-sized (H, W, 3) uint8 images in rows, on white, ``pad`` pixels apart."""
    h, w = rows[0][0].shape[:2]
    cols = max(len(r) for r in rows)
    canvas = np.full((len(rows) * (h + pad) - pad, cols * (w + pad) - pad, 3), 255, dtype=np.uint8)
    for i, row in enumerate(rows):
        for j, image in enumerate(row):
            canvas[i * (h + pad): i * (h + pad) + h, j * (w + pad): j * (w + pad) + w] = image
    return canvas


def png(array: np.ndarray) -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(array), mode="RGB").save(buffer, format="PNG")
    return buffer.getvalue()


@contextlib.contextmanager
def isolated_rng(device: torch.device, seed: int) -> Iterator[None]:
    """Every global RNG training may use (python, numpy, torch CPU and ``device``) as it was,
    whatever happens inside; inside, torch is seeded with ``seed``."""
    py_state, np_state = random.getstate(), np.random.get_state()
    devices = [device] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices):
            torch.random.default_generator.manual_seed(seed)
            if devices:
                with torch.cuda.device(device):
                    torch.cuda.manual_seed(seed)
            yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)


@contextlib.contextmanager
def eval_mode(networks: Sequence[Any]) -> Iterator[None]:
    """``eval()`` on every network, then each module's own mode back."""
    modules = [m for net in networks if isinstance(net, nn.Module) for m in net.modules()]
    modes = [m.training for m in modules]
    for net in networks:
        if isinstance(net, nn.Module):
            net.eval()
    try:
        yield
    finally:
        for module, mode in zip(modules, modes):
            module.training = mode


class ValidationImages(Callback):
    """Draws, saves and logs the validation grids (see the module docstring)."""

    def __init__(self, config: Any, backbone: Any, prompts: Sequence[str]) -> None:
        from snpo.evaluate.sample import SampleConfig
        from snpo.methods import get_method

        self.config = config
        self.backbone = backbone
        self.prompts = list(prompts)
        self.seeds = [int(s) for s in config.validation_seeds]
        self.spec = get_method(config.method)
        self.sample_config = sample_config_for(config)
        self.batch_size = SampleConfig.__dataclass_fields__["batch_size"].default
        self.null_branch = bool(config.validation_null_branch)
        if self.null_branch and not backbone.has_null_branch:
            raise ConfigError(f"validation_null_branch: this {backbone.family} model samples without a null "
                              "branch (no true CFG)")
        if not backbone.has_null_branch and self.sample_config.guidance_scale != 1:
            raise ConfigError(f"validation_guidance_scale: this {backbone.family} model samples with no null "
                              f"branch, so the CFG scale must be 1 (or set true_cfg: true), got "
                              f"{self.sample_config.guidance_scale!r}")
        self.folder = Path(config.output_dir) / VALIDATION_DIR
        self.enabled = True
        self.trainer: Any = None
        self.networks: dict[str, Any] = {}
        self.sampler: Any = None
        self.null_sampler: Any = None

    @property
    def settings(self) -> dict[str, Any]:
        c = self.sample_config
        return {"num_inference_steps": c.num_inference_steps, "guidance_scale": c.guidance_scale,
                "scheduler": c.scheduler, "resolution": c.resolution, "guide": self.spec.guide_name,
                "batch_size": self.batch_size}

    # ---- hooks ------------------------------------------------------------------------------
    def on_loop_begin(self, trainer: Any) -> None:
        from accelerate.utils import DistributedType

        self.trainer = trainer
        accelerator = trainer.accelerator
        state = accelerator.state
        zero3 = getattr(getattr(state, "deepspeed_plugin", None), "zero_stage", 0) == 3
        if accelerator.distributed_type == DistributedType.FSDP or zero3:
            accelerator.print("note: validation images are not drawn when the weights are sharded (FSDP, "
                              "ZeRO-3); sample the saved model with snpo sample")
            self.enabled = False
            return
        networks = run_networks(self.spec, self.backbone, trainer.model)
        self.networks = networks
        self.sampler = make_sampler(self.backbone, networks, self.spec, self.sample_config)
        if self.null_branch:
            self.null_sampler = make_sampler(self.backbone, networks, self.spec, self.sample_config,
                                             guidance_scale=0.0)
        if accelerator.is_main_process:
            self.folder.mkdir(parents=True, exist_ok=True)
            atomic_write_json(self.folder / INDEX_FILE, {
                "prompts": self.prompts, "seeds": self.seeds, "null_branch": self.null_branch,
                "null_branch_prompt": self.prompts[0] if self.null_branch else None,
                "method": self.spec.name, "settings": self.settings,
            })
        if int(getattr(trainer, "start_step", 0)) == 0:
            self.validate(0)  # the reference: before any update

    def on_step_end(self, step: int, logs: dict[str, float]) -> None:
        if step % self.config.validation_steps == 0 or step == self.config.max_steps:
            self.validate(step)

    # ---- one validation ---------------------------------------------------------------------
    def validate(self, step: int) -> None:
        """Draw, save and log the grid of ``step`` on the main process; the others wait."""
        if not self.enabled or self.trainer is None:
            return
        accelerator = self.trainer.accelerator
        if accelerator.is_main_process:
            modules = list(self.networks.values())
            with isolated_rng(accelerator.device, self.seeds[0]), eval_mode(modules), torch.no_grad(), \
                    accelerator.autocast():
                images = draw(self.sampler, self.prompts, self.seeds, self.sample_config, self.batch_size)
                nulls = (draw(self.null_sampler, self.prompts[:1], self.seeds, self.sample_config, self.batch_size)
                         if self.null_branch else {})
            self._save(step, images, nulls)
            self._log(accelerator, step, images, nulls)
        accelerator.wait_for_everyone()

    def _save(self, step: int, images: dict[tuple[int, int], Tensor], nulls: dict[tuple[int, int], Tensor]) -> None:
        folder = self.folder / f"step-{step:06d}"
        folder.mkdir(parents=True, exist_ok=True)
        arrays = {cell: to_uint8(image) for cell, image in images.items()}
        for (index, seed), array in arrays.items():
            atomic_write_bytes(folder / image_name(index, seed), png(array))
        rows = [[arrays[(i, s)] for s in self.seeds] for i in range(len(self.prompts))]
        atomic_write_bytes(self.folder / grid_name(step), png(grid(rows)))
        if nulls:
            null_arrays = [to_uint8(nulls[(0, s)]) for s in self.seeds]
            for seed, array in zip(self.seeds, null_arrays):
                atomic_write_bytes(folder / null_image_name(seed), png(array))
            atomic_write_bytes(self.folder / grid_name(step, null=True), png(grid([null_arrays])))

    def _log(self, accelerator: Any, step: int, images: dict[tuple[int, int], Tensor],
             nulls: dict[tuple[int, int], Tensor]) -> None:
        rows = [[to_uint8(images[(i, s)]) for s in self.seeds] for i in range(len(self.prompts))]
        for tracker in accelerator.trackers:
            if tracker.name == "tensorboard":
                writer = tracker.writer
                writer.add_image(TB_IMAGES, grid(rows), step, dataformats="HWC")
                if nulls:
                    writer.add_image(TB_NULL, grid([[to_uint8(nulls[(0, s)]) for s in self.seeds]]), step,
                                     dataformats="HWC")
                writer.flush()
            elif tracker.name == "wandb":
                import wandb

                values = {TB_IMAGES: [wandb.Image(rows[i][j], caption=f"{i}: {prompt} (seed {seed})")
                                      for i, prompt in enumerate(self.prompts) for j, seed in enumerate(self.seeds)]}
                if nulls:
                    values[TB_NULL] = [wandb.Image(to_uint8(nulls[(0, s)]), caption=f"null branch (seed {s})")
                                       for s in self.seeds]
                tracker.log(values, step=step)


def validation_card_info(output_dir: str | Path) -> dict[str, Any] | None:
    """What the model card shows of the validation images on disk: the reference (step 0) and
    final grids, with the prompts, seeds and settings; None when there are none."""
    import json

    folder = Path(output_dir) / VALIDATION_DIR
    index = folder / INDEX_FILE
    if not index.is_file():
        return None
    grids = sorted(p for p in folder.glob("step-*.png") if not p.stem.endswith("-null"))
    if not grids:
        return None
    info = json.loads(index.read_text())
    first, last = grids[0], grids[-1]

    def step_of(path: Path) -> int:
        return int(path.stem.split("-")[1])

    shown = [first] if first == last else [first, last]
    out = {**info, "grids": [(step_of(p), f"{VALIDATION_DIR}/{p.name}") for p in shown]}
    nulls = [folder / grid_name(step_of(p), null=True) for p in shown]
    out["null_grids"] = [(step_of(p), f"{VALIDATION_DIR}/{p.name}") for p in nulls if p.is_file()]
    return out
