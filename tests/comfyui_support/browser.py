"""The real ComfyUI front end in headless Chromium (Playwright driving the system /usr/bin/chromium; no
`playwright install`). Opt-in by presence: tests skip when either is missing."""

from __future__ import annotations

import importlib.util
import json
import urllib.request
from contextlib import contextmanager
from pathlib import Path

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--hide-scrollbars",
]
VIEWPORT = {"width": 1500, "height": 950}
UI_TIMEOUT_MS = 180_000  # the front end is heavy and the test machine has 2 shared cores


def missing() -> str | None:
    """Why the browser tests cannot run here, or None."""
    if importlib.util.find_spec("playwright") is None:
        return "the browser test needs the `playwright` Python package (pip install -e '.[browser]')"
    if not CHROMIUM.is_file():
        return f"the browser test needs a system Chromium at {CHROMIUM} (apt-get install chromium)"
    return None


def quiet_first_run(server_url: str) -> None:
    """No first-run template browser or minimap over the canvas (front end settings, stored by the server)."""
    for key, value in (("Comfy.TutorialCompleted", True), ("Comfy.Minimap.Visible", False)):
        req = urllib.request.Request(
            f"{server_url}/settings/{key}", json.dumps(value).encode(), {"Content-Type": "application/json"}
        )
        urllib.request.urlopen(req, timeout=10).read()


@contextmanager
def comfy_page(server_url: str):
    """A page with the ComfyUI front end loaded; yields (page, errors), errors being uncaught page exceptions."""
    from playwright.sync_api import sync_playwright

    quiet_first_run(server_url)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport=VIEWPORT)
            page.set_default_timeout(UI_TIMEOUT_MS)
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.goto(server_url + "/")
            page.wait_for_function("!!(window.app && app.graph && app.canvas && app.extensionManager)")
            page.wait_for_timeout(1500)
            close_banners(page)
            yield page, errors
        finally:
            browser.close()


def close_banners(page) -> None:
    """Dialogs and the "Introducing Nodes 2.0" bar a fresh profile shows."""
    page.keyboard.press("Escape")
    page.evaluate("""() => {
        document.querySelectorAll('.p-dialog-close-button, .p-dialog-header-close').forEach(b => b.click());
        for (const e of document.querySelectorAll('div, span')) {
          if (e.childElementCount === 0 && e.textContent.trim().startsWith('Introducing Nodes 2.0')) {
            let bar = e; while (bar.parentElement && bar.offsetWidth < window.innerWidth - 4) bar = bar.parentElement;
            const buttons = bar.querySelectorAll('button'); buttons[buttons.length - 1]?.click(); break;
          }
        }
    }""")


def load_workflow(page, workflow: dict) -> None:
    """Open a saved workflow as a new tab (as opening a template does) and check that it is the current graph."""
    fresh = {k: v for k, v in workflow.items() if k != "id"}  # the same id would re-focus an already open tab
    page.evaluate("async (wf) => { await app.loadGraphData(wf); }", fresh)
    types = sorted(page.evaluate("app.graph._nodes.map(n => n.type)"))
    assert types == sorted(n["type"] for n in workflow["nodes"]), types


def set_widgets(page, node_type: str, values: dict) -> None:
    """Set widget values on every node of a type in the current graph, as a user would."""
    found = page.evaluate(
        """([type, values]) => {
        const nodes = app.graph._nodes.filter(n => n.type === type);
        for (const n of nodes) for (const [k, v] of Object.entries(values)) n.widgets.find(w => w.name === k).value = v;
        return nodes.length;
    }""",
        [node_type, values],
    )
    assert found, f"no {node_type} node in the current graph"


def front_end_prompt(page, workflow: dict) -> dict:
    """The API prompt the front end itself makes of a saved workflow (load it, then app.graphToPrompt), without
    the `_meta` titles it adds for display (the server ignores them)."""
    load_workflow(page, workflow)
    prompt = page.evaluate("async () => (await app.graphToPrompt()).output")
    return {node_id: {k: v for k, v in node.items() if k != "_meta"} for node_id, node in prompt.items()}


def centre_on(page, node_type: str, scale: float = 1.0) -> None:
    page.evaluate(
        """([type, scale]) => {
        const n = app.graph._nodes.find(n => n.type === type), c = app.canvas;
        c.ds.scale = scale;
        const w = c.canvas.width / (window.devicePixelRatio || 1), h = c.canvas.height / (window.devicePixelRatio || 1);
        c.ds.offset[0] = -n.pos[0] + (w / scale - n.size[0]) / 2;
        c.ds.offset[1] = -n.pos[1] + (h / scale - n.size[1]) / 2;
        c.setDirty(true, true);
    }""",
        [node_type, scale],
    )


def fit_graph(page, max_scale: float = 1.0) -> None:
    """Zoom and pan so that every node is in view."""
    page.evaluate(
        """(maxScale) => {
        const c = app.canvas, nodes = app.graph._nodes;
        const x0 = Math.min(...nodes.map(n => n.pos[0])), y0 = Math.min(...nodes.map(n => n.pos[1] - 40));
        const x1 = Math.max(...nodes.map(n => n.pos[0] + n.size[0])), y1 = Math.max(...nodes.map(n => n.pos[1] + n.size[1]));
        const w = c.canvas.width / (window.devicePixelRatio || 1) - 120, h = c.canvas.height / (window.devicePixelRatio || 1) - 160;
        const s = Math.min(maxScale, w / (x1 - x0), h / (y1 - y0));
        c.ds.scale = s;
        c.ds.offset[0] = -x0 + (w / s - (x1 - x0)) / 2 + 80 / s;
        c.ds.offset[1] = -y0 + (h / s - (y1 - y0)) / 2 + 120 / s;
        c.setDirty(true, true);
    }""",
        max_scale,
    )
