"""The GMI tab in a real browser, inside the REAL Automatic1111 WebUI (opt-in, like test_a1111_integration.py).

Needs GMI_A1111_DIR (a stable-diffusion-webui checkout, see test_a1111_integration.py), the `playwright` Python package
and a system Chromium at /usr/bin/chromium (no `playwright install`). Reuses the integration test's WebUI fixture: four
tiny random SD1 checkpoints, specs built through /gmi/v1/build. A query image is rendered from one checkpoint with an
unseen prompt and seed; then, in Chromium: open the WebUI, switch to the GMI tab, upload the image, click Identify,
check the rendered ranking (generating checkpoint first, thumbnails loaded), click "Use this checkpoint" and check that
the quicksettings checkpoint dropdown and /sdapi/v1/options follow. Saves docs/a1111-identify.png.

On the same WebUI: a LoRA row's "Use this checkpoint" puts ``<lora:name:w>`` into the txt2img prompt (the user's text
kept, a second switch replacing gmi's tag; docs/a1111-identify-lora.png), and the Refine button on a near-duplicate
pair shows the ranking before and renders only the contenders' missing spec images.
"""

from __future__ import annotations

import base64
import importlib.util
import os
import re
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests import test_a1111_integration as integration

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
]
SCREENSHOT = Path(__file__).resolve().parents[1] / "docs" / "a1111-identify.png"
LORA_SCREENSHOT = SCREENSHOT.with_name("a1111-identify-lora.png")
UI_TIMEOUT_MS = 180_000  # the WebUI page is heavy and the test machine has 2 shared cores

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not os.environ.get("GMI_A1111_DIR"),
        reason="set GMI_A1111_DIR to a stable-diffusion-webui checkout to run the real-WebUI browser test",
    ),
    pytest.mark.skipif(
        importlib.util.find_spec("playwright") is None,
        reason="the browser test needs the `playwright` Python package (pip install playwright)",
    ),
    pytest.mark.skipif(not CHROMIUM.is_file(), reason=f"the browser test needs a system Chromium at {CHROMIUM}"),
]

server = integration.server  # the module-scoped WebUI fixture (a separate WebUI for this module)


