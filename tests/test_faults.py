"""Fault injection (issue 11): hostile names and uploads, OS faults, broken caches and specs, concurrent builds,
bad numbers and malformed requests, through gmi_core, the CLI, the ComfyUI routes/nodes and the A1111 API/tab.

Each test's name starts with its class (security, faults_os, faults_cache, faults_status, faults_alias, faults_lock,
faults_numbers, faults_promptset, faults_messages, faults_progress, etiquette); the "Hardening" table in docs/hardening.md
counts the cases per class (`pytest --collect-only -q tests/test_faults.py`). Every case also checks that nothing
is lost: specs that were ready stay ready unless the case itself breaks them.
"""

from __future__ import annotations

import asyncio
import json
import os
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from gmi_core import limits
from gmi_core.checkpoints import FolderCheckpointSource
from gmi_core.encoders import tiny_encoder
from gmi_core.engine import Gmi
from gmi_core.errors import EncoderUnavailable, GmiError, ImageError, InvalidInput, NotFound
from gmi_core.images import load_image
from gmi_core.paths import FILE_MODE, redact, resolve_inside
from gmi_core.prompts import load_prompt_set
from gmi_core.protocols import GenerationSettings
from gmi_core.spec import Spec, _content_hash
from tests.image_files import png_header_only
from tests.test_comfyui_nodes import FakeGenerator, Interrupted, build, env, fake_image, write_fake_checkpoint  # noqa: F401

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parents[1]
SETTINGS = GenerationSettings(steps=3, width=64, height=64)


# -- a small, fast core: header-valid fake checkpoints, a generator that paints each checkpoint's colour ----------
class PaintingGenerator:
    """Renders checkpoint i's colour plus seed noise; records every call (duplicate rendering shows up here)."""

    def __init__(self, fail_with: BaseException | None = None, fail_after: int = 0):
        self.calls: list[tuple[str, str]] = []
        self.fail_with, self.fail_after = fail_with, fail_after

    def generate(self, checkpoint, prompt, seeds, settings):
        from safetensors import safe_open

        if self.fail_with is not None and len(self.calls) >= self.fail_after:
            raise self.fail_with
        self.calls.append((checkpoint.name, prompt))
        with safe_open(str(checkpoint.path), "pt") as f:
            index = int(f.metadata()["index"])
        return [fake_image(index, prompt, s, settings.width) for s in seeds]

    def release(self):
        pass


class World:
    def __init__(self, root: Path, count: int = 3):
        self.root, self.models, self.home = root, root / "models", root / "home"
        self.paths = [write_fake_checkpoint(self.models / f"m{i}.safetensors", i) for i in range(count)]
        self.encoder = tiny_encoder(0)
        self.prompts = load_prompt_set("platform").head(3)

    def source(self):
        return FolderCheckpointSource(self.models, hash_cache=self.home / "hashes.json")

    def gmi(self, **kw) -> Gmi:
        return Gmi(self.home / "specs", self.encoder, self.prompts, budget="allx2", settings=SETTINGS, **kw)

    def states(self) -> dict[str, str]:
        return {s.name: s.state for s in self.gmi().status(self.source())[0]}

    def spec_path(self, name: str) -> Path:
        gmi = self.gmi()
        ckpt = next(c for c in self.source().list_checkpoints().checkpoints if c.name == name)
        return gmi.store.path_for(gmi.key(ckpt))


@pytest.fixture
def core(tmp_path) -> World:
    w = World(tmp_path)
    report = w.gmi().build(w.source(), PaintingGenerator())
    assert sorted(report.built) == ["m0.safetensors", "m1.safetensors", "m2.safetensors"] and not report.failed
    return w


