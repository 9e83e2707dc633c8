"""Confidence on every ranking (gmi_core/confidence.py) and refine of the contenders' specs (gmi_core/refine.py).

The library here is real: three tiny random SD checkpoints rendered with diffusers, one of them a near-duplicate of
another (the same weights with a slightly different colour cast), specs at a small budget (6 prompts x 1 image).
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from gmi_core.bench.refine_bench import POLICIES, refine_section
from gmi_core.bench.synthetic import SimConfig, make_family
from gmi_core.budgets import parse_budget
from gmi_core.confidence import normalised_weights, separation
from gmi_core.ranker import FeatureBank, prompt_weights, rank
from gmi_core.refine import refine

DEFAULT, TARGET = "6x1", "6x3"  # the library's budget and what refine tops the contenders up to
TWIN = "twin.safetensors"
QUERY = "a lighthouse on a cliff at dusk"  # not a prompt of the spec set


class CountingGenerator:
    """The real diffusers generator, counting the images it renders per checkpoint; ``stop_after`` prompts it
    reports a user interrupt (checked by the builder before the next prompt)."""

    def __init__(self, inner, stop_after: int | None = None):
        self.inner, self.stop_after, self.calls = inner, stop_after, []

    def generate(self, checkpoint, prompt, seeds, settings):
        self.calls.append((checkpoint.name, prompt, list(seeds)))
        return self.inner.generate(checkpoint, prompt, seeds, settings)

    def images(self, name: str | None = None) -> int:
        return sum(len(seeds) for n, _, seeds in self.calls if name in (None, n))

    def interrupted(self) -> bool:
        return self.stop_after is not None and len(self.calls) >= self.stop_after

    def release(self):
        self.inner.release()


@pytest.fixture(scope="module")
def twin_library(tmp_path_factory, tiny_world):
    """Two of the tiny world's checkpoints plus a near-duplicate of the first, specs built at DEFAULT."""
    root = tmp_path_factory.mktemp("twins")
    models = root / "models"
    models.mkdir()
    originals = sorted(tiny_world.models.glob("*.safetensors"))[:2]
    for path in originals:
        shutil.copy(path, models / path.name)
    state = load_file(str(originals[0]))
    key = next(k for k in state if k.endswith("decoder.conv_out.bias"))
    state[key] = state[key] + 0.02  # a fine-tune that barely moved: a near-duplicate
    save_file(state, str(models / TWIN), metadata={"gmi_tiny_seed": "twin"})
    from gmi_core.checkpoints import FolderCheckpointSource
    from gmi_core.engine import Gmi
    from gmi_core.prompts import load_prompt_set

    source = FolderCheckpointSource(models, hash_cache=root / "hashes.json")
    prompts = load_prompt_set("platform").head(6)
    encoder = tiny_world.gmi().encoder

    def engine(spec_root):
        return Gmi(spec_root, encoder, prompts, budget=DEFAULT, settings=tiny_world.settings)

    report = engine(root / "specs").build(source, tiny_world.generator())
    assert len(report.built) == 3 and not report.failed
    checkpoints = {c.name: c for c in source.list_checkpoints().checkpoints}
    return root, source, engine, checkpoints, originals[0].name


def _fresh(tmp_path, twin_library):
    """A copy of the library's specs (each test grows its own)."""
    root, source, engine, checkpoints, original = twin_library
    shutil.copytree(root / "specs", tmp_path / "specs")
    return engine(tmp_path / "specs"), source, checkpoints, original


def _query(tiny_world, checkpoint):
    return tiny_world.generator().generate(checkpoint, QUERY, [777_001], tiny_world.settings)


