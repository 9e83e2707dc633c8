"""Screenshot of the GMI Identify node with its ranking, in headless Chromium against a running ComfyUI.

Drives the page over the Chrome DevTools protocol (aiohttp websocket): loads an API-format workflow
into the real front-end, queues it from the page (so the page receives the `executed` message and our
web extension renders the ranking), centres the Identify node and captures the page.
"""

from __future__ import annotations

import asyncio
import base64
import json
import shutil
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

from .comfy_env import free_port

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
         "--no-first-run", "--hide-scrollbars", "--window-size=1500,950"]


class _Cdp:
    def __init__(self, ws):
        self.ws, self.next_id = ws, 0

    async def call(self, method: str, **params):
        self.next_id += 1
        my_id = self.next_id
        await self.ws.send_str(json.dumps({"id": my_id, "method": method, "params": params}))
        while True:
            msg = json.loads((await self.ws.receive()).data)
            if msg.get("id") == my_id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})

    async def eval(self, expression: str):
        res = await self.call("Runtime.evaluate", expression=expression, awaitPromise=True, returnByValue=True)
        if "exceptionDetails" in res:
            raise RuntimeError(f"JS error: {json.dumps(res['exceptionDetails'])[:1500]}")
        return res.get("result", {}).get("value")

    async def wait_for(self, expression: str, timeout: float, what: str):
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                if await self.eval(expression):
                    return
            except RuntimeError:
                pass
            await asyncio.sleep(0.5)
        raise TimeoutError(f"timed out waiting for {what}")


async def _shoot(server_url: str, workflow: dict, out: Path, debug_port: int, panel_out: Path | None = None) -> None:
    import aiohttp

    async with aiohttp.ClientSession() as session:
        targets = await (await session.get(f"http://127.0.0.1:{debug_port}/json")).json()
        page = next(t for t in targets if t.get("type") == "page")
        async with session.ws_connect(page["webSocketDebuggerUrl"], max_msg_size=0) as ws:
            cdp = _Cdp(ws)
            await cdp.call("Page.enable")
            await cdp.call("Runtime.enable")
            await cdp.call("Page.navigate", url=server_url + "/")
            await cdp.wait_for("!!(window.app && window.app.graph && window.app.canvas)", 90, "the ComfyUI front-end")
            await asyncio.sleep(2)
            # close whatever welcome/template dialog a fresh profile shows
            await cdp.eval("document.querySelectorAll('.p-dialog-close-button, .p-dialog-header-close').forEach(b => b.click()); true")
            await cdp.eval(f"app.loadApiJson({json.dumps(workflow)}, 'gmi-identify.json'); true")
            await cdp.wait_for("app.graph._nodes.some(n => n.type === 'GMIIdentify')", 30, "the workflow to load")
            await cdp.eval("app.queuePrompt(0, 1).then(() => true)")
            await cdp.wait_for("!!app.graph._nodes.find(n => n.type === 'GMIIdentify').gmiLastRanking", 240,
                               "the Identify node to show its ranking")
            await asyncio.sleep(2)  # thumbnails load
            await cdp.eval("""(() => {
                const n = app.graph._nodes.find(n => n.type === 'GMIIdentify');
                const c = app.canvas;
                c.ds.scale = 1.25;
                const w = c.canvas.width / (window.devicePixelRatio || 1), h = c.canvas.height / (window.devicePixelRatio || 1);
                c.ds.offset[0] = -n.pos[0] + (w / c.ds.scale - n.size[0]) / 2;
                c.ds.offset[1] = -n.pos[1] + (h / c.ds.scale - n.size[1]) / 2;
                c.setDirty(true, true); c.draw(true, true);
                return true; })()""")
            await cdp.call("Input.dispatchKeyEvent", type="keyDown", key="Escape", code="Escape", windowsVirtualKeyCode=27)
            await cdp.call("Input.dispatchKeyEvent", type="keyUp", key="Escape", code="Escape", windowsVirtualKeyCode=27)
            await cdp.eval("""(() => {
                document.querySelectorAll('.p-dialog-mask').forEach(e => e.remove());
                for (const e of document.querySelectorAll('div, span')) {
                  if (e.childElementCount === 0 && e.textContent.trim().startsWith('Introducing Nodes 2.0')) {
                    let bar = e; while (bar.parentElement && bar.offsetWidth < window.innerWidth - 4) bar = bar.parentElement;
                    const buttons = bar.querySelectorAll('button'); buttons[buttons.length - 1]?.click(); break;
                  }
                }
                return true; })()""")
            await asyncio.sleep(2)
            shot = await cdp.call("Page.captureScreenshot", format="png")
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_bytes(base64.b64decode(shot["data"]))
            if panel_out is not None:
                # the GMI side panel: status table, then "Build missing specs" queued from the page
                await cdp.eval("document.querySelector('.gmi-tab-button, [class*=gmi-tab]')?.click(); true")
                await cdp.wait_for("document.querySelectorAll('.gmi-panel table tr').length > 0", 60, "the GMI panel")
                await cdp.eval("[...document.querySelectorAll('.gmi-panel button')].find(b => b.textContent.startsWith('Build')).click(); true")
                await cdp.wait_for("/built \\d/.test(document.querySelector('.gmi-panel').textContent)", 120,
                                   "the panel's build to finish")
                await asyncio.sleep(1.5)
                shot = await cdp.call("Page.captureScreenshot", format="png")
                Path(panel_out).write_bytes(base64.b64decode(shot["data"]))


def identify_screenshot(server, workflow: dict, out: Path, panel_out: Path | None = None, timeout: float = 300) -> Path:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if not browser:
        raise RuntimeError("chromium not found (apt-get install chromium)")
    for key in ("Comfy.TutorialCompleted",):  # no first-run template browser over the canvas
        req = urllib.request.Request(f"{server.url}/settings/{key}", b"true", {"Content-Type": "application/json"})
        urllib.request.urlopen(req, timeout=10).read()
    port = free_port()
    profile = tempfile.mkdtemp(prefix="gmi-chromium-")
    proc = subprocess.Popen([browser, *FLAGS, f"--remote-debugging-port={port}", f"--user-data-dir={profile}", "about:blank"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 60
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/json/version", timeout=2).read()
                break
            except OSError:
                if time.time() > deadline:
                    raise
                time.sleep(0.5)
        asyncio.run(asyncio.wait_for(_shoot(server.url, workflow, Path(out), port, panel_out), timeout))
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
        shutil.rmtree(profile, ignore_errors=True)
    return Path(out)