def run_gmi(*args) -> subprocess.CompletedProcess:
    """``python -m gmi_core ARGS`` from this checkout in a child process, as a user runs it."""
    return subprocess.run(
        [sys.executable, "-m", "gmi_core", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
        env=dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1"),
    )


def query(index: int = 1) -> Image.Image:
    return fake_image(index, "a lighthouse in a storm", 987_654)


def no_server_path(text: str, *roots: Path) -> bool:
    return all(str(r) not in text for r in roots) and "/tmp/" not in text


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
# Faults: OS errors -> one line; reads never fail because a cache write failed
# ===================================================================================================================
def _raise_enospc(*args, **kwargs):
    raise OSError(28, "No space left on device", "/srv/private/gmi/specs/x.tmp")


def test_faults_os_disk_full_during_a_build_is_one_line_and_loses_nothing(core, monkeypatch):
    import gmi_core.spec as spec_module

    target = "m1.safetensors"
    core.spec_path(target).unlink()
    monkeypatch.setattr(spec_module, "save_file", _raise_enospc)
    report = core.gmi().build(core.source(), PaintingGenerator(), "missing")
    assert report.failed == [(target, "No space left on device: x.tmp")]
    monkeypatch.undo()
    assert core.states() == {"m0.safetensors": "ready", target: "missing", "m2.safetensors": "ready"}
    assert not list(core.spec_path(target).parent.glob("*.tmp"))


def test_faults_os_read_only_store_still_lists_and_identifies(core, monkeypatch):
    import gmi_core.store as store_module

    (core.home / "specs" / "manifest.json").unlink()  # listing must rebuild it, but cannot write it
    monkeypatch.setattr(store_module, "write_json_atomic", lambda *a, **k: _raise_enospc())
    import gmi_core.hashing as hashing

    monkeypatch.setattr(hashing, "write_json_atomic", lambda *a, **k: _raise_enospc())
    (core.home / "hashes.json").unlink()
    assert set(core.states().values()) == {"ready"}
    result = core.gmi().identify([query(1)], prompt="a lighthouse", source=core.source())
    assert len(result.ranking) == 3


def test_faults_os_cache_write_failure_does_not_fail_hashing(tmp_path, monkeypatch):
    import hashlib

    import gmi_core.hashing as hashing

    path = write_fake_checkpoint(tmp_path / "m.safetensors", 0)
    monkeypatch.setattr(hashing, "write_json_atomic", _raise_enospc)
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


# ===================================================================================================================
# Faults: every cache validated on read and rebuilt when wrong
# ===================================================================================================================
BAD_HASH_ENTRIES = [
    {"stamp": None, "sha256": "0" * 64},
    {"sha256": "Z" * 64},
    {"stamp": "x", "sha256": "ab" * 32},
    {"stamp": [1], "sha256": "ab" * 32},
    "not a dict",
    {"stamp": [True, 1], "sha256": "ab" * 32},
]


@pytest.mark.parametrize("kind", ["garbage", "list", "short_hash", "uppercase", "wrong_stamp_shape", "bad_entries"])
def test_faults_cache_hash_cache_is_validated_and_rebuilt(tmp_path, kind):
    import hashlib

    from gmi_core.hashing import sha256_file

    path = write_fake_checkpoint(tmp_path / "m.safetensors", 0)
    cache = tmp_path / "cache.json"
    truth = hashlib.sha256(path.read_bytes()).hexdigest()
    st = path.stat()
    key, stamp = str(path.resolve()), [st.st_size, st.st_mtime_ns]
    content = {
        "garbage": "{{{ not json",
        "list": json.dumps([1, 2, 3]),
        "short_hash": json.dumps({key: {"stamp": stamp, "sha256": "ab" * 31}}),
        "uppercase": json.dumps({key: {"stamp": stamp, "sha256": truth.upper()}}),
        "wrong_stamp_shape": json.dumps({key: {"stamp": [stamp], "sha256": "ab" * 32}}),
        "bad_entries": json.dumps({key: BAD_HASH_ENTRIES[0], **{f"k{i}": e for i, e in enumerate(BAD_HASH_ENTRIES)}}),
    }[kind]
    cache.write_text(content)
    assert sha256_file(path, cache) == truth
    data = json.loads(cache.read_text())
    assert data == {key: {"stamp": stamp, "sha256": truth}}  # rebuilt: only valid entries remain


@pytest.mark.parametrize("kind", ["garbage", "list", "entries_list", "wrong_types", "foreign_key", "claims_ready"])
def test_faults_cache_manifest_is_validated_and_rebuilt(core, kind):
    manifest = core.home / "specs" / "manifest.json"
    data = json.loads(manifest.read_text())
    rel = next(iter(data["entries"]))
    if kind == "garbage":
        manifest.write_text("\x00\x01 not json")
    elif kind == "list":
        manifest.write_text("[]")
    elif kind == "entries_list":
        manifest.write_text(json.dumps({"entries": [1, 2]}))
    elif kind == "wrong_types":
        data["entries"][rel]["prompts_done"] = "3"
        data["entries"][rel]["complete"] = "yes"
        manifest.write_text(json.dumps(data))
    elif kind == "foreign_key":  # an entry that says its file holds another checkpoint's spec
        data["entries"][rel]["sha256"] = "f" * 64
        manifest.write_text(json.dumps(data))
    else:  # the manifest says ready, the file (same size and mtime) was replaced by garbage of the same size
        path = core.home / "specs" / rel
        st = path.stat()
        path.write_bytes(b"\x00" * st.st_size)
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
        data["entries"][rel]["mtime"] = st.st_mtime
        manifest.write_text(json.dumps(data))
    states = core.states()
    if kind == "claims_ready":
        # the stamp matches, so listing trusts the cache; identify re-reads the file, refuses it, and status follows
        result = core.gmi().identify([query()], prompt="x", source=core.source())
        assert len(result.ranking) == 2 and any("unreadable" in r for _, r in result.excluded)
        assert sorted(core.states().values()) == ["corrupt", "ready", "ready"]
    else:
        assert set(states.values()) == {"ready"}
        rebuilt = json.loads(manifest.read_text())
        assert len(rebuilt["entries"]) == 3


# ===================================================================================================================
# Faults: status is the truth (anything identify would exclude is "corrupt" everywhere; build missing rebuilds it)
# ===================================================================================================================
def _rewrite(path: Path, edit_meta=None, edit_tensors=None, recompute_checksum=True):
    from safetensors import safe_open

    tensors = load_file(str(path))
    with safe_open(str(path), "pt") as f:
        meta = json.loads(f.metadata()["gmi"])
    if edit_tensors:
        edit_tensors(tensors)
    if edit_meta:
        edit_meta(meta)
    if recompute_checksum:
        meta["content_sha256"] = _content_hash(tensors, meta)
    save_file(tensors, str(path), metadata={"gmi": json.dumps(meta)})


def _nan(t):
    t["image_features"][0, 0, 0] = float("nan")


CORRUPTIONS = {
    "flipped_tensor_byte": lambda p: p.write_bytes(
        p.read_bytes()[:-50] + bytes([p.read_bytes()[-50] ^ 0xFF]) + p.read_bytes()[-49:]
    ),
    "edited_metadata_no_checksum": lambda p: _rewrite(
        p, lambda m: m.update(checkpoint_name="renamed"), recompute_checksum=False
    ),
    "edited_settings_no_checksum": lambda p: _rewrite(
        p, lambda m: m["settings"].update(steps=99), recompute_checksum=False
    ),
    "nan_features_valid_checksum": lambda p: _rewrite(p, edit_tensors=_nan),
    "bad_field_types_valid_checksum": lambda p: _rewrite(p, lambda m: m["settings"].update(steps="many")),
    "negative_size_valid_checksum": lambda p: _rewrite(p, lambda m: m["settings"].update(width=-64)),
    "prompts_not_strings_valid_checksum": lambda p: _rewrite(p, lambda m: m["prompt_set"].update(prompts=[1, 2, 3])),
    "truncated": lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 3]),
    "empty_file": lambda p: p.write_bytes(b""),
    "not_json_metadata": lambda p: save_file(load_file(str(p)), str(p), metadata={"gmi": "{nope"}),
}


@pytest.mark.parametrize("kind", sorted(CORRUPTIONS))
def test_faults_status_corrupt_everywhere_and_build_missing_rebuilds(core, kind):
    target = "m1.safetensors"
    CORRUPTIONS[kind](core.spec_path(target))
    statuses = {s.name: s for s in core.gmi().status(core.source())[0]}
    assert statuses[target].state == "corrupt", (kind, statuses[target])
    assert statuses[target].detail and no_server_path(statuses[target].detail, core.root)
    assert {n: s.state for n, s in statuses.items() if n != target} == {
        "m0.safetensors": "ready",
        "m2.safetensors": "ready",
    }
    result = core.gmi().identify([query()], prompt="x", source=core.source())
    assert target not in [r.name for r in result.ranking] and target in dict(result.excluded)
    generator = PaintingGenerator()
    report = core.gmi().build(core.source(), generator, "missing")
    assert report.built == [target] and {c[0] for c in generator.calls} == {target}
    assert core.states() == {n: "ready" for n in ("m0.safetensors", "m1.safetensors", "m2.safetensors")}


def test_faults_status_a_spec_is_trusted_only_at_its_own_path(core):
    a, b = core.spec_path("m0.safetensors"), core.spec_path("m2.safetensors")
    b.write_bytes(a.read_bytes())  # m0's spec copied over m2's path
    statuses = {s.name: s for s in core.gmi().status(core.source())[0]}
    assert statuses["m2.safetensors"].state == "corrupt" and "own path" in statuses["m2.safetensors"].detail
    assert statuses["m0.safetensors"].state == "ready"
    result = core.gmi().identify([query(2)], prompt="x", source=core.source())
    assert [r.name for r in result.ranking].count("m0.safetensors") == 1 and "m2.safetensors" in dict(result.excluded)
    assert core.gmi().build(core.source(), PaintingGenerator(), "missing").built == ["m2.safetensors"]


def test_faults_status_checksum_covers_the_metadata(core, tmp_path):
    spec = Spec.load(core.spec_path("m0.safetensors"))
    path = tmp_path / "s.safetensors"
    spec.save(path)
    _rewrite(path, lambda m: m["prompt_set"]["prompts"].__setitem__(0, "a different prompt"), recompute_checksum=False)
    with pytest.raises(GmiError, match="checksum"):
        Spec.load(path)


