"""The simulated CLIP feature space the synthetic benchmarks rank in: checkpoints with a style and interactions,
prompts with topics, seeded and deterministic (families a_easy ... e_subtle_x16, see ``bench synthetic``)."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch


@dataclass
class SimConfig:
    d: int = 768
    n_platform: int = 55
    n_eval: int = 18
    images_per_prompt: int = 4
    n_topics: int = 11
    e_mu: float = 0.40
    e_content: float = 0.30
    e_style: float = 0.08
    e_inter: float = 0.04
    e_noise: float = 0.18
    inter_rank: int = 16
    topic_share: float = 0.6
    e_text_mu: float = 1.0
    e_phrasing: float = 0.1
    e_pseudo_noise: float = 0.5
    pixel_dim: int = 192
    pixel_signal: float = 0.1
    near_dup_own: float = 0.35  # share of style and interaction a near-duplicate does not share with its lineage
    style_subspace: int = 64  # family (d)
    b1_axis: float = 0.7  # family (c): component of the topics along the mirror's normal


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True).clamp(min=1e-12)


class World:
    """One family's feature space: shared directions, prompts, checkpoints; seeded and deterministic."""

    def __init__(self, cfg: SimConfig, seed: int):
        self.cfg = cfg
        self.gen = torch.Generator().manual_seed(seed)
        d = cfg.d
        self.mu = self.unit(d)
        self.mu_text = self.unit(d)
        self.v = self.randn(d, cfg.inter_rank) / math.sqrt(d)
        self.pixel_proj = self.randn(cfg.pixel_dim, d) / math.sqrt(d)
        self.styles: torch.Tensor | None = None  # [M, d]
        self.inter: torch.Tensor | None = None  # [M, d, r]
        self.mirror: torch.Tensor | None = None  # [M] bool: renders R c instead of c
        self.normal: torch.Tensor | None = None  # [d] mirror normal (family c)

    # random helpers on the world's own generator
    def randn(self, *shape) -> torch.Tensor:
        return torch.randn(*shape, generator=self.gen)

    def unit(self, *shape) -> torch.Tensor:
        return _unit(self.randn(*shape))

    # -- prompts ------------------------------------------------------------------------------
    def contents(self, topics: torch.Tensor, count: int, topic_ids: torch.Tensor | None = None) -> torch.Tensor:
        if topic_ids is None:
            topic_ids = torch.randint(len(topics), (count,), generator=self.gen)
        share = self.cfg.topic_share
        return _unit(math.sqrt(share) * topics[topic_ids] + math.sqrt(1 - share) * self.unit(count, self.cfg.d))

    def text(self, contents: torch.Tensor) -> torch.Tensor:
        """Text features of prompts with these contents (each prompt its own phrasing)."""
        c = self.cfg
        phr = self.randn(len(contents), c.d) / math.sqrt(c.d)
        return _unit(math.sqrt(c.e_text_mu) * self.mu_text + contents + math.sqrt(c.e_phrasing) * phr)

    def pseudo_prompt(self, text: torch.Tensor) -> torch.Tensor:
        xi = self.randn(*text.shape) / math.sqrt(self.cfg.d)
        return _unit(text + math.sqrt(self.cfg.e_pseudo_noise) * xi)

    def reflect(self, x: torch.Tensor) -> torch.Tensor:
        return x - 2 * (x @ self.normal)[..., None] * self.normal

    # -- checkpoints --------------------------------------------------------------------------
    def set_checkpoints(self, styles: torch.Tensor, inter: torch.Tensor, mirror: torch.Tensor | None = None) -> None:
        self.styles, self.inter = _unit(styles), inter
        self.mirror = torch.zeros(len(styles), dtype=torch.bool) if mirror is None else mirror

    def render(
        self, ckpts: torch.Tensor, contents: torch.Tensor, n: int, pixels: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Image and pixel features [len(ckpts), len(contents), n, dim] for checkpoint indices ``ckpts``
        and per-checkpoint contents ([P, d] shared, or [len(ckpts), P, d])."""
        c = self.cfg
        if contents.ndim == 2:
            contents = contents.expand(len(ckpts), -1, -1)
        rendered = torch.where(
            self.mirror[ckpts][:, None, None], self.reflect(contents) if self.normal is not None else contents, contents
        )
        inter = _unit(torch.einsum("mpd,dr,mer->mpe", rendered, self.v, self.inter[ckpts]))
        clean = (
            math.sqrt(c.e_mu) * self.mu
            + math.sqrt(c.e_content) * rendered
            + math.sqrt(c.e_style) * self.styles[ckpts][:, None, :]
            + math.sqrt(c.e_inter) * inter
        )
        noise = self.randn(*clean.shape[:2], n, c.d) / math.sqrt(c.d)
        z = _unit(clean[:, :, None, :] + math.sqrt(c.e_noise) * noise)
        if not pixels:
            return z.half().float(), None
        eta = self.randn(*z.shape[:3], c.pixel_dim) / math.sqrt(c.pixel_dim)
        pix = _unit(math.sqrt(c.pixel_signal) * _unit(z @ self.pixel_proj.T) + math.sqrt(1 - c.pixel_signal) * eta)
        # stored as specs store them: fp16
        return z.half().float(), pix.half().float()


def make_family(name: str, cfg: SimConfig, seed: int, m: int = 16) -> tuple[World, torch.Tensor, torch.Tensor]:
    """(world with checkpoints, platform contents [N, d], evaluation contents [E, d])."""
    if name.startswith("e_subtle_x"):
        factor = float(name.rsplit("x", 1)[1])
        return make_family("a_easy", replace(cfg, e_style=cfg.e_style / factor, e_inter=cfg.e_inter / factor), seed, m)
    w = World(cfg, seed)
    d, r = cfg.d, cfg.inter_rank
    if name == "c_example_b1":
        w.normal = w.unit(d)
        n_pos = 6
        side = w.unit(n_pos, d)
        side = _unit(side - (side @ w.normal)[:, None] * w.normal)  # random directions orthogonal to the normal
        topics = _unit(cfg.b1_axis * w.normal + math.sqrt(1 - cfg.b1_axis**2) * side)  # one side of the mirror
        half = cfg.n_platform // 2
        base = w.contents(topics, half)
        platform = [base, w.reflect(base)]
        if cfg.n_platform % 2:
            fixed = w.contents(topics, 1)
            platform.append(_unit(fixed - (fixed @ w.normal)[:, None] * w.normal))  # on the mirror: R c = c
        platform = torch.cat(platform)
        evaluation = w.contents(topics, cfg.n_eval)  # one side only: another distribution than the platform's
        style, inter = w.unit(1, d), w.randn(1, d, r) / math.sqrt(r)
        w.set_checkpoints(style.expand(2, -1).clone(), inter.expand(2, -1, -1).clone(), torch.tensor([False, True]))
        return w, platform, evaluation
    topics = w.unit(cfg.n_topics, d)
    w.topics = topics  # the evaluation distribution's topics (bench observed draws the user's prompts from it)
    ids = torch.arange(cfg.n_platform) % cfg.n_topics
    platform = w.contents(topics, cfg.n_platform, ids)
    evaluation = w.contents(topics, cfg.n_eval)
    if name == "a_easy":
        w.set_checkpoints(w.randn(m, d), w.randn(m, d, r) / math.sqrt(r))
    elif name == "b_near_duplicates":
        lineages = max(1, m // 4)
        own = cfg.near_dup_own
        base_s, base_u = w.randn(lineages, d), w.randn(lineages, d, r) / math.sqrt(r)
        group = torch.arange(m) % lineages
        styles = math.sqrt(1 - own) * _unit(base_s)[group] + math.sqrt(own) * w.unit(m, d)
        inter = math.sqrt(1 - own) * base_u[group] + math.sqrt(own) * w.randn(m, d, r) / math.sqrt(r)
        w.set_checkpoints(styles, inter)
    elif name.startswith("d_many"):
        k = min(cfg.style_subspace, d // 2)
        basis = torch.linalg.qr(w.randn(d, k))[0]
        w.set_checkpoints(w.randn(m, k) @ basis.T, w.randn(m, d, r) / math.sqrt(r))
    else:
        raise ValueError(f"unknown family {name}")
    return w, platform, evaluation
