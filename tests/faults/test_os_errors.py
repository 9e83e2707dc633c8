"""OS errors are one line; reads never fail because a cache write failed.

Moved from tests/test_faults.py (issue 11's fault suite, split by class in issue 19); each test name still
starts with its class."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.faults.harness import (
    PaintingGenerator,
    query,
    raise_enospc,
    run_gmi,
)
from tests.test_comfyui_nodes import write_fake_checkpoint

torch.set_num_threads(1)


# ===================================================================================================================
# Faults: OS errors -> one line; reads never fail because a cache write failed
# ===================================================================================================================
def test_faults_os_disk_full_during_a_build_is_one_line_and_loses_nothing(core, monkeypatch):
    import gmi_core.spec as spec_module

    target = "m1.safetensors"
    core.spec_path(target).unlink()
    monkeypatch.setattr(spec_module, "save_file", raise_enospc)
    report = core.gmi().build(core.source(), PaintingGenerator(), "missing")
    assert report.failed == [(target, "No space left on device: x.tmp")]
    monkeypatch.undo()
    assert core.states() == {"m0.safetensors": "ready", target: "missing", "m2.safetensors": "ready"}
    assert not list(core.spec_path(target).parent.glob("*.tmp"))


def test_faults_os_read_only_store_still_lists_and_identifies(core, monkeypatch):
    import gmi_core.store as store_module

    (core.home / "specs" / "manifest.json").unlink()  # listing must rebuild it, but cannot write it
    monkeypatch.setattr(store_module, "write_json_atomic", lambda *a, **k: raise_enospc())
    import gmi_core.hashing as hashing

    monkeypatch.setattr(hashing, "write_json_atomic", lambda *a, **k: raise_enospc())
    (core.home / "hashes.json").unlink()
    assert set(core.states().values()) == {"ready"}
    result = core.gmi().identify([query(1)], prompt="a lighthouse", source=core.source())
    assert len(result.ranking) == 3


def test_faults_os_cache_write_failure_does_not_fail_hashing(tmp_path, monkeypatch):
    import hashlib

    import gmi_core.hashing as hashing

    path = write_fake_checkpoint(tmp_path / "m.safetensors", 0)
    monkeypatch.setattr(hashing, "write_json_atomic", raise_enospc)
    assert hashing.sha256_file(path, tmp_path / "cache.json") == hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("where", ["home_is_a_file", "specs_is_a_file", "models_missing", "image_is_a_dir"])
def test_faults_os_cli_one_line_never_a_traceback(core, tmp_path, where):
    home, models = core.home, core.models
    image = tmp_path / "q.png"
    query().save(image)
    if where == "home_is_a_file":
        home = tmp_path / "not-a-dir"
        home.write_text("x")
    elif where == "specs_is_a_file":
        home = tmp_path / "home2"
        home.mkdir()
        (home / "specs").write_text("x")
    elif where == "models_missing":
        models = tmp_path / "nope"
    else:
        image = tmp_path / "folder.png"
        image.mkdir()
    encoder = core.root / "enc.safetensors"
    from gmi_core.encoders import save_encoder

    save_encoder(core.encoder, encoder)
    out = run_gmi("identify", image, "--models", models, "--home", home, "--encoder", encoder, "--prompt", "x")
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) == 1, out.stderr
    if where == "image_is_a_dir":
        assert "not a regular file" in out.stderr


def test_faults_os_unreadable_checkpoint_is_skipped_not_fatal(core, monkeypatch):
    import gmi_core.hashing as hashing

    real = hashing._digest

    def flaky(path):
        if Path(path).name == "m2.safetensors":
            raise PermissionError(13, "Permission denied", str(path))
        return real(path)

    monkeypatch.setattr(hashing, "_digest", flaky)
    core.home.joinpath("hashes.json").unlink(missing_ok=True)  # nothing cached: every file is read
    listing = core.source().list_checkpoints()
    assert [c.name for c in listing.checkpoints] == ["m0.safetensors", "m1.safetensors"]
    assert [(s.name, s.reason) for s in listing.skipped] == [("m2.safetensors", "unreadable (Permission denied)")]
