# ruff: noqa: B023  (timing lambdas are called at once, inside the loop that defines them)
"""``bench scale``: identification latency and memory against the number of specs, and spec-build overhead.

Specs are synthetic features of realistic shape (55 prompts x 4 images x 768 dims, fp16, as
``bench synthetic`` family (d) generates them). Per M it times, for one query (already encoded:
the CLIP pass is not included), on this machine's CPU threads:

* ``exact_ms``: the full weighted RKME over all M specs (full features in RAM, precomputed Kbar);
  ``null`` where the full features do not fit in RAM (100,000 specs = 33.8 GB fp16);
* ``prefilter_ms``: the two-tier path of :class:`gmi_core.fastrank.CompactIndex` (linear-kernel
  weighted score on r-dim codes over all M, then the exact score on the top ``--candidates``);
* ``prefilter_recall_at_10``: |top-10 of the two-tier path intersect top-10 of the exact score| / 10,
  averaged over queries. Where exact does not fit in RAM it is computed by streaming the full
  features from a memory-mapped file (slow, a few queries), and the JSON says so.

``build_overhead_ratio``: time of a spec build (generate + encode + store) divided by the time of
the same generation without gmi, in one run, on tiny random diffusers checkpoints with the tiny
random CLIP encoder (both on this CPU).
"""

from __future__ import annotations

import argparse
import math
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from ..fastrank import CompactIndex, exact_scores, median_gamma, prompt_weights
from ..ranker import FeatureBank, kbar, rank
from .synthetic import SimConfig, make_family

PAPER_SHAPE = "55 prompts x 4 images x 768 dims, fp16"


ENGINE_PATH_MAX = 1000  # also time what Gmi.identify runs (ranker.rank) up to this many specs


def _engine_path_ms(full, prompt, q_img, q_text, repeats: int) -> dict:
    """ranker.rank as the engine calls it (median-heuristic gamma, weights, Kbar cached in the bank)."""
    m, n = full.shape[:2]
    bank = FeatureBank([str(i) for i in range(m)], full, prompt.half(), torch.ones(m, n, dtype=torch.bool))
    started = time.perf_counter()
    rank(bank, "gmi", q_img[0, :1], q_text[0])  # the first call computes Kbar for the bank
    first = (time.perf_counter() - started) * 1000
    steady = _time(lambda r: rank(bank, "gmi", q_img[r % len(q_img), :1], q_text[r % len(q_text)]), repeats)
    return {"engine_first_ms": round(first, 2), "engine_ms": round(steady, 2)}