# ===================================================================================================================
# Faults: several names, one sha256 -> ranked once, listed as aliases, never dropped; built once
# ===================================================================================================================
def test_faults_alias_same_file_under_two_names(core):
    copy = core.models / "zz_copy_of_m1.safetensors"
    copy.write_bytes(core.paths[1].read_bytes())
    generator = PaintingGenerator()
    report = core.gmi().build(core.source(), generator, "all")
    assert sorted(report.built) == ["m0.safetensors", "m1.safetensors", "m2.safetensors"]
    assert len(generator.calls) == 3 * 3  # the copy was not rendered again
    states = core.states()
    assert states["zz_copy_of_m1.safetensors"] == states["m1.safetensors"] == "ready"
    result = core.gmi().identify([query(1)], prompt="x", source=core.source())
    names = [r.name for r in result.ranking]
    assert len(names) == 3 and names.count("m1.safetensors") == 1
    row = next(r for r in result.ranking if r.name == "m1.safetensors")
    assert row.aliases == ["zz_copy_of_m1.safetensors"]
    assert result.to_dict()["ranking"][names.index("m1.safetensors")]["aliases"] == ["zz_copy_of_m1.safetensors"]
    listed = core.gmi().build(core.source(), PaintingGenerator(), ["zz_copy_of_m1.safetensors", "m1.safetensors"])
    assert listed.built == ["zz_copy_of_m1.safetensors"]  # one name per file


# ===================================================================================================================
# Faults: a lock per spec across processes; the second build skips; no duplicate rendering; temp files cleaned
# ===================================================================================================================
HOLD_LOCK = """
import sys, time
from pathlib import Path
from gmi_core.locks import spec_lock
with spec_lock(Path(sys.argv[1])):
    print("locked", flush=True)
    time.sleep(120)
"""


def _hold_lock_in_another_process(spec_path: Path):
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(spec_path)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=REPO,
        env=dict(os.environ, PYTHONPATH=str(REPO)),
    )
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_faults_lock_second_process_skips_and_renders_nothing(core):
    target = core.spec_path("m1.safetensors")
    target.unlink()
    holder = _hold_lock_in_another_process(target)
    try:
        generator = PaintingGenerator()
        report = core.gmi().build(core.source(), generator, "missing")
        assert report.built == [] and generator.calls == []
        skipped = {s.name: s.reason for s in report.skipped}
        assert skipped == {"m1.safetensors": f"being built by pid {holder.pid}"}
    finally:
        holder.kill()
        holder.wait()
    # kill -9 released the lock: the next build proceeds and leaves no temp file
    (target.parent / f"{target.name}.abc123.tmp").write_bytes(b"half a spec from a killed writer")
    report = core.gmi().build(core.source(), PaintingGenerator(), "missing")
    assert report.built == ["m1.safetensors"]
    assert not list(target.parent.glob("*.tmp")) and set(core.states().values()) == {"ready"}


def test_faults_lock_two_real_builds_at_once_render_each_prompt_once(core, tmp_path):
    for name in ("m0.safetensors", "m1.safetensors", "m2.safetensors"):
        core.spec_path(name).unlink()
    script = f"""
import sys, json
sys.path.insert(0, {str(REPO)!r})
from pathlib import Path
from tests.test_faults import World, PaintingGenerator
w = World.__new__(World)
root = Path({str(core.root)!r})
w.root, w.models, w.home = root, root / "models", root / "home"
from gmi_core.encoders import tiny_encoder
from gmi_core.prompts import load_prompt_set
w.encoder, w.prompts = tiny_encoder(0), load_prompt_set("platform").head(3)
g = PaintingGenerator()
r = w.gmi().build(w.source(), g, "missing")
print(json.dumps({{"built": r.built, "calls": len(g.calls), "skipped": [s.name for s in r.skipped]}}))
"""
    env_vars = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", script],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=REPO,
            env=env_vars,
        )
        for _ in range(2)
    ]
    outs = [json.loads(p.communicate(timeout=600)[0].strip().splitlines()[-1]) for p in procs]
    built = sorted(n for o in outs for n in o["built"])
    # every spec built exactly once overall; a process that met a lock skipped, the other rendered
    assert sorted(set(built)) == built
    calls = sum(o["calls"] for o in outs)
    assert calls == 3 * len(built)
    states = core.states()
    assert all(states[n] == "ready" for n in built)
    # whatever was skipped is simply built by the next run
    core.gmi().build(core.source(), PaintingGenerator(), "missing")
    assert set(core.states().values()) == {"ready"}


def test_faults_lock_spec_files_get_normal_permissions(core):
    mode = stat.S_IMODE(core.spec_path("m0.safetensors").stat().st_mode)
    assert mode == FILE_MODE and mode & 0o044  # not mkstemp's 0600: readable like any other new file
    assert stat.S_IMODE((core.home / "specs" / "manifest.json").stat().st_mode) == FILE_MODE


# ===================================================================================================================
# Faults: numbers validated in one place; JSON never NaN
# ===================================================================================================================
BAD_NUMBERS = [
    ("top_k", 0),
    ("top_k", -3),
    ("top_k", "abc"),
    ("top_k", 1.5),
    ("top_k", True),
    ("gamma", float("nan")),
    ("gamma", float("inf")),
    ("gamma", 0),
    ("gamma", -1.0),
    ("gamma", "x"),
    ("tau", float("nan")),
    ("tau", float("-inf")),
    ("tau", 0.0),
]


@pytest.mark.parametrize(("field", "value"), BAD_NUMBERS)
def test_faults_numbers_identify_refuses_bad_values(core, field, value):
    with pytest.raises(InvalidInput):
        core.gmi().identify([query()], prompt="x", source=core.source(), **{field: value})


BAD_SETTINGS = [
    {"steps": 0},
    {"steps": -1},
    {"steps": 10**6},
    {"width": 65},
    {"width": 32},
    {"height": 8192},
    {"width": 0},
    {"cfg": float("nan")},
    {"cfg": float("inf")},
    {"cfg": -1.0},
    {"sampler": ""},
    {"negative_prompt": "x" * 5000},
]


@pytest.mark.parametrize("bad", BAD_SETTINGS, ids=lambda d: "-".join(f"{k}={str(v)[:8]}" for k, v in d.items()))
def test_faults_numbers_build_settings_refused_before_anything_runs(tmp_path, bad):
    w = World(tmp_path)
    with pytest.raises(InvalidInput):
        Gmi(w.home / "specs", w.encoder, w.prompts, "allx2", GenerationSettings(**{**SETTINGS.to_dict(), **bad}))
    with pytest.raises(InvalidInput):
        Gmi(w.home / "specs", w.encoder, w.prompts, "allx0", SETTINGS)
    with pytest.raises(InvalidInput, match="unknown sampler"):
        limits.check_settings(GenerationSettings(sampler="warp"), samplers=["euler"], schedulers=["normal"])


