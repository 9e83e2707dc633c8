"""Security: hostile names never leave gmi's folders, no path echo, decode limits before decoding.

Moved from tests/test_faults.py (issue 11's fault suite, split by class in issue 19); each test name still
starts with its class."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from gmi_core import limits
from gmi_core.encoders import tiny_encoder
from gmi_core.errors import EncoderUnavailable, ImageError, InvalidInput, NotFound
from gmi_core.images import load_image
from gmi_core.observed import import_images, observed_key
from gmi_core.paths import folder_inside, redact, resolve_inside
from tests.faults.harness import (
    REPO,
    hold_lock_in_another_process,
    no_server_path,
)
from tests.image_files import png_header_only
from tests.test_comfyui_nodes import fake_image

torch.set_num_threads(1)

# ===================================================================================================================
# Security: names confined to gmi's folders, no path echo, decode limits before decoding
# ===================================================================================================================
HOSTILE_NAMES = [
    "../outside.json",
    "sets/../../outside.json",
    "..",
    "%2e%2e/outside.json",
    "..%2Foutside.json",
    "sets%2F..%2F..%2Foutside.json",
    "..\\outside.json",
    "C:\\outside.json",
    "",
    "a\x00b.json",
    "/etc/passwd",
]


@pytest.mark.parametrize("name", HOSTILE_NAMES)
def test_security_hostile_names_never_leave_the_allowed_folders(tmp_path, name):
    root = tmp_path / "gmi" / "prompt_sets"
    root.mkdir(parents=True)
    (tmp_path / "gmi" / "outside.json").write_text('["secret"]')
    (root / "ok.json").write_text('["fine"]')
    with pytest.raises((InvalidInput, NotFound)) as err:
        resolve_inside(name, [root], "prompt set")
    assert no_server_path(str(err.value), tmp_path)
    assert resolve_inside("ok.json", [root], "prompt set") == (root / "ok.json").resolve()


def test_security_symlinks_out_of_the_folder_are_refused_in_it_accepted(tmp_path):
    root = tmp_path / "sets"
    root.mkdir()
    secret = tmp_path / "secret.txt"
    secret.write_text("a prompt from outside\n")
    (root / "leak.txt").symlink_to(secret)
    (root / "sub").symlink_to(tmp_path, target_is_directory=True)
    (root / "real.txt").write_text("x\n")
    (root / "alias.txt").symlink_to(root / "real.txt")
    for name in ("leak.txt", "sub/secret.txt"):
        with pytest.raises(NotFound) as err:
            resolve_inside(name, [root], "prompt set")
        assert no_server_path(str(err.value), tmp_path)
    assert resolve_inside("alias.txt", [root], "prompt set") == (root / "real.txt").resolve()
    # an absolute path is accepted only where the caller allows it (host settings) and only inside the roots
    assert resolve_inside(str(root / "real.txt"), [root], "prompt set", allow_absolute=True).name == "real.txt"
    with pytest.raises(NotFound):
        resolve_inside(str(secret), [root], "prompt set", allow_absolute=True)
    (root / "folder.json").mkdir()
    with pytest.raises(NotFound):
        resolve_inside("folder.json", [root], "prompt set")  # a directory is not a file


@pytest.mark.parametrize("name", ["../../elsewhere/evil", "evil/../../x", "/tmp/evil", "ViT-L-14%2F..", "a b"])
def test_security_encoder_model_names_cannot_reach_other_safetensors(tmp_path, name):
    from gmi_core.encoders import load_encoder, save_encoder

    search = tmp_path / "clip"
    search.mkdir()
    save_encoder(tiny_encoder(1), tmp_path / "elsewhere" / "evil-openai.safetensors")
    with pytest.raises((InvalidInput, EncoderUnavailable)) as err:
        load_encoder(name, search_dirs=[search])
    assert no_server_path(str(err.value), tmp_path) or isinstance(err.value, EncoderUnavailable)
    with pytest.raises((InvalidInput, EncoderUnavailable)):
        load_encoder("ViT-B-32/../../elsewhere/evil", search_dirs=[search])


def test_security_encoder_file_names_resolve_only_inside_the_search_folders(tmp_path):
    from gmi_core.encoders import load_encoder, save_encoder

    search = tmp_path / "clip"
    save_encoder(tiny_encoder(1), tmp_path / "outside.safetensors")
    save_encoder(tiny_encoder(2), search / "inside.safetensors")
    assert load_encoder("inside.safetensors", search_dirs=[search]).encoder_id == "gmi-tiny-clip-s2"
    for name in ("../outside.safetensors", "x/../../outside.safetensors"):
        with pytest.raises((EncoderUnavailable, InvalidInput)) as err:
            load_encoder(name, search_dirs=[search])
        assert no_server_path(str(err.value), tmp_path)


def test_security_redact_keeps_no_absolute_path():
    text = "spec file /home/u/.cache/gmi/specs/ab/x.safetensors is unreadable; C:\\Users\\me\\f.json; ViT-L-14/openai"
    out = redact(text)
    assert "/home/u" not in out and "C:\\Users" not in out and "x.safetensors" in out and "ViT-L-14/openai" in out


def test_security_pixel_limit_from_the_header_before_decoding(monkeypatch):
    before = Image.MAX_IMAGE_PIXELS
    decoded = []
    original_load = Image.Image.load
    monkeypatch.setattr(Image.Image, "load", lambda self: decoded.append(self.size) or original_load(self))
    for w, h in ((16000, 16000), (8000, 6000), (40000, 1100)):
        t0 = time.perf_counter()
        with pytest.raises(ImageError, match="image too large"):
            load_image(png_header_only(w, h), name="upload")
        assert time.perf_counter() - t0 < 1.0
    assert decoded == [] and before == Image.MAX_IMAGE_PIXELS  # PIL's global limit untouched
    monkeypatch.setattr(limits, "MAX_IMAGE_PIXELS", 100)  # the one configurable place
    buf = __import__("io").BytesIO()
    Image.new("RGB", (20, 20)).save(buf, "PNG")
    with pytest.raises(ImageError, match="image too large"):
        load_image(buf.getvalue())
    out = subprocess.run(
        [sys.executable, "-c", "from gmi_core import limits; print(limits.MAX_IMAGE_PIXELS)"],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=dict(os.environ, GMI_MAX_IMAGE_PIXELS="1234"),
    )
    assert out.stdout.strip() == "1234"


def test_security_pil_global_limit_is_never_changed_from_threads():
    seen = set()
    stop = threading.Event()

    def watch():
        while not stop.is_set():
            seen.add(Image.MAX_IMAGE_PIXELS)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        buf = __import__("io").BytesIO()
        fake_image(0, "x", 1).save(buf, "PNG")
        for _ in range(30):
            load_image(buf.getvalue())
    finally:
        stop.set()
        watcher.join()
    assert seen == {Image.MAX_IMAGE_PIXELS}


def test_security_byte_limit_counts_chunks_without_a_declared_length():
    counter = limits.ByteCounter(10)
    counter.add(b"12345")
    with pytest.raises(limits.UploadTooLarge):
        counter.add(b"123456")
    exact = limits.ByteCounter(4)
    assert b"".join(exact.add(c) for c in (b"ab", b"cd")) == b"abcd" and exact.count == 4


def test_security_image_files_over_the_byte_limit_are_not_read(tmp_path, monkeypatch):
    import gmi_core.images as images

    big = tmp_path / "big.png"
    big.write_bytes(b"\x89PNG" + b"0" * 2000)
    monkeypatch.setattr(images, "MAX_UPLOAD_BYTES", 1000)
    with pytest.raises(ImageError, match="larger than"):
        load_image(big)
    with pytest.raises(ImageError, match="larger than"):
        load_image(big.read_bytes())


# ===================================================================================================================
# Specs without generating (issue 10's routes under issue 11's rules): folders confined, links out skipped, numbers
# checked, 4xx never 500, no path echo, the spec lock held while an observed spec is extended
# ===================================================================================================================

HOSTILE_FOLDERS = [
    "..",
    "../",
    "renders/../..",
    "/etc",
    "//server/share",
    "%2e%2e",
    "renders%2F..%2F..",
    "..\\x",
    "C:\\Windows",
    "a\x00b",
    "link_out",
    "link_out/deeper",
    "missing",
]


def _user_images(folder: Path, checkpoint_names: list[str], count: int = 2) -> None:
    """A1111-style PNGs whose infotext names each checkpoint (by name: the fake checkpoints' hashes are not recorded)."""
    from PIL import PngImagePlugin

    folder.mkdir(parents=True, exist_ok=True)
    for c, name in enumerate(checkpoint_names):
        for i in range(count):
            info = PngImagePlugin.PngInfo()
            info.add_text(
                "parameters", f"a harbour at dusk {i}\nSteps: 3, Seed: {i}, Size: 64x64, Model: {Path(name).stem}"
            )
            fake_image(c, f"a harbour at dusk {i}", i).save(folder / f"{Path(name).stem}_{i}.png", pnginfo=info)


@pytest.mark.parametrize("name", HOSTILE_FOLDERS)
def test_security_import_images_folder_never_leaves_the_root(tmp_path, name):
    root = tmp_path / "output"
    (root / "renders").mkdir(parents=True)
    (tmp_path / "elsewhere" / "deeper").mkdir(parents=True)
    (root / "link_out").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    with pytest.raises((InvalidInput, NotFound)) as err:
        folder_inside(root, name, "subfolder")
    assert no_server_path(str(err.value), tmp_path) and "\n" not in str(err.value)


def test_security_import_images_folder_inside_the_root_is_accepted(tmp_path):
    root = tmp_path / "output"
    (root / "renders" / "day1").mkdir(parents=True)
    (root / "link_in").symlink_to(root / "renders", target_is_directory=True)
    assert folder_inside(root, "") == root.resolve()
    assert folder_inside(root, "renders/day1/") == (root / "renders" / "day1").resolve()
    assert folder_inside(root, "link_in/day1") == (root / "renders" / "day1").resolve()


def test_security_import_images_files_linking_out_are_skipped(core, tmp_path):
    folder = tmp_path / "output"
    _user_images(folder, ["m0.safetensors"])
    _user_images(tmp_path / "elsewhere", ["m1.safetensors"])
    (folder / "leak.png").symlink_to(tmp_path / "elsewhere" / "m1_0.png")
    (folder / "sub").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    gmi = core.gmi()
    report = import_images(gmi, core.source().list_checkpoints(), folder)
    assert report.added == {"m0.safetensors": 2}, report.to_dict()
    refused = sorted(f for f, r in report.skipped if "link that leaves the folder" in r)
    assert refused == ["leak.png"], report.skipped  # a linked folder is not walked at all
    assert not any(f.startswith("sub/") for f, _ in report.skipped)
    assert core.states() == dict.fromkeys(
        ("m0.safetensors", "m1.safetensors", "m2.safetensors"), "ready"
    )  # nothing lost


def test_faults_lock_import_images_waits_for_no_one_and_loses_nothing(core, tmp_path):
    """Another process extends m0's observed spec: this import skips m0 ("busy"), imports the rest, keeps m0's file."""
    folder = tmp_path / "output"
    _user_images(folder, ["m0.safetensors", "m1.safetensors"])
    gmi = core.gmi()
    m0 = next(c for c in core.source().list_checkpoints().checkpoints if c.name == "m0.safetensors")
    holder = hold_lock_in_another_process(gmi.store.path_for(observed_key(m0.sha256, gmi.encoder.encoder_id)))
    try:
        report = import_images(gmi, core.source().list_checkpoints(), folder)
    finally:
        holder.kill()
        holder.wait()
    assert report.added == {"m1.safetensors": 2}, report.to_dict()
    assert sorted(f for f, r in report.skipped if r.startswith("busy")) == ["m0_0.png", "m0_1.png"]
    again = import_images(gmi, core.source().list_checkpoints(), folder)  # the lock is gone: m0 now, m1 not twice
    assert again.added == {"m0.safetensors": 2} and sum("already in" in r for _, r in again.skipped) == 2
