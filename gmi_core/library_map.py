"""A map of the library from the specs alone: pairwise spec distances, near-duplicate groups, a 2-D picture.

Distance between checkpoints m and m' (the ranker's Gaussian kernel, nothing generated): the squared
MMD between their conditional kernel mean embeddings, averaged over the anchor prompts a (the
platform prompt set), i.e. prompt-aligned:

    D(m, m') = mean_a || mu_m(a) - mu_m'(a) ||^2,    mu_m(a) = sum_t W_m[a, t] k(z_{m,t}, .)

For a spec that rendered prompt a itself, W_m[a] puts 1/S on each of its S images of that prompt
(exact alignment). For a spec without that prompt (an observed spec: the user's own prompts),
W_m[a] is a softmax over its rows of cos(prompt_row, prompt_a) / ``SOFT_ALIGN_TAU``, a kernel
regression of its conditional at a. The self terms leave out each image's kernel with itself
(unbiased MMD), so two samples of one checkpoint are at distance ~0 however few images there are.
The *relative* distance D / mean_a(||mu_m(a)||^2 + ||mu_m'(a)||^2) is scale-free; checkpoints whose
relative distance is below :data:`NEAR_DUPLICATE_THRESHOLD` are linked, and linked checkpoints form
groups (connected components). The threshold comes from ``bench synthetic``'s near-duplicate family
(its ``library_map`` section reports the distances it rests on).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .observed import OBSERVED, spec_kind
from .paths import atomic_write
from .ranker import kernel, median_gamma
from .spec import Spec

# Relative distance; set from bench synthetic's b_near_duplicates (docs/observed-specs.md).
NEAR_DUPLICATE_THRESHOLD = 0.11
SOFT_ALIGN_TAU = 0.05
_ALIGNED_COS = 0.9999


@dataclass
class SpecView:
    """A spec's images [T, d] and its anchor weights [A, T]; ``aligned`` rows per anchor when it has them all."""

    images: torch.Tensor
    weights: torch.Tensor
    aligned: torch.Tensor | None  # [A, S, d] when every anchor is one of its finished prompts


def spec_view(spec: Spec, anchors: torch.Tensor) -> SpecView:
    """Unrepeated images of a (possibly merged) spec and its weights at each anchor prompt."""
    n_generated = (
        spec.extra["parts"][0] if spec_kind(spec) == "mixed" else (0 if spec_kind(spec) == OBSERVED else spec.n_prompts)
    )
    rows, images, row_of = [], [], []
    for i in range(spec.n_prompts):
        if not spec.done[i]:
            continue
        own = spec.image_features[i][spec.image_done[i]]  # the rendered images (merged observed rows hold one)
        rows.append(i)
        images.append(own)  # stored precision; converted block by block where kernels are computed
        row_of += [len(rows) - 1] * len(own)
    z = torch.cat(images)
    row_of = torch.tensor(row_of)
    sizes = torch.bincount(row_of).float()
    unit = torch.nn.functional.normalize
    cos = unit(anchors.float(), dim=-1) @ unit(spec.prompt_features[rows].float(), dim=-1).T  # [A, R]; fp16-safe
    exact = cos > _ALIGNED_COS
    soft = torch.softmax(cos / SOFT_ALIGN_TAU, dim=1)
    row_w = torch.where(exact.any(dim=1, keepdim=True), exact.float() / exact.sum(1, keepdim=True).clamp(min=1), soft)
    weights = row_w[:, row_of] / sizes[row_of]
    aligned = None
    generated = [k for k, i in enumerate(rows) if i < n_generated]
    if generated and exact[:, generated].sum(1).eq(1).all():
        pick = exact[:, generated].float().argmax(1)
        aligned = torch.stack([images[generated[int(k)]] for k in pick])
    return SpecView(z, weights, aligned)


def _self_terms(view: SpecView, gamma: float) -> torch.Tensor:
    """||mu(a)||^2 per anchor, each image's kernel with itself left out (biased where a row has one image)."""
    z = view.images.float()
    k = kernel(z @ z.T, gamma)
    w = view.weights
    full = ((w @ k) * w).sum(1)
    diag = (w**2).sum(1)
    denom = 1 - diag
    return torch.where(denom > 1e-6, (full - diag) / denom.clamp(min=1e-6), full)


