"""Every cache is validated on read and rebuilt when wrong.

Moved from tests/test_faults.py (issue 11's fault suite, split by class in issue 19); each test name still
starts with its class."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.faults.harness import (
    query,
    raise_enospc,
)
from tests.test_comfyui_nodes import write_fake_checkpoint

torch.set_num_threads(1)

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


def test_faults_cache_label_cache_validated_and_written_best_effort(core, monkeypatch):
    import gmi_core.interrogator as interrogator

    gmi = core.gmi()
    gmi.interrogate([query()])
    cache = next((core.home / "specs" / "cache").glob("labels--*.safetensors"))
    tensors = load_file(str(cache))
    first = next(iter(tensors))
    tensors[first][0, 0] = float("nan")  # right keys, poisoned content
    save_file(tensors, str(cache))
    monkeypatch.setattr(interrogator, "save_file", raise_enospc)  # and the rewrite fails (read-only store)
    fresh = core.gmi()
    result = fresh.identify([query()], source=core.source())  # interrogates: must not fail or use the NaNs
    assert result.prompt_source == "interrogator" and result.pseudo_prompt
    assert torch.isfinite(fresh.interrogator.label_embeddings()[first]).all()
    assert not list(cache.parent.glob("*.tmp"))
