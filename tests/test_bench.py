"""Benchmarks: the fast paths agree with the ranker, the simulator has the properties it claims,
the suites measure what they say (Example B.1 separates gmi from rkme_clip), JSON has the shape."""

from __future__ import annotations

import json
import math

import pytest
import torch

from gmi_core import ranker
from gmi_core.bench import run_bench
from gmi_core.bench.simulation import SimConfig, make_family
from gmi_core.bench.synthetic import evaluate_family
from gmi_core.fastrank import (
    concat_kbar,
    concat_means,
    query_means_many,
    scores_from_means,
)
from gmi_core.index import CompactIndex, exact_scores

torch.set_num_threads(1)
QUALITY_KEYS = {"top1", "top2", "top3", "top4", "mean_rank", "n_tasks"}


def _unit(x):
    return x / x.norm(dim=-1, keepdim=True)


@pytest.fixture
def small_bank():
    g = torch.Generator().manual_seed(3)
    m, n, s, d, p = 5, 6, 2, 32, 12
    image = _unit(torch.randn(m, n, s, d, generator=g)).half().float()
    pixel = _unit(torch.randn(m, n, s, p, generator=g)).half().float()
    prompt = _unit(torch.randn(n, d, generator=g))
    bank = ranker.FeatureBank(
        [f"c{i}" for i in range(m)], image, prompt, torch.ones(m, n, dtype=torch.bool), pixel, [None] * m
    )
    queries = _unit(torch.randn(3, 4, d, generator=g))
    q_pix = _unit(torch.randn(3, 4, p, generator=g))
    q_text = _unit(torch.randn(3, d, generator=g))
    return bank, queries, q_pix, q_text


def test_batched_scores_match_ranker(small_bank):
    bank, queries, q_pix, q_text = small_bank
    g = 1.3
    means = query_means_many(bank.image, queries, [g, g / 2], (1, 4))
    pmeans = query_means_many(bank.pixel, q_pix, [g], (1, 4))
    for t in range(len(queries)):
        for u in (1, 4):
            want = {
                m: ranker.rank(bank, m, queries[t, :u], q_text[t], q_pix[t, :u], gamma=g).scores
                for m in ("gmi", "rkme_clip", "rkme_concat", "rkme_basic")
            }
            n = bank.prompt.shape[0]
            uni = torch.full((n,), 1 / n)
            w = ranker.prompt_weights(bank.prompt, q_text[t])
            got = {
                "gmi": scores_from_means(means[(g, u)][t : t + 1], ranker.kbar(bank.image, g), w[None])[0],
                "rkme_clip": scores_from_means(means[(g, u)][t : t + 1], ranker.kbar(bank.image, g), uni)[0],
                "rkme_concat": scores_from_means(
                    concat_means(means[(g / 2, u)][t : t + 1], bank.prompt, q_text[t : t + 1], g),
                    concat_kbar(ranker.kbar(bank.image, g / 2), bank.prompt, g),
                    uni,
                )[0],
                "rkme_basic": scores_from_means(pmeans[(g, u)][t : t + 1], ranker.kbar(bank.pixel, g), uni)[0],
            }
            for method in want:
                assert torch.allclose(got[method], want[method], atol=1e-5), method


def test_exact_and_kbar_fast_paths_match_ranker(small_bank):
    bank, queries, _, q_text = small_bank
    g = 0.9
    m, n, s, d = bank.image.shape
    flat = bank.image[m - 1].float().reshape(n * s, d)  # Kbar by its definition, for one spec
    pairs = torch.exp(-g * (2 - 2 * flat @ flat.T).clamp(min=0)).reshape(n, s, n, s)
    naive = pairs.mean(dim=(1, 3))
    for i in range(n):  # two images of one prompt: distinct images only (s != s')
        naive[i, i] = (pairs[i, :, i, :].sum() - pairs[i, :, i, :].diagonal().sum()) / (s * (s - 1))
    assert torch.allclose(ranker.kbar(bank.image, g)[m - 1], naive, atol=1e-6)
    w = ranker.prompt_weights(bank.prompt, q_text[0])
    fast = exact_scores(bank.image.half(), ranker.kbar(bank.image, g), queries[0, :2], w, g)
    want = ranker.rank(bank, "gmi", queries[0, :2], q_text[0], gamma=g).scores
    assert torch.allclose(fast, want, atol=3e-3)  # fp16 similarities
    assert torch.equal(torch.argsort(fast), torch.argsort(want))


