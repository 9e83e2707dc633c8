"""The command line, in process: build, specs, identify --json, and the demo."""

import json

import pytest

from gmi_core.cli import main


def _engine_args(world, home):
    prompts = home / "prompts.txt"
    prompts.write_text("\n".join(world.prompt_set.prompts[:3]))
    s = world.settings
    return [
        "--models",
        str(world.models),
        "--home",
        str(home),
        "--encoder",
        str(world.encoder_file),
        "--prompt-set",
        str(prompts),
        "--budget",
        "allx2",
        "--steps",
        str(s.steps),
        "--cfg",
        str(s.cfg),
        "--width",
        str(s.width),
        "--height",
        str(s.height),
    ]


def test_build_specs_identify_json(tiny_world, tmp_path, capsys):
    args = _engine_args(tiny_world, tmp_path)
    assert main(["build", *args, "--config", str(tiny_world.config), "--json"]) == 0
    out = capsys.readouterr()
    assert len(json.loads(out.out)["built"]) == 4
    assert "24 image(s) to render for 4 checkpoint(s)" in out.err, "the plan is shown before the build starts"
    assert out.err.count("gmi: hashing") == 4, "first sight of each checkpoint is announced"

    assert main(["specs", *args, "--json"]) == 0
    out = capsys.readouterr()
    assert "gmi: hashing" not in out.err, "hashes come from the cache afterwards"
    rows = json.loads(out.out)
    assert [r["state"] for r in rows] == ["ready"] * 4 and all(r["prompts_done"] == 3 for r in rows)
    assert all(r["images_done"] == 6 and r["family"] == "sd1" and r["current"] for r in rows)

    assert main(["specs", *args[:-8], "--budget", "allx3", "--steps", "9", *args[-6:]]) == 0
    table = capsys.readouterr().out
    assert "12 image(s) missing" in table and table.count("partial") == 4 and "steps 4 (now 9)" in table

    checkpoint = tiny_world.source().list_checkpoints().checkpoints[2]
    image = tiny_world.generator().generate(
        checkpoint, "a tiger walking through the jungle", [4242], tiny_world.settings
    )[0]
    image.save(tmp_path / "query.png")
    assert main(["identify", str(tmp_path / "query.png"), *args, "--json", "--top-k", "3"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert {"method", "pseudo_prompt", "ranking"} <= set(out) and out["method"] == "gmi"
    assert len(out["ranking"]) == 3 and out["ranking"][0]["name"] == checkpoint.name
    assert set(out["ranking"][0]) >= {"rank", "name", "sha256", "score", "top_prompts", "partial", "images_done"}

    assert main(["identify", str(tmp_path / "query.png"), *args]) == 0
    assert checkpoint.name in capsys.readouterr().out


def test_identify_reports_bad_image_clearly(tiny_world, tmp_path, capsys):
    (tmp_path / "bad.jpg").write_text("nope")
    assert main(["identify", str(tmp_path / "bad.jpg"), *_engine_args(tiny_world, tmp_path)]) == 2
    assert "not an image file" in capsys.readouterr().err


def test_missing_models_folder(tmp_path, capsys):
    assert main(["specs", "--models", str(tmp_path / "nowhere"), "--home", str(tmp_path)]) == 2
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.slow
def test_demo_json(tmp_path, capsys):
    assert main(["demo", "--json", "--workdir", str(tmp_path)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["true_checkpoint"] == out["ranking"][0]["name"]
    assert len(out["ranking"]) == 4 and out["pseudo_prompt"]
    report = (tmp_path / "report.html").read_text()
    assert out["true_checkpoint"] in report and report.count("data:image/png;base64") >= 4


def test_the_benchmarks_load_only_for_the_bench_command(tmp_path):
    """`gmi specs` (any command but bench) imports neither gmi_core.bench nor fastrank; `gmi bench` still works."""
    import subprocess
    import sys

    models = tmp_path / "models"
    models.mkdir()
    code = (
        "import sys\nfrom gmi_core.cli import main\n"
        f"main(['specs', '--models', {str(models)!r}, '--home', {str(tmp_path / 'home')!r}, '--encoder', 'x'])\n"
        "print(sorted(m for m in sys.modules if m.startswith(('gmi_core.bench', 'gmi_core.fastrank'))))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip().splitlines()[-1] == "[]", out.stdout + out.stderr
    listed = subprocess.run([sys.executable, "-m", "gmi_core", "--help"], capture_output=True, text=True, timeout=120)
    assert "bench" in listed.stdout
    bench = subprocess.run(
        [sys.executable, "-m", "gmi_core", "bench", "--help"], capture_output=True, text=True, timeout=120
    )
    assert bench.returncode == 0 and all(c in bench.stdout for c in ("synthetic", "roundtrip", "scale", "identify"))
