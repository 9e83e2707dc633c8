"""Spec files and the store: round trip, corruption, resume, stale and foreign specs."""

import json
import os
import shutil

import numpy as np
import pytest
import torch

from gmi_core.budgets import cell_seed, prompt_order
from gmi_core.encoders import tiny_encoder
from gmi_core.errors import Cancelled, NoSpecsError, SpecError
from gmi_core.families import FamilySettings
from gmi_core.prompts import load_prompt_set
from gmi_core.ranker import FeatureBank
from gmi_core.spec import Spec, SpecKey
from gmi_core.store import SpecStore


def _one_spec(world):
    gmi = world.gmi()
    checkpoint = world.source().list_checkpoints().checkpoints[0]
    return gmi.store.load(gmi.key(checkpoint)), gmi, checkpoint


def test_spec_written_reloaded_and_equal(tiny_world, tmp_path):
    spec, _, _ = _one_spec(tiny_world)
    path = tmp_path / "copy.safetensors"
    spec.save(path)
    again = Spec.load(path)
    assert again.metadata() == spec.metadata()
    for name in ("image_features", "prompt_features", "pixel_features", "thumbnails", "done"):
        assert torch.equal(getattr(again, name), getattr(spec, name)), name
    assert again.complete and again.seeds == [[cell_seed(0, i, s) for s in range(2)] for i in range(10)]
    assert not list(tmp_path.glob("*.tmp")), "atomic write leaves no temp file"