def test_near_duplicate_query_is_ambiguous_and_refine_renders_only_the_contenders(tmp_path, tiny_world, twin_library):
    gmi, source, checkpoints, original = _fresh(tmp_path, twin_library)
    query = _query(tiny_world, checkpoints[TWIN])
    before = gmi.identify(query, source=source)
    assert before.ambiguous is True and set(before.contenders) == {TWIN, original}
    data = before.to_dict()
    assert data["ambiguous"] is True and data["contenders"] == before.contenders
    assert all(0 <= row["confidence"] <= 1 for row in data["ranking"])
    json.dumps(data, allow_nan=False)

    counting = CountingGenerator(tiny_world.generator())
    progress = []
    refined = refine(gmi, query, source, counting, budget=TARGET, progress=progress.append)
    per_spec = 6 * 3 - 6  # TARGET minus DEFAULT images: only the missing cells
    assert {n for n, *_ in counting.calls} == {TWIN, original}, "only the contenders' specs are rendered"
    assert counting.images(TWIN) == counting.images(original) == per_spec
    assert refined.images_rendered == 2 * per_spec and not refined.cancelled
    assert progress[-1].images_planned == progress[-1].images_rendered == 2 * per_spec and progress[-1].eta_s == 0
    rendered = {(n, p, s) for n, p, seeds in counting.calls for s in seeds}
    assert len(rendered) == 2 * per_spec, "no image rendered twice"
    summary = refined.to_dict()["refine"]
    assert summary["images_rendered"] == 2 * per_spec and [r["name"] for r in summary["before"]["ranking"]] == [
        r.name for r in before.ranking
    ]
    for name in (TWIN, original):  # refined specs stay larger for later queries
        assert sum(gmi.store.load(gmi.key(checkpoints[name])).image_counts) == 18

    # the same library with every spec at the target budget (the others topped up too) ranks the same way
    full = twin_library[2](tmp_path / "specs")
    full.budget = parse_budget(TARGET)
    others = CountingGenerator(tiny_world.generator())
    full.build(source, others)
    assert {n for n, *_ in others.calls} == set(checkpoints) - {TWIN, original}
    expected = full.identify(query, source=source)
    assert [r.name for r in refined.after.ranking] == [r.name for r in expected.ranking]  # scores: other gamma
    # after a refine the contenders are ranked as a library of their own, the rest behind them in the first order
    among = gmi.identify(query, source=source, among={checkpoints[TWIN].sha256, checkpoints[original].sha256})
    assert [r.name for r in among.ranking] == [r.name for r in refined.after.ranking[:2]]
    assert [r.rank for r in refined.after.ranking] == [1, 2, 3] and refined.after.ranking[2].name not in {
        TWIN,
        original,
    }


def test_unambiguous_query_renders_nothing(tmp_path, tiny_world, twin_library):
    gmi, source, checkpoints, original = _fresh(tmp_path, twin_library)
    distinct = next(name for name in checkpoints if name not in (TWIN, original))
    query = _query(tiny_world, checkpoints[distinct])
    counting = CountingGenerator(tiny_world.generator())
    refined = refine(gmi, query, source, counting, budget=TARGET)
    assert refined.before.ambiguous is False and refined.before.contenders == [distinct]
    assert counting.calls == [] and refined.images_rendered == 0 and refined.after is refined.before
    assert refined.after.ranking[0].name == distinct and refined.after.ranking[0].confidence > 0.99


def test_interrupted_refine_keeps_its_images_and_answers(tmp_path, tiny_world, twin_library):
    gmi, source, checkpoints, _original = _fresh(tmp_path, twin_library)
    query = _query(tiny_world, checkpoints[TWIN])
    counting = CountingGenerator(tiny_world.generator(), stop_after=2)
    refined = refine(gmi, query, source, counting, budget=TARGET, should_cancel=counting.interrupted)
    assert refined.cancelled and counting.images() == 4 and refined.images_rendered == 4
    first = counting.calls[0][0]
    assert sum(gmi.store.load(gmi.key(checkpoints[first])).image_counts) == 6 + 4, "rendered prompts are kept"
    assert refined.after is not refined.before and {r.name for r in refined.after.ranking} == set(checkpoints)
    assert refined.to_dict()["refine"]["cancelled"] is True
    # the next refine resumes: it renders only what is still missing
    again = CountingGenerator(tiny_world.generator())
    resumed = refine(gmi, query, source, again, budget=TARGET)
    assert again.images() == 2 * 12 - 4 and not resumed.cancelled


def test_image_cap_is_shared_by_the_contenders(tmp_path, tiny_world, twin_library):
    gmi, source, checkpoints, original = _fresh(tmp_path, twin_library)
    query = _query(tiny_world, checkpoints[TWIN])
    counting = CountingGenerator(tiny_world.generator())
    refined = refine(gmi, query, source, counting, budget=TARGET, max_images=9)
    assert counting.images() <= 9 and counting.images(TWIN) == counting.images(original) == 4
    assert refined.images_rendered == counting.images()


