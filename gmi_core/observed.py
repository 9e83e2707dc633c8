"""Observed specs: a checkpoint's spec built from images the user already has, without generating.

Each image on disk that records its checkpoint (A1111 infotext, ComfyUI graph, or a model manager's
preview next to the checkpoint) is attributed to a local checkpoint, by hash first and by name
second; anything ambiguous or unknown is reported and left alone. The attributed images and their
own prompts become rows of the checkpoint's *observed* spec: one row per image (S = 1), its prompt
feature from the image's own prompt. Observed specs live in the store under the prompt-set id
:data:`OBSERVED` (one per checkpoint and encoder), beside the generated spec of the platform set;
at ranking time both are merged into one spec whose kind is "mixed" (:func:`merge`).
"""

from __future__ import annotations

import hashlib
import logging
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .errors import Busy, GmiError, ImageError, SpecError
from .image_metadata import ImageMetadata, read_metadata
from .images import load_image
from .locks import spec_lock
from .loras import addnet_hash, model_metadata, observed_model
from .paths import inside, one_line, shown
from .protocols import CheckpointInfo, CheckpointListing, GenerationSettings
from .spec import Spec, SpecKey, pixel_feature, thumbnail

log = logging.getLogger(__name__)

OBSERVED = "observed"  # prompt-set id (name and hash) of observed specs in the store
MAX_OBSERVED_IMAGES = 64  # rows per observed spec: bounds ranking cost for users with huge folders
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth")
# model managers keep previews next to the checkpoint: name.png or name.preview.png (also .jpg, .jpeg, .webp)
UNKNOWN_SEED = -1


def spec_kind(spec: Spec) -> str:
    """ "generated" (the platform prompts, rendered by gmi), "observed" (the user's images) or "mixed"."""
    return spec.extra.get("kind", "generated")


def spec_counts(spec: Spec) -> dict:
    images = sum(spec.image_counts)
    if spec_kind(spec) == "generated":
        return {"generated_images": images, "observed_images": 0}
    return dict(spec.extra.get("counts") or {"generated_images": 0, "observed_images": images})


@dataclass
class Attribution:
    checkpoint: CheckpointInfo | None
    reason: str = ""  # why it is None
    how: str = ""  # "hash", "name" or "preview"


