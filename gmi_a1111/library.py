"""The Build tab's "specs without generating" actions: import images from the WebUI's folders, near-duplicate groups."""

from __future__ import annotations

import html
from pathlib import Path

from modules import paths, shared

from gmi_core import service
from gmi_core.errors import GmiError, InvalidInput
from gmi_core.paths import folder_inside, one_line

from . import runtime

ROOTS = ("outputs", "models")


def root_folder(root: str) -> Path:
    """The WebUI's output folder (Settings > Paths, else outputs/ in its data folder) or its models folder."""
    if root == "models":
        return runtime.models_dir()
    if root == "outputs":
        configured = str(getattr(shared.opts, "outdir_samples", "") or "").strip()
        return Path(configured) if configured else Path(paths.data_path) / "outputs"
    raise InvalidInput(f"root must be one of {', '.join(ROOTS)}")


def import_images_report(root: str, subfolder: str) -> dict:
    folder = folder_inside(root_folder(root), subfolder, "subfolder")
    return service.import_images_payload(runtime.get_engine(), runtime.source(), folder)


def import_images_html(root: str, subfolder: str) -> str:
    try:
        report = import_images_report(root, subfolder)
    except (GmiError, OSError) as exc:
        return f"<div style='color:#c33'><b>gmi:</b> {html.escape(one_line(exc))}</div>"
    added = "".join(f"<li>{html.escape(n)}: {k} image(s)</li>" for n, k in report["added"].items())
    reasons = ", ".join(f"{k} {html.escape(r)}" for r, k in report["skipped_by_reason"].items())
    skipped = "".join(f"<li>{html.escape(s['file'])}: {html.escape(s['reason'])}</li>" for s in report["skipped"][:200])
    return (
        f"<p>Scanned {report['scanned']} image(s); added {report['added_total']} to observed specs "
        f"(nothing generated).</p><ul>{added}</ul>"
        + (f"<details><summary>Skipped: {reasons}</summary><ul>{skipped}</ul></details>" if skipped else "")
    )


def groups_report() -> dict:
    return service.map_payload(runtime.get_engine(), runtime.source())


def groups_html() -> str:
    try:
        data = groups_report()
    except (GmiError, OSError) as exc:
        return f"<div style='color:#c33'><b>gmi:</b> {html.escape(one_line(exc))}</div>"
    if not data["checkpoints"]:
        return "<p>No specs yet.</p>"
    groups = "".join(f"<li>{', '.join(html.escape(n) for n in g)}</li>" for g in data["groups"])
    return (
        f"<p>{len(data['checkpoints'])} checkpoint(s) with specs; near-duplicate threshold {data['threshold']}.</p>"
        + (f"<p>Near-duplicate groups (render alike):</p><ul>{groups}</ul>" if groups else "<p>No near-duplicates.</p>")
    )
