"""Observed specs from A1111-style images written here: attribution, bad input, ranking without generated specs."""

from __future__ import annotations

import json

import pytest
from PIL import Image, PngImagePlugin

from gmi_core.cli import main
from gmi_core.image_metadata import decode_user_comment, parse_comfy_prompt, parse_infotext
from gmi_core.observed import MAX_OBSERVED_IMAGES, OBSERVED, observed_key
from gmi_core.prompts import load_prompt_set

IMAGE_PROMPTS = 8  # per checkpoint, from the platform set (the user's own prompts)
QUERY_SEED = 700_000


def infotext(prompt: str, seed: int, model_hash: str, model: str) -> str:
    return (
        f"{prompt}\nNegative prompt: blurry\nSteps: 4, Sampler: Euler, Schedule type: Automatic, CFG scale: 7, "
        f"Seed: {seed}, Size: 64x64, Model hash: {model_hash}, Model: {model}, Version: v1.10.1"
    )


def exif_with_comment(text: str) -> Image.Exif:
    exif = Image.Exif()
    exif.get_ifd(0x8769)[0x9286] = b"UNICODE\x00" + text.encode("utf-16-be")
    return exif


def comfy_graph(ckpts: list[str], text: str, seed: int) -> str:
    graph = {
        str(i + 1): {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": c}} for i, c in enumerate(ckpts)
    }
    graph["10"] = {"class_type": "CLIPTextEncode", "inputs": {"text": text, "clip": ["1", 1]}}
    graph["11"] = {"class_type": "KSampler", "inputs": {"seed": seed, "positive": ["10", 0], "negative": ["10", 0]}}
    return json.dumps(graph)


@pytest.fixture(scope="module")
def user_folder(tiny_world, tmp_path_factory):
    """A folder of the user's renders: PNG infotext, JPEG and WebP EXIF, ComfyUI graphs, and bad files."""
    folder = tmp_path_factory.mktemp("renders")
    prompts = load_prompt_set("platform").prompts[20 : 20 + IMAGE_PROMPTS]
    checkpoints = tiny_world.source().list_checkpoints().checkpoints
    generator = tiny_world.generator()
    for c_index, ckpt in enumerate(checkpoints):
        sub = folder / f"day{c_index % 2}" / ckpt.name.removesuffix(".safetensors")
        sub.mkdir(parents=True)
        for i, prompt in enumerate(prompts):
            seed = 5000 + 100 * c_index + i
            image = generator.generate(ckpt, prompt, [seed], tiny_world.settings)[0]
            stem = ckpt.name.removesuffix(".safetensors")
            if i % 4 == 1:  # JPEG with the infotext in EXIF UserComment, model named only by name
                image.save(
                    sub / f"{i:05}.jpg",
                    exif=exif_with_comment(f"{prompt}\nSteps: 4, Sampler: Euler, Seed: {seed}, Model: {stem}"),
                )
            elif i % 4 == 2:  # WebP with EXIF, AutoV2 hash
                image.save(sub / f"{i:05}.webp", exif=exif_with_comment(infotext(prompt, seed, ckpt.short_hash, stem)))
            elif i % 4 == 3:  # ComfyUI SaveImage-style PNG with the API graph
                info = PngImagePlugin.PngInfo()
                info.add_text("prompt", comfy_graph([ckpt.name], prompt, seed))
                image.save(sub / f"{i:05}.png", pnginfo=info)
            else:  # A1111 PNG
                info = PngImagePlugin.PngInfo()
                info.add_text("parameters", infotext(prompt, seed, ckpt.short_hash, stem))
                image.save(sub / f"{i:05}.png", pnginfo=info)
    bad = folder / "bad"
    bad.mkdir()
    plain = Image.new("RGB", (64, 64), (200, 10, 10))
    plain.save(bad / "no-metadata.png")
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", infotext("a cat", 1, "abcdef0123", "someone_elses_model"))
    plain.save(bad / "unknown-checkpoint.png", pnginfo=info)
    info = PngImagePlugin.PngInfo()
    info.add_text("prompt", comfy_graph([checkpoints[0].name, checkpoints[1].name], "a cat", 1))
    plain.save(bad / "two-checkpoints.png", pnginfo=info)
    (bad / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", infotext("a cat", 1, checkpoints[0].short_hash, "x"))
    plain.save(bad / "truncated.png", pnginfo=info)
    data = (bad / "truncated.png").read_bytes()
    (bad / "truncated.png").write_bytes(data[: len(data) - 30])
    return folder, checkpoints


def test_metadata_parsers():
    meta = parse_infotext(infotext("a red fox,\nin snow", 42, "0123456789", "my model"))
    assert (meta.prompt, meta.seed, meta.model_hash, meta.model_name) == (
        "a red fox,\nin snow",
        42,
        "0123456789",
        "my model",
    )
    assert parse_infotext("just a prompt").model_hash is None
    refined = parse_infotext(
        infotext("a fox", 1, "0123456789", "base") + ", Refiner: other [abcdef0123], Refiner switch at: 0.8"
    )
    assert refined.checkpoint_names == ["base", "other [abcdef0123]"]  # two checkpoints: attributed to neither
    graph = json.loads(comfy_graph(["a.safetensors", "b.safetensors"], "a fox", 3))
    meta = parse_comfy_prompt(graph)
    assert meta.checkpoint_names == ["a.safetensors", "b.safetensors"] and meta.prompt == "a fox" and meta.seed == 3
    text = infotext("x", 1, "0123456789", "m")
    assert decode_user_comment(b"UNICODE\x00" + text.encode("utf-16-le")) == text
    assert decode_user_comment(b"UNICODE\x00" + text.encode("utf-16-be")) == text


def test_import_images_builds_observed_specs_that_identify(tiny_world, user_folder, tmp_path, capsys):
    folder, checkpoints = user_folder
    home = tmp_path / "home"
    (home / "specs").mkdir(parents=True)
    args = [
        "import-images",
        str(folder),
        "--models",
        str(tiny_world.models),
        "--home",
        str(home),
        "--encoder",
        str(tiny_world.encoder_file),
        "--json",
    ]
    assert main(args) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["added"] == {c.name: IMAGE_PROMPTS for c in checkpoints}, report
    reasons = {item["file"]: item["reason"] for item in report["skipped"]}
    assert set(reasons) == {
        f"bad/{n}"
        for n in ("no-metadata.png", "unknown-checkpoint.png", "two-checkpoints.png", "corrupt.png", "truncated.png")
    }, reasons
    assert "no generation metadata" in reasons["bad/no-metadata.png"]
    assert (
        "not installed" in reasons["bad/unknown-checkpoint.png"]
        and "abcdef0123" in reasons["bad/unknown-checkpoint.png"]
    )
    assert "ambiguous" in reasons["bad/two-checkpoints.png"]
    assert "truncated" in reasons["bad/truncated.png"] or "unreadable" in reasons["bad/truncated.png"]
    for spec in report["specs"]:
        assert spec["kind"] == OBSERVED and spec["generated_images"] == 0 and spec["observed_images"] == IMAGE_PROMPTS
        assert spec["attributed_by"] == {"hash": 4, "name": 4}  # A1111 hash, ComfyUI ckpt_name / A1111 "Model:" only

    gmi = tiny_world.gmi(spec_root=home / "specs")
    entries = gmi.store.entries()
    assert {e.prompt_set_hash for e in entries} == {OBSERVED}  # nothing generated, nothing of the platform set
    spec = gmi.store.load(observed_key(checkpoints[0].sha256, gmi.encoder.encoder_id))
    assert spec.prompts == list(load_prompt_set("platform").prompts[20 : 20 + IMAGE_PROMPTS])
    evaluation = load_prompt_set("evaluation").prompts
    source = tiny_world.source()
    for index, ckpt in enumerate(checkpoints):
        query = tiny_world.generator().generate(ckpt, evaluation[index], [QUERY_SEED + index], tiny_world.settings)
        result = gmi.identify(query, prompt=evaluation[index], source=source)
        assert result.ranking[0].name == ckpt.name, result.to_dict()
        centred = gmi.identify(query, prompt=evaluation[index], source=source, centre=True)
        assert centred.ranking[0].name == ckpt.name, centred.to_dict()
        assert result.ranking[0].kind == OBSERVED and result.ranking[0].counts["generated_images"] == 0
        match = result.ranking[0].top_prompts[0]
        assert match.prompt_set_hash == OBSERVED and gmi.library.thumbnail(ckpt.sha256, match.spec_index, OBSERVED)

    # importing the same folder again adds nothing and touches no spec
    mtimes = {e.file: e.mtime for e in gmi.store.entries()}
    assert main(args) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["added_total"] == 0 and {e.file: e.mtime for e in gmi.store.entries()} == mtimes
    assert sum("already in the observed spec" in s["reason"] for s in again["skipped"]) == IMAGE_PROMPTS * len(
        checkpoints
    )
    assert main(args[:-1]) == 0  # the summary for people
    text = capsys.readouterr().out
    assert "added 0 to 0 observed spec(s)" in text and "no generation metadata" in text
    assert MAX_OBSERVED_IMAGES >= IMAGE_PROMPTS


def test_observed_and_generated_specs_mix(tiny_world, user_folder, tmp_path):
    """A checkpoint with a generated and an observed spec ranks as one mixed spec beside generated-only ones."""
    import shutil

    from gmi_core.observed import import_images

    folder, checkpoints = user_folder
    root = tmp_path / "specs"
    shutil.copytree(tiny_world.root / "specs", root)
    gmi = tiny_world.gmi(spec_root=root)
    only_first = tmp_path / "first"
    shutil.copytree(next(folder.rglob(checkpoints[0].name.removesuffix(".safetensors"))), only_first)
    report = import_images(gmi, tiny_world.source().list_checkpoints(), only_first)
    assert report.added == {checkpoints[0].name: IMAGE_PROMPTS}
    evaluation = load_prompt_set("evaluation").prompts
    for index, ckpt in enumerate(checkpoints):
        query = tiny_world.generator().generate(
            ckpt, evaluation[index + 4], [QUERY_SEED + 50 + index], tiny_world.settings
        )
        result = gmi.identify(query, source=tiny_world.source())
        assert result.ranking[0].name == ckpt.name, result.to_dict()
        kinds = {r.name: r.kind for r in result.ranking}
        assert kinds[checkpoints[0].name] == "mixed" and kinds[checkpoints[1].name] == "generated"
    status, _ = gmi.status(tiny_world.source())
    assert [s.observed_images for s in status] == [IMAGE_PROMPTS, 0, 0, 0]


def test_preview_next_to_checkpoint_is_attributed(tiny_world, tmp_path):
    from gmi_core.image_metadata import ImageMetadata
    from gmi_core.observed import Attributor

    listing = tiny_world.source().list_checkpoints()
    ckpt = listing.checkpoints[2]
    attributor = Attributor(listing)
    preview = ckpt.path.with_name(ckpt.path.stem + ".preview.png")
    assert attributor.attribute(preview, ImageMetadata()).checkpoint == ckpt
    other = ImageMetadata(source="a1111", model_hash=listing.checkpoints[0].short_hash)
    assert attributor.attribute(preview, other).checkpoint is None  # location and metadata disagree: not guessed


def test_padded_bank_scores_each_spec_as_if_alone():
    """Per-spec prompts [M, N, d]: padded prompts and images are masked off. A spec whose every prompt has two or
    more images scores as if alone; a one-image row has no pair of its own, so its Kbar diagonal is the bank's
    mean diagonal (the same for every spec)."""
    import torch

    from gmi_core.observed import merge
    from gmi_core.protocols import GenerationSettings
    from gmi_core.ranker import FeatureBank, kbar, rank
    from gmi_core.spec import Spec

    g = torch.Generator().manual_seed(0)

    def unit(*shape):
        x = torch.randn(*shape, generator=g)
        return (x / x.norm(dim=-1, keepdim=True)).half()

    def spec(n, s, kind, sha):
        extra = (
            {} if kind == "generated" else {"kind": OBSERVED, "counts": {"generated_images": 0, "observed_images": n}}
        )
        psh = "p" if kind == "generated" else OBSERVED
        return Spec(
            sha,
            sha * 64,
            "enc",
            psh,
            psh,
            [f"{sha}{i}" for i in range(n)],
            [[0] * s] * n,
            GenerationSettings(),
            unit(n, s, 16),
            unit(n, 16),
            unit(n, s, 12),
            torch.zeros(n, 2, 2, 3, dtype=torch.uint8),
            torch.ones(n, s, dtype=torch.bool),
            extra,
        )

    generated, observed, other = spec(6, 4, "generated", "a"), spec(9, 1, OBSERVED, "b"), spec(6, 4, "generated", "c")
    specs = [generated, observed, merge(other, spec(5, 1, OBSERVED, "c"))]
    query, text, pixels = unit(2, 16).float(), unit(16).float(), unit(2, 12).float()
    bank = FeatureBank.from_specs(specs)
    assert bank.prompt.shape == (3, 11, 16) and bank.image.shape == (3, 11, 4, 16)
    assert bank.mask[1, :9, 0].all() and not bank.mask[1, :, 1:].any() and not bank.mask[1, 9:].any()
    for method in ("gmi", "rkme_clip", "rkme_concat", "rkme_basic"):
        together = rank(bank, method, query, text, pixels, gamma=0.7).scores
        alone = float(rank(FeatureBank.from_specs([generated]), method, query, text, pixels, gamma=0.7).scores[0])
        assert abs(float(together[0]) - alone) < 1e-5, method
    k = kbar(bank.image, 0.7, bank.mask, per_prompt_fill=False)
    known = torch.diagonal(kbar(bank.image[:1], 0.7, bank.mask[:1]), dim1=1, dim2=2)[0, :6]
    merged_known = torch.diagonal(k, dim1=1, dim2=2)[2, :6]
    mean_diagonal = float(torch.cat([known, merged_known]).mean())
    assert torch.allclose(torch.diagonal(k, dim1=1, dim2=2)[1, :9], torch.full((9,), mean_diagonal), atol=1e-5)


def test_text_chunks_after_the_image_data_are_read(tmp_path):
    """Some tools append their text chunks after IDAT; PIL reads those only when loading."""
    import zlib

    from gmi_core.image_metadata import read_metadata

    Image.new("RGB", (8, 8)).save(tmp_path / "plain.png")
    data = (tmp_path / "plain.png").read_bytes()
    text = b"parameters\x00" + infotext("a fox", 3, "0123456789", "m").encode()
    chunk = len(text).to_bytes(4, "big") + b"tEXt" + text + zlib.crc32(b"tEXt" + text).to_bytes(4, "big")
    iend = data.rindex(b"IEND") - 4
    (tmp_path / "late.png").write_bytes(data[:iend] + chunk + data[iend:])
    assert read_metadata(tmp_path / "late.png").model_hash == "0123456789"
    assert read_metadata(tmp_path / "plain.png").source == ""


def test_odd_metadata_never_raises(tmp_path):
    from gmi_core.image_metadata import read_metadata
    from gmi_core.observed import Attributor
    from gmi_core.protocols import CheckpointListing

    odd = [
        ("prompt", '{"1": {"inputs": [1, 2]}}'),
        ("prompt", '{"1": "x", "2": {"class_type": "K", "inputs": {"positive": ["9", 0], "ckpt_name": 5}}}'),
        ("prompt", "[1, 2]"),
        ("prompt", "null"),
        ("prompt", "[" * 5000 + "]" * 5000),
        ("workflow", '{"nodes": "x"}'),
        ("workflow", '{"nodes": [{"type": 1}]}'),
        ("parameters", "Steps: 20, Seed: x, Model hash: , Model: "),
        ("parameters", "\n\n"),
        ("parameters", '"' * 100),
    ]
    attributor = Attributor(CheckpointListing())
    for index, (key, value) in enumerate(odd):
        info = PngImagePlugin.PngInfo()
        info.add_text(key, value)
        path = tmp_path / f"{index}.png"
        Image.new("RGB", (4, 4)).save(path, pnginfo=info)
        who = attributor.attribute(path, read_metadata(path))
        assert who.checkpoint is None and who.reason, (key, value)
