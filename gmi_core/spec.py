"""The specification of one checkpoint: CLIP features of its images per prompt, plus metadata.

On disk a spec is one safetensors file (no pickle). Its JSON metadata rides in the safetensors
header and carries a sha256 of the tensor bytes and of the metadata itself, so a truncated file or
an edited tensor or field is rejected on load.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from .budgets import cell_seed
from .errors import GmiError, SpecError
from .limits import check_settings
from .paths import atomic_write, shown, without_path
from .protocols import GenerationSettings
from .safetensors_header import read_header as read_safetensors_header

SPEC_FORMAT_VERSION = 2  # 2: per-image mask ``image_done`` [N, S] and ``family``; version 1 files load as well
READABLE_VERSIONS = (1, 2)
PIXEL_FEATURE_SIZE = 8  # rkme_basic compares 8x8 RGB thumbnails (192 values)
THUMBNAIL_SIZE = 64
_TENSORS = ("image_features", "prompt_features", "pixel_features", "thumbnails", "image_done")


@dataclass(frozen=True)
class SpecKey:
    sha256: str
    encoder_id: str
    prompt_set_hash: str


@dataclass
class Spec:
    """Features for N prompts x S images; ``image_done[i, s]`` marks the rendered ones (the others are zero).

    Images of one prompt are rendered in seed order, so each prompt holds a prefix of its S images; which
    prompts are rendered first is the budget order (:mod:`gmi_core.budgets`).
    """

    checkpoint_name: str
    sha256: str
    encoder_id: str
    prompt_set_name: str
    prompt_set_hash: str
    prompts: list[str]
    seeds: list[list[int]]
    settings: GenerationSettings
    image_features: torch.Tensor  # [N, S, d] float16, unit rows
    prompt_features: torch.Tensor  # [N, d] float16, unit rows
    pixel_features: torch.Tensor  # [N, S, 3*8*8] float16, unit rows
    thumbnails: (
        torch.Tensor | None
    )  # [N, 64, 64, 3] uint8, the first image of each prompt; None when loaded for ranking
    image_done: torch.Tensor  # [N, S] bool
    extra: dict = field(default_factory=dict)
    family: str = ""  # the checkpoint family whose generation settings were used

    @property
    def key(self) -> SpecKey:
        return SpecKey(self.sha256, self.encoder_id, self.prompt_set_hash)

    @property
    def done(self) -> torch.Tensor:
        """[N] bool: prompts with at least one image (the ones a ranking can use)."""
        return self.image_done.any(dim=1)

    @property
    def image_counts(self) -> list[int]:
        return self.image_done.sum(dim=1).tolist()

    @property
    def complete(self) -> bool:
        return bool(self.image_done.all())

    def grow(self, images_per_prompt: int, base_seed: int) -> None:
        """Room for ``images_per_prompt`` images per prompt; new cells get their fixed seeds, old ones stay."""
        n, s = self.image_done.shape
        extra = images_per_prompt - s
        if extra <= 0:
            return
        self.image_features = torch.cat(
            [self.image_features, self.image_features.new_zeros(n, extra, self.image_features.shape[-1])], 1
        )
        self.pixel_features = torch.cat(
            [self.pixel_features, self.pixel_features.new_zeros(n, extra, self.pixel_features.shape[-1])], 1
        )
        self.image_done = torch.cat([self.image_done, self.image_done.new_zeros(n, extra)], 1)
        self.seeds = [
            row + [cell_seed(base_seed, i, j) for j in range(s, images_per_prompt)] for i, row in enumerate(self.seeds)
        ]

    @property
    def n_prompts(self) -> int:
        return len(self.prompts)

    @property
    def images_per_prompt(self) -> int:
        return int(self.image_features.shape[1])

    @classmethod
    def empty(
        cls,
        *,
        checkpoint_name: str,
        sha256: str,
        encoder_id: str,
        prompt_set_name: str,
        prompt_set_hash: str,
        prompts: list[str],
        seeds: list[list[int]],
        settings: GenerationSettings,
        prompt_features: torch.Tensor,
        feature_dim: int,
        family: str = "",
    ) -> Spec:
        n, s = len(prompts), len(seeds[0])
        return cls(
            checkpoint_name=checkpoint_name,
            sha256=sha256,
            encoder_id=encoder_id,
            prompt_set_name=prompt_set_name,
            prompt_set_hash=prompt_set_hash,
            prompts=list(prompts),
            seeds=[list(x) for x in seeds],
            settings=settings,
            image_features=torch.zeros(n, s, feature_dim, dtype=torch.float16),
            prompt_features=prompt_features.to(torch.float16).contiguous(),
            pixel_features=torch.zeros(n, s, 3 * PIXEL_FEATURE_SIZE**2, dtype=torch.float16),
            thumbnails=torch.zeros(n, THUMBNAIL_SIZE, THUMBNAIL_SIZE, 3, dtype=torch.uint8),
            image_done=torch.zeros(n, s, dtype=torch.bool),
            family=family,
        )

    def _tensors(self) -> dict[str, torch.Tensor]:
        if self.thumbnails is None:
            raise SpecError(
                f"spec of {self.checkpoint_name} was loaded for ranking only (no thumbnails); it cannot be saved"
            )
        return {
            "image_features": self.image_features.contiguous(),
            "prompt_features": self.prompt_features.contiguous(),
            "pixel_features": self.pixel_features.contiguous(),
            "thumbnails": self.thumbnails.contiguous(),
            "image_done": self.image_done.to(torch.uint8).contiguous(),
        }

    def metadata(self) -> dict:
        return {
            "format_version": SPEC_FORMAT_VERSION,
            "checkpoint_name": self.checkpoint_name,
            "sha256": self.sha256,
            "encoder_id": self.encoder_id,
            "prompt_set": {"name": self.prompt_set_name, "hash": self.prompt_set_hash, "prompts": self.prompts},
            "seeds": self.seeds,
            "settings": self.settings.to_dict(),
            "family": self.family,
            "complete": self.complete,
            "extra": self.extra,
        }

    def save(self, path: Path) -> None:
        """Write atomically: a temp file in the same folder, then rename over the target."""
        tensors = self._tensors()
        meta = self.metadata()
        meta["content_sha256"] = _content_hash(tensors, meta)
        with atomic_write(path) as tmp:
            save_file(tensors, tmp, metadata={"gmi": json.dumps(meta, allow_nan=False)})

    @classmethod
    def load(cls, path: Path, verify: bool = True, thumbnails: bool = True) -> Spec:
        """Read and validate; any inconsistency raises :class:`SpecError` naming the file and the fault.

        ``verify=False`` skips the content checksum and the value checks: for a file version that was
        verified before (see :meth:`gmi_core.store.SpecStore.scan`). ``thumbnails=False`` leaves the
        thumbnails on disk (ranking needs only features; :func:`read_thumbnail` reads one on demand).
        """
        path = Path(path)
        wanted = [name for name in (*_TENSORS, "done") if thumbnails or verify or name != "thumbnails"]
        try:
            header, names, tensors = _read_safetensors(path, wanted)
        except (OSError, ValueError, KeyError, TypeError, RuntimeError) as exc:
            raise SpecError(f"spec file {shown(path)} is unreadable or truncated: {without_path(exc, path)}") from exc
        try:
            meta = json.loads(header["gmi"], parse_constant=_refuse_constant)
            if not isinstance(meta, dict):
                raise ValueError("metadata is not an object")
        except (KeyError, ValueError) as exc:
            raise SpecError(f"spec file {shown(path)} has no valid gmi metadata") from exc
        if meta.get("format_version") not in READABLE_VERSIONS:
            raise SpecError(
                f"spec file {shown(path)} has format version {meta.get('format_version')}, expected {SPEC_FORMAT_VERSION}"
            )
        done_name = "image_done" if meta["format_version"] >= 2 else "done"  # version 1: whole prompts
        missing = [name for name in _TENSORS if (done_name if name == "image_done" else name) not in names]
        if missing:
            raise SpecError(f"spec file {shown(path)} lacks tensors {missing}")
        covered = meta if meta["format_version"] >= 2 else None  # version 1 checksummed the tensors only
        if verify and _content_hash(tensors, covered) != meta.get("content_sha256"):
            raise SpecError(f"spec file {shown(path)} was modified after it was written (content checksum mismatch)")
        if done_name == "done":
            tensors["image_done"] = (
                tensors.pop("done").bool()[:, None].expand(tensors["image_features"].shape[:2]).clone()
            )
        try:
            spec = cls(
                checkpoint_name=meta["checkpoint_name"],
                sha256=meta["sha256"],
                encoder_id=meta["encoder_id"],
                prompt_set_name=meta["prompt_set"]["name"],
                prompt_set_hash=meta["prompt_set"]["hash"],
                prompts=list(meta["prompt_set"]["prompts"]),
                seeds=[list(map(int, s)) for s in meta["seeds"]],
                settings=GenerationSettings.from_dict(meta["settings"]),
                image_features=tensors["image_features"],
                prompt_features=tensors["prompt_features"],
                pixel_features=tensors["pixel_features"],
                thumbnails=tensors["thumbnails"] if thumbnails else None,
                image_done=tensors["image_done"].bool(),
                extra=dict(meta.get("extra", {})),
                family=str(meta.get("family", "")),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise SpecError(f"spec file {shown(path)} has incomplete metadata: {exc}") from exc
        spec.validate(shown(path), values=verify)
        return spec

    def validate(self, origin: str = "spec", values: bool = True) -> None:
        """Shapes always; with ``values`` also finiteness and unit length (once per file version)."""
        n, s = len(self.prompts), len(self.seeds[0]) if self.seeds else 0
        d = self.prompt_features.shape[-1] if self.prompt_features.ndim == 2 else -1
        checks = [
            (n > 0 and s > 0, "no prompts or seeds"),
            (all(len(row) == s for row in self.seeds) and len(self.seeds) == n, "seed table shape"),
            (tuple(self.image_features.shape) == (n, s, d), f"image_features shape {tuple(self.image_features.shape)}"),
            (tuple(self.prompt_features.shape) == (n, d), f"prompt_features shape {tuple(self.prompt_features.shape)}"),
            (self.pixel_features.shape[:2] == (n, s), "pixel_features shape"),
            (
                self.thumbnails is None or (self.thumbnails.shape[0] == n and self.thumbnails.dtype == torch.uint8),
                "thumbnails shape",
            ),
            (tuple(self.image_done.shape) == (n, s), "image_done mask shape"),
        ]
        for ok, what in checks:
            if not ok:
                raise SpecError(f"{origin}: inconsistent spec ({what})")
        texts = [self.checkpoint_name, self.sha256, self.encoder_id, self.prompt_set_name, self.prompt_set_hash]
        if not all(isinstance(t, str) and t for t in texts) or not all(isinstance(p, str) for p in self.prompts):
            raise SpecError(f"{origin}: metadata fields of the wrong type")
        try:
            check_settings(self.settings)
        except GmiError as exc:
            raise SpecError(f"{origin}: bad generation settings ({exc})") from None
        if not values:
            return
        # numpy, not torch: these small reductions must not wait on torch's thread pool (slow on busy CPUs)
        for name in ("image_features", "prompt_features", "pixel_features"):
            if not np.isfinite(getattr(self, name).numpy()).all():
                raise SpecError(f"{origin}: {name} holds NaN or infinite values")
        finished = self.image_features.numpy()[self.image_done.numpy()].astype(np.float32)
        if finished.size and not np.allclose(np.linalg.norm(finished, axis=-1), 1.0, atol=1e-2):
            raise SpecError(f"{origin}: image features are not unit vectors")


_DTYPES = {
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F32": torch.float32,
    "F64": torch.float64,
    "U8": torch.uint8,
    "I8": torch.int8,
    "I16": torch.int16,
    "I32": torch.int32,
    "I64": torch.int64,
    "BOOL": torch.bool,
}


def _read_safetensors(path: Path, names) -> tuple[dict, set, dict[str, torch.Tensor]]:
    """(metadata, every tensor name, the named tensors), read with plain file reads into memory they own.

    safetensors' own loader maps the file, and tensors sharing a mapping keep it resident: a ranking
    bank stacked from such tensors would hold the features twice.
    """
    with open(path, "rb") as handle:
        header, size = read_safetensors_header(handle)
        metadata = header.pop("__metadata__", None) or {}
        file_size = os.fstat(handle.fileno()).st_size
        tensors = {}
        for name in names:
            if name not in header:
                continue
            info = header[name]
            start, end = info["data_offsets"]
            tensor = torch.empty(info["shape"], dtype=_DTYPES[info["dtype"]])
            nbytes = tensor.numel() * tensor.element_size()
            if end - start != nbytes or 8 + size + end > file_size:
                raise ValueError(f"tensor {name} is truncated or inconsistent with its shape")
            handle.seek(8 + size + start)
            if nbytes and handle.readinto(tensor.reshape(-1).view(torch.uint8).numpy()) != nbytes:
                raise ValueError(f"tensor {name} is truncated")
            tensors[name] = tensor
    return metadata, set(header), tensors


def _refuse_constant(name: str):
    raise ValueError(f"{name} in metadata")


def _content_hash(tensors: dict[str, torch.Tensor], meta: dict | None) -> str:
    """sha256 over every tensor and the metadata (all of it but this checksum field; None: tensors only)."""
    digest = hashlib.sha256()
    if meta is not None:
        covered = {k: v for k, v in meta.items() if k != "content_sha256"}
        digest.update(json.dumps(covered, sort_keys=True, allow_nan=False).encode())
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        digest.update(name.encode())
        digest.update(str(tuple(t.shape)).encode())
        digest.update(str(t.dtype).encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def read_thumbnail(path: Path, prompt_index: int) -> np.ndarray | None:
    """One prompt's [64, 64, 3] uint8 thumbnail straight from the spec file (a slice read, no checksum);
    None when that prompt is not finished. Raises SpecError for an unreadable file or a bad index."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            done = handle.get_slice("image_done" if "image_done" in handle.keys() else "done")  # noqa: SIM118 - v1 has done [N]
            count = done.get_shape()[0]
            if not 0 <= prompt_index < count:
                raise SpecError(f"spec {Path(path).parent.name[:10]} has no prompt {prompt_index} (it has {count})")
            if not bool(done[prompt_index : prompt_index + 1].any()):
                return None
            return handle.get_slice("thumbnails")[prompt_index : prompt_index + 1][0].numpy()
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise SpecError(f"spec file {shown(path)} is unreadable or truncated: {without_path(exc, path)}") from exc


def pixel_feature(image) -> np.ndarray:
    """Raw-pixel descriptor for the rkme_basic baseline: an 8x8 RGB downscale, unit length."""
    from PIL import Image

    small = np.asarray(image.convert("RGB").resize((PIXEL_FEATURE_SIZE,) * 2, Image.BILINEAR), dtype=np.float32) / 255.0
    vec = small.reshape(-1) - 0.5
    norm = np.linalg.norm(vec)
    return vec / norm if norm > 1e-8 else np.full_like(vec, 1.0 / np.sqrt(vec.size))


def thumbnail(image) -> np.ndarray:
    from PIL import Image

    return np.array(image.convert("RGB").resize((THUMBNAIL_SIZE,) * 2, Image.BICUBIC), dtype=np.uint8)
