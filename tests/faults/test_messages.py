"""Messages say what happened.

Moved from tests/test_faults.py (issue 11's fault suite, split by class in issue 19); each test name still
starts with its class."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import torch

from gmi_core.encoders import tiny_encoder
from gmi_core.errors import GmiError, ImageError
from gmi_core.images import load_image
from tests.faults.harness import (
    PaintingGenerator,
    run_gmi,
)

torch.set_num_threads(1)


# ===================================================================================================================
# Faults: messages say what happened
# ===================================================================================================================
def test_faults_messages_skipped_checkpoint_named_in_a_build(core):
    (core.models / "lora.safetensors").write_bytes(b"not a checkpoint")
    report = core.gmi().build(core.source(), PaintingGenerator(), ["lora.safetensors"])
    assert report.built == [] and not report.failed
    assert "lora.safetensors" in {s.name for s in report.skipped}
    with pytest.raises(GmiError, match="unknown checkpoint"):
        core.gmi().build(core.source(), PaintingGenerator(), ["really-unknown.safetensors"])


@pytest.mark.parametrize("kind", ["folder", "device", "fifo"])
def test_faults_messages_not_a_regular_file(tmp_path, kind):
    path = tmp_path / "x.png"
    if kind == "folder":
        path.mkdir()
    elif kind == "device":
        path = Path("/dev/null")
    else:
        os.mkfifo(path)
    t0 = time.perf_counter()
    with pytest.raises(ImageError, match="not a regular file"):
        load_image(path)
    assert time.perf_counter() - t0 < 2  # a FIFO is never opened (it would block)


def test_faults_messages_cli_empty_models_folder_says_so(tmp_path):
    (tmp_path / "models").mkdir()
    from gmi_core.encoders import save_encoder

    encoder = save_encoder(tiny_encoder(0), tmp_path / "enc.safetensors")
    out = run_gmi("specs", "--models", tmp_path / "models", "--home", tmp_path / "home", "--encoder", encoder)
    assert out.returncode == 0 and "holds no checkpoint files" in out.stdout, out


def test_faults_messages_cli_build_prints_skipped_reason(tmp_path):
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "lora.safetensors").write_bytes(b"garbage")
    from gmi_core.encoders import save_encoder

    encoder = save_encoder(tiny_encoder(0), tmp_path / "enc.safetensors")
    out = run_gmi(
        "build",
        "--models",
        tmp_path / "models",
        "--home",
        tmp_path / "home",
        "--encoder",
        encoder,
        "--which",
        "lora.safetensors",
    )
    assert "lora.safetensors: skipped: unreadable" in out.stderr and "unknown" not in out.stderr, out
