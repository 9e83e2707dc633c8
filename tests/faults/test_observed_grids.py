"""Class 10 (issue 18, part): an A1111 grid (a collage of the batch, in outputs/*-grids/, named grid-*, or by its
content: pixels that tile the infotext's image size) is never counted as an observed image of the checkpoint its
infotext names (observed.is_grid)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from gmi_core.image_metadata import read_metadata
from gmi_core.observed import import_images, is_grid
from tests.faults.test_security import _user_images

torch.set_num_threads(1)


@pytest.mark.parametrize(
    ("relative", "grid"),
    [
        ("txt2img-grids/2026-12-05/00001-123.png", True),
        ("img2img-grids/00002.png", True),
        ("txt2img-images/grid-0003.png", True),
        ("txt2img-images/2026-12-05/00001-123.png", False),
        ("my-grids-photos.png", False),
    ],
)
def test_observed_grids_are_recognised(relative, grid):
    assert is_grid(Path(relative)) is grid


@pytest.mark.parametrize(
    ("params", "pixels", "grid"),
    [
        ("Size: 64x64", (128, 128), True),  # a batch of 4, 2 x 2
        ("Size: 64x64", (192, 64), True),  # 3 in a row
        ("Size: 64x48", (64, 96), True),
        ("Size: 64x64", (64, 64), False),
        ("Size: 64x64", (100, 64), False),  # not whole tiles
        ("Size: 64x64, Hires upscale: 2", (128, 128), False),  # the hires fix's output is one image
        ("Size: 64x64, Hires upscale: 2", (256, 128), True),
        ("Size: 64x64, Hires upscale: 1.5", (96, 96), False),
        ("Size: 64x48, Hires resize: 96x72", (96, 72), False),
        ("Size: 64x48, Hires resize: 96x72", (192, 72), True),
        ("Size: 64x64, Postprocess upscale by: 2", (128, 128), False),  # Extras upscaled one image
        ("Size: 64x64, Hires resize: 128x0", (256, 128), False),  # a side A1111 derives: cannot tell
        ("", (128, 128), False),  # no infotext
    ],
)
def test_observed_grids_are_recognised_by_content(tmp_path, params, pixels, grid):
    """Where "save grids" writes into the images folder under the images' own file name pattern."""
    from PIL import Image, PngImagePlugin

    info = PngImagePlugin.PngInfo()
    if params:
        info.add_text("parameters", f"a harbour at dusk\nSteps: 3, Seed: 5, {params}, Model: m0")
    Image.new("RGB", pixels, (90, 120, 150)).save(tmp_path / "00007-5.png", pnginfo=info)
    meta = read_metadata(tmp_path / "00007-5.png")
    assert meta.pixel_size == pixels
    assert is_grid(Path("txt2img-images/00007-5.png"), meta) is grid


def test_observed_grids_are_skipped_by_import_images(core, tmp_path):
    outputs = tmp_path / "outputs"
    _user_images(outputs / "txt2img-images", ["m0.safetensors"])
    _user_images(outputs / "txt2img-grids", ["m1.safetensors"])  # a grid whose infotext names m1
    shutil.copy(outputs / "txt2img-images" / "m0_0.png", outputs / "txt2img-images" / "grid-0001.png")
    _collage(outputs / "txt2img-images" / "m0_0.png", outputs / "txt2img-images" / "00009-0.png")  # named as images
    report = import_images(core.gmi(), core.source().list_checkpoints(), outputs)
    assert report.added == {"m0.safetensors": 2}, report.to_dict()
    grids = sorted(label for label, reason in report.skipped if reason.startswith("a grid"))
    assert grids == [
        "txt2img-grids/m1_0.png",
        "txt2img-grids/m1_1.png",
        "txt2img-images/00009-0.png",
        "txt2img-images/grid-0001.png",
    ]


def _collage(image_file: Path, target: Path) -> None:
    """An A1111 grid of four copies of ``image_file``, with its infotext (as "save grids" writes it)."""
    from PIL import Image, PngImagePlugin

    with Image.open(image_file) as image:
        info = PngImagePlugin.PngInfo()
        info.add_text("parameters", image.text["parameters"])
        width, height = image.size
        grid = Image.new("RGB", (2 * width, 2 * height))
        for index in range(4):
            grid.paste(image, ((index % 2) * width, (index // 2) * height))
    grid.save(target, pnginfo=info)


def test_observed_grids_refused_download_fails_fast_naming_url_and_folder(tmp_path, monkeypatch):
    """Class 10: downloads allowed, the hub unreachable: one short probe, then the URL and where to put the file."""
    import socket
    import time

    from gmi_core.encoders import load_encoder
    from gmi_core.errors import EncoderUnavailable

    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    started = time.monotonic()
    with pytest.raises(EncoderUnavailable) as info:
        load_encoder("ViT-B-32", allow_download=True, download_dir=tmp_path / "models" / "gmi" / "clip")
    message = str(info.value)
    assert time.monotonic() - started < 40, "a refused download must fail fast (it took 92 s)"
    assert f"127.0.0.1:{port}" in message and "not reachable" in message, message
    assert "https://huggingface.co/" in message and "save it as models/gmi/clip/" in message, message