def distances(
    specs: list[Spec], anchors: torch.Tensor, gamma: float | None = None
) -> tuple[np.ndarray, np.ndarray, float]:
    """(D [M, M] squared prompt-aligned MMD, relative distance [M, M], gamma)."""
    views = [spec_view(s, anchors) for s in specs]
    if gamma is None:
        gamma = median_gamma(torch.cat([v.images for v in views]))
    m = len(views)
    selfs = torch.stack([_self_terms(v, gamma) for v in views])  # [M, A]
    cross = torch.zeros(m, m, anchors.shape[0])
    fast = [i for i, v in enumerate(views) if v.aligned is not None]
    if len(fast) > 1:  # specs of the anchor prompt set itself: only each prompt's own images meet
        stacked = torch.stack([views[i].aligned for i in fast])  # [F, A, S, d]
        f, a, s, d = stacked.shape
        for j in range(a):
            x = stacked[:, j].reshape(f * s, d).float()
            block = kernel(x @ x.T, gamma).reshape(f, s, f, s).mean(dim=(1, 3))
            cross[torch.tensor(fast)[:, None], torch.tensor(fast)[None, :], j] = block
    fast_set = set(fast)
    for i in range(m):
        for j in range(i + 1, m):
            if i in fast_set and j in fast_set:
                continue
            k = kernel(views[i].images.float() @ views[j].images.float().T, gamma)
            cross[i, j] = cross[j, i] = ((views[i].weights @ k) * views[j].weights).sum(1)
    d2 = (selfs[:, None, :] + selfs[None, :, :] - 2 * cross).mean(-1)
    d2.fill_diagonal_(0)
    scale = (selfs[:, None, :] + selfs[None, :, :]).mean(-1)
    rel = d2.clamp(min=0) / scale.clamp(min=1e-12)
    rel.fill_diagonal_(0)
    return d2.numpy().astype(np.float64), rel.numpy().astype(np.float64), float(gamma)


def groups(relative: np.ndarray, threshold: float = NEAR_DUPLICATE_THRESHOLD) -> list[list[int]]:
    """Connected components of the pairs closer than ``threshold``; singletons left out."""
    m = len(relative)
    parent = list(range(m))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i in range(m):
        for j in range(i + 1, m):
            if relative[i, j] < threshold:
                parent[root(i)] = root(j)
    comps: dict[int, list[int]] = {}
    for i in range(m):
        comps.setdefault(root(i), []).append(i)
    return sorted((c for c in comps.values() if len(c) > 1), key=lambda c: (-len(c), c))


def classical_mds(d2: np.ndarray, dims: int = 2) -> np.ndarray:
    """Coordinates [M, dims] whose squared distances approximate ``d2`` (Torgerson scaling)."""
    m = len(d2)
    if m == 1:
        return np.zeros((1, dims))
    j = np.eye(m) - 1.0 / m
    b = -0.5 * j @ np.clip(d2, 0, None) @ j
    values, vectors = np.linalg.eigh(b)
    top = np.argsort(values)[::-1][:dims]
    coords = vectors[:, top] * np.sqrt(np.clip(values[top], 0, None))
    if coords.shape[1] < dims:
        coords = np.pad(coords, ((0, 0), (0, dims - coords.shape[1])))
    return coords


@dataclass
class LibraryMap:
    names: list[str]
    sha256: list[str]
    installed: list[bool]
    kinds: list[str]
    d2: np.ndarray
    relative: np.ndarray
    coords: np.ndarray
    groups: list[list[int]]
    gamma: float
    threshold: float
    excluded: list[tuple[str, str]] = field(default_factory=list)

    def to_dict(self) -> dict:
        group_of = {i: g for g, members in enumerate(self.groups) for i in members}
        nearest = []
        for i in range(len(self.names)):
            others = [j for j in range(len(self.names)) if j != i]
            j = min(others, key=lambda k: self.relative[i, k]) if others else None
            nearest.append(
                None
                if j is None
                else {"name": self.names[j], "relative_distance": round(float(self.relative[i, j]), 5)}
            )
        return {
            "gamma": self.gamma,
            "threshold": self.threshold,
            "checkpoints": [
                {
                    "name": n,
                    "sha256": s,
                    "short_hash": s[:10],
                    "installed": inst,
                    "kind": k,
                    "x": float(x),
                    "y": float(y),
                    "group": group_of.get(i),
                    "nearest": nearest[i],
                }
                for i, (n, s, inst, k, (x, y)) in enumerate(
                    zip(self.names, self.sha256, self.installed, self.kinds, self.coords)
                )
            ],
            "groups": [[self.names[i] for i in g] for g in self.groups],
            "relative_distance": np.round(self.relative, 5).tolist(),
            "excluded": [{"name": n, "reason": r} for n, r in self.excluded],
        }


