"""The latent and text-embedding cache: encode every image and prompt ONCE (``snpo cache``).

The reference scripts run the VAE and the text encoder(s) on the same images and prompts
every step. The cache does that work once and training reads tensors from disk, so a cached
training step does no encoder work at all (the trainer does not even load the encoders).

Layout of ``cache_dir``::

    manifest.json              fingerprint, layout, shard list, skip report, complete flag
    null.safetensors           the null condition's prompt entries (one row)
    pairs-00000.safetensors    pairs [0, S) of the dataset, S = cache_shard_size
    pairs-00001.safetensors    ...

A shard holds, for its n pairs (n <= S: unreadable pairs are left out and counted)::

    chosen_latents, rejected_latents            (n, C, h, w)
    chosen_latents_flipped, ...                 the same images flipped (random_flip only)
    source_index, source_group, text_index      (n,) the pair's dataset index and locality
                                                group (see GroupedShuffleSampler); its prompt row
    text.<key>                                  (u, ...) one row per distinct prompt in the shard
    chosen.<key>, rejected.<key>                (n, ...) per-image entries (SDXL's time_ids)

and in its metadata the pair keys, the prompts and the pairs skipped while decoding.

Crops and flips. A random crop cannot be cached exactly (every offset would be a different
latent), so a cache requires ``center_crop: true`` and says so. A random flip is cached
exactly: both the unflipped and the flipped image are encoded (twice the latents, the text is
shared), and the cached dataset picks one per pair with the same per-item draw
(``item_seed(seed, epoch, index)``) as ``PreferencePairDataset``, so a cached run sees the same
flips as an uncached one.

Staleness. The manifest holds a fingerprint of everything the tensors depend on: the model's
encoder components (configs, tokenizer files, a sampled hash of the weight files), the VAE
override, the resolution and transform, the dataset spec (name, split, ties, sample limit,
file names and sizes) and the cache format. Training refuses a cache whose fingerprint
differs, naming the first differing entry, and so does ``snpo cache`` when asked to extend one.

Resuming. Shards are written atomically (temporary file, then rename) and the manifest is
marked complete only at the end: an interrupted ``snpo cache`` run continues at the first
missing shard. Several processes (``accelerate launch``) split the shards between them.
"""

from __future__ import annotations

import bisect
import glob
import hashlib
import json
import math
import os
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from snpo.data.dataset import SkippedItem, item_seed
from snpo.data.records import RecordSkipped
from snpo.data.sampler import GroupedShuffleSampler
from snpo.data.skips import SkipReport
from snpo.data.source import PreferenceSource
from snpo.data.transforms import PairedTransform
from snpo.errors import UserError
from snpo.files import atomic_save_safetensors, atomic_write_json

CACHE_VERSION = 1
MANIFEST = "manifest.json"
NULL_FILE = "null.safetensors"
#: how latents are taken from the VAE posterior (part of the fingerprint)
LATENT_RULE = "posterior-mean"
STORAGE_DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# pipeline components that never feed the cache
NOT_ENCODERS = frozenset({"unet", "transformer", "scheduler", "safety_checker", "feature_extractor", "image_encoder"})
DATA_SUFFIXES = frozenset({".parquet", ".arrow", ".jsonl", ".ndjson", ".csv", ".json"})
HASH_SAMPLE = 1 << 20  # bytes hashed at the start, middle and end of each weight file


class CacheError(UserError):
    """A cache that cannot be used (missing, incomplete, stale); the message is one line."""


def shard_name(index: int) -> str:
    return f"pairs-{index:05d}.safetensors"


