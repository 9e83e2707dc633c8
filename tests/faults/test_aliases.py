"""Several names, one sha256: ranked once, listed as aliases, never dropped; built once.

Moved from tests/test_faults.py (issue 11's fault suite, split by class in issue 19); each test name still
starts with its class."""

from __future__ import annotations

import torch

from tests.faults.harness import (
    PaintingGenerator,
    query,
)

torch.set_num_threads(1)


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