def test_truncated_spec_is_rejected(tiny_world, tmp_path):
    spec, _, _ = _one_spec(tiny_world)
    path = tmp_path / "spec.safetensors"
    spec.save(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(SpecError, match="unreadable or truncated"):
        Spec.load(path)


def test_tampered_spec_is_rejected(tiny_world, tmp_path):
    spec, _, _ = _one_spec(tiny_world)
    path = tmp_path / "spec.safetensors"
    spec.save(path)
    data = bytearray(path.read_bytes())
    data[-100] ^= 0xFF  # flip bits inside the tensor data
    path.write_bytes(bytes(data))
    with pytest.raises(SpecError, match="modified after it was written"):
        Spec.load(path)


def test_corrupt_spec_in_store_is_excluded_then_rebuilt(tiny_world, tmp_path):
    shutil.copytree(tiny_world.root / "specs", tmp_path / "specs")
    gmi = tiny_world.gmi(spec_root=tmp_path / "specs")
    source = tiny_world.source()
    victim = source.list_checkpoints().checkpoints[3]
    path = gmi.store.path_for(gmi.key(victim))
    path.write_bytes(path.read_bytes()[:-500])

    query = tiny_world.generator().generate(victim, "a fox in an autumn forest", [77], tiny_world.settings)
    result = gmi.identify(query, source=source)
    assert victim.name not in [r.name for r in result.ranking]
    assert any(name == victim.name and "truncated" in reason for name, reason in result.excluded)
    states = {s.name: s.state for s in gmi.status(source)[0]}
    assert states[victim.name] == "corrupt"

    report = gmi.build(source, tiny_world.generator())
    assert report.built == [victim.name]
    assert list(path.parent.glob("*.corrupt-*")), "the corrupt file is kept aside, not deleted"
    assert gmi.identify(query, source=source).ranking[0].name == victim.name


class CountingGenerator:
    """Wraps a real generator; counts prompts and can stop the build after some of them."""

    def __init__(self, inner, stop_after=None):
        self.inner, self.stop_after, self.prompts = inner, stop_after, []

    def generate(self, checkpoint, prompt, seeds, settings):
        self.prompts.append(prompt)
        return self.inner.generate(checkpoint, prompt, seeds, settings)

    def release(self):
        self.inner.release()


def test_interrupted_build_resumes_without_regenerating(tiny_world, tmp_path):
    gmi = tiny_world.gmi(spec_root=tmp_path / "specs")
    source = tiny_world.source()
    first = CountingGenerator(tiny_world.generator())
    report = gmi.build(
        source,
        first,
        which=[source.list_checkpoints().checkpoints[0].name],
        should_cancel=lambda: len(first.prompts) >= 4,
    )
    order = [tiny_world.prompt_set.prompts[i] for i in prompt_order(10)]
    assert report.cancelled and first.prompts == order[:4]
    status = {s.name: s for s in gmi.status(source)[0]}
    name = source.list_checkpoints().checkpoints[0].name
    assert status[name].state == "partial" and status[name].prompts_done == 4

    second = CountingGenerator(tiny_world.generator())
    gmi.build(source, second, which=[name])
    assert second.prompts == order[4:]
    assert {s.name: s.state for s in gmi.status(source)[0]}[name] == "ready"
    rebuilt = gmi.store.load(gmi.key(source.list_checkpoints().checkpoints[0]))
    reference = tiny_world.gmi().store.load(gmi.key(source.list_checkpoints().checkpoints[0]))
    assert torch.allclose(rebuilt.image_features.float(), reference.image_features.float(), atol=1e-3)


def test_generator_exception_keeps_finished_prompts(tiny_world, tmp_path):
    gmi = tiny_world.gmi(spec_root=tmp_path / "specs")
    source = tiny_world.source()

    class Interrupting(CountingGenerator):
        def generate(self, checkpoint, prompt, seeds, settings):
            if len(self.prompts) == 3:
                raise Cancelled("host interrupt")
            return super().generate(checkpoint, prompt, seeds, settings)

    name = source.list_checkpoints().checkpoints[1].name
    assert gmi.build(source, Interrupting(tiny_world.generator()), which=[name]).cancelled
    assert {s.name: s.prompts_done for s in gmi.status(source)[0]}[name] == 3


def test_changed_steps_keep_specs_usable_and_say_why(tiny_world):
    from dataclasses import replace

    gmi = tiny_world.gmi()
    gmi.settings = FamilySettings.uniform(replace(tiny_world.settings, steps=9))
    statuses = gmi.status(tiny_world.source())[0]
    assert {s.state for s in statuses} == {"ready"}, "other settings never make a spec stale"
    assert not any(s.current for s in statuses) and all("steps 4 (now 9)" in s.detail for s in statuses)
    assert gmi.plan(tiny_world.source(), "missing").images == 0, "build missing renders nothing for them"
    assert gmi.plan(tiny_world.source(), "all").images == 4 * 20, "only 'all' renders them again"


def test_specs_of_another_encoder_or_prompt_set_are_never_mixed(tiny_world, tmp_path):
    shutil.copytree(tiny_world.root / "specs", tmp_path / "specs")
    source = tiny_world.source()
    other_set = load_prompt_set("platform").head(3)
    other = tiny_world.gmi(spec_root=tmp_path / "specs", encoder=tiny_encoder(seed=7), prompt_set=other_set)
    checkpoint = source.list_checkpoints().checkpoints[0]
    other.build(source, tiny_world.generator(), which=[checkpoint.name])
    query = tiny_world.generator().generate(checkpoint, "a fox in an autumn forest", [5], tiny_world.settings)

    ranked_other = other.identify(query, source=source)
    assert [r.name for r in ranked_other.ranking] == [checkpoint.name]
    assert len(ranked_other.excluded) == 3

    original = tiny_world.gmi(spec_root=tmp_path / "specs")
    assert len(original.identify(query, source=source).ranking) == 4
    same_encoder_other_set = tiny_world.gmi(spec_root=tmp_path / "specs", prompt_set=other_set)
    with pytest.raises(NoSpecsError, match="build specs first"):
        same_encoder_other_set.identify(query, source=source)
    store = SpecStore(tmp_path / "specs")
    specs = [store.load(e.key) for e in store.entries() if e.sha256 == checkpoint.sha256]
    with pytest.raises(ValueError, match="different encoders"):
        FeatureBank.from_specs(specs)


def test_manifest_is_rebuilt_when_broken(tiny_world, tmp_path):
    shutil.copytree(tiny_world.root / "specs", tmp_path / "specs")
    (tmp_path / "specs" / "manifest.json").write_text("{not json")
    entries = SpecStore(tmp_path / "specs").entries()
    assert len(entries) == 4 and all(e.complete for e in entries)
    assert len(json.loads((tmp_path / "specs" / "manifest.json").read_text())["entries"]) == 4


def test_identify_reads_each_spec_file_once_per_version(tiny_world, tmp_path, monkeypatch):
    shutil.copytree(tiny_world.root / "specs", tmp_path / "specs")
    gmi = tiny_world.gmi(spec_root=tmp_path / "specs")
    gmi.store.entries()  # copies are new file versions (their ctime differs): verified once, here
    source = tiny_world.source()
    checkpoint = source.list_checkpoints().checkpoints[0]
    query = tiny_world.generator().generate(checkpoint, "a fox in an autumn forest", [11], tiny_world.settings)
    loads = []
    original = Spec.load.__func__

    def counting(cls, path, verify=True, thumbnails=True):
        loads.append((verify, thumbnails))
        return original(cls, path, verify, thumbnails)

    monkeypatch.setattr(Spec, "load", classmethod(counting))
    first = gmi.identify(query, source=source)
    assert loads == [(False, False)] * 4, "the store listed verified versions: features only, not checked again"
    bank, specs = gmi.library._bank_cache[1], [spec for _, spec in gmi.library._spec_cache.values()]
    storage = bank.image.untyped_storage().data_ptr()
    assert all(s.thumbnails is None and s.image_features.untyped_storage().data_ptr() == storage for s in specs), (
        "the bank holds the only copy of the features, and no thumbnails"
    )
    assert gmi.identify(query, source=source).to_dict() == first.to_dict() and len(loads) == 4
    loads.clear()
    fresh = tiny_world.gmi(spec_root=tmp_path / "specs")  # a new process: verified versions are trusted
    assert fresh.identify(query, source=source).to_dict() == first.to_dict()
    assert loads == [(False, False)] * 4
    gmi.build(source, tiny_world.generator(), which="all")  # rewrites every spec file, recorded as it saves them
    loads.clear()
    gmi.identify(query, source=source)
    assert loads == [(False, False)] * 4, "files gmi wrote are listed as it wrote them"
    changed = tmp_path / "specs" / gmi.store.entries()[0].file
    os.utime(changed, ns=(changed.stat().st_atime_ns, changed.stat().st_mtime_ns + 10**9))  # changed behind gmi's back
    loads.clear()
    gmi.identify(query, source=source)
    assert loads == [(True, True), (False, False)], "a changed file is verified once, when the store lists it"
    sha = source.list_checkpoints().checkpoints[0].sha256
    before = len(loads)
    thumb = gmi.library.thumbnail(sha, 0)
    assert thumb.size == (64, 64) and len(loads) == before, "a thumbnail is a slice read, not a spec load"
    full = gmi.store.load(SpecKey(sha, gmi.encoder.encoder_id, gmi.prompt_set.hash))
    assert np.array_equal(np.asarray(thumb), full.thumbnails[0].numpy())


def test_rebuild_all_that_fails_at_once_keeps_the_old_specs(tiny_world, tmp_path):
    shutil.copytree(tiny_world.root / "specs", tmp_path / "specs")
    gmi = tiny_world.gmi(spec_root=tmp_path / "specs")
    source = tiny_world.source()

    class Broken:
        def generate(self, checkpoint, prompt, seeds, settings):
            raise RuntimeError("checkpoint failed to load")

        def release(self):
            pass

    report = gmi.build(source, Broken(), which="all")
    assert report.built == [] and len(report.failed) == 4 and "failed to load" in report.failed[0][1]
    assert {s.state for s in gmi.status(source)[0]} == {"ready"}


def test_a_store_object_sees_what_another_one_wrote(tiny_world, tmp_path, monkeypatch):
    """Listing remembers the manifest and folder listings between calls, yet misses no change another process makes."""
    import gmi_core.store as store_module

    shutil.copytree(tiny_world.root / "specs", tmp_path / "specs")
    reader, writer = SpecStore(tmp_path / "specs"), SpecStore(tmp_path / "specs")
    first = reader.entries()
    monkeypatch.setattr(store_module, "SETTLED_NS", -(10**18))  # every listing cached, as hours after the last write
    assert reader.entries() == first and len(first) == 4
    spec = writer.load(first[0].key)
    spec.sha256 = "f" * 64  # a new checkpoint folder
    writer.save(spec)
    assert len(reader.entries()) == 5
    spec.encoder_id = "another-encoder"  # a second file in a folder the reader has listed
    writer.save(spec)
    assert {e.encoder_id for e in reader.entries() if e.sha256 == "f" * 64} == {first[0].encoder_id, "another-encoder"}
    os.unlink(writer.path_for(spec.key))
    assert len(reader.entries()) == 5
    changed = tmp_path / "specs" / first[1].file
    data = bytearray(changed.read_bytes())
    data[-100] ^= 0xFF
    changed.write_bytes(bytes(data))  # rewritten in place: its folder's listing is unchanged
    entries, problems = reader.scan()
    assert len(entries) == 4 and list(problems) == [first[1].file] and "modified" in problems[first[1].file]