def test_faults_numbers_json_never_holds_nan(core):
    result = core.gmi().identify([query()], prompt="x", source=core.source())
    result.ranking[0].score = float("nan")
    result.ranking[1].score = float("inf")
    text = json.dumps(result.to_dict(), allow_nan=False)
    assert json.loads(text)["ranking"][0]["score"] is None
    assert limits.json_safe({"a": [float("nan"), 1.0, {"b": float("-inf")}]}) == {"a": [None, 1.0, {"b": None}]}


# ===================================================================================================================
# Faults: prompt-set files must be a JSON list of strings or a text file of lines
# ===================================================================================================================
PROMPT_FILES = {
    "object.json": ('{"prompts": ["a"]}', "list of strings"),
    "numbers.json": ("[1, 2, 3]", "list of strings"),
    "mixed.json": ('["a", null]', "list of strings"),
    "broken.json": ('["a", ', "not valid JSON"),
    "empty.txt": ("\n\n  \n", "holds no prompts"),
    "empty.json": ("[]", "holds no prompts"),
    "binary.txt": (b"\x00\x01\x02abc", "binary"),
    "latin1.txt": (b"caf\xe9 au lait\n", "not UTF-8"),
    "long.txt": ("x" * (limits.MAX_TEXT_FIELD + 1), "longer than"),
}


@pytest.mark.parametrize("name", sorted(PROMPT_FILES))
def test_faults_promptset_bad_files_are_refused_clearly(tmp_path, name):
    content, message = PROMPT_FILES[name]
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(GmiError, match=message) as err:
        load_prompt_set(str(path))
    assert len(str(err.value).splitlines()) == 1


def test_faults_promptset_good_files_and_a_folder(tmp_path):
    (tmp_path / "ok.json").write_text('["a cat", " a dog "]')
    (tmp_path / "ok.txt").write_text("\ufeffa cat\n\na dog\n")
    assert load_prompt_set(str(tmp_path / "ok.json")).prompts == ("a cat", "a dog")
    assert load_prompt_set(str(tmp_path / "ok.txt")).prompts == ("a cat", "a dog")
    (tmp_path / "dir.json").mkdir()
    with pytest.raises(GmiError, match="not a regular file"):
        load_prompt_set(str(tmp_path / "dir.json"))


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


# ===================================================================================================================
# Faults: interrupted or failed builds end the progress display (ComfyUI panel event, A1111 job status)
# ===================================================================================================================
@pytest.mark.parametrize("fault", ["interrupt_in_sampler", "os_error", "unexpected"])
def test_faults_progress_comfyui_panel_always_gets_done(env, monkeypatch, fault):  # noqa: F811 - the fixture
    sent = []
    monkeypatch.setattr(env.nodes.events, "send", lambda event, data: sent.append((event, data)))
    exc = {
        "interrupt_in_sampler": Interrupted("stop"),
        "os_error": OSError(28, "No space left on device"),
        "unexpected": KeyError("boom"),
    }[fault]
    original = FakeGenerator.generate

    def failing(self, *args, **kwargs):
        if len(FakeGenerator.calls) >= 2:
            raise exc
        return original(self, *args, **kwargs)

    monkeypatch.setattr(FakeGenerator, "generate", failing)
    try:
        out, _ = build(env)
        report = out["ui"]["gmi_build"][0]
    except BaseException as raised:  # noqa: BLE001 - the interrupt propagates to ComfyUI, as it must
        assert fault in ("interrupt_in_sampler", "unexpected"), raised
        report = None
    done = [d for e, d in sent if e == "gmi.build.done"]
    assert len(done) == 1 and {"built", "failed", "cancelled"} <= set(done[0])
    if report is not None:
        assert report["failed"] and all("No space" in f["reason"] for f in report["failed"])


# ===================================================================================================================
# ComfyUI routes: uploads, hostile queries, malformed requests
# ===================================================================================================================
def _client(env):  # noqa: F811
    from aiohttp import web

    server = __import__("types").SimpleNamespace(routes=web.RouteTableDef())
    env.nodes.routes.register(server)
    app = web.Application()
    app.add_routes(server.routes)
    return app


def _png(index=3) -> bytes:
    buf = __import__("io").BytesIO()
    fake_image(index, "a harbour", 4242).save(buf, "PNG")
    return buf.getvalue()


def test_security_comfyui_uploads_are_limited_and_decoded_off_the_loop(env, monkeypatch):  # noqa: F811
    import aiohttp
    from aiohttp.test_utils import TestClient, TestServer

    build(env)
    app = _client(env)
    pack_limits = sys.modules[env.pack.__name__ + ".gmi_core.limits"]
    routes = env.nodes.routes
    decoded = []
    real_load = routes.load_image

    def slow_load(data, name=None):
        decoded.append(name)
        time.sleep(1.5)
        return real_load(data, name=name)

    async def scenario():
        async with TestClient(TestServer(app)) as client:
            # a 16000x16000 header: refused from the header, fast, PIL's global limit untouched
            form = aiohttp.FormData({"encoder": "tiny.safetensors", "max_prompts": "4"})
            form.add_field("image", png_header_only(16000, 16000), filename="bomb.png", content_type="image/png")
            t0 = time.perf_counter()
            r = await client.post("/gmi/identify", data=form)
            body = await r.json()
            assert r.status == 400 and "image too large" in body["error"] and time.perf_counter() - t0 < 5
            # too many images: refused before any decode
            monkeypatch.setattr(routes, "load_image", slow_load)
            form = aiohttp.FormData({"encoder": "tiny.safetensors"})
            for i in range(pack_limits.MAX_IMAGES_PER_REQUEST + 1):
                form.add_field("image", _png(), filename=f"{i}.png", content_type="image/png")
            r = await client.post("/gmi/identify", data=form)
            assert r.status == 400 and "at most" in (await r.json())["error"] and decoded == []
            # decoding runs in a worker thread: other requests are answered meanwhile
            form = aiohttp.FormData({"encoder": "tiny.safetensors", "max_prompts": "4"})
            form.add_field("image", _png(), filename="q.png", content_type="image/png")
            slow = asyncio.ensure_future(client.post("/gmi/identify", data=form))
            await asyncio.sleep(0.3)
            t0 = time.perf_counter()
            r = await client.get("/gmi/options")
            assert r.status == 200 and time.perf_counter() - t0 < 1.0 and not slow.done()
            assert (await slow).status == 200
            # a chunked upload (no Content-Length) past the byte limit: 413 while reading
            monkeypatch.setattr(pack_limits, "MAX_UPLOAD_BYTES", 50_000)
            monkeypatch.setattr(pack_limits.ByteCounter.__init__, "__defaults__", (50_000,))

            async def chunks():
                boundary = "XyZ"
                yield f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\n\r\n'.encode()
                for _ in range(40):
                    yield b"\x00" * 4096
                yield f"\r\n--{boundary}--\r\n".encode()

            r = await client.post(
                "/gmi/identify", data=chunks(), headers={"Content-Type": "multipart/form-data; boundary=XyZ"}
            )
            assert r.status == 413, await r.text()

    asyncio.run(scenario())


