"""A self-contained HTML report of one identification: the query, the ranking, the matching spec images."""

from __future__ import annotations

import html
from collections.abc import Callable, Sequence
from pathlib import Path

from PIL import Image

from .images import png_data_uri
from .results import IdentifyResult


def write_report(
    path: Path,
    result: IdentifyResult,
    queries: Sequence[Image.Image],
    thumbnail: Callable[[str, int], Image.Image],
    true_checkpoint: str | None = None,
) -> Path:
    """``thumbnail(sha256, prompt_index)`` gives a spec image (SpecLibrary.thumbnail)."""
    rows = []
    for entry in result.ranking:
        thumbs = "".join(
            f'<figure><img src="{png_data_uri(thumbnail(entry.sha256, m.index), 96)}"><figcaption>{html.escape(m.prompt)}'
            f"<br>w={m.weight:.3f}</figcaption></figure>"
            for m in entry.top_prompts
        )
        mark = " &#10004; generating checkpoint" if true_checkpoint == entry.name else ""
        rows.append(
            f"<tr><td>{entry.rank}</td><td>{html.escape(entry.name)}{mark}</td><td><code>{entry.short_hash}</code></td>"
            f"<td>{entry.score:.5f}</td><td class=t>{thumbs}</td></tr>"
        )
    query_html = "".join(f'<img src="{png_data_uri(q, 192)}">' for q in queries)
    page = f"""<!doctype html><meta charset=utf-8><title>gmi identification</title>
<style>body{{font-family:sans-serif;margin:2em}} td{{padding:4px 8px;border-bottom:1px solid #ddd;vertical-align:top}}
figure{{display:inline-block;vertical-align:top;margin:0 6px;width:100px;font-size:11px}} img{{image-rendering:pixelated}}
figure img{{width:96px;height:96px}} .q img{{width:192px;height:192px;margin-right:8px}}</style>
<h1>Which checkpoint made this image?</h1>
<div class=q>{query_html}</div>
<p>Method <b>{result.method}</b>; prompt ({result.prompt_source}): <i>{html.escape(result.pseudo_prompt)}</i></p>
<table><tr><th>#</th><th>checkpoint</th><th>hash</th><th>score (lower is better)</th><th>best-matching spec prompts</th></tr>
{"".join(rows)}</table>"""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page, encoding="utf-8")
    return path