def test_example_b1_is_what_it_claims_and_gmi_separates():
    cfg = SimConfig(d=64, n_eval=6)
    world, platform, evaluation = make_family("c_example_b1", cfg, seed=5)
    # the platform prompt set is closed under the mirror, evaluation prompts are on one side only
    assert (
        torch.cdist(world.reflect(platform), platform, compute_mode="donot_use_mm_for_euclid_dist")
        .min(dim=1)
        .values.max()
        < 1e-4
    )
    assert ((evaluation @ world.normal) > 0).all()
    side = platform @ world.normal
    assert (side > 1e-6).sum() == (side < -1e-6).sum() == len(platform) // 2
    out = evaluate_family("c_example_b1", cfg, seed=5, m=2, cap=200, min_tasks=96, sweep=False, tau=None)
    r = out["results"]
    assert out["info"]["platform_set_closed_under_mirror"]
    for n in ("1", "4"):
        assert r["gmi"][n]["top1"] >= 0.95
        assert r["rkme_clip"][n]["top1"] <= 0.75  # near chance (0.5): identical marginals
        assert r["download"][n]["top1"] == 0.5


def test_b1_marginals_really_coincide():
    """Without prompt weighting the two checkpoints' specs are draws from one distribution."""
    cfg = SimConfig(d=64)
    world, platform, _ = make_family("c_example_b1", cfg, seed=2)
    z, _ = world.render(torch.tensor([0, 1]), platform, 64, pixels=False)
    a, b = z[0].reshape(-1, cfg.d), z[1].reshape(-1, cfg.d)
    # per-prompt conditionals differ a lot, the pooled means do not
    assert (z[0].mean(1) - z[1].mean(1)).norm(dim=-1).mean() > 0.3
    assert (a.mean(0) - b.mean(0)).norm() < 0.05


def test_synthetic_json_shape(tmp_path):
    out = tmp_path / "s.json"
    assert (
        run_bench(
            ["synthetic", "--quick", "--families", "a", "c", "--no-sweep", "--out", str(out), "--max-tasks", "48"]
        )
        == 0
    )
    data = json.loads(out.read_text())
    assert {"command", "machine", "settings", "results"} <= set(data)
    assert data["command"] == "synthetic"
    assert set(data["results"]) == {"a_easy", "c_example_b1"}
    for methods in data["results"].values():
        assert set(methods) == {"gmi", "rkme_clip", "rkme_concat", "rkme_basic", "download"}
        for per in methods.values():
            assert set(per) == {"1", "4"}
            for r in per.values():
                assert set(r) == QUALITY_KEYS
                assert 0 <= r["top1"] <= r["top2"] <= r["top3"] <= r["top4"] <= 1
    assert data["results"]["a_easy"]["download"]["1"]["top1"] == pytest.approx(1 / 16, abs=0.03)
    assert all("met" in t for t in data["targets"])
    assert (tmp_path / "s.png").stat().st_size > 1000
    curve = data["results_budget"]["c_example_b1"]
    assert {"16x1", "32x1", "55x1", "55x2", "55x4"} <= set(curve)
    for label, row in curve.items():
        assert set(row) == {"images_per_spec", "top1", "top4", "mean_rank", "n_tasks"}
        p, s = map(int, label.split("x"))
        assert row["images_per_spec"] == p * s and 0 <= row["top1"] <= row["top4"] <= 1
    assert curve["55x4"]["top1"] == data["results"]["c_example_b1"]["gmi"]["1"]["top1"], (
        "the full budget is the main run"
    )
    assert "budget" in data["budget_choice"] and (tmp_path / "s-budget.png").stat().st_size > 1000


def test_synthetic_is_seeded(tmp_path):
    a = evaluate_family("b_near_duplicates", SimConfig(d=32, n_eval=3), 1, 8, 40, 24, False, None)
    b = evaluate_family("b_near_duplicates", SimConfig(d=32, n_eval=3), 1, 8, 40, 24, False, None)
    assert a["results"] == b["results"]