MALFORMED = [
    ("json_body", {"Content-Type": "application/json"}, b'{"image": "x"}'),
    ("no_content_type", {}, b"abc"),
    ("form_urlencoded", {"Content-Type": "application/x-www-form-urlencoded"}, b"image=abc"),
    ("missing_boundary", {"Content-Type": "multipart/form-data"}, b"--x\r\n\r\n"),
    (
        "truncated_multipart",
        {"Content-Type": "multipart/form-data; boundary=b"},
        b'--b\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\n\r\n\x89PNG',
    ),
    ("garbage_multipart", {"Content-Type": "multipart/form-data; boundary=b"}, b"\x00\xff\x00garbage"),
    ("bad_top_k", None, {"top_k": "abc"}),
    ("negative_top_k", None, {"top_k": "-2"}),
    ("float_max_prompts", None, {"max_prompts": "1.5"}),
    ("unknown_method", None, {"method": "magic"}),
    ("encoder_path", None, {"encoder": "../../../../etc/passwd.safetensors"}),
    ("encoder_model_path", None, {"encoder": "../../x/openai"}),
    ("prompt_set_path", None, {"prompt_set": "../../secret.txt"}),
    ("prompt_set_encoded", None, {"prompt_set": "%2e%2e%2fsecret.txt"}),
    ("huge_field", None, {"prompt": "x" * 5000}),
]


@pytest.mark.parametrize("case", MALFORMED, ids=[m[0] for m in MALFORMED])
def test_faults_numbers_comfyui_malformed_requests_are_4xx_never_500(env, case):  # noqa: F811
    import aiohttp
    from aiohttp.test_utils import TestClient, TestServer

    build(env)
    (env.base / "secret.txt").write_text("a secret prompt\n")
    app = _client(env)
    name, headers, body = case

    async def scenario():
        async with TestClient(TestServer(app)) as client:
            if headers is not None:
                r = await client.post("/gmi/identify", data=body, headers=headers)
            else:
                form = aiohttp.FormData({"encoder": "tiny.safetensors", "max_prompts": "4", **body})
                form.add_field("image", _png(), filename="q.png", content_type="image/png")
                r = await client.post("/gmi/identify", data=form)
            text = await r.text()
            assert 400 <= r.status < 500, (name, r.status, text)
            assert json.loads(text)["error"] and no_server_path(text, env.base)

    asyncio.run(scenario())


BAD_STATUS_QUERIES = [
    "family_settings=steps%3Dabc",
    "family_settings=steps%3D0",
    "family_settings=cfg%3Dnan",
    "family_settings=cfg%3Dinf",
    "family_settings=width%3D65",
    "family_settings=sdxl.width%3D99999",
    "family_settings=sd9.steps%3D3",
    "sampler_name=warp",
    "budget=0x-1",
    "budget=banana",
    "prompt_set=../../secret.txt",
    "encoder=/etc/x.safetensors",
    "max_prompts=1e9",
    "seed=1.5",
]


@pytest.mark.parametrize("q", BAD_STATUS_QUERIES)
def test_faults_numbers_comfyui_status_query_validated(env, q):  # noqa: F811
    from aiohttp.test_utils import TestClient, TestServer

    build(env)
    app = _client(env)

    async def scenario():
        async with TestClient(TestServer(app)) as client:
            r = await client.get("/gmi/status?" + (q if q.startswith("encoder=") else "encoder=tiny.safetensors&" + q))
            text = await r.text()
            assert 400 <= r.status < 500, (q, r.status, text)
            assert no_server_path(text, env.base)
            assert "NaN" not in text

    asyncio.run(scenario())


def test_faults_status_comfyui_route_shows_corrupt_and_no_paths(env):  # noqa: F811
    from aiohttp.test_utils import TestClient, TestServer

    build(env)
    spec = next((env.base / "user" / "gmi" / "specs").glob("*/*.safetensors"))
    spec.write_bytes(spec.read_bytes()[:1000])
    app = _client(env)

    async def scenario():
        async with TestClient(TestServer(app)) as client:
            r = await client.get(
                "/gmi/status?encoder=tiny.safetensors&max_prompts=4&budget=allx2&family_settings=steps%3D3+width%3D64+height%3D64"
            )
            data = await r.json()
            states = sorted(c["state"] for c in data["checkpoints"])
            assert r.status == 200 and states == ["corrupt", "ready", "ready", "ready"], data
            corrupt = next(c for c in data["checkpoints"] if c["state"] == "corrupt")
            assert corrupt["detail"] and no_server_path(json.dumps(data), env.base)

    asyncio.run(scenario())


# ===================================================================================================================
# A1111: numbers, malformed bodies, chunked limit, busy switch, encoder load vs WebUI model load, name matching, UI
# ===================================================================================================================
from tests.test_a1111_adapter import b64png, encoder_file, gmi, webui, world  # noqa: E402,F401


@pytest.fixture
def a1111_world(world):  # noqa: F811 - the fake WebUI world of test_a1111_adapter
    return world


@pytest.fixture
def a1111_app(a1111_world):
    fastapi = pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    a1111_world.shared.cmd_opts.api = True
    app = fastapi.FastAPI()
    a1111_world.modules["modules.api.api"].Api(app, a1111_world.modules["modules.call_queue"].queue_lock)
    gmi("api").on_app_started(None, app)
    return TestClient(app), a1111_world


A1111_BAD_REQUESTS = [
    ("POST", "/gmi/v1/identify", {"content": b"not json", "headers": {"content-type": "application/json"}}),
    ("POST", "/gmi/v1/identify", {"content": b"image=x", "headers": {"content-type": "text/plain"}}),
    ("POST", "/gmi/v1/identify", {"json": {"image": 5}}),
    ("POST", "/gmi/v1/identify", {"json": {"images": ["x"] * 17}}),
    ("POST", "/gmi/v1/identify", {"json": {"image": "AAAA", "top_k": "many"}}),
    ("POST", "/gmi/v1/build", {"json": {"steps": "NaN"}}),
    ("POST", "/gmi/v1/build", {"content": b'{"cfg": NaN}', "headers": {"content-type": "application/json"}}),
    ("POST", "/gmi/v1/build", {"json": {"width": 65}}),
    ("POST", "/gmi/v1/build", {"json": {"prompt_set": "/etc/passwd"}}),
    ("POST", "/gmi/v1/build", {"json": {"prompt_set": "../../../../etc/passwd"}}),
    ("POST", "/gmi/v1/build", {"json": {"prompt_set": "%2e%2e/x.json"}}),
    ("POST", "/gmi/v1/build", {"json": {"checkpoints": ["../../etc/passwd"]}}),
    ("POST", "/gmi/v1/switch", {"json": {"checkpoint": "/etc/passwd"}}),
    ("POST", "/gmi/v1/switch", {"json": {}}),
    ("GET", "/gmi/v1/build/%2e%2e%2fx", {}),
]