# ---- fingerprint ---------------------------------------------------------------------------
def _sampled_file_hash(path: Path) -> str:
    """Size + start, middle and end of a (large) weight file: distinguishes checkpoints of
    one architecture without reading gigabytes."""
    size = path.stat().st_size
    h = hashlib.blake2b(str(size).encode(), digest_size=12)
    with path.open("rb") as fh:
        for offset in sorted({0, max(0, size // 2 - HASH_SAMPLE // 2), max(0, size - HASH_SAMPLE)}):
            fh.seek(offset)
            h.update(fh.read(HASH_SAMPLE))
    return h.hexdigest()


def _clean_config(config: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in config.items() if k not in ("_name_or_path", "_diffusers_version", "transformers_version")}


def component_fingerprint(folder: Path) -> dict[str, Any]:
    """Configs (parsed), small files (hashed) and weight files (sampled hash) of a folder."""
    out: dict[str, Any] = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        name = path.relative_to(folder).as_posix()
        if path.suffix in (".safetensors", ".bin", ".pt", ".ckpt"):
            out[name] = _sampled_file_hash(path)
        elif path.name in ("config.json",):
            out[name] = _clean_config(json.loads(path.read_text()))
        elif path.stat().st_size < (8 << 20):
            out[name] = hashlib.blake2b(path.read_bytes(), digest_size=12).hexdigest()
    return out


def model_fingerprint(model_path: Path, vae_path: Path | None = None) -> dict[str, Any]:
    """What the cached tensors depend on in a pipeline folder: its encoder components."""
    index = json.loads((model_path / "model_index.json").read_text())
    out: dict[str, Any] = {
        "_class_name": index.get("_class_name"),
        "force_zeros_for_empty_prompt": index.get("force_zeros_for_empty_prompt"),
    }
    for name, value in sorted(index.items()):
        if name.startswith("_") or name in NOT_ENCODERS or not isinstance(value, list) or value[0] is None:
            continue
        folder = vae_path if (name == "vae" and vae_path is not None) else model_path / name
        if folder.is_dir():
            out[name] = component_fingerprint(folder)
    return out


def dataset_fingerprint(spec: str, split: str | None, drop_ties: bool, max_train_samples: int | None,
                        max_caption_chars: int | None = None) -> dict[str, Any]:
    """The dataset spec plus the names and sizes of its local files (a hub id stays a name)."""
    path = Path(spec).expanduser()
    if path.is_dir():  # the data files only (a folder may also hold images or notes)
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in DATA_SUFFIXES)
        listing = {p.relative_to(path).as_posix(): p.stat().st_size for p in files}
    elif path.is_file():
        listing = {path.name: path.stat().st_size}
    elif set("*?[") & set(spec):
        listing = {os.path.basename(p): os.path.getsize(p) for p in sorted(glob.glob(spec))}
    else:
        listing = {}
    return {"dataset_name": spec, "dataset_split": split, "drop_ties": drop_ties,
            "max_train_samples": max_train_samples, "max_caption_chars": max_caption_chars,
            "files": listing}


def cache_fingerprint(
    *, family: str, model_path: Path, vae_path: Path | None, resolution: int, center_crop: bool,
    random_flip: bool, resample: str, dataset: dict[str, Any],
) -> dict[str, Any]:
    """Everything a cache's tensors depend on; compared entry by entry when it is opened."""
    return {
        "version": CACHE_VERSION,
        "family": family,
        "latents": LATENT_RULE,
        "model": model_fingerprint(model_path, vae_path),
        "transform": {"resolution": resolution, "center_crop": center_crop,
                      "random_flip": random_flip, "resample": resample},
        "dataset": dataset,
    }


def first_difference(saved: Any, mine: Any, path: str = "") -> str | None:
    """The first entry where two fingerprints differ, as ``a.b.c: saved -> mine``."""
    if isinstance(saved, dict) and isinstance(mine, dict):
        for key in sorted(set(saved) | set(mine)):
            where = f"{path}.{key}" if path else key
            if key not in saved or key not in mine:
                return f"{where}: {'absent' if key not in saved else 'present'} in the cache"
            found = first_difference(saved[key], mine[key], where)
            if found:
                return found
        return None
    if saved != mine:
        return f"{path}: cache has {_short(saved)}, this run has {_short(mine)}"
    return None


def _short(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."


# ---- the manifest ----------------------------------------------------------------------
def read_manifest(cache_dir: Path) -> dict[str, Any] | None:
    path = cache_dir / MANIFEST
    return json.loads(path.read_text()) if path.is_file() else None


# ---- building ----------------------------------------------------------------------------
class _PairImages(Dataset):
    """Decoded, centre-cropped pairs (and their flipped twins) of a source, for encoding."""

    def __init__(self, source: PreferenceSource, transform: PairedTransform, with_flip: bool) -> None:
        self.source, self.transform, self.with_flip = source, transform, with_flip
        self.groups = source.groups()

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> dict[str, Any] | SkippedItem:
        try:
            record = self.source.get(index)
        except RecordSkipped as exc:
            return SkippedItem(exc.kind, exc.key, exc.detail)
        item: dict[str, Any] = {"index": index, "group": int(self.groups[index]),
                                "prompt": record.prompt, "key": record.key}
        for flip in (False, True) if self.with_flip else (False,):
            suffix = "_flipped" if flip else ""
            for name, image in (("chosen", record.chosen), ("rejected", record.rejected)):
                pixels, original_size, crop = self.transform.apply(image, 0.5, 0.5, flip)
                item[f"{name}_pixels{suffix}"] = pixels
                if not flip:  # a centre crop has the same offsets flipped or not
                    item[f"{name}_original_size"] = torch.tensor(original_size)
                    item[f"{name}_crop_top_left"] = torch.tensor(crop)
        return item


def _collate_images(items: Sequence[dict[str, Any] | SkippedItem]) -> dict[str, Any]:
    kept = [i for i in items if not isinstance(i, SkippedItem)]
    batch: dict[str, Any] = {"skipped": [i for i in items if isinstance(i, SkippedItem)], "size": len(kept)}
    if kept:
        for key in kept[0]:
            values = [i[key] for i in kept]
            batch[key] = torch.stack(values) if isinstance(values[0], Tensor) else values
    return batch


class _ShardWriter:
    """Accumulates encoded pairs of one shard; prompts deduplicated within the shard."""

    def __init__(self, image_keys: Sequence[str], dtype: torch.dtype) -> None:
        self.image_keys, self.dtype = tuple(image_keys), dtype
        self.tensors: dict[str, list[Tensor]] = {}
        self.text_rows: dict[str, list[Tensor]] = {}
        self.prompts: dict[str, int] = {}
        self.keys: list[str] = []
        self.text_index: list[int] = []
        self.skipped: list[list[str]] = []

    def _add(self, name: str, value: Tensor) -> None:
        self.tensors.setdefault(name, []).append(value.detach().to("cpu", self.dtype))

    def add(self, batch: dict[str, Any], chosen: Tensor, rejected: Tensor, cond: dict[str, Tensor],
            flipped: tuple[Tensor, Tensor] | None) -> None:
        b = chosen.shape[0]
        self._add("chosen_latents", chosen)
        self._add("rejected_latents", rejected)
        if flipped is not None:
            self._add("chosen_latents_flipped", flipped[0])
            self._add("rejected_latents_flipped", flipped[1])
        self.tensors.setdefault("source_index", []).append(torch.as_tensor(batch["index"], dtype=torch.int64))
        self.tensors.setdefault("source_group", []).append(torch.as_tensor(batch["group"], dtype=torch.int64))
        for key, value in cond.items():
            if key in self.image_keys:
                self._add(f"chosen.{key}", value[:b])
                self._add(f"rejected.{key}", value[b:])
        for i, prompt in enumerate(batch["prompt"]):
            if prompt not in self.prompts:
                self.prompts[prompt] = len(self.prompts)
                for key, value in cond.items():
                    if key not in self.image_keys:  # rows [0, b) are the prompts' (chosen) rows
                        self.text_rows.setdefault(f"text.{key}", []).append(value[i].detach().to("cpu", self.dtype))
            self.text_index.append(self.prompts[prompt])
        self.keys.extend(batch["key"])

    def save(self, path: Path) -> int:
        tensors = {name: torch.cat(parts) for name, parts in self.tensors.items()}
        tensors.update({name: torch.stack(rows) for name, rows in self.text_rows.items()})
        tensors["text_index"] = torch.tensor(self.text_index, dtype=torch.int64)
        if not self.keys:  # every pair of the shard unreadable: an empty but valid shard
            tensors = {k: torch.zeros(0, dtype=torch.int64) for k in ("source_index", "source_group", "text_index")}
        metadata = {"keys": json.dumps(self.keys), "prompts": json.dumps(list(self.prompts)),
                    "skipped": json.dumps(self.skipped)}
        atomic_save_safetensors(tensors, path, metadata)
        return len(self.keys)


def build_cache(
    cache_dir: str | Path,
    source: PreferenceSource,
    backbone: Any,
    *,
    fingerprint: dict[str, Any],
    resolution: int,
    center_crop: bool = True,
    random_flip: bool = False,
    resample: str = "bicubic",
    max_pairs: int | None = None,
    shard_size: int = 512,
    batch_size: int = 8,
    num_workers: int = 0,
    storage_dtype: torch.dtype = torch.float32,
    accelerator: Any = None,
    show_progress: bool = True,
    on_shard: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Encode ``source`` with ``backbone`` into ``cache_dir``; resume where a previous run
    stopped. Returns the completed manifest. ``on_shard(i)`` runs after shard ``i`` is saved."""
    if not center_crop:
        raise CacheError(
            "center_crop: a cache needs center_crop=true (a random crop cannot be cached); "
            "train without cache_dir for random crops"
        )
    cache_dir = Path(cache_dir)
    is_main = accelerator is None or accelerator.is_main_process
    rank, world = (0, 1) if accelerator is None else (accelerator.process_index, accelerator.num_processes)
    n = len(source) if max_pairs is None else min(len(source), max_pairs)
    num_shards = math.ceil(n / shard_size)
    layout = {"shard_size": shard_size, "num_source_pairs": n, "random_flip": random_flip,
              "dtype": str(storage_dtype).removeprefix("torch."),
              "image_keys": list(getattr(backbone, "image_condition_keys", ())),
              "resolution": resolution}
    existing = read_manifest(cache_dir)
    if existing is not None:
        diff = first_difference(existing["fingerprint"], fingerprint) or first_difference(existing["layout"], layout)
        if diff:
            raise CacheError(f"cache_dir: {cache_dir} holds another cache ({diff}); use another cache_dir or delete it")
        if existing.get("complete"):
            return existing
    if is_main:
        cache_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(cache_dir / MANIFEST, {"fingerprint": fingerprint, "layout": layout, "complete": False})
        if not (cache_dir / NULL_FILE).is_file():
            with torch.no_grad():
                null = backbone.null_condition(backbone.encode_prompts([""]))
            rows = {f"text.{k}": v[:1].to("cpu", storage_dtype) for k, v in null.items() if k not in layout["image_keys"]}
            atomic_save_safetensors(rows, cache_dir / NULL_FILE)
    if accelerator is not None:
        accelerator.wait_for_everyone()

    transform = PairedTransform(resolution, center_crop=True, random_flip=False, resample=resample)
    images = _PairImages(source, transform, with_flip=random_flip)
    todo = [s for s in range(num_shards) if s % world == rank and not (cache_dir / shard_name(s)).is_file()]
    progress = tqdm(total=sum(min(n, (s + 1) * shard_size) - s * shard_size for s in todo),
                    desc="cache", disable=not (show_progress and is_main), dynamic_ncols=True)
    device, dtype = backbone.device, backbone.encoder_dtype
    for s in todo:
        indices = list(range(s * shard_size, min(n, (s + 1) * shard_size)))
        loader = DataLoader(torch.utils.data.Subset(images, indices), batch_size=batch_size,
                            collate_fn=_collate_images, num_workers=num_workers)
        writer = _ShardWriter(layout["image_keys"], storage_dtype)
        for batch in loader:
            writer.skipped.extend([i.kind, i.key, i.detail] for i in batch["skipped"])
            progress.update(batch["size"] + len(batch["skipped"]))
            if batch["size"] == 0:
                continue
            with torch.no_grad():
                chosen, rejected, cond = backbone.encode_batch(batch)
                flipped = None
                if random_flip:
                    pixels = torch.cat([batch["chosen_pixels_flipped"], batch["rejected_pixels_flipped"]])
                    flipped = backbone.encode_images(pixels.to(device, dtype)).float().chunk(2)
            writer.add(batch, chosen, rejected, cond, flipped)
        writer.save(cache_dir / shard_name(s))
        if on_shard is not None:
            on_shard(s)
    progress.close()
    if accelerator is not None:
        accelerator.wait_for_everyone()
    manifest = _finish_manifest(cache_dir, fingerprint, layout, source.scan(), num_shards)
    if is_main:
        atomic_write_json(cache_dir / MANIFEST, manifest)
    if accelerator is not None:
        accelerator.wait_for_everyone()
    return manifest


def _finish_manifest(cache_dir: Path, fingerprint: dict[str, Any], layout: dict[str, Any],
                     scan_report: SkipReport, num_shards: int) -> dict[str, Any]:
    report = scan_report.copy()
    shards = []
    for s in range(num_shards):
        with safe_open(str(cache_dir / shard_name(s)), framework="pt") as f:
            meta = f.metadata()
        for kind, key, _ in json.loads(meta["skipped"]):
            report.add(kind, key=key)
        shards.append({"file": shard_name(s), "pairs": len(json.loads(meta["keys"]))})
    # the scan's counts plus the pairs found unreadable while encoding (a sample limit,
    # max_train_samples, is not a skip: num_pairs says how many pairs the cache holds)
    return {"fingerprint": fingerprint, "layout": layout, "complete": True, "shards": shards,
            "num_pairs": sum(s["pairs"] for s in shards), "report": report.as_dict(),
            "report_summary": report.summary()}


# ---- reading -----------------------------------------------------------------------------
class CachedPairDataset(Dataset):
    """Pairs of a complete cache as the trainer's batches expect (latents + condition).

    Items are read through memory-mapped safetensors handles (a few per process), so random
    access costs one small read per tensor. ``set_epoch`` varies the flips as
    ``PreferencePairDataset`` does.
    """

    def __init__(self, cache_dir: str | Path, manifest: dict[str, Any], *, seed: int = 0, max_open: int = 16) -> None:
        self.cache_dir = Path(cache_dir)
        self.manifest = manifest
        layout = manifest["layout"]
        self.random_flip = bool(layout["random_flip"])
        self.image_keys = tuple(layout["image_keys"])
        self.flip_draw = PairedTransform(layout["resolution"], center_crop=True, random_flip=self.random_flip)
        self.seed, self.epoch = seed, 0
        self.files = [s["file"] for s in manifest["shards"] if s["pairs"] > 0]
        counts = [s["pairs"] for s in manifest["shards"] if s["pairs"] > 0]
        self.starts = [0]
        for c in counts:
            self.starts.append(self.starts[-1] + c)
        self.max_open = max_open
        self._handles: OrderedDict[int, Any] = OrderedDict()
        self._meta: dict[int, dict[str, list[str]]] = {}
        self.report = SkipReport(manifest["report"]["total_seen"], manifest["report"]["counts"])
        with safe_open(str(self.cache_dir / NULL_FILE), framework="pt") as f:
            self.null_text = {k.removeprefix("text."): f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
        groups = []
        for name in self.files:
            with safe_open(str(self.cache_dir / name), framework="pt") as f:
                groups.append(f.get_tensor("source_group"))
        self.groups = torch.cat(groups).numpy() if groups else np.zeros(0, dtype=np.int64)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.starts[-1]

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_handles"] = OrderedDict()  # handles are per process
        return state

    def _handle(self, shard: int) -> Any:
        if shard in self._handles:
            self._handles.move_to_end(shard)
            return self._handles[shard]
        handle = safe_open(str(self.cache_dir / self.files[shard]), framework="pt")
        self._handles[shard] = handle
        if len(self._handles) > self.max_open:
            self._handles.popitem(last=False)
        if shard not in self._meta:
            meta = handle.metadata()
            self._meta[shard] = {"keys": json.loads(meta["keys"]), "prompts": json.loads(meta["prompts"])}
        return handle

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < len(self):
            raise IndexError(f"pair {index} out of range ({len(self)} cached pairs)")
        shard = bisect.bisect_right(self.starts, index) - 1
        j = index - self.starts[shard]
        f = self._handle(shard)
        meta = self._meta[shard]

        def row(name: str, i: int) -> Tensor:
            return f.get_slice(name)[i : i + 1][0]

        source_index = int(row("source_index", j))
        text_row = int(row("text_index", j))
        # the same per-item draw as PreferencePairDataset, so flips match an uncached run
        generator = torch.Generator().manual_seed(item_seed(self.seed, self.epoch, source_index))
        flip = self.flip_draw.sample(generator)[2]
        suffix = "_flipped" if flip else ""
        item: dict[str, Any] = {
            "prompt": meta["prompts"][text_row],
            "key": meta["keys"][j],
            "chosen_latents": row(f"chosen_latents{suffix}", j),
            "rejected_latents": row(f"rejected_latents{suffix}", j),
            "cond_chosen": {}, "cond_rejected": {},
        }
        for name in f.keys():  # noqa: SIM118 (safe_open handles have no __iter__)
            if name.startswith("text."):
                value = row(name, text_row)
                item["cond_chosen"][name[5:]] = item["cond_rejected"][name[5:]] = value
            elif name.startswith("chosen."):
                item["cond_chosen"][name[7:]] = row(name, j)
            elif name.startswith("rejected."):
                item["cond_rejected"][name[9:]] = row(name, j)
        return item


class CachedGroupSampler(GroupedShuffleSampler):
    """``GroupedShuffleSampler``'s order over a cache's pairs, from the locality groups the
    source had: a cached run visits the pairs in the same order as an uncached one."""

    def __init__(self, dataset: CachedPairDataset, *, seed: int = 0, groups_per_window: int = 4) -> None:
        # the parent's state is exactly these four fields; its order() uses nothing else
        self.groups = np.asarray(dataset.groups)
        self.seed = seed
        self.epoch = 0
        self.groups_per_window = max(1, int(groups_per_window))


def collate_cached(items: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Stack cached items: latents ``(B, ...)`` and a condition with 2B rows, chosen first."""
    keys = items[0]["cond_chosen"].keys()
    return {
        "prompt": [i["prompt"] for i in items],
        "key": [i["key"] for i in items],
        "size": len(items),
        "skipped": [],
        "chosen_latents": torch.stack([i["chosen_latents"] for i in items]),
        "rejected_latents": torch.stack([i["rejected_latents"] for i in items]),
        "cond": {k: torch.cat([torch.stack([i["cond_chosen"][k] for i in items]),
                               torch.stack([i["cond_rejected"][k] for i in items])]) for k in keys},
    }


def open_cache(cache_dir: str | Path, fingerprint: dict[str, Any], *, seed: int = 0) -> CachedPairDataset:
    """The cached dataset, or a one-line ``CacheError`` (missing, incomplete or stale cache)."""
    cache_dir = Path(cache_dir)
    manifest = read_manifest(cache_dir)
    if manifest is None:
        raise CacheError(f"cache_dir: no cache in {cache_dir}; build it first with `snpo cache` (same config)")
    diff = first_difference(manifest["fingerprint"], fingerprint)
    if diff:
        raise CacheError(f"cache_dir: the cache in {cache_dir} is stale ({diff}); rebuild it with `snpo cache`")
    if not manifest.get("complete"):
        done = len(list(cache_dir.glob("pairs-*.safetensors")))
        total = math.ceil(manifest["layout"]["num_source_pairs"] / manifest["layout"]["shard_size"])
        raise CacheError(
            f"cache_dir: the cache in {cache_dir} is incomplete ({done} of {total} shards); "
            "run `snpo cache` again to finish it"
        )
    if manifest["num_pairs"] == 0:
        raise CacheError(f"cache_dir: the cache in {cache_dir} holds no usable pairs: {manifest['report_summary']}")
    return CachedPairDataset(cache_dir, manifest, seed=seed)