def test_identify_and_switch_in_the_gmi_tab(server, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    from gmi_core.prompts import load_prompt_set

    server.post("/sdapi/v1/options", {**server.settings, "gmi_models": "checkpoints"})
    job = server.build_specs()
    assert job["state"] == "done" and not job["report"]["failed"], job
    _, specs = server.get("/gmi/v1/specs")
    assert len(specs["checkpoints"]) == integration.CHECKPOINTS
    assert all(c["state"] == "ready" for c in specs["checkpoints"])
    titles = {c["name"]: c["title"] for c in specs["checkpoints"]}

    _, options = server.get("/sdapi/v1/options")
    loaded = options["sd_model_checkpoint"]
    target = next(name for name in sorted(titles)[::-1] if titles[name] != loaded)  # so the switch is a real change
    spec_prompts = set(load_prompt_set("platform").prompts[: integration.SPEC_PROMPTS])
    prompt = next(p for p in load_prompt_set("evaluation").prompts if p not in spec_prompts)
    image, info = integration.txt2img(server, prompt, 777_013, titles[target])
    assert info["sd_model_name"] == target.removesuffix(".safetensors")
    query = tmp_path / "query.png"
    query.write_bytes(base64.b64decode(image.split(",", 1)[-1]))
    print(f"\nquery from {target} ({prompt!r}, seed 777013); checkpoint loaded before: {loaded!r}")

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.set_default_timeout(UI_TIMEOUT_MS)
            errors = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.goto(server.url, wait_until="domcontentloaded")
            dropdown = page.locator("#setting_sd_model_checkpoint input")
            expect(dropdown).to_have_value(loaded, timeout=UI_TIMEOUT_MS)  # the UI has loaded its settings

            page.locator("#tabs > .tab-nav button", has_text="GMI").click()
            tab = page.locator("#tab_gmi")
            expect(tab).to_be_visible()
            tab.locator("#gmi_reference input[type=file]").set_input_files(str(query))
            expect(tab.locator("#gmi_reference img")).to_be_visible()
            page.locator("#gmi_identify").click()

            table = page.locator("#gmi_ranking table.gmi-ranking")
            expect(table).to_be_visible(timeout=UI_TIMEOUT_MS)
            rows = table.locator("tr:has(td)")
            expect(rows).to_have_count(integration.CHECKPOINTS)
            ranking = [rows.nth(i).locator("td").nth(1).inner_text() for i in range(rows.count())]
            print(f"rendered ranking: {ranking}")
            assert ranking[0] == target
            assert sorted(ranking) == sorted(titles)
            thumbs = table.locator("img")
            assert thumbs.count() >= integration.CHECKPOINTS
            loaded_thumbs = thumbs.evaluate_all("imgs => imgs.filter(i => i.complete && i.naturalWidth > 0).length")
            assert loaded_thumbs == thumbs.count(), f"{thumbs.count() - loaded_thumbs} thumbnails did not render"
            expect(page.locator("#gmi_choice input")).to_have_value(titles[target])

            tab.screenshot(path=str(SCREENSHOT))
            page.locator("#gmi_use").click()
            expect(dropdown).to_have_value(titles[target], timeout=UI_TIMEOUT_MS)
            assert not errors, errors
        finally:
            browser.close()

    _, options = server.get("/sdapi/v1/options")
    assert options["sd_model_checkpoint"] == titles[target]
    print(f"quicksettings dropdown and /sdapi/v1/options: {options['sd_model_checkpoint']!r}; screenshot {SCREENSHOT}")


@contextmanager
def webui_page(server):
    """Chromium on the WebUI, once its settings have loaded; fails on any uncaught page error."""
    from playwright.sync_api import expect, sync_playwright

    expect.set_options(timeout=UI_TIMEOUT_MS)  # every wait below: the page is heavy on 2 shared cores
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.set_default_timeout(UI_TIMEOUT_MS)
            errors = []
            page.on("pageerror", lambda exc: errors.append(f"{exc}\n{exc.stack}"))
            page.goto(server.url, wait_until="domcontentloaded")
            _, options = server.get("/sdapi/v1/options")
            expect(page.locator("#setting_sd_model_checkpoint input")).to_have_value(options["sd_model_checkpoint"])
            yield page
            assert not errors, errors
        finally:
            browser.close()


def open_gmi_tab(page, query: Path, prompt: str = "", top_k: int | None = None):
    """The GMI tab with ``query`` uploaded, the prompt typed and, if given, the Top k slider set."""
    from playwright.sync_api import expect

    page.locator("#tabs > .tab-nav button", has_text="GMI").click()
    tab = page.locator("#tab_gmi")
    expect(tab).to_be_visible()
    tab.locator("#gmi_reference input[type=file]").set_input_files(str(query))
    expect(tab.locator("#gmi_reference img")).to_be_visible()
    if prompt:
        page.locator("#gmi_prompt textarea").fill(prompt)
    if top_k:
        page.locator("#gmi_top_k input[type=number]").fill(str(top_k))
        page.locator("#gmi_top_k input[type=number]").press("Enter")
    return tab


def ranking_names(page, count: int | None = None) -> list[str]:
    """The names in the rendered ranking table (the name cell without its marks)."""
    from playwright.sync_api import expect

    rows = page.locator("#gmi_ranking table.gmi-ranking tr:has(td)")
    if count is not None:
        expect(rows).to_have_count(count)
    return [rows.nth(i).locator("td").nth(1).inner_text().split(" (")[0].strip() for i in range(rows.count())]


def choose(page, value: str) -> None:
    """Pick ``value`` in the tab's "Checkpoint" dropdown (Gradio 3 lists its options as li[data-value])."""
    from playwright.sync_api import expect

    page.locator("#gmi_choice input").click()
    page.locator(f"#gmi_choice li[data-value='{value}']").click()
    expect(page.locator("#gmi_choice input")).to_have_value(value)


def generate_in_txt2img(page) -> str:
    """Press the txt2img tab's Generate at 3 steps (tiny models, CPU); the infotext it shows. The size stays 512 px:
    typing into the width / height boxes raises the WebUI's own page error (Gradio's "reading 'props'")."""
    from playwright.sync_api import expect

    page.locator("#tabs > .tab-nav button", has_text="txt2img").click()
    steps = page.locator("#txt2img_steps input[type=number]")
    steps.fill("3")
    steps.press("Enter")
    info = page.locator("div#html_info_txt2img.prose")  # the inner one of two elements with that id
    page.locator("#txt2img_generate").click()
    expect(info).to_contain_text("Steps: 3")
    text = info.inner_text()
    page.locator("#tabs > .tab-nav button", has_text="GMI").click()
    return text


def write_query(server, tmp_path, prompt, seed, title, name="query.png") -> tuple[Path, str]:
    image, _ = integration.txt2img(server, prompt, seed, title)
    path = tmp_path / name
    path.write_bytes(base64.b64decode(image.split(",", 1)[-1]))
    return path, image


def test_use_this_checkpoint_puts_the_lora_tag_into_the_txt2img_prompt(server, tmp_path):
    """#21: two tiny LoRAs for tiny_sd1_0 (one at 0.5); a render of tiny-lora-0 at a spec cell is identified in the tab
    as that LoRA row (Refine keeps the LoRA choices); "Use this checkpoint" selects the base in the quicksettings and appends ``<lora:tiny-lora-0:1>``
    to the user's txt2img prompt, and the WebUI's Generate renders with both (its infotext); switching to the other
    LoRA row replaces the tag, to a plain checkpoint removes it."""
    from playwright.sync_api import expect

    from gmi_core.budgets import cell_seed
    from gmi_core.prompts import load_prompt_set
    from gmi_core.tiny_lora import write_lora_for_checkpoint

    models = server.data_dir / "models"
    base = "tiny_sd1_0.safetensors"
    for i in range(2):
        write_lora_for_checkpoint(
            models / "Lora" / f"tiny-lora-{i}.safetensors", models / "Stable-diffusion" / base, 700 + i
        )
    lora_settings = {"gmi_models": "both", "gmi_lora_strengths": "1; tiny-lora-1=0.5", "gmi_lora_bases": f"sd1={base}"}
    server.post("/sdapi/v1/options", {**server.settings, **lora_settings})
    try:
        job = server.build_specs()
        assert job["state"] == "done" and not job["report"]["failed"], job
        _, specs = server.get("/gmi/v1/specs")
        titles = {c["name"]: c["title"] for c in specs["checkpoints"]}
        rows = [f"tiny-lora-0 @ 1 on {base}", f"tiny-lora-1 @ 0.5 on {base}"]
        assert set(rows) < set(titles) and all(c["state"] == "ready" for c in specs["checkpoints"]), specs
        choices = [f"{titles[base]} <lora:tiny-lora-0:1>", f"{titles[base]} <lora:tiny-lora-1:0.5>"]
        plain = next(name for name in sorted(titles) if name.startswith("tiny_sd1_") and name != base)

        prompt = load_prompt_set("platform").prompts[1]
        query, _ = write_query(server, tmp_path, f"{prompt} <lora:tiny-lora-0:1>", cell_seed(0, 1, 0), titles[base])
        server.post("/sdapi/v1/options", {"sd_model_checkpoint": titles[plain]})  # so the switch is a real change
        user_text = "a watercolour fox, <lora:tiny-lora-1:0.8>"  # the user's own tag of a LoRA gmi then picks: replaced

        with webui_page(server) as page:
            box = page.locator("#txt2img_prompt textarea")
            box.fill(user_text)
            open_gmi_tab(page, query, prompt, top_k=len(titles))
            page.locator("#gmi_identify").click()
            ranking = ranking_names(page, len(titles))
            print(f"\nrendered ranking: {ranking}")
            assert ranking[0] == rows[0] and set(ranking) == set(titles)
            expect(page.locator("#gmi_choice input")).to_have_value(choices[0])
            page.locator("#tab_gmi").screenshot(path=str(LORA_SCREENSHOT))
            choose(page, choices[1])
            page.locator("#gmi_refine").click()  # unambiguous: renders nothing, answers with the same choices
            expect(page.locator("#gmi_ranking .gmi-refine")).to_contain_text("0 image(s) rendered")
            expect(page.locator("#gmi_choice input")).to_have_value(choices[0])

            dropdown = page.locator("#setting_sd_model_checkpoint input")
            page.locator("#gmi_use").click()
            expect(dropdown).to_have_value(titles[base])
            expect(box).to_have_value("a watercolour fox, <lora:tiny-lora-1:0.8> <lora:tiny-lora-0:1>")
            first = box.input_value()
            generated = generate_in_txt2img(page)  # the WebUI's own Generate sees the tag and the base
            applied = re.search(r'Lora hashes: "([^"]*)"', generated)
            assert generated.startswith(first) and applied and "tiny-lora-0: " in applied.group(1), generated
            assert f"Model: {base.removesuffix('.safetensors')}" in generated, generated

            choose(page, choices[1])
            page.locator("#gmi_use").click()
            expect(box).to_have_value("a watercolour fox <lora:tiny-lora-1:0.5>")
            second = box.input_value()

            choose(page, titles[plain])
            page.locator("#gmi_use").click()
            expect(dropdown).to_have_value(titles[plain])
            expect(box).to_have_value("a watercolour fox")
        print(f"txt2img prompt after the switches: {first!r} -> {second!r} -> 'a watercolour fox'")
    finally:
        server.post("/sdapi/v1/options", {**server.settings, "gmi_models": "checkpoints"})


def test_refine_button_renders_only_the_contenders_missing_images(server, tmp_path):
    """#22: a near-duplicate of tiny_sd1_0 (one byte of its last tensor changed); a query of tiny_sd1_0 is ambiguous
    in the tab; Refine shows the ranking before and the images it rendered per checkpoint, and those counts are
    exactly what /gmi/v1/specs reports added to the contenders' specs (nothing to any other checkpoint)."""
    from playwright.sync_api import expect

    twin = server.near_duplicate("tiny_sd1_0.safetensors")
    server.post("/sdapi/v1/options", {**server.settings, "gmi_models": "checkpoints"})
    try:
        assert server.build_specs()["state"] == "done"
        _, specs = server.get("/gmi/v1/specs")
        before = {c["name"]: c["images_done"] for c in specs["checkpoints"]}
        titles = {c["name"]: c["title"] for c in specs["checkpoints"]}
        assert twin.name in before
        query, _ = write_query(
            server, tmp_path, "a lighthouse on a cliff at dusk", 313_133, titles["tiny_sd1_0.safetensors"]
        )

        with webui_page(server) as page:
            open_gmi_tab(page, query)
            page.locator("#gmi_identify").click()
            ambiguous = page.locator("#gmi_ranking .gmi-ambiguous")
            expect(ambiguous).to_be_visible()
            contenders = ambiguous.inner_text()
            identified = ranking_names(page)
            print(f"\nbefore refine: {identified}; {contenders}")
            page.locator("#gmi_refine").click()
            note = page.locator("#gmi_ranking .gmi-refine")
            expect(note).to_be_visible()
            shown = note.inner_text()
            refined = ranking_names(page)
        print(f"refine display: {shown}\nafter refine: {refined}")

        listed = [
            name.strip() for name in re.findall(r"\d+\. ([^,\n]+)", re.search(r"Before refine: (.*)", shown).group(1))
        ]
        assert listed and listed == identified[: len(listed)], (listed, identified)
        total, parts = re.search(r"(\d+) image\(s\) rendered \((.*)\)", shown).groups()
        rendered = {name: int(k) for name, k in re.findall(r"(\S+) \+(\d+)", parts)}
        _, specs = server.get("/gmi/v1/specs")
        after = {c["name"]: c["images_done"] for c in specs["checkpoints"]}
        added = {name: after[name] - before[name] for name in before if after[name] != before[name]}
        print(f"images added per spec (status API): {added}")
        assert added == rendered and sum(rendered.values()) == int(total) > 0
        assert set(rendered) <= {"tiny_sd1_0.safetensors", twin.name} and all(n in contenders for n in rendered)
        assert refined[0] in ("tiny_sd1_0.safetensors", twin.name)
    finally:
        twin.unlink()
        twin.with_suffix(".yaml").unlink()
        server.post("/sdapi/v1/refresh-checkpoints", {})
