"""Library map: near-duplicates built from one base are grouped, distinct checkpoints are not; MDS and the image."""

from __future__ import annotations

import json
import shutil

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from gmi_core.bench.simulation import SimConfig, make_family
from gmi_core.cli import main
from gmi_core.library_map import NEAR_DUPLICATE_THRESHOLD, build_map, classical_mds
from gmi_core.protocols import GenerationSettings
from gmi_core.spec import Spec


def simulated_specs(family: str, m: int = 16, seed: int = 4):
    cfg = SimConfig(d=128)
    world, platform, _ = make_family(family, cfg, seed, m)
    text = world.text(platform).half()
    z, _ = world.render(torch.arange(m), platform, cfg.images_per_prompt, pixels=False)
    n, s = len(platform), cfg.images_per_prompt
    specs = [
        Spec(
            f"c{i:02}",
            f"{i:064x}",
            "sim",
            "platform",
            "sim",
            [str(k) for k in range(n)],
            [[0] * s] * n,
            GenerationSettings(),
            z[i].half(),
            text,
            torch.zeros(n, s, 1, dtype=torch.float16),
            torch.zeros(n, 1, 1, 3, dtype=torch.uint8),
            torch.ones(n, s, dtype=torch.bool),
        )
        for i in range(m)
    ]
    return specs, text


def test_near_duplicate_lineages_are_grouped_and_distinct_checkpoints_are_not():
    specs, anchors = simulated_specs("b_near_duplicates")
    lib = build_map(specs, anchors)
    lineages = [sorted(f"c{i:02}" for i in range(16) if i % 4 == k) for k in range(4)]
    assert sorted(sorted(lib.names[i] for i in g) for g in lib.groups) == lineages
    distinct, own_anchors = simulated_specs("a_easy", seed=9)
    assert build_map(distinct, own_anchors).groups == []
    assert lib.coords.shape == (16, 2)


def test_classical_mds_recovers_planar_points():
    pts = np.random.default_rng(0).normal(size=(7, 2))
    d2 = ((pts[:, None] - pts[None]) ** 2).sum(-1)
    got = classical_mds(d2)
    assert np.allclose(((got[:, None] - got[None]) ** 2).sum(-1), d2, atol=1e-8)


def test_map_cli_groups_a_reupload_and_a_merge_of_real_checkpoints(tiny_world, tmp_path, capsys):
    """A re-upload (same weights, new file) and a light merge of one tiny checkpoint, specs built for real."""
    models = tmp_path / "models"
    shutil.copytree(tiny_world.models, models)
    base = sorted(models.glob("*.safetensors"))[0]
    other = sorted(models.glob("*.safetensors"))[1]
    a, b = load_file(str(base)), load_file(str(other))
    save_file(a, str(models / "reupload.safetensors"), metadata={"uploader": "someone else"})
    merged = {
        k: (0.97 * v.float() + 0.03 * b[k].float()).to(v.dtype) if v.is_floating_point() else v for k, v in a.items()
    }
    save_file(merged, str(models / "merge.safetensors"))
    for cfg in tiny_world.models.glob("*.yaml"):
        shutil.copy(cfg, models / cfg.name)
    home = tmp_path / "home"
    shutil.copytree(tiny_world.root / "specs", home / "specs")
    gmi = tiny_world.gmi(spec_root=home / "specs")
    from gmi_core.checkpoints import FolderCheckpointSource

    source = FolderCheckpointSource(models, hash_cache=home / "hashes.json")
    report = gmi.build(source, tiny_world.generator())
    assert sorted(report.built) == ["merge.safetensors", "reupload.safetensors"], report.to_dict()
    prompts = tmp_path / "prompts.json"  # the world's prompt set (the platform set's head) as a file
    prompts.write_text(json.dumps(list(tiny_world.prompt_set.prompts)))
    assert (
        main(
            [
                "map",
                "--models",
                str(models),
                "--home",
                str(home),
                "--encoder",
                str(tiny_world.encoder_file),
                "--prompt-set",
                str(prompts),
                "--json",
                "--out",
                str(tmp_path / "map.png"),
            ]
        )
        == 0
    )
    data = json.loads(capsys.readouterr().out)
    groups = [set(g) for g in data["groups"]]
    assert {base.name, "reupload.safetensors", "merge.safetensors"} in groups, data
    distinct = [
        p.name
        for p in sorted(models.glob("*.safetensors"))[1:4]
        if p.name not in ("merge.safetensors", "reupload.safetensors")
    ]
    assert not any(len(g & set(distinct)) > 1 for g in groups), data
    assert data["threshold"] == NEAR_DUPLICATE_THRESHOLD
    from PIL import Image

    assert Image.open(tmp_path / "map.png").size == (900, 700)
    assert (
        main(
            [
                "map",
                "--models",
                str(models),
                "--home",
                str(home),
                "--encoder",
                str(tiny_world.encoder_file),
                "--prompt-set",
                str(prompts),
            ]
        )
        == 0
    )
    assert "group 1: " in capsys.readouterr().out
