"""Budgets that grow, mixed budgets in one ranking, per-family settings from the checkpoint header."""

import json

import pytest
import torch
from safetensors.torch import save_file

from gmi_core.budgets import BUDGETS, cell_seed, parse_budget, prompt_order
from gmi_core.checkpoints import inspect_checkpoint
from gmi_core.errors import GmiError
from gmi_core.families import FamilySettings, parse_overrides
from gmi_core.protocols import CheckpointInfo
from gmi_core.ranker import FeatureBank, kbar, prompt_weights, rank
from gmi_core.spec import Spec


class CountingGenerator:
    """A real generator that counts the images (seeds) it renders, per checkpoint."""

    def __init__(self, inner):
        self.inner, self.calls = inner, []

    def generate(self, checkpoint, prompt, seeds, settings):
        self.calls.append((checkpoint.name, prompt, list(seeds)))
        return self.inner.generate(checkpoint, prompt, seeds, settings)

    @property
    def images(self) -> int:
        return sum(len(seeds) for _, _, seeds in self.calls)

    def release(self):
        self.inner.release()


def test_budgets_are_prefixes_of_each_other():
    order = prompt_order(55)
    assert sorted(order) == list(range(55)) and order == prompt_order(55)
    quick, standard, full = (BUDGETS[n] for n in ("quick", "standard", "full"))
    assert quick.prompt_indices(55) == standard.prompt_indices(55)[:16] == order[:16]
    assert full.prompt_indices(55) == order and full.images(55) == 220 and standard.images(55) <= 64
    assert len({i // 11 for i in quick.prompt_indices(55)}) == 5, "the first 16 prompts span the whole set"
    assert parse_budget("32x2").images(55) == 64 and parse_budget("allx3").prompt_count(10) == 10
    with pytest.raises(GmiError, match="choose quick, standard, full"):
        parse_budget("lots")


def test_quick_spec_ranks_at_once_and_a_full_build_adds_only_missing_images(tiny_world, tmp_path):
    source = tiny_world.source()
    checkpoints = source.list_checkpoints().checkpoints
    quick = tiny_world.gmi(spec_root=tmp_path / "specs")
    quick.budget = parse_budget("4x1")
    first = CountingGenerator(tiny_world.generator())
    assert quick.plan(source).images == 4 * 4
    quick.build(source, first)
    assert first.images == 16 and len(first.calls) == 16
    query = tiny_world.generator().generate(checkpoints[2], "a fox in an autumn forest", [4242], tiny_world.settings)
    result = quick.identify(query, source=source)
    assert result.ranking[0].name == checkpoints[2].name
    assert all(r.images_done == 4 and r.prompts_done == 4 and not r.partial for r in result.ranking)

    full = tiny_world.gmi(spec_root=tmp_path / "specs")  # the fixture's budget: every prompt x 2 images
    statuses = full.status(source)[0]
    assert {s.state for s in statuses} == {"partial"} and {s.budget_done for s in statuses} == {None}
    assert [s.images_missing for s in statuses] == [16] * 4 and full.plan(source).images == 64
    before = full.store.load(full.key(checkpoints[0]))
    partial_result = full.identify(query, source=source)
    assert all(r.partial for r in partial_result.ranking), "rankings flag specs below the budget"
    assert partial_result.to_dict()["ranking"][0]["partial"] is True

    second = CountingGenerator(tiny_world.generator())
    progress = []
    full.build(source, second, progress=progress.append)
    assert second.images == 64, "only the missing images are rendered"
    done_cells = {(prompt, seed) for _, prompt, seeds in first.calls for seed in seeds}
    assert not done_cells & {(p, s) for _, p, seeds in second.calls for s in seeds}, "no image rendered twice"
    after = full.store.load(full.key(checkpoints[0]))
    old = before.image_done
    assert torch.equal(after.image_features[:, :1][old], before.image_features[old]), "earlier images kept"
    assert after.seeds == [[cell_seed(0, i, s) for s in range(2)] for i in range(10)]
    assert {s.state for s in full.status(source)[0]} == {"ready"}
    assert progress[-1].images_planned == 64 and progress[-1].images_rendered == 64
    assert progress[-1].seconds_per_image > 0 and progress[-1].eta_s == 0
    reference = tiny_world.gmi().store.load(full.key(checkpoints[0]))
    assert torch.allclose(after.image_features.float(), reference.image_features.float(), atol=1e-3), (
        "a spec grown in two builds equals one built at once"
    )


def test_mixed_budgets_rank_together_with_the_generating_checkpoint_first(tiny_world, tmp_path):
    source = tiny_world.source()
    checkpoints = source.list_checkpoints().checkpoints
    gmi = tiny_world.gmi(spec_root=tmp_path / "specs")
    for ckpt, budget in zip(checkpoints, ("3x1", "allx2", "6x1", "allx1")):
        gmi.budget = parse_budget(budget)
        gmi.build(source, tiny_world.generator(), which=[ckpt.name])
    gmi.budget = parse_budget("allx2")
    images = {c.name: s.images_done for c, s in zip(checkpoints, gmi.status(source)[0])}
    assert list(images.values()) == [3, 20, 6, 10]
    generator = tiny_world.generator()
    for i, ckpt in enumerate(checkpoints):
        query = generator.generate(ckpt, "a lighthouse on a rocky coast at dawn", [777 + i], tiny_world.settings)
        result = gmi.identify(query, source=source)
        assert len(result.ranking) == 4 and not result.excluded
        assert result.ranking[0].name == ckpt.name, [(r.name, r.score) for r in result.ranking]
        centred = gmi.identify(query, source=source, centre=True)
        assert centred.ranking[0].name == ckpt.name, [(r.name, r.score) for r in centred.ranking]
        assert {r.name: r.partial for r in result.ranking} == {
            c.name: c.name != checkpoints[1].name for c in checkpoints
        }


def test_masked_kbar_is_fair_to_specs_with_fewer_images():
    """A checkpoint's expected score must not depend on how many images per prompt its spec holds."""
    g = torch.Generator().manual_seed(0)
    centre = torch.nn.functional.normalize(torch.randn(1, 6, 1, 16, generator=g), dim=-1)
    samples = torch.nn.functional.normalize(centre + 0.5 * torch.randn(400, 6, 4, 16, generator=g), dim=-1)
    full = kbar(samples, 1.0)
    mask = torch.zeros(400, 6, 4, dtype=torch.bool)
    mask[:200] = True
    mask[200:, :, 0] = True  # one image per prompt: the diagonal comes from the specs that have pairs
    mixed = kbar(samples, 1.0, mask)
    assert torch.allclose(mixed[:200].mean(0), full[:200].mean(0))
    assert torch.allclose(mixed[200:].mean(0), mixed[:200].mean(0), atol=0.02)
    only_single = kbar(samples, 1.0, mask.clone().fill_(False).index_fill_(2, torch.tensor([0]), True))
    assert torch.allclose(torch.diagonal(only_single, dim1=1, dim2=2), torch.ones(400, 6))


def test_feature_bank_pads_specs_of_different_widths(tiny_world, tmp_path):
    gmi = tiny_world.gmi()
    source = tiny_world.source()
    specs = [gmi.store.load(gmi.key(c)) for c in source.list_checkpoints().checkpoints]
    narrow = specs[0]
    narrow.image_features, narrow.pixel_features = narrow.image_features[:, :1], narrow.pixel_features[:, :1]
    narrow.image_done, narrow.seeds = narrow.image_done[:, :1].clone(), [row[:1] for row in narrow.seeds]
    narrow.image_done[5:] = False
    bank = FeatureBank.from_specs(specs)
    assert bank.image.shape[2] == 2 and bank.mask[0].sum() == 5 and bank.mask[1:].all()
    query = specs[0].image_features[0, :1].float()
    ranking = rank(bank, "rkme_clip", query)
    assert ranking.order[0] == 0 and torch.isfinite(ranking.scores).all()


def test_version_1_spec_files_still_load(tiny_world, tmp_path):
    """Specs written before budgets (whole prompts, ``done`` [N]) load as fully rendered prompts."""
    from safetensors import safe_open

    from gmi_core.spec import _content_hash

    gmi = tiny_world.gmi()
    spec = gmi.store.load(gmi.key(tiny_world.source().list_checkpoints().checkpoints[0]))
    tensors = dict(spec._tensors())
    done = tensors.pop("image_done")[:, 0].clone()
    done[7:] = 0
    tensors["done"] = done
    meta = spec.metadata()
    meta.pop("family")
    meta["format_version"] = 1
    meta["content_sha256"] = _content_hash(tensors, None)  # version 1 checksummed the tensors only
    path = tmp_path / "v1.safetensors"
    save_file(tensors, str(path), metadata={"gmi": json.dumps(meta)})
    with safe_open(str(path), framework="pt") as handle:
        assert "image_done" not in handle.keys()  # noqa: SIM118 - safe_open has no __contains__
    old = Spec.load(path)
    assert old.image_counts == [2] * 7 + [0] * 3 and old.done.sum() == 7


def _header_only_checkpoint(path, keys, metadata=None, tensors=None):
    state = {k: torch.zeros(1) for k in keys}
    state.update(tensors or {})
    save_file(state, str(path), metadata=metadata)
    return path


def test_family_settings_come_from_the_checkpoint_header(tmp_path):
    vae = ["first_stage_model.decoder.conv_in.weight"]
    unet = ["model.diffusion_model.input_blocks.0.0.weight"]
    sdxl = _header_only_checkpoint(tmp_path / "xl.safetensors", unet + vae + ["conditioner.embedders.0.transformer.x"])
    sd1 = _header_only_checkpoint(tmp_path / "one.safetensors", unet + vae + ["cond_stage_model.transformer.x"])
    sd2_keys = unet + vae + ["cond_stage_model.model.x"]
    sd2 = _header_only_checkpoint(tmp_path / "two.safetensors", sd2_keys)
    probe = "model.diffusion_model.output_blocks.11.1.transformer_blocks.0.norm1.bias"
    spread = torch.randn(1280, generator=torch.Generator().manual_seed(0)) * 0.2
    sd2v = _header_only_checkpoint(tmp_path / "two_v.safetensors", sd2_keys, tensors={probe: spread})
    sd2v_meta = _header_only_checkpoint(
        tmp_path / "two_v_meta.safetensors", sd2_keys, {"modelspec.architecture": "stable-diffusion-v2-768-v"}
    )
    families = {p.stem: inspect_checkpoint(p)[0] for p in (sdxl, sd1, sd2, sd2v, sd2v_meta)}
    assert families == {"xl": "sdxl", "one": "sd1", "two": "sd2", "two_v": "sd2-v", "two_v_meta": "sd2-v"}

    settings = FamilySettings.defaults(overrides=parse_overrides(["sd1.steps=30", "cfg=5.5"]))
    from gmi_core.checkpoints import FolderCheckpointSource

    listing = FolderCheckpointSource(tmp_path, hash_cache=tmp_path / "h.json").list_checkpoints()
    by_name = {c.name: settings.for_family(c.family) for c in listing.checkpoints}
    assert (by_name["xl.safetensors"].width, by_name["xl.safetensors"].height) == (1024, 1024)
    assert by_name["two_v.safetensors"].width == 768 and by_name["two.safetensors"].width == 512
    assert by_name["one.safetensors"].steps == 30 and by_name["xl.safetensors"].steps == 25
    assert {s.cfg for s in by_name.values()} == {5.5}
    assert settings.for_family(CheckpointInfo("x.ckpt", tmp_path, "0" * 64, family="unknown").family).width == 512
    with pytest.raises(GmiError, match="between 64 and 4096"):
        FamilySettings.defaults(overrides=parse_overrides(["sdxl.width=8192"]))
    with pytest.raises(GmiError, match="unknown checkpoint family"):
        FamilySettings.defaults(overrides=parse_overrides(["sd4.steps=4"]))


@pytest.mark.parametrize("centre", [False, True], ids=["gmi", "gmi_centred"])
def test_budget_curve_scores_what_the_ranker_ranks_for_a_spec_of_that_budget(centre):
    """bench synthetic's batched budget estimator equals ranker.rank on a bank of specs built to the budget (cells
    outside it zero and masked off, as a partial spec holds them), for the default and the centred estimator."""
    from gmi_core.bench.simulation import SimConfig, make_family
    from gmi_core.bench.synthetic import budget_scores

    cfg = SimConfig(d=32, n_platform=10, n_eval=3, images_per_prompt=4)
    world, platform, evaluation = make_family("e_subtle_x16", cfg, 5, 6)
    image, _ = world.render(torch.arange(6), platform, 4, pixels=False)
    prompt = world.text(platform)
    truth = torch.tensor([0, 3, 5])
    q_img = world.render(truth, evaluation[:, None, :], 1, pixels=False)[0][:, 0]  # [3, 1, d]
    q_text = world.pseudo_prompt(world.text(evaluation))
    for budget in (parse_budget("6x2"), parse_budget("4x1"), parse_budget("allx4")):
        idx = budget.prompt_indices(10)
        sub = image[:, idx, : budget.images_per_prompt]
        w = torch.stack([prompt_weights(prompt[idx], t) for t in q_text])
        batched = budget_scores(sub, prompt[idx], q_img, q_text, w, centre)
        mask = torch.zeros(6, 10, 4, dtype=torch.bool)
        mask[:, idx, : budget.images_per_prompt] = True
        partial = FeatureBank(
            [f"c{i}" for i in range(6)], image * mask[..., None], prompt, mask.any(2), None, [None] * 6, mask
        )
        for t in range(3):
            want = rank(partial, "gmi", q_img[t], q_text[t], centre=centre).scores
            assert torch.allclose(batched[t], want, atol=1e-4), (budget, t)


def test_budget_json_has_every_estimators_curve(tmp_path):
    from gmi_core.bench import run_bench

    out = tmp_path / "s.json"
    assert (
        run_bench(["synthetic", "--quick", "--families", "c", "--no-sweep", "--max-tasks", "24", "--out", str(out)])
        == 0
    )
    data = json.loads(out.read_text())
    by_estimator = data["results_budget_by_estimator"]
    assert set(by_estimator) == {"gmi", "gmi_centred"} and by_estimator["gmi"] == data["results_budget"]
    for curves in by_estimator.values():
        assert set(curves["c_example_b1"]) >= {"16x1", "32x1", "55x1", "32x2", "55x2", "55x4"}
        assert all(
            set(row) == {"images_per_spec", "top1", "top4", "mean_rank", "n_tasks"}
            for row in curves["c_example_b1"].values()
        )
    assert set(data["budget_choice_by_estimator"]) == {"gmi", "gmi_centred"}
    assert data["budget_choice_by_estimator"]["gmi"] == data["budget_choice"]
    target = next(t for t in data["targets"] if t["target"].startswith("default budget"))
    assert set(target["value"]["top1_gap_to_full_other_estimators"]) == {"gmi_centred"}