def build_map(
    specs: list[Spec],
    anchors: torch.Tensor,
    threshold: float = NEAR_DUPLICATE_THRESHOLD,
    excluded: list[tuple[str, str]] | None = None,
    installed: list[bool] | None = None,
) -> LibraryMap:
    """``installed``: per spec, False for imported specs of checkpoints not on this machine (default: all are)."""
    if not specs:
        raise ValueError("no specs to map")
    d2, rel, gamma = distances(specs, anchors)
    return LibraryMap(
        names=[s.checkpoint_name for s in specs],
        sha256=[s.sha256 for s in specs],
        installed=list(installed) if installed is not None else [True] * len(specs),
        kinds=[spec_kind(s) for s in specs],
        d2=d2,
        relative=rel,
        coords=classical_mds(d2),
        groups=groups(rel, threshold),
        gamma=gamma,
        threshold=threshold,
        excluded=list(excluded or []),
    )


def draw_map(lib: LibraryMap, path: Path, size: tuple[int, int] = (900, 700)) -> Path:
    """The 2-D map as a PNG: groups in colour, near-duplicate links drawn, not-installed checkpoints hollow."""
    from PIL import Image, ImageDraw, PngImagePlugin

    from .charts import COLOURS, load_font

    width, height = size
    margin = 60
    img = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(img)
    font, small = load_font(14), load_font(11)
    draw.text(
        (margin, 14),
        f"gmi library map: {len(lib.names)} checkpoints, {len(lib.groups)} near-duplicate group(s)",
        fill="black",
        font=font,
    )
    xy = lib.coords.astype(float)
    lo, hi = xy.min(0), xy.max(0)
    span = np.where(hi - lo > 1e-12, hi - lo, 1.0)
    label_room = 190  # labels are drawn to the right of their points
    pts = [
        (
            margin + (x - lo[0]) / span[0] * (width - 2 * margin - label_room),
            margin + (y - lo[1]) / span[1] * (height - 2 * margin),
        )
        for x, y in xy
    ]
    colour = {i: COLOURS[g % len(COLOURS)] for g, members in enumerate(lib.groups) for i in members}
    for members in lib.groups:
        for a in members:
            for b in members:
                if a < b and lib.relative[a, b] < lib.threshold:
                    draw.line([pts[a], pts[b]], fill=colour[a], width=2)
    for i, (x, y) in enumerate(pts):
        c = colour.get(i, (110, 110, 110))
        r = 6
        if lib.installed[i]:
            draw.ellipse([x - r, y - r, x + r, y + r], fill=c, outline="black")
        else:
            draw.ellipse([x - r, y - r, x + r, y + r], fill="white", outline=c, width=2)
        label = lib.names[i] if len(lib.names[i]) <= 28 else lib.names[i][:26] + "…"
        draw.text((x + 8, y - 7), label + ("" if lib.installed[i] else " (not installed)"), fill="black", font=small)
    draw.text(
        (margin, height - 24),
        "distances: prompt-aligned MMD between specs (same kernel as ranking); "
        "filled = installed, hollow = imported spec only",
        fill=(90, 90, 90),
        font=small,
    )
    path = Path(path)
    info = PngImagePlugin.PngInfo()
    info.add_text(MAP_MARK, "1")  # how `gmi map --out` knows it may replace this file without --force
    with atomic_write(path) as tmp:
        img.save(tmp, format="PNG", pnginfo=info)
    return path


MAP_MARK = "gmi_map"


def is_map_image(path: Path) -> bool:
    """A PNG that :func:`draw_map` wrote."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            return image.format == "PNG" and MAP_MARK in image.info
    except (OSError, ValueError):
        return False