def test_compact_index_prefilter_recall():
    cfg = SimConfig(d=64)
    from gmi_core.bench.scale import ScaleWorld

    world = ScaleWorld(cfg, seed=1, chunk=100)
    full = torch.cat([world.specs(c) for c in range(3)])  # 300 specs
    gamma = ranker.median_gamma(full)
    mu, proj = CompactIndex.fit_projection(full.float().mean(2), 32)
    index = CompactIndex.from_parts(proj, mu, CompactIndex.encode(full, mu, proj), ranker.kbar(full, gamma), gamma)
    q_img, q_text = world.queries([5, 150, 299], 1, seed=4)
    for qi in range(3):
        w = ranker.prompt_weights(world.prompt, q_text[qi])
        exact = exact_scores(full, index.kbar, q_img[qi], w, gamma)
        top, _ = index.identify(full, q_img[qi], w, k=64)
        assert set(top[:10].tolist()) == set(torch.topk(exact, 10, largest=False).indices.tolist())


def test_scale_json_shape_and_memmap_path(tmp_path):
    out = tmp_path / "scale.json"
    args = [
        "scale",
        "--quick",
        "--sizes",
        "100",
        "300",
        "--dim",
        "32",
        "--ram-specs",
        "100",
        "--no-build",
        "--repeats",
        "1",
    ]
    args += [
        "--queries",
        "4",
        "--out",
        str(out),
        "--workdir",
        str(tmp_path),
        "--candidates",
        "32",
    ]
    assert run_bench(args) == 0
    data = json.loads(out.read_text())
    assert {"command", "machine", "settings", "results", "build_overhead_ratio", "peak_rss_gb", "disk_bytes"} <= set(
        data
    )
    for m, row in data["results"].items():
        assert {"exact_ms", "prefilter_ms", "prefilter_recall_at_10", "spec_bytes"} <= set(row)
        assert row["spec_bytes"] == int(m) * 55 * 4 * 32 * 2
        assert row["recall_queries"] == 4, "every M has its own recall queries, with an exact reference"
    assert data["results"]["100"]["exact_ms"] > 0
    assert data["results"]["300"]["exact_ms"] is None and "not timed" in data["results"]["300"]["exact_note"]
    assert all(row["prefilter_recall_at_10"] >= 0.9 for row in data["results"].values())
    assert data["disk_bytes"] == 300 * 55 * 4 * 32 * 2 and 0 < data["peak_rss_gb"] < 8
    assert {"peak RSS of the bench <= 8 GB", "disk <= 40 GB (removed on exit)"} <= {
        t["target"] for t in data["targets"]
    }
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("gmi-bench-scale-")]  # work folder removed


def test_parser_hook():
    import argparse

    from gmi_core.bench import add_bench_parser

    parser = argparse.ArgumentParser()
    add_bench_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["bench", "scale", "--quick", "--sizes", "10"])
    assert args.command == "bench" and args.bench_command == "scale" and args.sizes == [10]


@pytest.mark.slow
def test_roundtrip_tiny(tmp_path):
    pytest.importorskip("diffusers")
    out = tmp_path / "rt.json"
    args = ["roundtrip", "--quick", "--checkpoint-count", "2", "--platform-prompts", "2", "--eval-prompts", "1"]
    args += [
        "--images-per-prompt",
        "1",
        "--steps",
        "2",
        "--out",
        str(out),
        "--workdir",
        str(tmp_path),
        "--device",
        "cpu",
    ]
    assert run_bench(args) == 0
    data = json.loads(out.read_text())
    r = data["results"]["roundtrip"]
    assert r["gmi"]["1"]["n_tasks"] == 2 and set(r["gmi"]["1"]) == QUALITY_KEYS
    assert r["gmi"]["1"]["top1"] == 1.0  # the generating checkpoint ranks first
    assert math.isclose(data["families"]["roundtrip"]["chance_top1"], 0.5)


def test_default_budget_choice_is_the_closest_to_full():
    from gmi_core.bench.synthetic import choose_budget

    def row(images, top1):
        return {"images_per_spec": images, "top1": top1, "top4": 1.0, "mean_rank": 1.0, "n_tasks": 100}

    curve = {
        "e_subtle_x16": {
            "16x1": row(16, 0.5),
            "55x1": row(55, 0.70),
            "32x2": row(64, 0.77),
            "55x2": row(110, 0.83),
            "55x4": row(220, 0.84),
        },
        "c_example_b1": {
            k: row(v["images_per_spec"], 1.0)
            for k, v in {
                "16x1": row(16, 0),
                "55x1": row(55, 0),
                "32x2": row(64, 0),
                "55x2": row(110, 0),
                "55x4": row(220, 0),
            }.items()
        },
    }
    choice = choose_budget(curve)
    assert (
        choice["budget"] == "32x2"
        and not choice["within_tolerance"]
        and choice["top1_gap_to_full"]["e_subtle_x16"] == 0.07
    )
    curve["e_subtle_x16"]["55x1"]["top1"] = 0.83
    assert choose_budget(curve)["budget"] == "55x1" and choose_budget(curve)["within_tolerance"]