def test_separation_scores_are_the_rankers(tmp_path):
    """The margins the confidence tests are exactly the ranker's score differences (partial specs included)."""
    torch.manual_seed(0)
    cfg = SimConfig(d=64, n_platform=12, n_eval=3)
    world, platform, evaluation = make_family("e_subtle_x4", cfg, 1, 6)
    image, _ = world.render(torch.arange(6), platform, 3, pixels=False)
    mask = torch.ones(6, 12, 3, dtype=torch.bool)
    mask[1, :, 2] = False  # fewer images per prompt
    mask[2, 5:] = False  # fewer prompts
    mask[3, :, 1:] = False  # one image per prompt
    bank = FeatureBank([f"c{i}" for i in range(6)], image * mask[..., None], world.text(platform), mask.any(2), None)
    bank.image_mask = mask
    query, _ = world.render(torch.tensor([0]), evaluation[:1], 2, pixels=False)
    text = world.pseudo_prompt(world.text(evaluation[:1]))[0]
    ranking = rank(bank, "gmi", query[0, 0], text)
    order = ranking.order
    w = normalised_weights(prompt_weights(bank.prompt, text), mask[order])
    margin, se, z = separation(image[order][None], mask[order][None], w[None], query[0, 0][None], ranking.gamma)
    expected = ranking.scores[order] - ranking.scores[order[0]]
    exact = [i for i, m in enumerate(order.tolist()) if m != 3]  # Kbar's fill for one image per prompt differs
    assert torch.allclose(margin[0, exact] - margin[0, exact[0]], expected[exact] - expected[exact[0]], atol=1e-5)
    assert (se[0, 1:] > 0).all() and torch.isinf(z[0, 0])


def test_refine_bench_keys_and_calibration_table():
    cfg = SimConfig(d=64, n_eval=4)
    world, platform, evaluation = make_family("b_near_duplicates", cfg, 2, 8)
    image, _ = world.render(torch.arange(8), platform, 4, pixels=False)
    truth = torch.arange(8).repeat(2)
    ev = torch.arange(16) % 4
    q_img, _ = world.render(truth, evaluation[ev][:, None, :], 1, pixels=False)
    q_text = world.pseudo_prompt(world.text(evaluation)[ev])
    prompt = world.text(platform)
    weights = torch.stack([prompt_weights(prompt, q) for q in q_text])
    out = refine_section(image, prompt, q_img[:, 0], q_text, weights, truth)
    assert set(out["policies"]) == set(POLICIES)
    for row in out["policies"].values():
        assert set(row) == {"top1", "top4", "mean_rank", "images_rendered_mean", "ambiguous_rate", "n_tasks"}
    calibration = out["calibration"]
    cells = ("not_flagged_right", "not_flagged_wrong", "flagged_right", "flagged_wrong")
    assert sum(calibration[k] for k in cells) == 16
    assert out["images_unambiguous_max"] == 0
    assert out["policies"]["refine_top2"]["images_rendered_mean"] == 2 * (220 - 64)


def test_cli_identify_refine(tmp_path, tiny_world, twin_library, capsys):
    """identify --refine with the diffusers runner: the table and the JSON show the ranking before and the images."""
    from gmi_core.cli import main
    from gmi_core.prompts import load_prompt_set

    root, _, _, checkpoints, original = twin_library
    shutil.copytree(root / "specs", tmp_path / "specs")  # --home's spec store
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps(list(load_prompt_set("platform").head(6).prompts)))
    _query(tiny_world, checkpoints[TWIN])[0].save(tmp_path / "query.png")
    args = ["identify", str(tmp_path / "query.png"), "--models", str(root / "models"), "--home", str(tmp_path)]
    args += ["--encoder", str(tiny_world.encoder_file), "--prompt-set", str(prompts), "--budget", DEFAULT]
    assert main(args) == 0
    table = capsys.readouterr().out
    assert "ambiguous: 2 checkpoints" in table and "[contender]" in table and " conf " in table
    assert main([*args, "--refine", "--refine-budget", "6x2", "--config", str(tiny_world.config), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["refine"]["images_rendered"] == 2 * 6 and out["refine"]["before"]["ambiguous"] is True
    assert {c["name"] for c in out["refine"]["checkpoints"]} == {TWIN, original}
    assert main([*args, "--refine", "--refine-budget", "6x2", "--config", str(tiny_world.config)]) == 0
    table = capsys.readouterr().out  # already refined to 6x2: nothing left to render
    assert "before refine:" in table and "rendered 0 image(s): nothing" in table
