"""Status is the truth: anything identify would exclude is "corrupt" everywhere; build missing rebuilds it.

Moved from tests/test_faults.py (issue 11's fault suite, split by class in issue 19); each test name still
starts with its class."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from gmi_core.errors import GmiError
from gmi_core.spec import Spec, _content_hash
from tests.faults.harness import (
    PaintingGenerator,
    no_server_path,
    query,
)

torch.set_num_threads(1)


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
