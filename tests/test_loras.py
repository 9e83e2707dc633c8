"""LoRA specs in the core: reading LoRA files, choosing bases, building through the one spec path, identifying."""

from __future__ import annotations

import json
import shutil

import pytest
from safetensors.torch import save_file

from gmi_core.errors import InvalidInput
from gmi_core.loras import (
    DIFFUSERS_FORMATS,
    LoraChoices,
    LoraSource,
    combination_key,
    inspect_lora,
    legacy_model_hash,
    list_lora_files,
    lora_files_in,
    parse_choices,
    parse_strength,
)
from gmi_core.tiny_lora import tiny_lora_state, write_tiny_lora


def test_a_tiny_kohya_lora_is_read_from_its_header(tmp_path):
    path = write_tiny_lora(tmp_path / "style.safetensors", seed=1, metadata={"ss_sd_model_name": "tiny-sd-2.ckpt"})
    facts = inspect_lora(path)
    assert facts == {"family": "sd1", "format": "locon", "base_hints": {"ss_sd_model_name": "tiny-sd-2.ckpt"}}


@pytest.mark.parametrize(
    ("keys", "meta", "family"),
    [
        ({"lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": (4, 768)}, {}, "sdxl"),
        (
            {"lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight": (4, 1024)},
            {},
            "sd2",
        ),
        (
            {"lora_unet_x.lora_down.weight": (4, 32)},
            {"modelspec.architecture": "stable-diffusion-xl-v1-base/lora"},
            "sdxl",
        ),
        ({"lora_unet_x.lora_down.weight": (4, 32)}, {"ss_v2": "True"}, "sd2"),
    ],
)
def test_the_family_comes_from_metadata_or_keys(tmp_path, keys, meta, family):
    import torch

    path = tmp_path / "l.safetensors"
    save_file({k: torch.zeros(shape) for k, shape in keys.items()}, str(path), metadata=meta)
    assert inspect_lora(path)["family"] == family