class ScaleWorld:
    """Family (d)'s world, with checkpoint parameters generated per chunk so 10^5 checkpoints fit."""

    def __init__(self, cfg: SimConfig, seed: int, chunk: int = 500):
        self.cfg, self.seed, self.chunk = cfg, seed, chunk
        self.world, self.platform, self.evaluation = make_family("d_many_scale", cfg, seed, m=1)
        self.prompt = self.world.text(self.platform)
        self.eval_text = self.world.text(self.evaluation)
        k = min(cfg.style_subspace, cfg.d // 2)
        self.basis = torch.linalg.qr(torch.randn(cfg.d, k, generator=torch.Generator().manual_seed(seed + 7)))[0]

    def _params(self, index: int) -> int:
        w, cfg = self.world, self.cfg
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        count = self.chunk
        styles = torch.randn(count, self.basis.shape[1], generator=g) @ self.basis.T
        inter = torch.randn(count, cfg.d, cfg.inter_rank, generator=g) / math.sqrt(cfg.inter_rank)
        w.set_checkpoints(styles, inter)
        w.gen = g
        return count

    def specs(self, index: int) -> torch.Tensor:
        """Full features [chunk, N, S, d] fp16 of chunk ``index``."""
        self._params(index)
        z, _ = self.world.render(torch.arange(self.chunk), self.platform, self.cfg.images_per_prompt, pixels=False)
        return z.half()

    def queries(self, ckpts: list[int], n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(images [Q, n, d], pseudo-prompt text [Q, d]) for checkpoints ``ckpts`` on evaluation prompts."""
        imgs, texts = [], []
        qgen = torch.Generator().manual_seed(seed)
        for m in ckpts:
            self._params(m // self.chunk)
            self.world.gen = torch.Generator().manual_seed(seed * 7919 + m)
            e = int(torch.randint(len(self.evaluation), (1,), generator=qgen))
            z, _ = self.world.render(torch.tensor([m % self.chunk]), self.evaluation[e : e + 1], n, pixels=False)
            imgs.append(z[0, 0])
            texts.append(self.world.pseudo_prompt(self.eval_text[e]))
        return torch.stack(imgs), torch.stack(texts)


def _time(fn, repeats: int) -> float:
    fn(0)
    times = []
    for r in range(repeats):
        t = time.perf_counter()
        fn(r)
        times.append(time.perf_counter() - t)
    return float(np.median(times) * 1000)


def run(args: argparse.Namespace) -> dict:
    from . import machine_info
    from .report import line_chart

    if args.threads:
        torch.set_num_threads(args.threads)
    sizes = sorted(args.sizes or ([100, 1000] if args.quick else [100, 1000, 10000, 100000]))
    cfg = SimConfig(d=args.dim or (128 if args.quick else 768))
    n, s, d = cfg.n_platform, cfg.images_per_prompt, cfg.d
    chunk = min(500, sizes[-1]) if sizes[-1] >= 500 else sizes[-1]
    world = ScaleWorld(cfg, args.seed, chunk)
    gen_max = min(sizes[-1], args.generate_max) if args.generate_max else sizes[-1]
    m_max = math.ceil(gen_max / chunk) * chunk
    spec_bytes_full = n * s * d * 2
    ram_limit = args.ram_specs if args.ram_specs is not None else 10000
    workdir = Path(tempfile.mkdtemp(prefix="gmi-bench-scale-", dir=args.workdir))
    notes = []
    try:
        started = time.perf_counter()
        on_disk = m_max > ram_limit
        if on_disk:
            path = workdir / "full.f16"
            full_np = np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=(m_max, n, s, d))
            notes.append(
                f"full features of {m_max} specs ({m_max * spec_bytes_full / 1e9:.1f} GB) are a memory-mapped file on disk"
            )
        else:
            full_np = np.empty((m_max, n, s, d), dtype=np.float16)
        # pass 1: features; projection fitted on a sample of up to 2,000 specs' per-prompt means
        sample_means = []
        for c in range(m_max // chunk):
            block = world.specs(c)
            full_np[c * chunk : (c + 1) * chunk] = block.numpy()
            if c * chunk < 2000:
                sample_means.append(block.float().mean(dim=2))
        gamma = median_gamma(torch.from_numpy(np.asarray(full_np[: min(m_max, 2000)])))
        mu, proj = CompactIndex.fit_projection(torch.cat(sample_means), args.rank)
        gen_s = time.perf_counter() - started
        # pass 2: the compact tier (what each spec build would add: codes and Kbar)
        started = time.perf_counter()
        codes = torch.empty(m_max, n, proj.shape[1])  # rank <= d
        kbars = torch.empty(m_max, n, n)
        for c in range(0, m_max, chunk):
            block = torch.from_numpy(np.asarray(full_np[c : c + chunk]))
            codes[c : c + chunk] = CompactIndex.encode(block, mu, proj)
            kbars[c : c + chunk] = kbar(block, gamma)
        compact_s = time.perf_counter() - started
        if on_disk:
            full_np.flush()
        results = {}
        qgen = torch.Generator().manual_seed(args.seed + 99)
        for m in sizes:
            tiled = m > m_max
            if tiled:  # timing only: the generated index repeated; candidates map back to generated rows
                reps = math.ceil(m / m_max)
                index = _TiledIndex.from_parts(
                    proj, mu, codes.repeat(reps, 1, 1)[:m], kbars.repeat(reps, 1, 1)[:m], gamma
                )
                index.rows = m_max
                notes.append(
                    f"M={m}: features of {m_max} generated specs repeated {reps}x (generating {m} specs takes too long here); "
                    "latency measured on that index, recall not measurable on repeated specs"
                )
            else:
                index = CompactIndex.from_parts(proj, mu, codes[:m], kbars[:m], gamma)
            truth = torch.randint(min(m, m_max), (args.queries,), generator=qgen).tolist()
            q_img, q_text = world.queries(truth, 4, args.seed + m)
            weights = [prompt_weights(world.prompt, t) for t in q_text]
            in_ram = m <= ram_limit
            full = torch.from_numpy(
                np.array(full_np[:m]) if (in_ram and on_disk) else np.asarray(full_np[: min(m, m_max)])
            )
            row = {
                "spec_bytes": m * spec_bytes_full,
                "compact_bytes": index.nbytes,
                "candidates": args.candidates,
                "queries": args.queries,
            }
            # exact and its top-10 (in RAM; or streamed from disk for recall only)
            exact_top = []
            if in_ram and not tiled:
                row["exact_ms"] = round(
                    _time(
                        lambda r: exact_scores(
                            full, kbars[:m], q_img[r % len(truth), :1], weights[r % len(truth)], gamma
                        ),
                        args.repeats,
                    ),
                    2,
                )
                row["exact_ms_4_images"] = round(
                    _time(
                        lambda r: exact_scores(full, kbars[:m], q_img[r % len(truth)], weights[r % len(truth)], gamma),
                        max(2, args.repeats // 2),
                    ),
                    2,
                )
                for qi in range(len(truth)):
                    sc = exact_scores(full, kbars[:m], q_img[qi, :1], weights[qi], gamma)
                    exact_top.append(torch.topk(sc, min(10, m), largest=False).indices)
                row["recall_reference"] = "exact over all specs in RAM"
                if m <= ENGINE_PATH_MAX:
                    row |= _engine_path_ms(full, world.prompt, q_img, q_text, args.repeats)
            else:
                row["exact_ms"] = None
                row["exact_ms_4_images"] = None
                row["exact_note"] = (
                    f"exact over all {m} specs is infeasible in memory ({m * spec_bytes_full / 1e9:.1f} GB of fp16 features > RAM)"
                    if not in_ram
                    else "not measured on repeated specs"
                )
                nq = 0 if tiled else min(len(truth), args.stream_queries)
                if nq:
                    t0 = time.perf_counter()
                    parts = [[] for _ in range(nq)]
                    for c in range(0, m, 2048):
                        block = torch.from_numpy(np.asarray(full_np[c : min(m, c + 2048)]))
                        for qi in range(nq):
                            parts[qi].append(
                                exact_scores(block, kbars[c : c + len(block)], q_img[qi, :1], weights[qi], gamma)
                            )
                    exact_top = [torch.topk(torch.cat(p), 10, largest=False).indices for p in parts]
                    row["recall_reference"] = (
                        f"exact streamed from the memory-mapped file for {nq} queries ({time.perf_counter() - t0:.0f} s for all of them)"
                    )
                else:
                    row["recall_reference"] = "none: repeated specs" if tiled else "none (no exact reference computed)"
            row["prefilter_ms"] = round(
                _time(
                    lambda r: index.identify(
                        full,
                        q_img[r % len(truth), :1],
                        prompt_weights(world.prompt, q_text[r % len(truth)]),
                        args.candidates,
                    ),
                    args.repeats,
                ),
                2,
            )
            row["prefilter_ms_4_images"] = round(
                _time(
                    lambda r: index.identify(full, q_img[r % len(truth)], weights[r % len(truth)], args.candidates),
                    max(2, args.repeats // 2),
                ),
                2,
            )
            recalls, hits = [], 0
            for qi, top in enumerate(exact_top):
                got, _ = index.identify(full, q_img[qi, :1], weights[qi], args.candidates)
                recalls.append(len(set(got[:10].tolist()) & set(top.tolist())) / len(top))
                hits += int(got[0]) == truth[qi]
            row["prefilter_recall_at_10"] = round(float(np.mean(recalls)), 4) if recalls else None
            row["recall_queries"] = len(recalls)
            row["prefilter_top1_is_truth"] = round(hits / len(recalls), 4) if recalls else None
            if tiled:
                row["timing_index"] = f"{m_max} generated specs repeated to {m}"
            results[str(m)] = row
            full = None  # free before the next size
        ratio = None if args.no_build else build_overhead(args)
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    data = {
        "command": "scale",
        "machine": machine_info(),
        "settings": {
            "seed": args.seed,
            "quick": bool(args.quick),
            "spec_shape": f"{n} prompts x {s} images x {d} dims, fp16",
            "compact": f"codes {n} x {args.rank} float32 + Kbar {n} x {n} float32 per spec; projection fitted on up to 2,000 specs",
            "candidates_reranked": args.candidates,
            "gamma": gamma,
            "timing": f"median of {args.repeats} queries after a warm-up; one already-encoded query, CLIP pass excluded",
            "in_ram_limit_specs": ram_limit,
            "generation_s": round(gen_s, 1),
            "compact_build_s": round(compact_s, 1),
            "notes": notes,
        },
        "results": results,
        "build_overhead_ratio": ratio["ratio"] if ratio else None,
        "build_overhead": ratio,
    }
    data["targets"] = check_targets(data)
    if args.plot != "none":
        plot = args.plot or str(Path(args.out).with_suffix(".png") if args.out else Path("bench-scale.png"))
        ms = [int(m) for m in results]
        line_chart(
            plot,
            "bench scale: identification latency per query (ms, CPU)",
            ms,
            {
                "exact": [results[str(m)]["exact_ms"] for m in ms],
                "prefilter + re-rank": [results[str(m)]["prefilter_ms"] for m in ms],
                "exact, 4 images": [results[str(m)]["exact_ms_4_images"] for m in ms],
                "prefilter, 4 images": [results[str(m)]["prefilter_ms_4_images"] for m in ms],
            },
            "number of specs M",
            "ms",
        )
        data["plot"] = plot
    return data


def build_overhead(args: argparse.Namespace) -> dict:
    """Spec build (generate + encode + store) time / the same generation alone, tiny checkpoints, one run."""
    from ..checkpoints import FolderCheckpointSource
    from ..diffusers_generator import DiffusersGenerator
    from ..encoders import tiny_encoder
    from ..engine import Gmi
    from ..prompts import load_prompt_set
    from ..protocols import GenerationSettings
    from ..tiny import tiny_pipeline_config, write_tiny_checkpoint

    root = Path(tempfile.mkdtemp(prefix="gmi-bench-build-", dir=args.workdir))
    try:
        write_tiny_checkpoint(root / "ckpt" / "tiny-a.safetensors", seed=1)
        config = tiny_pipeline_config(root / "config")
        source = FolderCheckpointSource(root / "ckpt")
        ckpt = source.list_checkpoints().checkpoints[0]
        prompts = load_prompt_set("platform").head(args.build_prompts)
        settings = GenerationSettings(steps=args.build_steps, width=64, height=64)
        gen = DiffusersGenerator(config=config, device="cpu")
        gmi = Gmi(root / "specs", tiny_encoder(0, device="cpu"), prompts, images_per_prompt=2, settings=settings)
        _ = gmi.prompt_features  # text features are computed once per prompt set, not per build
        from ..builder import spec_seeds

        seeds = spec_seeds(len(prompts), 2, gmi.base_seed)

        def plain_run() -> float:
            t = time.perf_counter()
            for prompt, row in zip(prompts.prompts, seeds):
                gen.generate(ckpt, prompt, row, settings)
            return time.perf_counter() - t

        plain_run()  # load and warm up the pipeline with the very shapes the build uses
        plain_before = plain_run()
        t = time.perf_counter()
        timed = _KeepLoaded(gen)
        report = gmi.build(source, timed, which="all")
        built = time.perf_counter() - t
        inside = timed.seconds
        plain_after = plain_run()
        plain = (plain_before + plain_after) / 2
        if report.failed:
            raise RuntimeError(f"build failed: {report.failed}")
        images = len(prompts) * 2
        return {
            "ratio": round(built / inside, 3),
            "ratio_vs_separate_plain_runs": round(built / plain, 3),
            "generation_inside_build_s": round(inside, 3),
            "method": "ratio = spec build time / time spent in the generator during that same build (one run, pipeline already loaded); "
            "ratio_vs_separate_plain_runs compares with plain generation of the same prompts and seeds before and after the build (sensitive to CPU contention)",
            "build_s": round(built, 3),
            "generation_only_s": round(plain, 3),
            "generation_only_runs_s": [round(plain_before, 3), round(plain_after, 3)],
            "images": images,
            "per_image_generation_ms": round(plain / images * 1000, 1),
            "per_image_gmi_overhead_ms": round((built - inside) / images * 1000, 1),
            "pipeline": f"tiny random SD1 checkpoint through diffusers on CPU, {settings.width}x{settings.height}, {settings.steps} steps; tiny random CLIP encoder",
            "note": "the ratio depends on generation cost vs encoder cost: tiny pipelines make generation unrealistically cheap; "
            "per_image_gmi_overhead_ms is what a build adds per image",
        }
    finally:
        shutil.rmtree(root, ignore_errors=True)


class _TiledIndex(CompactIndex):
    """A compact index whose rows repeat ``rows`` generated specs: the re-rank reads row ``i % rows``."""

    rows: int = 0

    def identify(self, full, query_images, weights, k=64):
        cand, _ = torch.sort(self.prefilter(query_images, weights, k))
        scores = exact_scores(full[cand % self.rows], self.kbar[cand], query_images, weights, self.gamma)
        order = torch.argsort(scores, stable=True)
        return cand[order], scores[order]


class _KeepLoaded:
    """Wraps the generator so the build does not count reloading the already-loaded pipeline."""

    def __init__(self, gen):
        self.gen = gen
        self.seconds = 0.0  # time spent generating inside the build

    def generate(self, checkpoint, prompt, seeds, settings):
        t = time.perf_counter()
        try:
            return self.gen.generate(checkpoint, prompt, seeds, settings)
        finally:
            self.seconds += time.perf_counter() - t

    def release(self) -> None:
        pass


def check_targets(data: dict) -> list[dict]:
    res = data["results"]
    checks = []
    for m, limit in (("1000", 25.0), ("100000", 300.0)):
        if m in res:
            best = min(v for v in (res[m]["exact_ms"], res[m]["prefilter_ms"]) if v is not None)
            checks.append(
                {
                    "target": f"identification over {m} specs <= {limit:g} ms (1 query image, beyond the encoder pass)",
                    "value": best,
                    "met": best <= limit,
                }
            )
    for m, row in res.items():
        if row.get("prefilter_recall_at_10") is not None and row.get("recall_queries"):
            checks.append(
                {
                    "target": f"prefilter recall@10 >= 0.99 against exact at M={m} ({row['recall_reference']})",
                    "value": row["prefilter_recall_at_10"],
                    "met": row["prefilter_recall_at_10"] >= 0.99,
                }
            )
    if data.get("build_overhead_ratio") is not None:
        checks.append(
            {
                "target": "spec-build overhead <= 1.05x",
                "value": data["build_overhead_ratio"],
                "met": data["build_overhead_ratio"] <= 1.05,
            }
        )
    return checks


def format_tables(data: dict) -> str:
    lines = [
        "| M specs | full features | compact tier | exact ms (1 img / 4 img) | engine ms (first / steady) | prefilter+re-rank ms (1 img / 4 img) | recall@10 | recall reference |"
    ]
    lines.append("| --- | --- | --- | --- | --- | --- | --- | --- |")
    fmt = lambda v: "n/a" if v is None else f"{v:.1f}"  # noqa: E731
    for m, r in data["results"].items():
        lines.append(
            f"| {int(m):,} | {r['spec_bytes'] / 1e6:,.0f} MB | {r['compact_bytes'] / 1e6:,.1f} MB | {fmt(r['exact_ms'])} / {fmt(r['exact_ms_4_images'])} | "
            f"{fmt(r.get('engine_first_ms'))} / {fmt(r.get('engine_ms'))} | {fmt(r['prefilter_ms'])} / {fmt(r['prefilter_ms_4_images'])} | {r['prefilter_recall_at_10']} ({r['recall_queries']} q) | {r['recall_reference']} |"
        )
    b = data.get("build_overhead")
    if b:
        lines.append(
            f"\nSpec-build overhead: {b['ratio']}x ({b['build_s']} s build vs {b['generation_only_s']} s generation only, {b['images']} images; "
            f"{b['per_image_gmi_overhead_ms']} ms added per image; {b['pipeline']})"
        )
    lines.append("\nTargets")
    for t in data.get("targets", []):
        lines.append(f"- [{'met' if t['met'] else 'MISSED'}] {t['target']}: {t['value']}")
    return "\n".join(lines)


def add_arguments(commands) -> None:
    p = commands.add_parser("scale", help="latency and memory against the number of specs; spec-build overhead")
    p.add_argument("--out", help="JSON file (default bench-scale.json); the PNG goes beside it")
    p.add_argument("--plot", help="PNG file, or 'none'")
    p.add_argument("--quick", action="store_true", help="CI size: M = 100, 1000 at d=128")
    p.add_argument("--sizes", type=int, nargs="+", help="numbers of specs (default 100 1000 10000 100000)")
    p.add_argument("--dim", type=int, help="feature dimension (default 768; 128 with --quick)")
    p.add_argument("--rank", type=int, default=64, help="dimension of the compact codes")
    p.add_argument("--candidates", type=int, default=64, help="specs re-ranked exactly after the prefilter")
    p.add_argument("--queries", type=int, default=20, help="queries for recall")
    p.add_argument(
        "--stream-queries",
        type=int,
        default=5,
        help="queries whose exact reference is streamed from disk where it does not fit in RAM",
    )
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument(
        "--generate-max",
        type=int,
        help="generate at most this many specs; larger M are timed on the generated ones repeated",
    )
    p.add_argument("--ram-specs", type=int, help="hold full features in RAM up to this many specs (default 10000)")
    p.add_argument("--workdir", help="folder for the memory-mapped features (default: system temp)")
    p.add_argument("--keep", action="store_true", help="keep the work folder")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-build", action="store_true", help="skip the spec-build overhead measurement")
    p.add_argument("--build-prompts", type=int, default=8, help="prompts in the build-overhead run")
    p.add_argument("--build-steps", type=int, default=20, help="sampler steps in the build-overhead run")
    p.add_argument("--threads", type=int)