@pytest.mark.parametrize("case", A1111_BAD_REQUESTS, ids=lambda c: f"{c[1]}-{str(c[2])[:30]}")
def test_faults_numbers_a1111_bad_requests_are_4xx_never_500(a1111_app, case):
    client, webui_world = a1111_app
    method, path, kwargs = case
    r = client.request(method, path, **kwargs)
    assert 400 <= r.status_code < 500, (r.status_code, r.text)
    json.loads(r.text, parse_constant=lambda c: pytest.fail(f"{c} in a JSON answer"))
    assert no_server_path(r.text, webui_world.root)
    assert webui_world.process_calls == []


def test_security_a1111_chunked_body_over_the_limit_is_413(a1111_app, monkeypatch):
    client, _webui_world = a1111_app
    monkeypatch.setattr(gmi("api"), "MAX_REQUEST_BYTES", 10_000)

    def body():
        yield b'{"image": "'
        for _ in range(10):
            yield b"A" * 4096
        yield b'"}'

    r = client.post("/gmi/v1/identify", content=body(), headers={"content-type": "application/json"})
    assert r.status_code == 413 and "transfer-encoding" not in {
        k.lower() for k in r.request.headers if k.lower() == "content-length"
    }
    r = client.post("/gmi/v1/identify", content=b"x" * 20_000, headers={"content-type": "application/json"})
    assert r.status_code == 413


def test_security_a1111_image_pixel_limit_and_no_path_in_errors(a1111_app):
    import base64

    client, webui_world = a1111_app
    r = client.post("/gmi/v1/identify", json={"image": base64.b64encode(png_header_only(20000, 20000)).decode()})
    assert r.status_code == 422 and "image too large" in r.json()["detail"]
    webui_world.shared.opts.set(
        "gmi_prompt_set", str(webui_world.root / "elsewhere.json")
    )  # a setting pointing outside
    r = client.get("/gmi/v1/specs")
    assert r.status_code == 404 and no_server_path(r.text, webui_world.root)


def test_etiquette_a1111_switch_during_a_build_is_busy_not_a_hang(a1111_app):
    client, webui_world = a1111_app
    build_module = gmi("build")
    lock = webui_world.modules["modules.call_queue"].queue_lock
    lock.acquire()  # a generation runs: the build waits in the queue
    try:
        job = client.post("/gmi/v1/build", json={}).json()
        assert job["state"] == "queued"
        t0 = time.perf_counter()
        r = client.post("/gmi/v1/switch", json={"checkpoint": "model_2.safetensors"})
        assert r.status_code == 409 and r.json()["detail"].startswith("busy") and time.perf_counter() - t0 < 2
        assert webui_world.shared.opts.sd_model_checkpoint == "model_0.safetensors"
    finally:
        lock.release()
    for _ in range(600):
        if build_module.get_job(job["id"]).finished:
            break
        time.sleep(0.05)
    assert build_module.get_job(job["id"]).state == "done"
    assert client.post("/gmi/v1/switch", json={"checkpoint": "model_2.safetensors"}).status_code == 200


def test_etiquette_a1111_job_status_ends_when_the_build_dies(a1111_world, monkeypatch):
    build_module, runtime = gmi("build"), gmi("runtime")

    def dying(**overrides):
        raise KeyboardInterrupt  # not an Exception: must still leave the job finished and not busy

    monkeypatch.setattr(runtime, "get_engine", dying)
    job = build_module.new_job("missing")
    with pytest.raises(KeyboardInterrupt):
        build_module._run_in_queue(job)
    assert job.state == "failed" and job.finished and build_module.active_job() is None
    assert a1111_world.state_log[-1] == ("end", None)
    monkeypatch.setattr(
        runtime, "get_engine", lambda **o: (_ for _ in ()).throw(OSError(30, "Read-only file system", "/srv/x"))
    )
    job = build_module.start_build("missing", wait=True)
    assert job.state == "failed" and job.error == "Read-only file system: x"


def test_etiquette_a1111_encoder_load_waits_for_the_webui_model_load(a1111_world):
    runtime = gmi("runtime")
    runtime.reset()
    model_lock = a1111_world.sd_models.model_data.lock
    queue_lock = a1111_world.modules["modules.call_queue"].queue_lock
    for lock in (model_lock, queue_lock):
        runtime.reset()
        lock.acquire()  # the WebUI is loading a checkpoint (start-up load / a switch in the queue)
        done = threading.Event()
        errors = []

        def load(done=done, errors=errors):
            try:
                runtime.get_engine()
            except Exception as exc:  # noqa: BLE001
                errors.append(exc)
            done.set()

        threading.Thread(target=load).start()
        assert not done.wait(1.0), "the encoder loaded while the WebUI was loading a model"
        lock.release()
        assert done.wait(60) and not errors
    # inside a build (queue lock held by this thread) the load does not wait for itself
    runtime.reset()
    job = gmi("build").start_build("missing", wait=True)
    assert job.state == "done", job.error


def test_etiquette_a1111_switch_names_match_like_the_webui(a1111_world):
    host = gmi("host")
    host.WebuiCheckpointSource().list_checkpoints()
    info = host.resolve_checkpoint("model_1.safetensors")
    assert host.resolve_checkpoint("model_1") is info  # substring of a title, like override_settings
    assert host.resolve_checkpoint("model_1.safetensors [0000000000]") is info  # a stale checksum is ignored
    assert host.resolve_checkpoint(info.sha256[:10]) is info
    for name in ("MODEL_1", "/etc/passwd", str(a1111_world.ckpt_dir / "model_1.safetensors"), "   "):
        with pytest.raises(GmiError):
            host.resolve_checkpoint(name)


class _FakeGradio:
    """Just enough of gradio 3.41 to build the tab and record which events are wired (gradio is not a test dep)."""

    def __init__(self):
        self.components, self.events = [], []
        fake = self

        class Component:
            def __init__(self, *args, **kwargs):
                self.args, self.kwargs = args, kwargs
                fake.components.append(self)

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                return False

            def __getattr__(self, event):
                def register(fn=None, inputs=None, outputs=None, **kwargs):
                    fake.events.append((self, event, fn, inputs, outputs))
                    return self

                return register

        self.module = __import__("types").ModuleType("gradio")
        for name in (
            "Blocks",
            "Tab",
            "Row",
            "Column",
            "Image",
            "File",
            "Textbox",
            "Dropdown",
            "Slider",
            "Button",
            "HTML",
            "Dataframe",
            "CheckboxGroup",
            "State",
            "Accordion",
        ):
            setattr(self.module, name, type(name, (Component,), {}))
        self.module.update = lambda **kwargs: {"__update__": True, **kwargs}


@pytest.fixture
def gradio_tab(a1111_world, monkeypatch):
    fake = _FakeGradio()
    monkeypatch.setitem(sys.modules, "gradio", fake.module)
    call_queue = a1111_world.modules["modules.call_queue"]
    monkeypatch.setattr(call_queue, "wrap_gradio_gpu_call", lambda fn, extra_outputs=None: fn, raising=False)
    return fake, gmi("ui")


