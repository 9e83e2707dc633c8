"""Class 3 (issue 18): derived files are never trusted; status stays the truth.

A spec changed in place with its mtime put back is verified again (the stamp holds ctime, which ``utime`` cannot
restore); a broken compact index (a flipped byte, truncated, emptied, wrong shapes) is rebuilt, never a crash; the
same for the label embeddings cache, the hash cache and the manifest's verification records."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from gmi_core import limits
from gmi_core.index import StoreIndex
from tests.faults.harness import PaintingGenerator, query

torch.set_num_threads(1)


def _flip_in_place(path, count: int = 64) -> None:
    """Changes ``count`` bytes in the tensor data and puts the file's mtime back, as a careless tool would."""
    st = path.stat()
    data = bytearray(path.read_bytes())
    start = len(data) - 4 * count
    for i in range(start, start + count):
        data[i] ^= 0xFF
    with open(path, "r+b") as f:  # same inode, same size
        f.write(data)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert path.stat().st_mtime_ns == st.st_mtime_ns and path.stat().st_size == st.st_size


def test_derived_files_spec_changed_in_place_with_mtime_restored_is_verified_again(core):
    assert set(core.states().values()) == {"ready"}  # verified once, recorded in the manifest
    target = core.spec_path("m1.safetensors")
    _flip_in_place(target)
    assert core.states()["m1.safetensors"] == "corrupt"  # status is the truth
    result = core.gmi().identify([query(1)], prompt="x", source=core.source())
    assert "m1.safetensors" not in [r.name for r in result.ranking]  # never used
    core.gmi().build(core.source(), PaintingGenerator(), "missing")  # and rebuilt
    assert core.states()["m1.safetensors"] == "ready"


def test_derived_files_old_manifest_without_ctime_is_verified_again(core):
    manifest = core.home / "specs" / "manifest.json"
    data = json.loads(manifest.read_text())
    for entry in data["entries"].values():
        entry.pop("ctime_ns")  # a manifest from before the ctime stamp
    manifest.write_text(json.dumps(data))
    _flip_in_place(core.spec_path("m0.safetensors"))
    assert core.states() == {"m0.safetensors": "corrupt", "m1.safetensors": "ready", "m2.safetensors": "ready"}


def _indexed(core, monkeypatch):
    monkeypatch.setattr(limits, "INDEX_MIN_SPECS", 2)
    gmi = core.gmi()
    expected = gmi.identify([query(2)], prompt="x", source=core.source()).ranking[0].name
    assert gmi.library.index_path().exists()
    return gmi.library.index_path(), expected


INDEX_FAULTS = {
    "flipped_header_byte": lambda p: p.write_bytes(p.read_bytes()[:20] + b"\x00" + p.read_bytes()[21:]),
    "flipped_data_byte": lambda p: p.write_bytes(p.read_bytes()[:-9] + b"\xff" + p.read_bytes()[-8:]),
    "truncated": lambda p: p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2]),
    "emptied": lambda p: p.write_bytes(b""),
    "not_safetensors": lambda p: p.write_text("{not an index"),
    "a_folder": lambda p: (p.unlink(), p.mkdir()),
    "nan_values": lambda p: _rewrite_index(p, lambda t: t["kbar"].fill_(float("nan"))),
    "wrong_shapes": lambda p: _rewrite_index(p, lambda t: t.__setitem__("prompt", t["prompt"][:1])),
}


def _rewrite_index(path, edit) -> None:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
    tensors = load_file(str(path))
    edit(tensors)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)


@pytest.mark.parametrize("fault", sorted(INDEX_FAULTS))
def test_derived_files_broken_index_is_rebuilt_never_a_crash(core, monkeypatch, fault):
    path, expected = _indexed(core, monkeypatch)
    INDEX_FAULTS[fault](path)
    assert StoreIndex.load(path) is None  # never trusted
    for _ in range(2):  # a fresh engine (a new process) and the same one again
        result = core.gmi().identify([query(2)], prompt="x", source=core.source())
        assert result.ranking[0].name == expected
    if fault != "a_folder":
        assert StoreIndex.load(path) is not None  # rebuilt in place


@pytest.mark.parametrize("content", [b"", b"\x00" * 100, b"{not safetensors", None])
def test_derived_files_label_cache_broken_is_rebuilt(core, content):
    gmi = core.gmi()
    gmi.identify([query()], source=core.source())  # interrogates: writes the label embeddings cache
    caches = [p for p in (core.home / "specs" / "cache").rglob("*.safetensors")]
    assert caches
    for cache in caches:
        if content is None:  # truncated
            cache.write_bytes(cache.read_bytes()[: cache.stat().st_size // 3])
        else:
            cache.write_bytes(content)
    result = core.gmi().identify([query()], source=core.source())  # a new engine reads the cache again
    assert result.ranking and result.pseudo_prompt


@pytest.mark.parametrize("content", ["", "\x00" * 64, "[", '{"entries": 5}', '{"entries": {"x": {"mtime": "a"}}}'])
def test_derived_files_verification_records_broken_are_rebuilt(core, content):
    (core.home / "specs" / "manifest.json").write_text(content)
    assert set(core.states().values()) == {"ready"}
    assert json.loads((core.home / "specs" / "manifest.json").read_text())["entries"]  # written again
