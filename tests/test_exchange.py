"""Shareable spec files: size, bit-exact round trip on a fresh store, validation, not-installed checkpoints."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from gmi_core.cli import main
from gmi_core.encoders import load_encoder
from gmi_core.exchange import (
    HEADER_KEY,
    dequantise,
    import_files,
    local_prompt_features,
    pack_int4,
    quantise,
    unpack_int4,
    write_exchange,
)
from gmi_core.observed import OBSERVED
from gmi_core.prompts import load_prompt_set
from gmi_core.protocols import GenerationSettings
from gmi_core.spec import Spec, _content_hash
from gmi_core.store import SpecStore

SIZE_TARGET = 200_000  # bytes per default spec without thumbnails (55 prompts x 4 images x 768-d)


def resealed(tensors: dict, meta: dict) -> dict:
    """The header of a hand-edited file with a valid checksum: the edit must be caught by the field checks."""
    meta = dict(meta, content_sha256=_content_hash(tensors, {k: v for k, v in meta.items() if k != "content_sha256"}))
    return {HEADER_KEY: json.dumps(meta)}


def default_size_spec(seed: int = 0) -> Spec:
    """A spec of the default shape (platform set, 4 images per prompt, ViT-L/14 768-d), random unit features."""
    g = torch.Generator().manual_seed(seed)
    prompts = load_prompt_set("platform")
    n, s, d = len(prompts), 4, 768

    def unit(*shape):
        x = torch.randn(*shape, generator=g)
        return (x / x.norm(dim=-1, keepdim=True)).half()

    return Spec(
        "big.safetensors",
        f"{seed:064x}",
        "ViT-L-14/openai",
        prompts.name,
        prompts.hash,
        list(prompts.prompts),
        [[i * s + k for k in range(s)] for i in range(n)],
        GenerationSettings(),
        unit(n, s, d),
        unit(n, d),
        unit(n, s, 192),
        torch.randint(0, 255, (n, 64, 64, 3), dtype=torch.uint8, generator=g),
        torch.ones(n, s, dtype=torch.bool),
    )


def test_quantisation_is_idempotent_and_close():
    x = default_size_spec().image_features
    q, e = quantise(x, 127)
    y = dequantise(q, e)
    assert (y.float() - x.float()).abs().max() < 0.01
    assert torch.equal(torch.stack(quantise(y, 127)[:1]), torch.stack([q]))  # re-encoding the decoded values is exact
    assert torch.equal(quantise(y, 127)[1], e)
    p, _pe = quantise(default_size_spec().pixel_features, 7)
    assert torch.equal(unpack_int4(pack_int4(p)), p)


def test_default_spec_meets_the_size_target(tmp_path):
    spec = default_size_spec()
    out = write_exchange([spec], tmp_path / "one.safetensors")
    assert out.stat().st_size <= SIZE_TARGET, out.stat().st_size
    assert (tmp_path / "one.safetensors").stat().st_size * 3 < spec.image_features.numel() * 2 + 3 * 10**5
    with_thumbs = write_exchange([spec], tmp_path / "thumbs.safetensors", thumbnails=True)
    assert with_thumbs.stat().st_size > out.stat().st_size + spec.thumbnails.numel()


def _derive(encoder_file):
    return lambda store: local_prompt_features(store, load_encoder(str(encoder_file)))


def test_export_import_round_trip_on_a_fresh_store_is_bit_exact(tiny_world, tmp_path, capsys):
    home = tmp_path / "home"
    shutil.copytree(tiny_world.root / "specs", home / "specs")
    files = {}
    for mode, flags in (("compact", []), ("lossless", ["--lossless"])):
        files[mode] = tmp_path / f"{mode}.safetensors"
        assert main(["export", "--home", str(home), "--out", str(files[mode]), *flags]) == 0
    capsys.readouterr()
    original = SpecStore(home / "specs")
    originals = {e.sha256: original.load(e.key) for e in original.entries()}
    assert len(originals) == 4

    fresh = tmp_path / "fresh"
    for mode, path in files.items():
        store_home = fresh / mode
        code = main(
            ["import", str(path), "--home", str(store_home), "--encoder", str(tiny_world.encoder_file), "--json"]
        )
        report = json.loads(capsys.readouterr().out)
        assert code == 0 and report["summary"]["added"] == 4, report
        store = SpecStore(store_home / "specs")
        imported = {e.sha256: store.load(e.key) for e in store.entries()}
        assert imported.keys() == originals.keys()
        for sha, spec in imported.items():
            assert torch.equal(spec.prompt_features, originals[sha].prompt_features)  # re-derived exactly
            assert torch.equal(spec.done, originals[sha].done) and spec.seeds == originals[sha].seeds
            if mode == "lossless":
                assert torch.equal(spec.image_features, originals[sha].image_features)
                assert torch.equal(spec.pixel_features, originals[sha].pixel_features)
            else:
                assert (spec.image_features.float() - originals[sha].image_features.float()).abs().max() < 0.02
        # exporting the imported store again reproduces the file byte for byte
        again = tmp_path / f"again-{mode}.safetensors"
        assert (
            main(
                [
                    "export",
                    "--home",
                    str(store_home),
                    "--out",
                    str(again),
                    *(["--lossless"] if mode == "lossless" else []),
                ]
            )
            == 0
        )
        assert again.read_bytes() == path.read_bytes()
        # importing again: identical specs are left alone
        assert main(["import", str(path), "--home", str(store_home), "--json"]) == 0
        assert json.loads(capsys.readouterr().out.split("\n", 1)[1])["summary"]["identical"] == 4

    # ranking on the compact import agrees with the original store on every checkpoint's query
    gmi_original, gmi_imported = (
        tiny_world.gmi(spec_root=home / "specs"),
        tiny_world.gmi(spec_root=fresh / "compact" / "specs"),
    )
    source = tiny_world.source()
    for index, ckpt in enumerate(source.list_checkpoints().checkpoints):
        query = tiny_world.generator().generate(
            ckpt, load_prompt_set("evaluation").prompts[index], [31 + index], tiny_world.settings
        )
        a = gmi_original.identify(query, source=source)
        b = gmi_imported.identify(query, source=source)
        assert [r.name for r in a.ranking] == [r.name for r in b.ranking] and b.ranking[0].name == ckpt.name


def test_import_never_replaces_a_bigger_spec_and_rejects_bad_files(tiny_world, tmp_path):
    shutil.copytree(tiny_world.root / "specs", tmp_path / "specs")
    store = SpecStore(tmp_path / "specs")
    entry = store.entries()[0]
    full = store.load(entry.key)
    partial = store.load(entry.key)
    partial.image_done[3:] = False
    partial.image_features[3:] = 0
    small = write_exchange([partial], tmp_path / "partial.safetensors")
    derive = _derive(tiny_world.encoder_file)(store)
    report = import_files(store, [small], derive)
    assert [a.action for a in report.actions] == ["kept-local"]
    assert torch.equal(store.load(entry.key).done, full.done)

    # a bigger spec replaces a smaller local one
    store.save(partial)
    report = import_files(store, [write_exchange([full], tmp_path / "full.safetensors", lossless=True)], derive)
    assert [a.action for a in report.actions] == ["replaced"] and store.load(entry.key).done.all()

    # damaged and hostile files are rejected, nothing in the store changes
    before = {e.file: e.mtime for e in store.entries()}
    tensors = load_file(str(small))
    tensors["s0.image_q"][0, 0, 0] += 1
    from safetensors import safe_open

    with safe_open(str(small), framework="pt") as handle:
        header = handle.metadata()
    save_file(tensors, str(tmp_path / "edited.safetensors"), metadata=header)
    meta = json.loads(header[HEADER_KEY])
    meta["specs"][0]["checkpoint"]["autov2"] = "0000000000"
    save_file(
        load_file(str(small)), str(tmp_path / "badhash.safetensors"), metadata=resealed(load_file(str(small)), meta)
    )
    (tmp_path / "pickle.safetensors").write_bytes(b"\x80\x04\x95" + b"x" * 100)
    meta = json.loads(header[HEADER_KEY])
    meta["version"] = 99
    save_file(
        load_file(str(small)), str(tmp_path / "future.safetensors"), metadata=resealed(load_file(str(small)), meta)
    )
    names = ["edited", "badhash", "pickle", "future"]
    report = import_files(store, [tmp_path / f"{n}.safetensors" for n in names], derive)
    assert [a.action for a in report.actions] == ["rejected"] * 4
    details = [a.detail for a in report.actions]
    assert (
        "checksum" in details[0] and "AutoV2" in details[1] and "safetensors" in details[2] and "version" in details[3]
    )
    assert {e.file: e.mtime for e in store.entries()} == before


def test_not_installed_imported_spec_ranks_and_is_marked(tiny_world, tmp_path):
    """Specs of a checkpoint that is not on this machine rank when asked for, marked with hash and name."""
    checkpoints = tiny_world.source().list_checkpoints().checkpoints
    models = tmp_path / "models"
    models.mkdir()
    for ckpt in checkpoints[1:]:  # the first checkpoint is not installed here
        (models / ckpt.name).symlink_to(ckpt.path)
    from gmi_core.checkpoints import FolderCheckpointSource

    source = FolderCheckpointSource(models, hash_cache=tmp_path / "hashes.json")
    store_root = tmp_path / "specs"
    shutil.copytree(tiny_world.root / "specs", store_root)
    shutil.rmtree(store_root / "specs" / checkpoints[0].sha256)
    friend = SpecStore(tiny_world.root / "specs")
    shared = write_exchange(
        [friend.load(e.key) for e in friend.entries() if e.sha256 == checkpoints[0].sha256],
        tmp_path / "friend.safetensors",
    )
    gmi = tiny_world.gmi(spec_root=store_root)
    report = import_files(gmi.store, [shared], local_prompt_features(gmi.store, gmi.encoder))
    assert [a.action for a in report.actions] == ["added"]

    query = tiny_world.generator().generate(
        checkpoints[0], "a lighthouse on a cliff at dusk", [77], tiny_world.settings
    )
    without = gmi.identify(query, source=source)
    assert checkpoints[0].sha256 not in [r.sha256 for r in without.ranking]
    assert any("not installed" in name for name, _ in without.excluded)
    result = gmi.identify(query, source=source, include_not_installed=True)
    best = result.ranking[0]
    assert (best.sha256, best.name, best.installed) == (checkpoints[0].sha256, checkpoints[0].name, False)
    assert all(r.installed for r in result.ranking[1:])
    row = result.to_dict()["ranking"][0]
    assert row["installed"] is False and row["short_hash"] == checkpoints[0].short_hash


def test_observed_spec_exports_with_its_own_prompts(tmp_path):
    spec = default_size_spec(1)
    spec = Spec(
        "mine",
        spec.sha256,
        spec.encoder_id,
        OBSERVED,
        OBSERVED,
        [f"my prompt {i}" for i in range(8)],
        [[-1]] * 8,
        GenerationSettings(),
        spec.image_features[:8, :1].contiguous(),
        spec.prompt_features[:8].contiguous(),
        spec.pixel_features[:8, :1].contiguous(),
        spec.thumbnails[:8].contiguous(),
        torch.ones(8, 1, dtype=torch.bool),
        {"kind": OBSERVED, "counts": {"generated_images": 0, "observed_images": 8}},
    )
    out = write_exchange([spec], tmp_path / "observed.safetensors")
    store = SpecStore(tmp_path / "store")
    report = import_files(store, [out], lambda *_: pytest.fail("observed specs carry their own prompt features"))
    assert [a.action for a in report.actions] == ["added"]
    back = store.load(store.entries()[0].key)
    assert back.prompts == spec.prompts and back.extra["kind"] == OBSERVED
    assert (back.prompt_features.float() - spec.prompt_features.float()).abs().max() < 0.01


def test_mangled_metadata_is_rejected_per_spec_never_raised(tmp_path):
    """Every field of a spec entry replaced by wrong types: each file is rejected with a reason, nothing crashes."""
    from safetensors import safe_open

    spec = default_size_spec(2)
    good = write_exchange([spec], tmp_path / "good.safetensors")
    with safe_open(str(good), framework="pt") as handle:
        meta = json.loads(handle.metadata()[HEADER_KEY])
    tensors = load_file(str(good))
    store = SpecStore(tmp_path / "store")
    paths = []
    for key in meta["specs"][0]:
        for bad in (
            ((None,) if key != "popularity" else ()) + ([], -1, {"a": 1}) + (("x",) if key != "encoder_id" else ())
        ):
            broken = json.loads(json.dumps(meta))
            broken["specs"][0][key] = bad
            path = tmp_path / f"bad-{key}-{len(paths)}.safetensors"
            save_file(tensors, str(path), metadata=resealed(tensors, broken))
            paths.append(path)
    report = import_files(store, paths, lambda *_: spec.prompt_features)
    assert [a.action for a in report.actions] == ["rejected"] * len(paths), [
        (a.file, a.action) for a in report.actions if a.action != "rejected"
    ]
    assert not [a.detail for a in report.actions if "checksum" in a.detail]  # caught by the field checks, not the seal
    assert store.entries() == []


def test_specs_exported_before_the_family_recipes_import(tmp_path):
    """An export whose settings lack the recipe fields (guidance, shift, latent channels, split-model parts,
    workflow) imports with their defaults; a recipe field of the wrong type is still rejected."""
    from safetensors import safe_open

    from gmi_core.families import RECIPE_SETTINGS

    spec = default_size_spec(2)
    good = write_exchange([spec], tmp_path / "good.safetensors")
    with safe_open(str(good), framework="pt") as handle:
        meta = json.loads(handle.metadata()[HEADER_KEY])
    tensors = load_file(str(good))
    old, wrong = json.loads(json.dumps(meta)), json.loads(json.dumps(meta))
    for name in RECIPE_SETTINGS:
        del old["specs"][0]["settings"][name]
    wrong["specs"][0]["settings"]["guidance"] = "strong"
    paths = [tmp_path / "old.safetensors", tmp_path / "wrong.safetensors"]
    for path, data in zip(paths, (old, wrong), strict=True):
        save_file(tensors, str(path), metadata=resealed(tensors, data))
    store = SpecStore(tmp_path / "store")
    report = import_files(store, paths, lambda *_: spec.prompt_features)
    assert [a.action for a in report.actions] == ["added", "rejected"], [(a.action, a.detail) for a in report.actions]
    assert "guidance" in report.actions[1].detail
    (entry,) = store.entries()
    assert GenerationSettings.from_dict(entry.settings) == spec.settings  # the defaults the old spec was built with