def test_etiquette_a1111_building_the_tab_does_nothing_heavy(gradio_tab, a1111_world, monkeypatch):
    fake, ui = gradio_tab
    runtime = gmi("runtime")
    runtime.reset()
    heavy = []
    monkeypatch.setattr(runtime, "get_encoder", lambda *a, **k: heavy.append("encoder"))
    monkeypatch.setattr(runtime, "status", lambda *a, **k: heavy.append("status"))
    a1111_world.hash_calls.clear()
    for info in a1111_world.sd_models.checkpoints_list.values():
        info.sha256 = None
    ui.on_ui_tabs()
    assert heavy == [] and a1111_world.hash_calls == []
    wired = {(type(c).__name__, e) for c, e, *_ in fake.events}
    assert ("Tab", "select") in wired  # status loads when the Build tab opens (and on Refresh)


def test_etiquette_a1111_refresh_reports_first_time_hashing(gradio_tab, a1111_world):
    _, ui = gradio_tab
    a1111_world.refresh()  # a fresh start: only the loaded model_0 is in the WebUI's hash cache
    a1111_world.hash_calls.clear()
    steps = list(ui.refresh_status())
    hashing = [s[0] for s in steps[:-1]]
    assert len(hashing) == len(a1111_world.hash_calls) == 2
    assert all(f"hashing {c.split('/', 1)[1]}" in h for c, h in zip(a1111_world.hash_calls, hashing))
    _note, rows, selected = steps[-1]
    assert [r[3] for r in rows[:3]] == ["missing"] * 3 and selected["choices"][:3] == [
        "model_0.safetensors",
        "model_1.safetensors",
        "model_2.safetensors",
    ]
    assert len(list(ui.refresh_status())) == 1  # hashed once: no hashing messages the second time


def test_etiquette_a1111_identify_never_reuses_the_last_pseudo_prompt(gradio_tab, a1111_world):
    fake, ui = gradio_tab
    gmi("build").start_build("missing", wait=True)
    ui.on_ui_tabs()
    prompt_box = next(
        c for c in fake.components if type(c).__name__ == "Textbox" and c.kwargs.get("elem_id") == "gmi_prompt"
    )
    identify_event = next(e for e in fake.events if e[1] == "click" and e[2] is ui.do_identify)
    assert prompt_box not in identify_event[4]  # identify never writes into what the user types
    first = a1111_world.render(str(a1111_world.ckpt_dir / "model_1.safetensors"), "a ship", 1, 64, 64)
    _html, used, choice = ui.do_identify(first, None, "", "gmi", 3)
    assert "interrogated" in used and choice["value"].startswith("model_1")
    # Interrogate fills the prompt on request; a new image clears what only came from the old image
    text, _, remembered = ui.do_interrogate(first, None)
    assert text == remembered and text
    cleared = ui.on_new_image(text, remembered)
    assert cleared[0] == "" and cleared[2] == ""
    kept = ui.on_new_image("my own words", remembered)
    assert kept[0]["__update__"] and kept[2] == remembered


def test_faults_cache_label_cache_validated_and_written_best_effort(core, monkeypatch):
    import gmi_core.interrogator as interrogator

    gmi = core.gmi()
    gmi.interrogate([query()])
    cache = next((core.home / "specs" / "cache").glob("labels--*.safetensors"))
    tensors = load_file(str(cache))
    first = next(iter(tensors))
    tensors[first][0, 0] = float("nan")  # right keys, poisoned content
    save_file(tensors, str(cache))
    monkeypatch.setattr(interrogator, "save_file", _raise_enospc)  # and the rewrite fails (read-only store)
    fresh = core.gmi()
    result = fresh.identify([query()], source=core.source())  # interrogates: must not fail or use the NaNs
    assert result.prompt_source == "interrogator" and result.pseudo_prompt
    assert torch.isfinite(fresh.interrogator.label_embeddings()[first]).all()
    assert not list(cache.parent.glob("*.tmp"))


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", '{"steps": "many", "cfg": "nan", "width": null}'])
def test_faults_cache_comfyui_panel_settings_validated(env, content):  # noqa: F811
    settings = env.nodes.settings
    settings.path().parent.mkdir(parents=True, exist_ok=True)
    settings.path().write_text(content)
    assert settings.load() == settings.DEFAULTS


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


def test_faults_lock_two_threads_one_process_build_once(core):
    core.spec_path("m1.safetensors").unlink()
    started, release = threading.Event(), threading.Event()

    class SlowGenerator(PaintingGenerator):
        def generate(self, *args, **kwargs):
            started.set()
            release.wait(30)
            return super().generate(*args, **kwargs)

    first, second = SlowGenerator(), PaintingGenerator()
    reports = {}
    worker = threading.Thread(
        target=lambda: reports.setdefault("first", core.gmi().build(core.source(), first, "missing"))
    )
    worker.start()
    assert started.wait(30)
    reports["second"] = core.gmi().build(core.source(), second, "missing")
    release.set()
    worker.join(60)
    assert reports["first"].built == ["m1.safetensors"] and second.calls == []
    assert [s.name for s in reports["second"].skipped if "being built" in s.reason] == ["m1.safetensors"]
    assert set(core.states().values()) == {"ready"}


def test_faults_alias_a1111_api_lists_both_names(a1111_app):
    client, webui_world = a1111_app
    (webui_world.ckpt_dir / "copy_of_model_1.safetensors").write_bytes(
        (webui_world.ckpt_dir / "model_1.safetensors").read_bytes()
    )
    webui_world.refresh()
    job = client.post("/gmi/v1/build", json={"wait": True}).json()
    built = job["report"]["built"]
    assert job["state"] == "done" and len(built) == 3  # the file behind two names was rendered once
    assert len({"model_1.safetensors", "copy_of_model_1.safetensors"} & set(built)) == 1
    specs = {c["name"]: c["state"] for c in client.get("/gmi/v1/specs").json()["checkpoints"]}
    assert specs["copy_of_model_1.safetensors"] == specs["model_1.safetensors"] == "ready"
    image = b64png(webui_world.render(str(webui_world.ckpt_dir / "model_1.safetensors"), "a tree", 4242, 64, 64))
    ranking = client.post("/gmi/v1/identify", json={"image": image, "prompt": "a tree"}).json()["ranking"]
    names = [r["name"] for r in ranking]
    assert len(names) == 3 and len({"model_1.safetensors", "copy_of_model_1.safetensors"} & set(names)) == 1
    row = next(r for r in ranking if r["name"] in ("model_1.safetensors", "copy_of_model_1.safetensors"))
    assert row["aliases"] and set(row["aliases"] + [row["name"]]) == {
        "model_1.safetensors",
        "copy_of_model_1.safetensors",
    }