class Attributor:
    """Maps what an image records to one local checkpoint, or says why it cannot."""

    def __init__(self, listing: CheckpointListing):
        self.checkpoints = [c for c in listing.checkpoints if c.lora is None]
        self.loras = list({c.lora.sha256: c.lora for c in listing.checkpoints if c.lora}.values())  # LoRA specs
        self._addnet: dict[Path, str] = {}
        self._legacy: dict[str, list[CheckpointInfo]] | None = None
        self.by_name: dict[str, list[CheckpointInfo]] = defaultdict(list)
        self.previews: dict[tuple[str, str], CheckpointInfo] = {}
        for ckpt in self.checkpoints:
            for key in name_keys(ckpt.name):
                if ckpt not in self.by_name[key]:
                    self.by_name[key].append(ckpt)
            path = Path(ckpt.path)
            self.previews[(str(path.parent.resolve()), path.stem.lower())] = ckpt

    def by_hash(self, value: str) -> list[CheckpointInfo]:
        value = value.lower()
        if len(value) == 8:  # the old A1111 "model hash": sha256 of 64 KiB at offset 1 MiB
            if self._legacy is None:
                self._legacy = defaultdict(list)
                for ckpt in self.checkpoints:
                    try:
                        self._legacy[legacy_model_hash(Path(ckpt.path))].append(ckpt)
                    except OSError:
                        continue
            return self._legacy.get(value, [])
        if len(value) < 10:
            return []
        return [c for c in self.checkpoints if c.sha256.startswith(value)]

    def with_lora(self, base: CheckpointInfo, meta: ImageMetadata) -> tuple[CheckpointInfo | None, str]:
        """The base, or the base + LoRA combination the image records (gmi_core.loras.observed_model)."""

        def hash_of(path: Path) -> str:
            if path not in self._addnet:
                self._addnet[path] = addnet_hash(path)
            return self._addnet[path]

        return observed_model(base, meta.loras, self.loras, hash_of)

    def preview_of(self, path: Path) -> CheckpointInfo | None:
        stem = path.name[: -len(path.suffix)].lower().removesuffix(".preview")
        return self.previews.get((str(path.parent.resolve()), stem))

    def attribute(self, path: Path, meta: ImageMetadata) -> Attribution:
        preview = self.preview_of(path)
        found = self._from_metadata(meta)
        if preview is not None:
            if found.checkpoint is not None and found.checkpoint.sha256 != preview.sha256:
                return Attribution(None, f"preview of {preview.name}, but its metadata names {found.checkpoint.name}")
            if found.checkpoint is None and meta.source and "names no checkpoint" not in found.reason:
                return Attribution(None, f"preview of {preview.name}, but its metadata: {found.reason}")
            return Attribution(preview, how="preview")
        return found

    def _from_metadata(self, meta: ImageMetadata) -> Attribution:
        if not meta.source:
            return Attribution(None, "no generation metadata (A1111 infotext or ComfyUI graph)")
        if meta.problem and not meta.checkpoint_names:
            return Attribution(None, meta.problem)
        if len(meta.checkpoint_names) > 1:
            return Attribution(
                None, f"names {len(meta.checkpoint_names)} checkpoints ({', '.join(meta.checkpoint_names)}): ambiguous"
            )
        if meta.model_hash:
            hits = _distinct(self.by_hash(meta.model_hash))
            if len(hits) == 1:
                return Attribution(hits[0], how="hash")
            if len(hits) > 1:
                return Attribution(
                    None,
                    f"model hash {meta.model_hash} fits {len(hits)} checkpoints ({', '.join(c.name for c in hits)}): ambiguous",
                )
            named = f" ({meta.model_name})" if meta.model_name else ""
            return Attribution(None, f"checkpoint with hash {meta.model_hash}{named} is not installed")
        name = meta.checkpoint_names[0] if meta.checkpoint_names else meta.model_name
        if not name:
            return Attribution(None, "metadata names no checkpoint")
        hits = []
        for key in name_keys(name):
            hits = _distinct(hits + self.by_name.get(key, []))
            if hits:
                break
        if len(hits) == 1:
            return Attribution(hits[0], how="name")
        if len(hits) > 1:
            return Attribution(
                None,
                f"checkpoint name {name!r} fits {len(hits)} checkpoints ({', '.join(c.name for c in hits)}): ambiguous",
            )
        return Attribution(None, f"checkpoint {name!r} is not installed")


def _distinct(checkpoints: list[CheckpointInfo]) -> list[CheckpointInfo]:
    """One entry per file content: two names of one file (a link, a copy) are one checkpoint, not ambiguous."""
    return list({c.sha256: c for c in checkpoints}.values())


def name_keys(name: str) -> list[str]:
    """Ways hosts write one checkpoint's name, most specific first: relative path, without the suffix,
    A1111's model_name (folders joined by "_"), file name, file stem."""
    rel = name.replace("\\", "/").strip().lower()
    stem = next((rel[: -len(s)] for s in CHECKPOINT_SUFFIXES if rel.endswith(s)), rel)
    return list(dict.fromkeys([rel, stem, stem.replace("/", "_"), rel.rsplit("/", 1)[-1], stem.rsplit("/", 1)[-1]]))


def legacy_model_hash(path: Path) -> str:
    with open(path, "rb") as handle:
        handle.seek(0x100000)
        return hashlib.sha256(handle.read(0x10000)).hexdigest()[:8]


@dataclass
class Candidate:
    path: Path
    checkpoint: CheckpointInfo
    prompt: str | None
    seed: int | None
    how: str
    file_sha256: str = ""


@dataclass
class ImportImagesReport:
    scanned: int = 0
    added: dict[str, int] = field(default_factory=dict)  # checkpoint name -> images added
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (file, reason)
    specs: list[dict] = field(default_factory=list)
    interrogated: int = 0

    def to_dict(self) -> dict:
        reasons: dict[str, int] = defaultdict(int)
        for _, reason in self.skipped:
            reasons[_reason_class(reason)] += 1
        return {
            "scanned": self.scanned,
            "added": self.added,
            "added_total": sum(self.added.values()),
            "interrogated_prompts": self.interrogated,
            "skipped": [{"file": f, "reason": r} for f, r in self.skipped],
            "skipped_by_reason": dict(reasons),
            "specs": self.specs,
        }


