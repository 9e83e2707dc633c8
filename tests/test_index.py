"""The engine's two-tier index (gmi_core.index): used above the threshold, same top-1 as the exact ranking,
kept in step with the store listing, saved next to the store."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from gmi_core import limits, spec_library
from gmi_core.budgets import cell_seed
from gmi_core.encoders import tiny_encoder
from gmi_core.engine import Gmi
from gmi_core.index import StoreIndex
from gmi_core.prompts import load_prompt_set
from gmi_core.protocols import GenerationSettings
from gmi_core.spec import Spec, SpecKey

torch.set_num_threads(1)
SPECS, PROMPTS, IMAGES = 60, 4, 2


def _image(colour: np.ndarray, seed: int) -> Image.Image:
    """A checkpoint's "style": its own colour and pattern, plus per-image noise."""
    rng = np.random.default_rng(seed)
    pixels = colour[None, None, :] + rng.normal(0, 25, (32, 32, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")


def _colour(m: int) -> np.ndarray:
    return np.random.default_rng(1000 + m).uniform(0, 255, 3)


def _save_spec(gmi: Gmi, m: int, seed_offset: int = 0) -> str:
    prompts = gmi.prompt_set
    sha = hashlib.sha256(f"checkpoint {m}".encode()).hexdigest()
    spec = Spec.empty(
        checkpoint_name=f"ckpt-{m:03d}",
        sha256=sha,
        encoder_id=gmi.encoder.encoder_id,
        prompt_set_name=prompts.name,
        prompt_set_hash=prompts.hash,
        prompts=list(prompts.prompts),
        seeds=[[cell_seed(0, i, s) for s in range(IMAGES)] for i in range(len(prompts))],
        settings=GenerationSettings(steps=2, width=64, height=64),
        prompt_features=gmi.prompt_features,
        feature_dim=gmi.encoder.dim,
    )
    images = [_image(_colour(m), 10_000 * m + 100 * i + s + seed_offset) for i in range(PROMPTS) for s in range(IMAGES)]
    spec.image_features[:] = gmi.encoder.encode_images(images).reshape(PROMPTS, IMAGES, -1).half()
    spec.image_done[:] = True
    gmi.store.save(spec)
    return sha


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("index-store")
    gmi = Gmi(root, tiny_encoder(0, device="cpu"), load_prompt_set("platform").head(PROMPTS))
    shas = [_save_spec(gmi, m) for m in range(SPECS)]
    return root, shas


def _engine(root) -> Gmi:
    return Gmi(root, tiny_encoder(0, device="cpu"), load_prompt_set("platform").head(PROMPTS))


def _query(m: int, k: int = 0) -> list[Image.Image]:
    return [_image(_colour(m), 7_777_777 + 13 * m + k)]


def test_index_above_threshold_same_top1_as_exact(store, monkeypatch):
    root, shas = store
    exact = _engine(root)
    monkeypatch.setattr(limits, "INDEX_MIN_SPECS", SPECS + 1)  # one above the store: exact
    exact_results = [exact.identify(_query(m), prompt="a photo", top_k=5) for m in range(0, SPECS, 6)]
    assert exact.library._index is None and not exact.library.index_path().exists()
    assert all(len(r.ranking) == SPECS for r in [exact.identify(_query(0), prompt="a photo")])

    monkeypatch.setattr(limits, "INDEX_MIN_SPECS", 10)
    monkeypatch.setattr(spec_library, "INDEX_CANDIDATES", 8)  # a shortlist much smaller than the store
    indexed = _engine(root)
    agree = 0
    for m, reference in zip(range(0, SPECS, 6), exact_results):
        got = indexed.identify(_query(m), prompt="a photo")
        assert len(got.ranking) == 8, "only the shortlist is read and ranked"
        assert got.excluded == [
            (f"{SPECS - 8} other checkpoint(s)", "not among the two-tier index's candidates for this image")
        ]
        assert got.gamma == pytest.approx(reference.gamma, rel=1e-6), (
            "the index's gamma is the exact ranker's median heuristic"
        )
        assert got.best.sha256 == reference.best.sha256
        assert got.best.score == pytest.approx(reference.best.score, rel=1e-4, abs=1e-6)
        agree += got.best.sha256 == shas[m]
    assert agree >= 7, f"the generating checkpoint should usually rank first ({agree}/10)"
    assert (
        indexed.library.index_path().exists()
        and indexed.library._index is not None
        and len(indexed.library._index.rows) == SPECS
    )


def test_index_follows_the_store_listing(store, monkeypatch, tmp_path):
    root, shas = store
    monkeypatch.setattr(limits, "INDEX_MIN_SPECS", 10)
    monkeypatch.setattr(spec_library, "INDEX_CANDIDATES", 8)
    gmi = _engine(root)
    gmi.identify(_query(1), prompt="a photo")
    saved = StoreIndex.load(gmi.library.index_path())
    assert saved is not None and saved.rows == gmi.library._index.rows, "the index is saved next to the store"

    # a process started later reads the saved index instead of reading every spec again
    later = _engine(root)
    loads = []
    original = later.store.load
    monkeypatch.setattr(later.store, "load", lambda *a, **k: loads.append(a) or original(*a, **k))
    later.identify(_query(1), prompt="a photo")
    assert len(loads) <= 8, f"{len(loads)} spec files read for one query with a saved index"

    # a new checkpoint's spec: encoded into the index (few changes), and found
    new_sha = _save_spec(gmi, SPECS)
    result = gmi.identify(_query(SPECS), prompt="a photo")
    assert len(gmi.library._index.rows) == SPECS + 1 and new_sha in gmi.library._index.shas
    assert result.best.sha256 == new_sha
    # a rewritten spec (other images): its row is encoded again
    before = dict(zip(gmi.library._index.shas, gmi.library._index.compact.kbar))
    _save_spec(gmi, 3, seed_offset=5)
    gmi.identify(_query(3), prompt="a photo")
    after = dict(zip(gmi.library._index.shas, gmi.library._index.compact.kbar))
    assert not torch.equal(before[shas[3]], after[shas[3]]) and torch.equal(before[shas[4]], after[shas[4]])
    # a removed spec leaves the index
    gmi.store.path_for(SpecKey(new_sha, gmi.encoder.encoder_id, gmi.prompt_set.hash)).unlink()
    gmi.identify(_query(1), prompt="a photo")
    assert new_sha not in gmi.library._index.shas and len(gmi.library._index.rows) == SPECS


def test_methods_the_index_does_not_serve_rank_exactly(store, monkeypatch):
    root, _ = store
    monkeypatch.setattr(limits, "INDEX_MIN_SPECS", 10)
    gmi = _engine(root)
    assert len(gmi.identify(_query(2), prompt="a photo", method="rkme_basic").ranking) == SPECS
    assert len(gmi.identify(_query(2), prompt="a photo", centre=True).ranking) == SPECS


def test_index_gamma_reads_only_the_sampled_rows_and_equals_the_rankers(tmp_path):
    """Above 4 x 1,024 stored rows the median heuristic samples rows: the index reads just those rows from the
    spec files and gets the very gamma ranker.median_gamma computes on the stacked features."""
    from gmi_core.index import _gamma_of
    from gmi_core.ranker import median_gamma

    gmi = _engine(tmp_path)
    gen = torch.Generator().manual_seed(3)
    stacked = []
    for m in range(530):  # 530 x 4 prompts x 2 images = 4,240 rows
        spec = Spec.empty(
            checkpoint_name=f"c{m}",
            sha256=hashlib.sha256(str(m).encode()).hexdigest(),
            encoder_id=gmi.encoder.encoder_id,
            prompt_set_name="p",
            prompt_set_hash=gmi.prompt_set.hash,
            prompts=list(gmi.prompt_set.prompts),
            seeds=[[i * 2 + s for s in range(IMAGES)] for i in range(PROMPTS)],
            settings=GenerationSettings(steps=2, width=64, height=64),
            prompt_features=gmi.prompt_features,
            feature_dim=gmi.encoder.dim,
        )
        features = torch.nn.functional.normalize(
            torch.randn(PROMPTS, IMAGES, gmi.encoder.dim, generator=gen), dim=-1
        ).half()
        spec.image_features[:] = features
        spec.image_done[:] = True
        spec.save(gmi.store.path_for(spec.key))
        stacked.append(features)
    entries = gmi.store.entries()
    order = {e.sha256: i for i, e in enumerate(entries)}
    stacked = torch.stack(
        [stacked[m] for m in sorted(range(530), key=lambda m: order[hashlib.sha256(str(m).encode()).hexdigest()])]
    )
    assert _gamma_of(gmi.store, entries) == median_gamma(stacked)


def test_scale_bench_exact_reference_and_chunks(tmp_path):
    """bench scale's chunk-by-chunk exact reference equals exact_scores over all specs held in RAM, and a chunk
    regenerates bit for bit (so the pass can fit on the first chunks and stream them again)."""
    from gmi_core.bench.scale import ScaleWorld, _generate, _make_queries
    from gmi_core.bench.simulation import SimConfig
    from gmi_core.index import exact_scores

    world = ScaleWorld(SimConfig(d=32), seed=2, chunk=100)
    assert torch.equal(world.specs(1), world.specs(1))
    queries = _make_queries(world, [100, 300], 3, 2, world.prompt, 300)
    gen = _generate(world, 300, tmp_path, 16, queries)
    full = gen.in_ram(300)
    assert torch.equal(full[100:200], world.specs(1)), "the features file holds the chunks in order"
    for q, m in enumerate(queries.size):
        reference = exact_scores(full[:m].float(), gen.kbars[:m], queries.images[q, :1], queries.weights[q], gen.gamma)
        assert torch.allclose(queries.exact[q, :m], reference, rtol=1e-4, atol=1e-5)
        assert torch.isinf(queries.exact[q, m:]).all()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_interrupted_scale_bench_leaves_no_temp_folder(tmp_path, sig):
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")]),
    }
    cmd = [
        sys.executable,
        "-m",
        "gmi_core",
        "bench",
        "scale",
        "--sizes",
        "20000",
        "--dim",
        "64",
        "--queries",
        "2",
        "--no-build",
        "--plot",
        "none",
        "--threads",
        "1",
        "--workdir",
        str(tmp_path),
        "--out",
        str(tmp_path / "x.json"),
    ]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not list(tmp_path.glob("gmi-bench-scale-*/features.f16")) and time.monotonic() < deadline:
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            time.sleep(0.05)
        assert list(tmp_path.glob("gmi-bench-scale-*/features.f16")), "the bench wrote its features file"
        proc.send_signal(sig)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode != 0 and not (tmp_path / "x.json").exists()
    assert not list(tmp_path.glob("gmi-bench-scale-*")), "the temp folder is removed when the bench is interrupted"
