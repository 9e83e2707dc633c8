"""Class 10 (issue 18, part): an A1111 grid (a collage of the batch, in outputs/*-grids/ or named grid-*) is never
counted as an observed image of the checkpoint its infotext names (observed.is_grid)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

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


def test_observed_grids_are_skipped_by_import_images(core, tmp_path):
    outputs = tmp_path / "outputs"
    _user_images(outputs / "txt2img-images", ["m0.safetensors"])
    _user_images(outputs / "txt2img-grids", ["m1.safetensors"])  # a grid whose infotext names m1
    shutil.copy(outputs / "txt2img-images" / "m0_0.png", outputs / "txt2img-images" / "grid-0001.png")
    report = import_images(core.gmi(), core.source().list_checkpoints(), outputs)
    assert report.added == {"m0.safetensors": 2}, report.to_dict()
    grids = sorted(label for label, reason in report.skipped if reason.startswith("a grid"))
    assert grids == ["txt2img-grids/m1_0.png", "txt2img-grids/m1_1.png", "txt2img-images/grid-0001.png"]


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