def _reason_class(reason: str) -> str:
    for key in (
        "not installed",
        "ambiguous",
        "no generation metadata",
        "unreadable",
        "not an image",
        "already",
        "cap",
        "preview of",
        "names no checkpoint",
        "another node",
    ):
        if key in reason:
            return key
    return "other"


def is_grid(relative: Path, meta: ImageMetadata | None = None) -> bool:
    """An A1111 grid, a collage of the batch's images and never an observed image: saved in an ``*-grids`` folder
    (outputs/txt2img-grids, img2img-grids), named ``grid-*``, or, wherever "save grids" points, an image whose
    pixels tile two or more of the images its infotext describes (``Size`` after hires fix) without a gap."""
    if relative.name.lower().startswith("grid-") or any(
        part.lower().endswith("-grids") for part in relative.parts[:-1]
    ):
        return True
    tile, pixels = (meta.tile_size, meta.pixel_size) if meta is not None else (None, None)
    if not tile or not pixels or pixels[0] % tile[0] or pixels[1] % tile[1]:
        return False
    return (pixels[0] // tile[0]) * (pixels[1] // tile[1]) >= 2


def scan(
    folder: Path, attributor: Attributor, report: ImportImagesReport, progress: Callable[[str], None] | None = None
) -> list[Candidate]:
    """Every image under ``folder`` (recursively) attributed to a local checkpoint; the rest reported."""
    found = []
    paths = sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    for index, path in enumerate(paths):
        report.scanned += 1
        label = str(path.relative_to(folder))
        if not inside(path, folder):  # a link out of the folder: its target is not the user's to import here
            report.skipped.append((label, "unreadable: a link that leaves the folder"))
            continue
        if progress and index % 50 == 0:
            progress(f"reading metadata {index + 1}/{len(paths)}")
        try:
            meta = read_metadata(path)
        except ImageError as exc:
            report.skipped.append((label, str(exc).split(": ", 1)[-1]))
            continue
        if is_grid(path.relative_to(folder), meta):
            report.skipped.append((label, "a grid (a collage of a batch), not one image of the checkpoint"))
            continue
        who = attributor.attribute(path, meta)
        model, reason = (None, who.reason) if who.checkpoint is None else attributor.with_lora(who.checkpoint, meta)
        if model is None:
            report.skipped.append((label, reason))
            continue
        found.append(Candidate(path, model, meta.prompt, meta.seed, who.how))
    return found


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _select(candidates: list[Candidate], room: int) -> list[Candidate]:
    """Up to ``room`` images, spread over as many distinct prompts as possible (round robin, path order)."""
    by_prompt: dict[str, list[Candidate]] = defaultdict(list)
    for c in candidates:
        by_prompt[c.prompt or ""].append(c)
    chosen, queues = [], list(by_prompt.values())
    while len(chosen) < room and queues:
        queues = [q for q in queues if q]
        for queue in queues:
            if len(chosen) < room and queue:
                chosen.append(queue.pop(0))
    return sorted(chosen, key=lambda c: str(c.path))


def observed_key(sha256: str, encoder_id: str) -> SpecKey:
    return SpecKey(sha256, encoder_id, OBSERVED)


def import_images(
    gmi, listing: CheckpointListing, folder: Path, progress: Callable[[str], None] | None = None
) -> ImportImagesReport:
    """Build or extend observed specs from the images under ``folder``. Generates nothing.

    ``gmi`` is the engine (its store, encoder and interrogator). Existing specs are only extended;
    an image already in a spec (same file bytes) is not added twice.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise GmiError(f"image folder {shown(folder)} does not exist")
    report = ImportImagesReport()
    attributor = Attributor(listing)
    by_ckpt: dict[str, list[Candidate]] = defaultdict(list)
    for cand in scan(folder, attributor, report, progress):
        by_ckpt[cand.checkpoint.sha256].append(cand)
    for sha, candidates in sorted(by_ckpt.items(), key=lambda kv: kv[1][0].checkpoint.name.lower()):
        key = observed_key(sha, gmi.encoder.encoder_id)
        try:
            with spec_lock(gmi.store.path_for(key)):  # the same per-spec lock builds take: no lost extension
                _import_checkpoint(gmi, key, candidates, folder, report, progress)
        except Busy:
            report.skipped += [
                (
                    str(c.path.relative_to(folder)),
                    f"busy: the observed spec of {c.checkpoint.name} is being written by another import",
                )
                for c in candidates
            ]
    return report


def _import_checkpoint(
    gmi,
    key: SpecKey,
    candidates: list[Candidate],
    folder: Path,
    report: ImportImagesReport,
    progress: Callable[[str], None] | None,
) -> None:
    """Extend one checkpoint's observed spec with its new images (called under the spec's lock)."""
    ckpt = candidates[0].checkpoint
    try:
        spec = gmi.store.load(key)
    except SpecError as exc:
        gmi.store.quarantine(key, str(exc))
        spec = None
    known = set(spec.extra.get("observed_files", [])) if spec is not None else set()
    fresh = []
    for cand in candidates:
        label = str(cand.path.relative_to(folder))
        try:
            cand.file_sha256 = _file_sha256(cand.path)
        except OSError as exc:
            report.skipped.append((label, f"unreadable: {one_line(exc)}"))
            continue
        if cand.file_sha256 in known:
            report.skipped.append((label, f"already in the observed spec of {ckpt.name}"))
        else:
            known.add(cand.file_sha256)
            fresh.append(cand)
    room = MAX_OBSERVED_IMAGES - (spec.n_prompts if spec is not None else 0)
    chosen = _select(fresh, max(0, room))
    for cand in fresh:
        if cand not in chosen:
            report.skipped.append(
                (
                    str(cand.path.relative_to(folder)),
                    f"observed spec of {ckpt.name} is full (cap {MAX_OBSERVED_IMAGES} images)",
                )
            )
    rows = _encode_rows(gmi, chosen, folder, report, progress, ckpt.name)
    if not rows:
        return
    spec = _extend(spec, rows, ckpt, gmi.encoder)
    gmi.store.save(spec)
    report.added[ckpt.name] = len(rows["prompts"])
    report.specs.append(
        {
            "name": ckpt.name,
            "sha256": key.sha256,
            "kind": spec_kind(spec),
            **spec_counts(spec),
            "attributed_by": dict(Counter(rows["how"])),
        }
    )


def _encode_rows(
    gmi, chosen: list[Candidate], folder: Path, report: ImportImagesReport, progress, name: str
) -> dict | None:
    images, kept = [], []
    for cand in chosen:
        try:
            images.append(load_image(cand.path))
            kept.append(cand)
        except ImageError as exc:
            report.skipped.append((str(cand.path.relative_to(folder)), str(exc).split(": ", 1)[-1]))
    if not kept:
        return None
    if progress:
        progress(f"encoding {len(kept)} image(s) of {name}")
    features = gmi.encoder.encode_images(images)
    prompts = []
    for i, cand in enumerate(kept):
        if cand.prompt:
            prompts.append(cand.prompt)
        else:  # a preview or a graph without a readable prompt: the interrogator's pseudo-prompt
            prompts.append(gmi.interrogator.prompt_from_features(features[i : i + 1]))
            report.interrogated += 1
    return {
        "prompts": prompts,
        "image": features.to(torch.float16)[:, None, :],
        "prompt": gmi.encoder.encode_texts(prompts).to(torch.float16),
        "pixel": torch.from_numpy(np.stack([pixel_feature(i) for i in images])).to(torch.float16)[:, None, :],
        "thumbs": torch.from_numpy(np.stack([thumbnail(i) for i in images])),
        "seeds": [[c.seed if c.seed is not None else UNKNOWN_SEED] for c in kept],
        "files": [c.file_sha256 for c in kept],
        "how": [c.how for c in kept],
    }


def _extend(spec: Spec | None, rows: dict, ckpt: CheckpointInfo, encoder) -> Spec:
    n = len(rows["prompts"])
    new = Spec(
        checkpoint_name=ckpt.name,
        sha256=ckpt.sha256,
        encoder_id=encoder.encoder_id,
        prompt_set_name=OBSERVED,
        prompt_set_hash=OBSERVED,
        prompts=rows["prompts"],
        seeds=rows["seeds"],
        settings=GenerationSettings(),
        image_features=rows["image"],
        prompt_features=rows["prompt"],
        pixel_features=rows["pixel"],
        thumbnails=rows["thumbs"],
        image_done=torch.ones(n, 1, dtype=torch.bool),
        extra={"kind": OBSERVED, "observed_files": rows["files"]},
    )
    if spec is not None:
        new = Spec(
            checkpoint_name=ckpt.name,
            sha256=ckpt.sha256,
            encoder_id=encoder.encoder_id,
            prompt_set_name=OBSERVED,
            prompt_set_hash=OBSERVED,
            prompts=spec.prompts + new.prompts,
            seeds=spec.seeds + new.seeds,
            settings=GenerationSettings(),
            image_features=torch.cat([spec.image_features, new.image_features]),
            prompt_features=torch.cat([spec.prompt_features, new.prompt_features]),
            pixel_features=torch.cat([spec.pixel_features, new.pixel_features]),
            thumbnails=torch.cat([spec.thumbnails, new.thumbnails]),
            image_done=torch.cat([spec.image_done, new.image_done]),
            extra={
                **spec.extra,
                "kind": OBSERVED,
                "observed_files": spec.extra.get("observed_files", []) + rows["files"],
            },
        )
    new.extra["counts"] = {"generated_images": 0, "observed_images": new.n_prompts}
    new.extra["model"] = model_metadata(ckpt)  # a LoRA combination's parts (gmi_core.loras)
    new.validate(f"observed spec of {ckpt.name}")
    return new


def merge(generated: Spec | None, observed: Spec | None) -> Spec:
    """One spec for ranking: the generated rows (platform prompts), then the observed rows.

    Observed rows (one image each) are padded to the generated spec's S images per prompt and the padding
    is masked off (``image_done``), so every masked mean kernel is that of the two parts stacked.
    """
    if generated is None or observed is None:
        spec = generated or observed
        if spec is None:
            raise ValueError("nothing to merge")
        return spec
    s = generated.images_per_prompt

    def padded(t: torch.Tensor) -> torch.Tensor:
        return torch.cat([t, t.new_zeros(t.shape[0], s - t.shape[1], *t.shape[2:])], 1)

    return Spec(
        checkpoint_name=generated.checkpoint_name,
        sha256=generated.sha256,
        encoder_id=generated.encoder_id,
        prompt_set_name=f"{generated.prompt_set_name}+{OBSERVED}",
        prompt_set_hash=f"{generated.prompt_set_hash}+{OBSERVED}",
        prompts=generated.prompts + observed.prompts,
        seeds=generated.seeds + [row + [UNKNOWN_SEED] * (s - len(row)) for row in observed.seeds],
        settings=generated.settings,
        image_features=torch.cat([generated.image_features, padded(observed.image_features)]),
        prompt_features=torch.cat([generated.prompt_features, observed.prompt_features]),
        pixel_features=torch.cat([generated.pixel_features, padded(observed.pixel_features)]),
        thumbnails=None
        if generated.thumbnails is None or observed.thumbnails is None  # loaded for ranking
        else torch.cat([generated.thumbnails, observed.thumbnails]),
        image_done=torch.cat([generated.image_done, padded(observed.image_done)]),
        extra={
            **generated.extra,
            "kind": "mixed",
            "parts": [generated.n_prompts, observed.n_prompts],
            "counts": {"generated_images": sum(generated.image_counts), "observed_images": sum(observed.image_counts)},
        },
    )


def row_source(spec: Spec, index: int) -> tuple[str, int]:
    """(stored spec's prompt-set id, row in it) of row ``index`` of a possibly merged spec."""
    kind = spec_kind(spec)
    if kind == "mixed":
        n_generated = spec.extra["parts"][0]
        if index >= n_generated:
            return OBSERVED, index - n_generated
        return spec.prompt_set_hash.split("+", 1)[0], index
    return spec.prompt_set_hash, index