def test_centred_ranking_matches_the_bench_estimator(small_bank):
    """rank(centre=True) scores what bench synthetic's gmi_centred measures (one implementation, gmi_core/centring.py)."""
    from gmi_core.centring import centre_library, centre_query

    bank, queries, _, q_text = small_bank
    got = ranker.rank(bank, "gmi", queries[0], q_text[0], centre=True, gamma=1.1).scores
    image, rows = centre_library(bank.image, bank.prompt, bank.mask)
    query = centre_query(queries[0], q_text[0], rows)
    w = ranker.prompt_weights(bank.prompt, q_text[0])
    c = ranker.kernel(torch.einsum("mnsd,ud->mnsu", image, query), 1.1).mean(dim=(2, 3))
    want = torch.einsum("i,mij,j->m", w, ranker.kbar(image, 1.1, bank.mask), w) - 2 * c @ w
    assert torch.allclose(got, want, atol=1e-5)


def test_centring_one_prompt_set_collapses_rows_exactly():
    """A library of one prompt set regresses over one row per prompt (weighted by the specs holding it): the same
    centred features and query as over every (spec, prompt) row, also when specs hold different prompts."""
    from gmi_core.centring import centre_library, centre_query

    gen = torch.Generator().manual_seed(3)
    unit = lambda x: x / x.norm(dim=-1, keepdim=True)  # noqa: E731
    image, prompts = unit(torch.randn(5, 6, 3, 16, generator=gen)), unit(torch.randn(6, 16, generator=gen))
    mask = torch.ones(5, 6, 3, dtype=torch.bool)
    mask[:2, 4:] = False  # two specs lack the last prompts (a partial build, or a refine of the others)
    mask[3, :, 2] = False
    query, text = unit(torch.randn(2, 16, generator=gen)), unit(torch.randn(16, generator=gen))
    collapsed, rows = centre_library(image, prompts, mask)
    every_row, all_rows = centre_library(image, prompts.expand(5, -1, -1), mask)
    assert len(rows.weight) == 6 and len(all_rows.weight) == int(mask.any(2).sum())
    assert torch.allclose(collapsed, every_row, atol=1e-5)
    assert torch.allclose(centre_query(query, text, rows), centre_query(query, text, all_rows), atol=1e-5)


def test_bench_identify_quick_times_every_stage(tmp_path):
    """Real child processes, ViT-B-32 with random weights, two layouts, a handful of real spec files."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "identify.json"
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "gmi_core",
            "bench",
            "identify",
            "--quick",
            "--sizes",
            "4",
            "--layouts",
            "transformers_hub",
            "--threads",
            "1",
            "--workdir",
            str(tmp_path),
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        cwd=root,
        timeout=900,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    data = json.loads(out.read_text())
    assert set(data) >= {"command", "machine", "settings", "results", "targets"} and data["command"] == "identify"
    assert set(data["results"]["layouts"]) == {"open_clip_flat", "transformers_hub"}
    assert data["results"]["layouts"]["transformers_hub"]["layout"] == "transformers"
    first, fresh = data["results"]["identify"]["4"]["first_ever"], data["results"]["identify"]["4"]["fresh_process"]
    assert first["specs"] == fresh["specs"] == 4
    assert not first["label_cache_on_disk"] and fresh["label_cache_on_disk"], "label embeddings cached on disk"
    for key in (
        "process_start_s",
        "encoder_load_s",
        "label_embeddings_s",
        "spec_load_s",
        "first_identify_s",
        "fresh_process_s",
        "image_encode_s",
        "ranking_s",
        "warm_identify_s",
        "peak_rss_mb",
    ):
        assert fresh[key] >= 0, key
    assert fresh["peak_rss_mb"] > fresh["baseline_rss_mb"] > 0 and len(data["targets"]) == 3
    assert "| 4 | fresh process |" in run.stdout
    assert [p.name for p in tmp_path.iterdir()] == ["identify.json"], "work files removed"
