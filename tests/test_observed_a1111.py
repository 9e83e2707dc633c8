"""The A1111 Build tab's observed-spec actions, against the fake WebUI of tests/test_a1111_adapter.py:
infotext PNGs in the WebUI's outputs folder become observed specs; the folder stays confined."""

from __future__ import annotations

import pytest
from PIL import PngImagePlugin

from tests.test_a1111_adapter import encoder_file, gmi, webui, world  # noqa: F401 - fixtures

PROMPTS = ["a red barn in snow", "a cup of coffee", "a dragon over mountains", "a cat in a hat", "a boat at sunset"]


def test_build_tab_imports_infotext_images_and_shows_groups(world):  # noqa: F811
    library, runtime = gmi("library"), gmi("runtime")
    from gmi_core.errors import GmiError

    out = world.root / "outputs" / "txt2img-images" / "2026-11-30"
    out.mkdir(parents=True)
    sha = {c.name: c.sha256 for c in runtime.source().list_checkpoints().checkpoints}  # hashes, as the WebUI has them
    infos = sorted(
        (
            i
            for i in {i.filename: i for i in world.sd_models.checkpoints_list.values()}.values()
            if i.name.startswith("model_")
        ),
        key=lambda i: i.name,
    )
    for c, info in enumerate(infos):
        for i, text in enumerate(PROMPTS):
            seed = 100 * c + i
            image = world.render(info.filename, text, seed, 64, 64)
            png = PngImagePlugin.PngInfo()
            png.add_text(
                "parameters",
                f"{text}\nSteps: 3, Sampler: Euler, Seed: {seed}, Size: 64x64, "
                f"Model hash: {sha[info.name][:10]}, Model: {info.model_name}",
            )
            image.save(out / f"{c}-{i}.png", pnginfo=png)
    for bad in ("../..", "/etc"):
        with pytest.raises(GmiError):
            library.import_images_report("outputs", bad)
    report = library.import_images_report("outputs", "")
    assert report["added"] == {info.name: len(PROMPTS) for info in infos}, report
    html = library.import_images_html("outputs", "")  # again: nothing new
    assert "added 0" in html and "already" in html
    status = runtime.status()
    assert [(c["state"], c["observed_images"]) for c in status["checkpoints"]] == [("missing", len(PROMPTS))] * 3
    for info in infos:
        query = world.render(info.filename, "a lighthouse in a storm", 987654, 64, 64)
        _, data = runtime.identify([query], prompt="a lighthouse in a storm", top_k=3, thumbnails=True)
        assert data["ranking"][0]["name"] == info.name and data["ranking"][0]["kind"] == "observed"
        assert data["ranking"][0]["top_prompts"][0]["thumbnail"].startswith("data:image/png;base64,")
    groups = library.groups_report()
    assert len(groups["checkpoints"]) == 3 and groups["groups"] == []
    assert "No near-duplicates" in library.groups_html()

    api = gmi("api")  # the same through /gmi/v1/import-images and /gmi/v1/map
    assert api.import_images(api.ImportImagesRequest(root="outputs"))["added_total"] == 0
    with pytest.raises(api.HTTPException) as err:
        api.import_images(api.ImportImagesRequest(root="outputs", subfolder="../../.."))
    assert err.value.status_code == 400 and "'..' is not accepted" in err.value.detail
    assert api.library_map()["groups"] == []