# ===================================================================================================================
# Specs without generating (issue 10's routes under issue 11's rules): folders confined, links out skipped, numbers
# checked, 4xx never 500, no path echo, the spec lock held while an observed spec is extended
# ===================================================================================================================
from gmi_core.observed import import_images, observed_key  # noqa: E402
from gmi_core.paths import folder_inside  # noqa: E402

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
    holder = _hold_lock_in_another_process(gmi.store.path_for(observed_key(m0.sha256, gmi.encoder.encoder_id)))
    try:
        report = import_images(gmi, core.source().list_checkpoints(), folder)
    finally:
        holder.kill()
        holder.wait()
    assert report.added == {"m1.safetensors": 2}, report.to_dict()
    assert sorted(f for f, r in report.skipped if r.startswith("busy")) == ["m0_0.png", "m0_1.png"]
    again = import_images(gmi, core.source().list_checkpoints(), folder)  # the lock is gone: m0 now, m1 not twice
    assert again.added == {"m0.safetensors": 2} and sum("already in" in r for _, r in again.skipped) == 2


def _library_client(env, output: Path):  # noqa: F811
    fp = sys.modules["folder_paths"]
    fp.get_output_directory = lambda: str(output)
    fp.get_input_directory = lambda: str(output.parent / "input")
    return _client(env)


LIBRARY_BAD_REQUESTS = [
    ("traversal", {"root": "output", "subfolder": "../.."}),
    ("absolute", {"root": "output", "subfolder": "/etc"}),
    ("encoded", {"root": "output", "subfolder": "%2e%2e/%2e%2e"}),
    ("symlink_out", {"root": "output", "subfolder": "link_out"}),
    ("missing_folder", {"root": "output", "subfolder": "nowhere"}),
    ("unknown_root", {"root": "/etc"}),
    ("root_not_a_string", {"root": ["output"]}),
    ("max_prompts_text", {"max_prompts": "many"}),
    ("max_prompts_negative", {"max_prompts": -3}),
    ("max_prompts_nan", {"max_prompts": float("nan")}),
    ("max_prompts_float", {"max_prompts": 1.5}),
    ("encoder_path", {"encoder": "../../../../etc/x.safetensors"}),
    ("prompt_set_path", {"prompt_set": "../../secret.txt"}),
    ("unknown_field", {"path": "/etc"}),
    ("huge_field", {"subfolder": "x" * 5000}),
]


@pytest.mark.parametrize("case", LIBRARY_BAD_REQUESTS, ids=[c[0] for c in LIBRARY_BAD_REQUESTS])
def test_faults_numbers_comfyui_import_images_bad_requests_are_4xx(env, tmp_path, case):  # noqa: F811
    from aiohttp.test_utils import TestClient, TestServer

    build(env)
    output = env.base / "output"
    output.mkdir()
    (env.base / "secret.txt").write_text("a secret prompt\n")
    (tmp_path / "elsewhere").mkdir(exist_ok=True)
    (output / "link_out").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    app = _library_client(env, output)
    name, fields = case
    specs_before = sorted(p.name for p in (env.base / "user" / "gmi" / "specs").rglob("*.safetensors"))

    async def scenario():
        async with TestClient(TestServer(app)) as client:
            body = json.dumps({"root": "output", "encoder": "tiny.safetensors", **fields})
            r = await client.post("/gmi/import-images", data=body, headers={"Content-Type": "application/json"})
            text = await r.text()
            assert 400 <= r.status < 500, (name, r.status, text)
            assert json.loads(text)["error"] and no_server_path(text, env.base, tmp_path)

    asyncio.run(scenario())
    assert sorted(p.name for p in (env.base / "user" / "gmi" / "specs").rglob("*.safetensors")) == specs_before


def test_faults_numbers_comfyui_library_routes_malformed_and_map(env, tmp_path):  # noqa: F811
    from aiohttp.test_utils import TestClient, TestServer

    build(env)
    output = env.base / "output"
    output.mkdir()
    app = _library_client(env, output)
    pack_limits = sys.modules[env.pack.__name__ + ".gmi_core.limits"]

    async def scenario():
        async with TestClient(TestServer(app)) as client:
            for body, headers in (
                (b"root=output", {"Content-Type": "application/x-www-form-urlencoded"}),
                (b"{not json", {"Content-Type": "application/json"}),
                (b"[1, 2]", {"Content-Type": "application/json"}),
                (b"\xff\xfe", {"Content-Type": "application/json"}),
            ):
                r = await client.post("/gmi/import-images", data=body, headers=headers)
                assert r.status == 400 and (await r.json())["error"], (body, r.status)

            async def chunks():  # no Content-Length: counted as it arrives
                yield b'{"subfolder": "'
                for _ in range(8):
                    yield b"a" * 4096
                yield b'"}'

            pack_limits.MAX_UPLOAD_BYTES = 10_000
            try:
                r = await client.post("/gmi/import-images", data=chunks(), headers={"Content-Type": "application/json"})
                assert r.status == 413, await r.text()
            finally:
                pack_limits.MAX_UPLOAD_BYTES = limits.MAX_UPLOAD_BYTES
            for q in ("max_prompts=abc", "max_prompts=-1", "encoder=/etc/x.safetensors", "prompt_set=../../x"):
                r = await client.get("/gmi/map?" + q)
                text = await r.text()
                assert 400 <= r.status < 500 and no_server_path(text, env.base), (q, r.status, text)
            r = await client.get("/gmi/map?encoder=tiny.safetensors&max_prompts=4")
            data = await r.json()
            assert r.status == 200 and len(data["checkpoints"]) == 4 and "NaN" not in await r.text(), data
            r = await client.post(
                "/gmi/import-images",
                data=json.dumps({"encoder": "tiny.safetensors", "max_prompts": 4}),
                headers={"Content-Type": "application/json"},
            )
            assert r.status == 200 and (await r.json())["scanned"] == 0  # an empty output folder: nothing, no error

    asyncio.run(scenario())


A1111_LIBRARY_BAD_REQUESTS = [
    {"root": "outputs", "subfolder": "../../.."},
    {"root": "outputs", "subfolder": "/etc"},
    {"root": "outputs", "subfolder": "%2e%2e"},
    {"root": "outputs", "subfolder": "link_out"},
    {"root": "outputs", "subfolder": "nowhere"},
    {"root": "/etc"},
    {"root": "outputs", "subfolder": 5},
    {"root": "outputs", "subfolder": "x" * 600},
]


@pytest.mark.parametrize("body", A1111_LIBRARY_BAD_REQUESTS, ids=lambda b: str(b)[:40])
def test_faults_numbers_a1111_import_images_bad_requests_are_4xx(a1111_app, tmp_path, body):
    client, webui_world = a1111_app
    outputs = webui_world.root / "outputs"
    outputs.mkdir(exist_ok=True)
    (tmp_path / "elsewhere").mkdir(exist_ok=True)
    if not (outputs / "link_out").exists():
        (outputs / "link_out").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    r = client.post("/gmi/v1/import-images", json=body)
    assert 400 <= r.status_code < 500, (r.status_code, r.text)
    assert no_server_path(r.text, webui_world.root, tmp_path)
    assert webui_world.process_calls == []
