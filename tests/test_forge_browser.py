"""The GMI tab in a real browser, inside the REAL Forge (opt-in, like test_forge_integration.py).

Needs GMI_FORGE_DIR (see test_forge_integration.py), the `playwright` Python package and a system Chromium at
/usr/bin/chromium (no `playwright install`). Reuses the integration test's Forge fixture: small random SD1 checkpoints,
specs built through /gmi/v1/build. A query image is rendered from one checkpoint with an unseen prompt and seed; then,
in Chromium: open Forge, switch to the GMI tab (Gradio 4), upload the image, click Identify, check the rendered
ranking (generating checkpoint first, thumbnails loaded), click "Use this checkpoint" and check that Forge's own
checkpoint dropdown and /sdapi/v1/options follow; the Build specs tab shows every spec ready and its button answers
through Forge's progress JavaScript. The GMI tab must add no JavaScript error. Saves docs/forge-identify.png.
"""

from __future__ import annotations

import base64
import importlib.util
import os
from pathlib import Path

import pytest

from tests import test_forge_integration as integration
from tests.test_a1111_browser import CHROMIUM, CHROMIUM_ARGS

SCREENSHOT = Path(__file__).resolve().parents[1] / "docs" / "forge-identify.png"
UI_TIMEOUT_MS = 180_000  # Forge's page is heavy and the test machine has 2 shared cores

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not os.environ.get("GMI_FORGE_DIR"),
        reason="set GMI_FORGE_DIR to a stable-diffusion-webui-forge checkout to run the real-Forge browser test",
    ),
    pytest.mark.skipif(
        importlib.util.find_spec("playwright") is None,
        reason="the browser test needs the `playwright` Python package (pip install playwright)",
    ),
    pytest.mark.skipif(not CHROMIUM.is_file(), reason=f"the browser test needs a system Chromium at {CHROMIUM}"),
]

server = integration.server  # the module-scoped Forge fixture (a separate Forge for this module)


def test_identify_and_switch_in_the_gmi_tab(server, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    from gmi_core.prompts import load_prompt_set

    server.post("/sdapi/v1/options", server.settings)
    job = server.build_specs()
    assert job["state"] == "done" and not job["report"]["failed"], job
    _, specs = server.get("/gmi/v1/specs")
    assert all(c["state"] == "ready" for c in specs["checkpoints"])
    titles = {c["name"]: c["title"] for c in specs["checkpoints"]}

    _, options = server.get("/sdapi/v1/options")
    selected = options["sd_model_checkpoint"]
    target = next(name for name in sorted(titles)[::-1] if titles[name] != selected)  # a real change
    spec_prompts = set(load_prompt_set("platform").prompts[: integration.SPEC_PROMPTS])
    prompt = next(p for p in load_prompt_set("evaluation").prompts if p not in spec_prompts)
    image, info = integration.txt2img(server, prompt, 777_013, titles[target])
    assert info["sd_model_name"] == target.removesuffix(".safetensors")
    query = tmp_path / "query.png"
    query.write_bytes(base64.b64decode(image.split(",", 1)[-1]))
    print(f"\nquery from {target} ({prompt!r}, seed 777013); checkpoint selected before: {selected!r}")

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.set_default_timeout(UI_TIMEOUT_MS)
            errors = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.goto(server.url, wait_until="domcontentloaded")
            dropdown = page.locator(".model_selection input").first  # Forge's checkpoint dropdown
            expect(dropdown).to_have_value(selected, timeout=UI_TIMEOUT_MS)

            # errors raised before the GMI tab is used are Forge's own page's (none may name gmi); from here on, none
            before_gmi = list(errors)
            assert not [e for e in before_gmi if "gmi" in e.lower()], before_gmi
            page.locator("#tabs > .tab-nav button", has_text="GMI").click()
            tab = page.locator("#tab_gmi")
            expect(tab).to_be_visible()
            tab.locator("#gmi_reference input[type=file]").set_input_files(str(query))
            expect(tab.locator("#gmi_reference img").first).to_be_visible()
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
            expect(page.locator("#gmi_modules")).to_be_visible()

            tab.screenshot(path=str(SCREENSHOT))
            page.locator("#gmi_use").click()
            expect(dropdown).to_have_value(target, timeout=UI_TIMEOUT_MS)  # Forge names checkpoints without hash

            # Build specs: the status table (a Gradio 4 generator) and the button behind Forge's progress JavaScript
            tab.locator("button", has_text="Build specs").first.click()
            spec_table = page.locator("#gmi_spec_table")
            expect(spec_table).to_contain_text("tiny_sd1_0.safetensors", timeout=UI_TIMEOUT_MS)
            expect(spec_table.locator("td", has_text="ready")).to_have_count(integration.CHECKPOINTS)
            page.locator("#gmi_build").click()  # every spec is ready: nothing selected, nothing rendered
            expect(page.locator("#gmi_build_result")).to_contain_text("Nothing selected", timeout=UI_TIMEOUT_MS)
            assert errors == before_gmi, errors[len(before_gmi) :]
            print(f"JavaScript errors of Forge's own page before the GMI tab was used: {before_gmi}")
        finally:
            browser.close()

    _, options = server.get("/sdapi/v1/options")
    assert options["sd_model_checkpoint"] == target
    print(
        f"Forge's checkpoint dropdown and /sdapi/v1/options: {options['sd_model_checkpoint']!r}; screenshot {SCREENSHOT}"
    )
