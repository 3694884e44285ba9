"""The toy world: a "web-pretrained" reference model and Pick-a-Pic-style preference pairs.

1. **Web-like pretraining data.** Rendered scenes with jitter; a fraction get a WRONG
   caption (1-2 attributes changed) and a fraction are DEGRADED (blur, noise or washout), as
   web image-text data is. The reference is pretrained on it with CFG dropout, through the
   same trainer as every alignment method, so it samples both good and bad images, as SD does.
2. **A pool of generators of different strength**: the reference; a STRONGER one (the
   reference trained further on clean, correctly captioned renders); a WEAKER one (the
   reference's pretraining stopped early). Pick-a-Pic's images came from several models and
   settings, many stronger than SD1.5; pairs sampled from the model itself are the other
   regime. Which one a study runs is a :class:`PairPool`.
3. **Pairs as Pick-a-Pic made them.** Two images per prompt, each from a generator drawn from
   the pool and with a guidance scale drawn from a set, labelled by the label judge with
   Bradley-Terry noise: ``P(image 0 preferred) = sigmoid((s0 - s1) / T)``.
4. **A held-out judge** that never labels anything, to catch reward hacking.

Everything is cached under a key of the settings that produced it, so a second demo run
reuses the reference and the pairs.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from snpo.backbones.toy import ToyBackbone, ToyModelConfig
from snpo.backbones.toy_flow import ToyFlowBackbone
from snpo.files import atomic_save_safetensors
from snpo.methods.denoising import DenoisingMethod
from snpo.sampling import SamplerSettings, sample_images, single_network_guide
from snpo.toy import scenes as S
from snpo.toy.data import TensorImageDataset, TensorPairDataset, stack_batch
from snpo.toy.judges import bradley_terry_labels, make_heldout_judge, make_label_judge
from snpo.toy.tokenizer import build_toy_tokenizer
from snpo.training.config import TrainConfig
from snpo.training.trainer import Callback, Trainer

#: Bump when the toy world's code changes what a cached artefact would contain.
#: 2: the null branch is pretrained on the trained text encoder's empty prompt (it used the
#: initial encoder's); generator pools; pair sources recorded.
WORLD_VERSION = 2
GENERATORS = ("reference", "strong", "weak")


@dataclass(frozen=True)
class PairPool:
    """Where the two images of each training pair come from: each image's generator is drawn
    independently with these probabilities (names from :data:`GENERATORS`)."""

    name: str
    weights: tuple[tuple[str, float], ...]

    def probabilities(self) -> dict[str, float]:
        total = sum(w for _, w in self.weights)
        return {g: w / total for g, w in self.weights}


#: the regimes of the study. ``on-policy``: both images are the reference's own samples (the
#: regime where a likelihood pull towards the data should hurt); ``pickapic-like``: most
#: images from a stronger generator, the rest the reference's (Pick-a-Pic's came from several
#: models, many stronger than SD1.5); ``mixed-strength``: weaker, equal and stronger
#: generators in equal shares (its images average BELOW the reference's own: docs/toy.md).
POOLS = {
    "on-policy": PairPool("on-policy", (("reference", 1.0),)),
    "pickapic-like": PairPool("pickapic-like", (("reference", 1 / 3), ("strong", 2 / 3))),
    "mixed-strength": PairPool("mixed-strength", (("reference", 1 / 3), ("strong", 1 / 3), ("weak", 1 / 3))),
}


def load_toy(path: str | Path) -> ToyBackbone:
    """A saved toy model: the DDPM toy or the flow-matching toy (its ``model_index.json`` says which)."""
    from snpo.backbones import load_backbone

    return load_backbone(path)


def default_cache_dir() -> Path:
    root = os.environ.get("SNPO_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "snpo"
    )
    return Path(root) / "toy"


@dataclass
class ToyWorldConfig:
    """Everything that determines the reference model and the preference pairs."""

    seed: int = 0
    model: ToyModelConfig = field(default_factory=ToyModelConfig)
    flow: bool = False  # the flow-matching toy (ToyFlowBackbone: rectified flow, Euler sampling) instead of the DDPM one
    # web-like pretraining
    pretrain_images: int = 24_000
    pretrain_steps: int = 2500
    pretrain_batch_size: int = 64
    pretrain_learning_rate: float = 2e-3
    pretrain_cfg_dropout: float = 0.1
    weak_fraction: float = 0.3  # the weak generator: the reference's pretraining stopped here
    strong_steps: int = 600  # the strong generator: the reference trained on clean data this long
    strong_learning_rate: float = 5e-4
    wrong_caption_fraction: float = 0.2
    degraded_fraction: float = 0.25
    jitter: float = 0.04
    # prompts and pairs
    heldout_prompts: int = 24
    pairs_per_prompt: int = 16
    heldout_pairs_per_prompt: int = 4
    pair_guidance_scales: tuple[float, ...] = (1.5, 3.0, 5.0, 7.5)
    pair_sampling_steps: int = 20
    label_temperature: float = 0.03

    def key(self, *parts: str) -> str:
        blob = json.dumps([WORLD_VERSION, asdict(self), *parts], sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]

    def pretrain_key(self) -> str:
        fields = {k: v for k, v in asdict(self).items()
                  if k.startswith(("pretrain", "wrong", "degraded", "jitter", "model", "seed", "weak", "flow"))}
        blob = json.dumps([WORLD_VERSION, fields], sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]

    def strong_key(self) -> str:
        return self.key("strong", self.pretrain_key())


@dataclass
class PairSet:
    """Preference pairs with their scores under both judges (by the pair's own order)."""

    prompts: list[str]
    chosen: torch.Tensor  # (N, 3, H, W) in [0, 1]
    rejected: torch.Tensor
    label_scores: np.ndarray  # (N, 2): label-judge score of chosen, rejected
    heldout_scores: np.ndarray  # (N, 2)
    sources: np.ndarray | None = None  # (N, 2): index into GENERATORS of chosen, rejected

    def source_report(self) -> dict[str, float]:
        """Share of images from each generator, of chosen images from each, and of mixed pairs."""
        if self.sources is None:
            return {}
        out = {}
        for i, name in enumerate(GENERATORS):
            out[f"images/{name}"] = float(np.mean(self.sources == i))
            out[f"chosen/{name}"] = float(np.mean(self.sources[:, 0] == i))
        out["pairs/mixed"] = float(np.mean(self.sources[:, 0] != self.sources[:, 1]))
        return out

    def dataset(self) -> TensorPairDataset:
        return TensorPairDataset(self.chosen, self.rejected, self.prompts)

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {
            "chosen": self.chosen, "rejected": self.rejected,
            "label_scores": torch.from_numpy(self.label_scores),
            "heldout_scores": torch.from_numpy(self.heldout_scores),
        }
        if self.sources is not None:
            tensors["sources"] = torch.from_numpy(self.sources.astype(np.int64))
        atomic_save_safetensors(tensors, path, metadata={"prompts": json.dumps(self.prompts)})

    @classmethod
    def load(cls, path: Path) -> PairSet:
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            prompts = json.loads(f.metadata()["prompts"])
        t = load_file(str(path))
        sources = t["sources"].numpy() if "sources" in t else None
        return cls(prompts, t["chosen"], t["rejected"], t["label_scores"].numpy(), t["heldout_scores"].numpy(),
                   sources)


def split_prompts(config: ToyWorldConfig) -> tuple[list[str], list[str]]:
    """(training prompts, held-out prompts): a fixed, seeded split of the 120 captions."""
    captions = [scene.caption for scene in S.all_scenes()]
    order = np.random.default_rng(config.seed + 17).permutation(len(captions))
    heldout = sorted(captions[i] for i in order[: config.heldout_prompts])
    train = sorted(captions[i] for i in order[config.heldout_prompts :])
    return train, heldout


def web_like_data(config: ToyWorldConfig, n: int) -> tuple[torch.Tensor, list[str], dict[str, int]]:
    """``n`` captioned images: jittered renders, some wrongly captioned, some degraded."""
    rng = np.random.default_rng(config.seed)
    all_scenes = S.all_scenes()
    scenes = [all_scenes[i] for i in rng.integers(len(all_scenes), size=n)]
    images = S.render(scenes, config.model.resolution, rng=rng, jitter=config.jitter)
    degraded = rng.random(n) < config.degraded_fraction
    kinds = rng.integers(len(S.DEGRADATIONS), size=n)
    for k, kind in enumerate(S.DEGRADATIONS):
        idx = np.flatnonzero(degraded & (kinds == k))
        if len(idx):
            images[idx] = S.degrade(images[idx], kind, rng, strength=float(rng.uniform(0.7, 1.3)))
    wrong = rng.random(n) < config.wrong_caption_fraction
    captions = [S.corrupt_caption(s, rng).caption if w else s.caption for s, w in zip(scenes, wrong)]
    stats = {"images": n, "wrong_caption": int(wrong.sum()), "degraded": int(degraded.sum())}
    return torch.from_numpy(images), captions, stats


class _Snapshot(Callback):
    """Saves the model being pretrained at one step (the weak generator)."""

    def __init__(self, backbone: ToyBackbone, step: int, folder: Path) -> None:
        self.backbone, self.step, self.folder = backbone, step, folder

    def on_step_end(self, step: int, logs: dict) -> None:
        if step == self.step:
            self.backbone.save_pretrained(self.folder)


def _denoise(backbone: ToyBackbone, pixels, captions, config: ToyWorldConfig, folder: Path, *, steps: int,
             learning_rate: float, show_progress: bool, callbacks=(), desc: str = "pretrain") -> list[float]:
    """Plain denoising training of the UNet and the text encoder jointly (CFG dropout)."""
    params = list(backbone.denoiser.parameters()) + list(backbone.text_encoder.parameters())
    train_config = TrainConfig(
        output_dir=str(folder), max_steps=steps, per_device_train_batch_size=config.pretrain_batch_size,
        learning_rate=learning_rate, lr_scheduler="cosine", lr_warmup_steps=min(100, steps // 10),
        adam_weight_decay=0.0, max_grad_norm=1.0, checkpointing_steps=0, report_to="none", seed=config.seed,
        method="sft", cfg_dropout=config.pretrain_cfg_dropout,
    )
    backbone.text_encoder.train()
    method = DenoisingMethod(backbone, config.pretrain_cfg_dropout, train_text_encoder=True)
    method.progress_name = desc
    result = Trainer(
        train_config, backbone, TensorImageDataset(pixels, captions), method,
        collate_fn=stack_batch, trainable_parameters=params, show_progress=show_progress,
        save_model=False, write_logs=False, callbacks=list(callbacks),
    ).train()
    backbone.text_encoder.eval()
    backbone.denoiser.eval()
    return [h["loss"] for h in result.history]


def pretrain_reference(config: ToyWorldConfig, folder: Path, *, show_progress: bool = True) -> ToyBackbone:
    """Pretrain the toy reference on web-like data (UNet and text encoder jointly); the model at
    ``weak_fraction`` of the way is kept as the weak generator (``folder/weak``)."""
    tokenizer = build_toy_tokenizer(S.WORDS, folder / "tokenizer_build", max_length=config.model.max_prompt_tokens)
    backbone = (ToyFlowBackbone if config.flow else ToyBackbone).create(tokenizer, config.model, seed=config.seed)
    pixels, captions, stats = web_like_data(config, config.pretrain_images)
    weak_step = max(1, int(round(config.weak_fraction * config.pretrain_steps)))
    losses = _denoise(backbone, pixels, captions, config, folder, steps=config.pretrain_steps,
                      learning_rate=config.pretrain_learning_rate, show_progress=show_progress,
                      callbacks=[_Snapshot(backbone, weak_step, folder / "weak")], desc="pretrain reference")
    backbone.save_pretrained(folder)
    tail = max(1, len(losses) // 10)
    summary = {"data": stats, "steps": len(losses), "weak_step": weak_step,
               "final_loss": float(np.mean(losses[-tail:])), "config": asdict(config)}
    (folder / "pretraining.json").write_text(json.dumps(summary, indent=2, default=str))
    return backbone


def load_or_pretrain_reference(
    config: ToyWorldConfig, cache_dir: Path | None = None, *, show_progress: bool = True
) -> tuple[ToyBackbone, Path]:
    """The cached reference for these settings, pretraining it on a cache miss."""
    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
    folder = cache_dir / f"reference-{config.pretrain_key()}"
    if (folder / "model_index.json").is_file() and (folder / "pretraining.json").is_file():
        return load_toy(folder), folder
    tmp = folder.with_name(folder.name + ".tmp")
    if tmp.exists():
        import shutil

        shutil.rmtree(tmp)
    pretrain_reference(config, tmp, show_progress=show_progress)
    os.replace(tmp, folder)  # a cache entry is never half-written
    return load_toy(folder), folder


@torch.no_grad()
def sample_with_scales(
    backbone: ToyBackbone, prompts: list[str], seeds: list[int], scales: np.ndarray, steps: int,
    *, show_progress: bool = False, desc: str = "sample",
) -> torch.Tensor:
    """Reference samples where image i uses guidance scale ``scales[i]``."""
    model = backbone.denoiser
    out = torch.empty(len(prompts), 3, backbone.config.resolution, backbone.config.resolution)
    shape = (backbone.config.latent_channels, backbone.config.latent_size, backbone.config.latent_size)
    for scale in np.unique(scales):
        idx = np.flatnonzero(scales == scale)
        cfg = SamplerSettings(num_inference_steps=steps, guidance_scale=float(scale), batch_size=256,
                              scheduler=backbone.sampling_scheduler_name)  # DDIM, or the flow toy's Euler
        out[idx] = sample_images(
            backbone, single_network_guide(backbone, model, float(scale)),
            [prompts[i] for i in idx], [seeds[i] for i in idx], shape, cfg,
            show_progress=show_progress, desc=f"{desc} cfg {scale:g}",
        )
    return out


def clean_data(config: ToyWorldConfig, n: int) -> tuple[torch.Tensor, list[str]]:
    """``n`` clean renders with their true captions (the strong generator's extra data)."""
    rng = np.random.default_rng(config.seed + 31)
    all_scenes = S.all_scenes()
    scenes = [all_scenes[i] for i in rng.integers(len(all_scenes), size=n)]
    images = S.render(scenes, config.model.resolution, rng=rng, jitter=config.jitter)
    return torch.from_numpy(images), [s.caption for s in scenes]


def load_or_make_strong(config: ToyWorldConfig, reference_dir: Path, *, show_progress: bool = True) -> Path:
    """The strong generator: the reference trained further on clean, correctly captioned data
    (cached next to the reference)."""
    folder = reference_dir.parent / f"strong-{config.strong_key()}"
    if (folder / "model_index.json").is_file():
        return folder
    tmp = folder.with_name(folder.name + ".tmp")
    if tmp.exists():
        import shutil

        shutil.rmtree(tmp)
    backbone = load_toy(reference_dir)
    pixels, captions = clean_data(config, config.strong_steps * config.pretrain_batch_size // 4)
    losses = _denoise(backbone, pixels, captions, config, tmp, steps=config.strong_steps,
                      learning_rate=config.strong_learning_rate, show_progress=show_progress,
                      desc="strong generator (clean data)")
    backbone.save_pretrained(tmp)
    (tmp / "training.json").write_text(json.dumps({"steps": len(losses), "final_loss": float(np.mean(losses[-10:]))}))
    os.replace(tmp, folder)
    return folder


def load_generators(config: ToyWorldConfig, reference_dir: Path, pool: PairPool, *,
                    show_progress: bool = True) -> dict[str, ToyBackbone]:
    """The generators ``pool`` draws from, loaded (the strong one made on first use)."""
    out = {}
    for name in pool.probabilities():
        if name == "reference":
            out[name] = load_toy(reference_dir)
        elif name == "weak":
            out[name] = load_toy(reference_dir / "weak")
        elif name == "strong":
            out[name] = load_toy(load_or_make_strong(config, reference_dir,
                                                                        show_progress=show_progress))
        else:
            raise ValueError(f"pool: unknown generator {name!r}; known: {', '.join(GENERATORS)}")
    return out


def make_pairs(
    generators: dict[str, ToyBackbone], pool: PairPool, prompts: list[str], pairs_per_prompt: int,
    config: ToyWorldConfig, *, seed_offset: int, show_progress: bool = True, desc: str = "pairs",
) -> PairSet:
    """Two images per pair, each from a generator drawn from ``pool`` and a guidance scale
    drawn from the set, labelled by the label judge with Bradley-Terry noise."""
    rng = np.random.default_rng(config.seed + seed_offset)
    pair_prompts = [p for p in prompts for _ in range(pairs_per_prompt)]
    n = len(pair_prompts)
    both_prompts = pair_prompts + pair_prompts
    seeds = np.asarray(seed_offset * 1_000_000 + np.arange(2 * n))
    scales = rng.choice(np.asarray(config.pair_guidance_scales, dtype=np.float64), size=2 * n)
    probs = pool.probabilities()
    names = list(probs)
    drawn = rng.choice(len(names), size=2 * n, p=[probs[g] for g in names])
    sources = np.asarray([GENERATORS.index(names[i]) for i in drawn])
    images = torch.empty(2 * n, 3, config.model.resolution, config.model.resolution)
    for i, name in enumerate(names):
        idx = np.flatnonzero(drawn == i)
        if len(idx):
            images[idx] = sample_with_scales(
                generators[name], [both_prompts[j] for j in idx], seeds[idx].tolist(), scales[idx],
                config.pair_sampling_steps, show_progress=show_progress, desc=f"{desc} ({name})")
    first, second = images[:n], images[n:]
    label_judge, heldout_judge = make_label_judge(), make_heldout_judge()
    s0, s1 = label_judge(first, pair_prompts), label_judge(second, pair_prompts)
    h0, h1 = heldout_judge(first, pair_prompts), heldout_judge(second, pair_prompts)
    first_wins = bradley_terry_labels(s0, s1, temperature=config.label_temperature, rng=rng).astype(bool)
    mask = torch.from_numpy(first_wins).view(-1, 1, 1, 1)
    chosen = torch.where(mask, first, second)
    rejected = torch.where(mask, second, first)
    label_scores = np.stack([np.where(first_wins, s0, s1), np.where(first_wins, s1, s0)], axis=1)
    heldout_scores = np.stack([np.where(first_wins, h0, h1), np.where(first_wins, h1, h0)], axis=1)
    src0, src1 = sources[:n], sources[n:]
    pair_sources = np.stack([np.where(first_wins, src0, src1), np.where(first_wins, src1, src0)], axis=1)
    return PairSet(pair_prompts, chosen, rejected, label_scores, heldout_scores, pair_sources)


def load_or_make_pairs(
    reference_dir: Path, config: ToyWorldConfig, pool: PairPool, *, show_progress: bool = True
) -> tuple[PairSet, PairSet]:
    """(training pairs on training prompts from ``pool``, held-out pairs on held-out prompts),
    cached. Held-out pairs are always the reference's own samples: they measure what the null
    branch learned on pairs no method trained on, the same for every regime."""
    train_prompts, heldout_prompts = split_prompts(config)
    path = reference_dir / f"pairs-{pool.name}-{config.key('pairs', repr(pool))}.safetensors"
    heldout_path = reference_dir / f"heldout-pairs-{config.key('heldout-pairs')}.safetensors"
    if not path.is_file():
        generators = load_generators(config, reference_dir, pool, show_progress=show_progress)
        make_pairs(generators, pool, train_prompts, config.pairs_per_prompt, config, seed_offset=1,
                   show_progress=show_progress, desc=f"training pairs, {pool.name}").save(path)
    if not heldout_path.is_file():
        on_policy = POOLS["on-policy"]
        generators = load_generators(config, reference_dir, on_policy, show_progress=show_progress)
        make_pairs(generators, on_policy, heldout_prompts, config.heldout_pairs_per_prompt, config,
                   seed_offset=2, show_progress=show_progress, desc="held-out pairs").save(heldout_path)
    return PairSet.load(path), PairSet.load(heldout_path)