def test_files_gmi_or_the_host_cannot_use_are_skipped_with_the_reason(tmp_path, tiny_world):
    import torch

    folder = tmp_path / "loras"
    write_tiny_lora(folder / "good.safetensors", seed=1)
    shutil.copy(next(tiny_world.models.glob("*.safetensors")), folder / "checkpoint.safetensors")
    (folder / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    save_file({"lora_unet_a.hada_w1_a": torch.zeros(2, 2)}, str(folder / "loha.safetensors"))
    save_file(
        {"lora_unet_a.lora_down.weight": torch.zeros(2, 2)},
        str(folder / "flux.safetensors"),
        {"modelspec.architecture": "flux-1-dev/lora"},
    )
    loras, skipped = list_lora_files(lora_files_in(folder), tmp_path / "h.json", DIFFUSERS_FORMATS, "diffusers")
    assert [lora.name for lora in loras] == ["good.safetensors"]
    reasons = {s.name: s.reason for s in skipped}
    assert reasons["checkpoint.safetensors"].startswith("LoRA: a checkpoint, not a LoRA")
    assert "unreadable or truncated" in reasons["broken.safetensors"]
    assert reasons["loha.safetensors"] == "LoRA: loha LoRA files are not loaded by diffusers"
    assert "flux-1-dev/lora" in reasons["flux.safetensors"]


def test_strengths_and_keys():
    assert parse_strength("0.75") == 0.75 and parse_strength(-0.0) == 0.0
    for bad in ("x", 5, float("nan")):
        with pytest.raises(InvalidInput):
            parse_strength(bad)
    assert combination_key("a" * 64, "b" * 64, 1) == combination_key("a" * 64, "b" * 64, 1.0004)
    assert combination_key("a" * 64, "b" * 64, 1) != combination_key("a" * 64, "b" * 64, 0.5)
    choices = parse_choices(["0.8", "style=0.5,1"], ["sd1=tiny-sd-2.safetensors", "char.safetensors=tiny-sd-3"])
    assert choices.strengths == (0.8,) and choices.strengths_per_lora == {"style": (0.5, 1.0)}
    assert choices.base_per_family == {"sd1": "tiny-sd-2.safetensors"}
    assert choices.base_per_lora == {"char.safetensors": "tiny-sd-3"}


def test_the_base_is_the_one_the_metadata_names_else_the_users_else_the_first(tmp_path, tiny_world):
    checkpoints = sorted(tiny_world.models.glob("*.safetensors"))
    folder = tmp_path / "loras"
    write_tiny_lora(folder / "named.safetensors", 1, metadata={"ss_sd_model_name": "/train/tiny-sd-3.safetensors"})
    write_tiny_lora(folder / "hashed.safetensors", 2, metadata={"ss_sd_model_hash": legacy_model_hash(checkpoints[3])})
    write_tiny_lora(folder / "plain.safetensors", 3)
    write_tiny_lora(folder / "xl.safetensors", 4, metadata={"ss_base_model_version": "sdxl_base_v1-0"})

    def bases(choices):
        listing = LoraSource(
            tiny_world.source(), lambda: lora_files_in(folder), choices, tmp_path / "h.json"
        ).list_checkpoints()
        return {c.lora.name: c.lora.base.name for c in listing.checkpoints if c.lora}, listing

    found, listing = bases(LoraChoices())
    assert found == {
        "named.safetensors": "tiny-sd-3.safetensors",
        "hashed.safetensors": "tiny-sd-4.safetensors",
        "plain.safetensors": "tiny-sd-1.safetensors",
    }
    assert {s.name: s.reason for s in listing.skipped}["xl.safetensors"] == (
        "LoRA: no installed sdxl checkpoint to apply this sdxl LoRA to"
    )
    assert len([c for c in listing.checkpoints if c.lora is None]) == 4
    found, _ = bases(parse_choices(["plain=0.5,1"], ["sd1=tiny-sd-2.safetensors"]))
    assert (
        found["plain.safetensors"] == "tiny-sd-2.safetensors" and found["named.safetensors"] == "tiny-sd-3.safetensors"
    )
    rows = LoraSource(
        tiny_world.source(),
        lambda: lora_files_in(folder),
        parse_choices(["plain=0.5,1"]),
        tmp_path / "h.json",
        kinds="loras",
    ).list_checkpoints()
    assert [c.name for c in rows.checkpoints if c.lora.name == "plain.safetensors"] == [
        "plain.safetensors @ 0.5 on tiny-sd-1.safetensors",
        "plain.safetensors @ 1 on tiny-sd-1.safetensors",
    ]
    assert all(c.lora for c in rows.checkpoints)


@pytest.fixture(scope="module")
def lora_world(tiny_world, tmp_path_factory):
    """Three tiny LoRAs (one at two strengths) on tiny-sd-1, LoRA specs built beside copies of the checkpoint specs."""
    pytest.importorskip("peft")
    root = tmp_path_factory.mktemp("lora_world")
    folder = root / "loras"
    for i in range(3):
        write_tiny_lora(folder / f"lora-{i}.safetensors", seed=100 + i)
    shutil.copytree(tiny_world.root / "specs", root / "specs")
    choices = parse_choices(["lora-2=0.5,1"])
    source = LoraSource(tiny_world.source(), lambda: lora_files_in(folder), choices, root / "h.json")
    gmi = tiny_world.gmi(spec_root=root / "specs")
    generator = tiny_world.generator()
    report = gmi.build(source, generator)
    return gmi, source, generator, report, folder


def test_lora_specs_build_on_one_loaded_base_and_show_in_status(lora_world):
    gmi, source, generator, report, _ = lora_world
    assert len(report.built) == 4 and not report.failed
    assert generator.base_loads == 1  # four LoRA specs on tiny-sd-1: the base was loaded once
    statuses, _ = gmi.status(source)
    loras = [s for s in statuses if s.model_kind == "lora"]
    assert len(loras) == 4 and all(s.state == "ready" for s in statuses)
    assert {s.lora["strength"] for s in loras if s.lora["lora_name"] == "lora-2.safetensors"} == {0.5, 1.0}
    spec = gmi.store.load(gmi.key(source.list_checkpoints().checkpoints[-1]))
    assert spec.extra["model"]["kind"] == "lora" and spec.extra["model"]["base_name"] == "tiny-sd-1.safetensors"


def test_a_render_with_a_lora_is_identified_as_that_row(lora_world, tiny_world):
    """The query repeats one spec cell (prompt and seed) of LoRA k at strength w: on the tiny random models a LoRA's
    change is chaotic, not a style, so only the same cell ties a render to its row (docs/loras.md)."""
    gmi, source, generator, _, _ = lora_world
    models = {c.name: c for c in source.list_checkpoints().checkpoints}
    spec = gmi.store.load(gmi.key(models["tiny-sd-1.safetensors"]))
    prompt, seed = spec.prompts[3], spec.seeds[3][1]
    for name in (
        "lora-0.safetensors @ 1 on tiny-sd-1.safetensors",
        "lora-2.safetensors @ 0.5 on tiny-sd-1.safetensors",
    ):
        images = generator.generate(models[name], prompt, [seed], tiny_world.settings)
        result = gmi.identify(images, prompt=prompt, source=source)
        assert result.best.name == name and result.best.model_kind == "lora"
        row = result.to_dict()["ranking"][0]
        assert row["lora"]["lora_name"] == name.split(" @ ")[0] and row["model_kind"] == "lora"
    plain = generator.generate(models["tiny-sd-2.safetensors"], prompt, [777_003], tiny_world.settings)
    only_loras = LoraSource(source.checkpoints, source.lora_files, source.choices, source.hash_cache, kinds="loras")
    ranking = gmi.identify(plain, prompt=prompt, source=only_loras).ranking
    assert ranking and all(r.model_kind == "lora" for r in ranking)
    only_checkpoints = LoraSource(
        source.checkpoints, source.lora_files, source.choices, source.hash_cache, kinds="checkpoints"
    )
    result = gmi.identify(plain, prompt=prompt, source=only_checkpoints)
    assert result.best.name == "tiny-sd-2.safetensors" and all(r.model_kind == "checkpoint" for r in result.ranking)


def test_an_interrupted_lora_build_resumes(lora_world, tiny_world, tmp_path):
    _, source, _, _, _ = lora_world
    gmi = tiny_world.gmi(spec_root=tmp_path / "specs")
    only = LoraSource(
        source.checkpoints,
        source.lora_files,
        LoraChoices(),
        source.hash_cache,
        kinds="loras",
        on_base="tiny-sd-1.safetensors",
    )
    calls = []
    report = gmi.build(
        only, tiny_world.generator(), should_cancel=lambda: any(p.images_rendered for p in calls), progress=calls.append
    )
    assert report.cancelled
    first = [s for s in gmi.status(only)[0] if s.state == "partial"]
    assert len(first) == 1 and first[0].images_done == 2
    progress = []
    report = gmi.build(only, tiny_world.generator(), progress=progress.append)
    assert not report.cancelled and {s.state for s in gmi.status(only)[0]} == {"ready"}
    assert progress[-1].images_planned == 3 * 20 - 2  # the two saved images are not rendered again


def test_lora_tensors_change_with_the_seed():
    a, b, near = tiny_lora_state(1), tiny_lora_state(2), tiny_lora_state(3, near=1)
    key = next(k for k in a if "attn" in k and k.endswith("lora_down.weight"))
    assert not a[key].equal(b[key])
    assert (near[key] - a[key]).abs().mean() < (b[key] - a[key]).abs().mean() / 3


def test_cli_lists_builds_and_identifies_lora_rows(lora_world, tiny_world, tmp_path, capsys):
    from gmi_core.budgets import cell_seed
    from gmi_core.cli import main
    from gmi_core.images import load_image

    _, source, generator, _, folder = lora_world
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(tiny_world.prompt_set.prompts[:2]))
    s = tiny_world.settings
    common = ["--models", str(tiny_world.models), "--home", str(tmp_path), "--encoder", str(tiny_world.encoder_file)]
    common += ["--prompt-set", str(prompts), "--budget", "allx2", "--steps", str(s.steps), "--cfg", str(s.cfg)]
    common += ["--width", str(s.width), "--height", str(s.height), "--loras", str(folder)]
    assert main(["build", *common, "--kind", "loras", "--config", str(tiny_world.config), "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)["built"]) == 3
    assert main(["specs", *common, "--lora-strength", "lora-2=0.5,1", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    kinds = {r["name"]: (r["model_kind"], r["state"]) for r in rows}
    assert kinds["tiny-sd-1.safetensors"] == ("checkpoint", "missing")
    assert kinds["lora-1.safetensors @ 1 on tiny-sd-1.safetensors"] == ("lora", "ready")
    assert kinds["lora-2.safetensors @ 0.5 on tiny-sd-1.safetensors"] == ("lora", "missing")
    model = next(c for c in source.list_checkpoints().checkpoints if c.name.startswith("lora-1.safetensors @ 1"))
    seed = cell_seed(
        0, 1, 0
    )  # a spec cell of the 2-prompt set: see test_a_render_with_a_lora_is_identified_as_that_row
    generator.generate(model, tiny_world.prompt_set.prompts[1], [seed], s)[0].save(tmp_path / "query.png")
    assert main(["identify", str(tmp_path / "query.png"), *common, "--kind", "loras", "--json"]) == 0
    ranking = json.loads(capsys.readouterr().out)["ranking"]
    assert ranking[0]["name"] == model.name and {r["model_kind"] for r in ranking} == {"lora"}
    assert load_image(tmp_path / "query.png").size == (s.width, s.height)
    assert main(["specs", *common[:-2], "--kind", "loras"]) == 2
    assert "--kind loras and --on-checkpoint need --loras FOLDER" in capsys.readouterr().err


def test_a1111_prompt_tags_replace_the_earlier_gmi_tag_and_the_same_lora():
    from gmi_core.loras import prompt_tag, with_lora_tag

    tag = prompt_tag("styles/ink.safetensors", 0.8)
    assert tag == "<lora:ink:0.8>"
    assert with_lora_tag("a cat", tag) == "a cat <lora:ink:0.8>"
    assert with_lora_tag("a cat, <lora:ink:1>", tag) == "a cat <lora:ink:0.8>"  # not applied twice
    kept = "a cat <lora:detail:0.3> <lora:old:1>"
    assert with_lora_tag(kept, tag, replace="<lora:old:1>") == "a cat <lora:detail:0.3> <lora:ink:0.8>"
    assert with_lora_tag("", tag) == tag


def test_images_recording_a_lora_grow_the_combinations_observed_spec(lora_world, tiny_world, tmp_path):
    from PIL.PngImagePlugin import PngInfo

    from gmi_core.loras import addnet_hash
    from gmi_core.observed import import_images

    gmi, source, generator, _, folder = lora_world
    listing = source.list_checkpoints()
    models = {c.name: c for c in listing.checkpoints}
    model = models["lora-1.safetensors @ 1 on tiny-sd-1.safetensors"]
    base = models["tiny-sd-1.safetensors"]
    images = tmp_path / "images"
    images.mkdir()
    lora_hash = addnet_hash(folder / "lora-1.safetensors")[:12]
    cases = {
        "hashed.png": f'a red barn <lora:lora-1:1>\nSteps: 4, Seed: 5, Model hash: {base.sha256[:10]}, Lora hashes: "lora-1: {lora_hash}"',
        "named.png": f"a blue boat <lora:lora-1>\nSteps: 4, Seed: 6, Model hash: {base.sha256[:10]}",
        "two.png": f"a cat <lora:lora-1:1> <lora:lora-0:1>\nSteps: 4, Seed: 7, Model hash: {base.sha256[:10]}",
        "missing.png": f"a dog <lora:nowhere:1>\nSteps: 4, Seed: 8, Model hash: {base.sha256[:10]}",
    }
    for index, (name, text) in enumerate(cases.items()):
        info = PngInfo()
        info.add_text("parameters", text)
        image = generator.generate(model, text.split("<")[0], [900 + index], tiny_world.settings)[0]
        image.save(images / name, pnginfo=info)
    loaders = [  # a ComfyUI editor graph only (no API graph): loader widgets; the muted LoRA loader does not count
        {"type": "CheckpointLoaderSimple", "mode": 0, "widgets_values": [base.name]},
        {"type": "LoraLoader", "mode": 0, "widgets_values": ["lora-1.safetensors", 1, 1]},
        {"type": "LoraLoader", "mode": 2, "widgets_values": ["lora-0.safetensors", 1, 1]},
    ]
    info = PngInfo()
    info.add_text("workflow", json.dumps({"nodes": loaders}))
    generator.generate(model, "a green kite", [905], tiny_world.settings)[0].save(images / "editor.png", pnginfo=info)
    report = import_images(gmi, listing, images).to_dict()
    assert report["added"] == {model.name: 3} and report["interrogated_prompts"] == 1
    reasons = {item["file"]: item["reason"] for item in report["skipped"]}
    assert "2 LoRAs (lora-1, lora-0): ambiguous" in reasons["two.png"]
    assert reasons["missing.png"] == "LoRA 'nowhere' is not installed (or not listed as a LoRA spec)"
    observed = gmi.store.load(observed_key_of(model.sha256, gmi))
    assert observed.extra["model"]["kind"] == "lora" and observed.extra["model"]["lora_name"] == "lora-1.safetensors"
    ranking = gmi.identify([image], prompt="a blue boat", source=source).ranking
    assert next(r for r in ranking if r.sha256 == model.sha256).kind == "mixed"  # generated + observed, one row


def observed_key_of(sha256, gmi):
    from gmi_core.observed import observed_key

    return observed_key(sha256, gmi.encoder.encoder_id)


def test_bench_roundtrip_lora_block(tiny_world, tmp_path):
    """bench roundtrip --loras N at toy size: the results_lora keys, a near pair, two strengths, one base load."""
    from gmi_core.bench.lora_roundtrip import lora_tables, run_loras
    from gmi_core.engine import Gmi

    shutil.copytree(tiny_world.root / "specs", tmp_path / "specs")  # the checkpoints' specs: the mixed rows
    gmi = Gmi(tmp_path / "specs", tiny_world.gmi().encoder, tiny_world.prompt_set, "2x1", tiny_world.settings)
    source = tiny_world.source()
    checkpoints = source.list_checkpoints().checkpoints
    evaluation = tiny_world.prompt_set.head(1)
    generator = tiny_world.generator()
    block = run_loras(gmi, generator, source, checkpoints, evaluation, tiny_world.settings, tmp_path, 4, 1.0)
    assert (block["n_loras"], block["n_lora_specs"]) == (4, 5)  # lora-00 also at strength 0.5
    assert block["near_pairs"] == [["lora-03.safetensors", "lora-02.safetensors"]]
    assert block["cost"]["base_loads_for_all_lora_specs"] == 1
    for rows in ("lora_rows", "mixed_rows"):
        assert block["results"][rows]["n_tasks"] == 5 and 1 <= block["results"][rows]["mean_rank"] <= 5
    assert 0 <= block["near_pairs_top2"] <= 1
    assert "| LoRA rows | 5 |" in lora_tables(block)
