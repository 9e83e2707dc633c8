"""The "Identify" tab (registered by scripts/gmi_tab.py through on_ui_tabs). Gradio 3.41 (A1111) and Gradio 4 (Forge):
the differences are asked from gmi_a1111.forge.

Building the tab does nothing heavy (on_ui_tabs runs during start-up, beside the WebUI's model load):
no encoder is loaded and no checkpoint hashed until the user opens "Build specs" or presses Refresh,
and first-time hashing shows which file is being hashed.
"""

from __future__ import annotations

import html
import logging
import queue
import threading
import time

import gradio as gr
from modules import call_queue, shared

from gmi_core.errors import GmiError
from gmi_core.images import load_image
from gmi_core.paths import one_line
from gmi_core.prompts import DEFAULT_PROMPT_SET
from gmi_core.ranker import METHODS

from . import build, forge, library, loras, runtime

log = logging.getLogger("gmi")

# Build button: a task id for the WebUI's progress bar (randomId/requestProgress come from the WebUI's own JS).
BUILD_JS = """
function() {
    var args = Array.from(arguments);
    var id = randomId();
    requestProgress(id, gradioApp().getElementById('gmi_build_result'), null, function() {});
    args[0] = id;
    return args;
}
"""


def switch_js(inputs: int) -> str:
    """For "Use this checkpoint": the same path as the host's checkpoint dropdown, so the dropdown follows; in Forge the
    chosen VAE / text encoder files go first through its own selectVAE (empty: keep the current ones). A LoRA row's
    choice is "<base title> <lora:name:w>": the checkpoint is selected and the tag put at the end of the txt2img
    prompt, replacing the tag gmi put there before and any tag of the same LoRA (gmi_core.loras.with_lora_tag).
    Returns exactly ``inputs`` values (Gradio 3 passes more arguments than inputs to a JavaScript-only listener)."""
    return f"""
function() {{
    var args = Array.from(arguments).slice(0, {inputs});
    var choice = args[0], modules = args[1];
    if (Array.isArray(modules) && modules.length && typeof selectVAE === 'function') {{ selectVAE(modules); }}
    if (!choice) {{ return args; }}
    var at = choice.indexOf(' <lora:');
    var title = at < 0 ? choice : choice.slice(0, at), tag = at < 0 ? '' : choice.slice(at + 1);
    selectCheckpoint(title);
    var box = gradioApp().querySelector('#txt2img_prompt textarea');
    if (box && (tag || window.gmiLoraTag)) {{
        var text = box.value;
        if (window.gmiLoraTag) {{ text = text.split(window.gmiLoraTag).join(''); }}
        if (tag) {{
            var name = tag.slice(6, tag.lastIndexOf(':'));
            text = text.replace(/\\s*<lora:([^:>]+)(?::[^>]*)?>/g, function(m, n) {{ return n === name ? '' : m; }});
        }}
        text = text.replace(/[ ,]+$/, '');
        box.value = tag ? (text ? text + ' ' + tag : tag) : text;
        updateInput(box);
        window.gmiLoraTag = tag;
    }}
    return args;
}}
"""


def _error_html(message: str) -> str:
    return f"<div class='gmi-error' style='color:#c33'><b>gmi:</b> {html.escape(message)}</div>"


def _images_from(single, files) -> list:
    images = [single] if single is not None else []
    for f in files or []:
        path = getattr(f, "name", f)
        images.append(load_image(path))
    return images


def ranking_html(data: dict) -> str:
    rows = []
    for r in data["ranking"]:
        thumbs = "".join(
            f"<img src='{m['thumbnail']}' title='{html.escape(m['prompt'])} (weight {m['weight']:.3f})' "
            f"style='display:inline-block;width:64px;height:64px;margin:1px;image-rendering:pixelated'>"
            for m in r["top_prompts"]
            if m.get("thumbnail")
        )
        partial = (
            f"<br><small title='ranked with the images it has'>partial spec: {r['prompts_done']} prompts, "
            f"{r['images_done']} images</small>"
            if r.get("partial")
            else ""
        )
        confidence = "-" if r.get("confidence") is None else f"{100 * r['confidence']:.0f}%"
        rows.append(
            f"<tr><td>{r['rank']}</td><td>{html.escape(r['name'])}{_marks(r)}{partial}</td><td><code>{r['short_hash']}</code></td>"
            f"<td>{r['score']:.4f}</td><td>{confidence}</td><td>{thumbs}</td></tr>"
        )
    excluded = "".join(
        f"<li>{html.escape(e['name'])}: {html.escape(e['reason'])}</li>" for e in data.get("excluded", [])
    )
    return (
        f"<p>Method <b>{html.escape(data['method'])}</b>; prompt ({html.escape(data['prompt_source'])}): "
        f"<i>{html.escape(data['pseudo_prompt'])}</i>. Lower score = closer.</p>"
        + _confidence_html(data)
        + f"<table class='gmi-ranking'><tr><th>#</th><th>{_model_column(data['ranking'])}</th><th>Hash</th><th>Score</th>"
        "<th title='winner: chance to beat every runner-up; runner-up: chance to beat the winner'>Confidence</th>"
        f"<th>Best-matching spec images</th></tr>{''.join(rows)}</table>"
        + (f"<details><summary>Not ranked</summary><ul>{excluded}</ul></details>" if excluded else "")
    )


def _model_column(ranking: list[dict]) -> str:
    """The ranking's first column says what its rows are: checkpoints, or checkpoints and LoRA combinations."""
    return "Checkpoint / LoRA" if any(r.get("model_kind") == "lora" for r in ranking) else "Checkpoint"


def _confidence_html(data: dict) -> str:
    """Ambiguous or not (gmi_core.confidence), and after a refine: the ranking before, the images rendered."""
    parts = []
    refine = data.get("refine")
    if refine:
        before = ", ".join(f"{r['rank']}. {r['name']}" for r in refine["before"]["ranking"][:4])
        rendered = ", ".join(f"{c['name']} +{c['images_rendered']}" for c in refine["checkpoints"]) or "nothing"
        stopped = " (interrupted: the rendered images are kept)" if refine["cancelled"] else ""
        parts.append(
            f"<p class='gmi-refine'>Before refine: {html.escape(before)}<br>Refine to {html.escape(refine['budget'])}: "
            f"{refine['images_rendered']} image(s) rendered ({html.escape(rendered)}){stopped}</p>"
        )
    if data.get("ambiguous") is True:
        parts.append(
            f"<p class='gmi-ambiguous'><b>Ambiguous:</b> {html.escape(', '.join(data['contenders']))} cannot be "
            "told apart at the images their specs hold; Refine renders more for them.</p>"
        )
    elif data.get("ambiguous") is False:
        parts.append("<p class='gmi-unambiguous'>Unambiguous: the winner is separated from every runner-up.</p>")
    return "".join(parts)


def _marks(row: dict) -> str:
    """'not installed' for imported specs of absent checkpoints; the spec kind when it is not generated."""
    marks = ([] if row.get("installed", True) else ["not installed"]) + (
        [row["kind"]] if row.get("kind", "generated") != "generated" else []
    )
    return "".join(f" <small>({html.escape(m)})</small>" for m in marks)


def status_rows(on_hashing=None) -> tuple[list[list], list[str], list[str], str]:
    """(table rows, all names, names without a ready spec, note) for the Build panel."""
    try:
        data = runtime.status(on_hashing=on_hashing, wait=False)
    except (GmiError, OSError) as exc:
        return [], [], [], _error_html(one_line(exc))
    if data.get("encoder_state") == "loading":
        return [], [], [], f"<p class='{LOADING_CLASS}'>gmi: {html.escape(data['note'])} (press Refresh)</p>"
    rows = [
        [
            c["name"],
            c["short_hash"],
            c["family"],
            c["state"],
            f"{c['images_done']}/{c['images_budget']}"
            + (f" + {c['observed_images']} observed" if c.get("observed_images") else ""),
            c["detail"] or ("" if c["current"] else "other settings"),
        ]
        for c in data["checkpoints"]
    ]
    rows += [[s["name"], "", "", "skipped", "", s["reason"]] for s in data["skipped"]]
    names = [c["name"] for c in data["checkpoints"]]
    todo = [c["name"] for c in data["checkpoints"] if c["state"] != "ready"]
    budget = data["budget"]
    sizes = "; ".join(
        f"{f} {v['width']}x{v['height']}, {v['steps']} steps, CFG {v['cfg']}"
        for f, v in data["family_settings"].items()
    )
    note = (
        f"Encoder <code>{html.escape(data['encoder_id'])}</code>, prompt set {html.escape(data['prompt_set']['name'])} "
        f"({data['prompt_set']['size']} prompts), specs in <code>{html.escape(runtime.setting_shown(str(runtime.spec_dir())))}</code>.<br>"
        f"Budget <b>{html.escape(budget['name'])}</b>: {budget['prompts']} prompts x {budget['images_per_prompt']} "
        f"image(s) = {budget['images']} per checkpoint; <b>{data['images_missing']} image(s) to render</b> for the "
        f"checkpoints without a ready spec.<br>Per family (Settings &gt; GMI): {html.escape(sizes)}"
    )
    if data.get("note"):
        note += f"<p>{html.escape(data['note'])}</p>"
    return rows, names, todo, note


LOADING_CLASS = "gmi-encoder-loading"  # marks the status note shown while the encoder loads
LOADING_POLLS = 60  # the tab asks again once a second while the encoder loads (a build may hold the loader)


def refresh_status():
    """Status on demand, as a generator: while checkpoints are hashed for the first time, says which one; while
    the encoder loads (never waited for: a build may hold the WebUI's loader), says so and asks again."""
    names: queue.Queue = queue.Queue()
    result = {}

    def work():
        try:
            for _ in range(LOADING_POLLS):
                result["rows"] = status_rows(on_hashing=names.put)
                if LOADING_CLASS not in result["rows"][3]:
                    break
                names.put(LOADING_CLASS)
                time.sleep(1)
        finally:
            names.put(None)

    threading.Thread(target=work, name="gmi-status", daemon=True).start()
    while (name := names.get()) is not None:
        yield (
            "<p>gmi: loading the CLIP encoder (after the WebUI's current job)…</p>"
            if name == LOADING_CLASS
            else f"<p>gmi: hashing {html.escape(name)} (first time only; the WebUI caches it)…</p>",
            gr.update(),
            gr.update(),
        )
    rows, all_names, todo, note = result.get("rows") or ([], [], [], _error_html("status failed; see the console"))
    yield note, rows, gr.update(choices=all_names, value=todo)


def do_identify(image, files, prompt, method, top_k):
    """The prompt box holds only what the user typed (or asked Interrogate for); the prompt used goes to its own box."""
    try:
        images = _images_from(image, files)
        if not images:
            raise GmiError("upload a reference image first")
        result, data = runtime.identify(images, prompt or None, method, int(top_k), thumbnails=True)
    except (GmiError, OSError) as exc:
        return _error_html(one_line(exc)), "", gr.update(choices=[], value=None)
    return _ranking_outputs(result, data)


def _ranking_outputs(result, data: dict) -> tuple:
    """The ranking HTML, the prompt used and the switch choices (installed rows only; a LoRA row with its tag)."""
    by_sha = runtime.titles_by_sha()
    titles = [loras.choice_value(r, by_sha) for r in data["ranking"] if r.get("installed", True)]
    used = f"{result.pseudo_prompt}  ({'typed' if result.prompt_source == 'user' else 'interrogated from this image'})"
    return ranking_html(data), used, gr.update(choices=titles, value=titles[0] if titles else None)


def do_refine(image, files, prompt, method, top_k, max_images):
    """Runs inside wrap_gradio_gpu_call (queue lock held): identify, render the contenders' missing images, rank."""
    from .refine import refine_identify

    try:
        images = _images_from(image, files)
        if not images:
            raise GmiError("upload a reference image first")
        result, data = refine_identify(images, prompt or None, method, int(top_k), True, int(max_images or 0) or None)
    except (GmiError, OSError) as exc:
        return _error_html(one_line(exc)), "", gr.update(choices=[], value=None), ""
    return *_ranking_outputs(result.after, data), ""


def do_interrogate(image, files):
    """Fills the prompt box on request; remembered so that a new image clears it again."""
    try:
        images = _images_from(image, files)
        if not images:
            raise GmiError("upload a reference image first")
        text = runtime.get_engine().interrogate(images)
        return text, "", text
    except (GmiError, OSError) as exc:
        return gr.update(), _error_html(one_line(exc)), gr.update()


def on_new_image(prompt, interrogated):
    """A new reference image: a prompt that only came from the previous image's interrogation is cleared."""
    if interrogated and prompt == interrogated:
        return "", "", ""
    return gr.update(), "", interrogated


def do_build(task_id, names, prompt_set, budget, sampler):
    """Runs inside wrap_gradio_gpu_call: the queue lock is held and shared.state has begun."""
    if not names:
        return "", "<p>Nothing selected.</p>"
    running = build.active_job()
    if running is not None:
        return "", _error_html(f"busy: a gmi build is already {running.state} ({running.id})")
    overrides = {"prompt_set": prompt_set or None, "budget": (budget or "").strip() or None, "sampler": sampler or None}
    overrides = {k: v for k, v in overrides.items() if v is not None}
    job = build.new_job(list(names), overrides, job_id=task_id)
    report = build.run_build_locked(job)
    parts = [f"<p>Build {html.escape(job.state)}.</p>"]
    if job.error:
        parts.append(_error_html(job.error))
    for label, key in (("Built", "built"),):
        if report.get(key):
            parts.append(f"<p>{label}: {html.escape(', '.join(report[key]))}</p>")
    for label, key in (("Skipped", "skipped"), ("Failed", "failed")):
        if report.get(key):
            items = "".join(f"<li>{html.escape(i['name'])}: {html.escape(i['reason'])}</li>" for i in report[key])
            parts.append(f"<p>{label}:</p><ul>{items}</ul>")
    # wrap_gradio_gpu_call wants a sequence whose last item is HTML (it appends the time taken)
    return job.message, "".join(parts)


def _sampler_names() -> list[str]:
    try:
        from modules import sd_samplers

        return [s.name for s in sd_samplers.all_samplers]
    except Exception:  # noqa: BLE001
        return [str(runtime.opt("gmi_sampler"))]


def on_ui_tabs():
    with gr.Blocks(analytics_enabled=False) as tab:
        with gr.Tab("Identify"):
            with gr.Row():
                with gr.Column():
                    image = gr.Image(label="Reference image", type="pil", elem_id="gmi_reference")
                    files = gr.File(label="More reference images", file_count="multiple", file_types=["image"])
                    prompt = gr.Textbox(label="Prompt (empty: interrogate the image)", lines=2, elem_id="gmi_prompt")
                    with gr.Row():
                        method = gr.Dropdown(list(METHODS), value=str(runtime.opt("gmi_method")), label="Method")
                        top_k = gr.Slider(
                            1, 50, value=int(runtime.opt("gmi_top_k")), step=1, label="Top k", elem_id="gmi_top_k"
                        )
                    with gr.Row():
                        interrogate_btn = gr.Button("Interrogate")
                        identify_btn = gr.Button("Identify", variant="primary", elem_id="gmi_identify")
                        refine_btn = gr.Button("Refine", elem_id="gmi_refine")
                    refine_cap = gr.Number(
                        0,
                        precision=0,
                        label="Refine: images at most (0 = the contenders' specs up to the full budget)",
                        elem_id="gmi_refine_cap",
                    )
                with gr.Column():
                    used_prompt = gr.Textbox(
                        label="Prompt used for ranking", interactive=False, elem_id="gmi_used_prompt"
                    )
                    result = gr.HTML(elem_id="gmi_ranking")
                    refine_note = gr.HTML(elem_id="gmi_refine_note")
                    with gr.Row():
                        choice = gr.Dropdown([], label="Checkpoint", elem_id="gmi_choice")
                        use_btn = gr.Button("Use this checkpoint", elem_id="gmi_use")
                    switch_inputs = [choice]
                    if forge.IS_FORGE:  # Flux-style checkpoints need their VAE / text encoder files
                        switch_inputs.append(
                            gr.Dropdown(
                                forge.module_names(),
                                value=[],
                                multiselect=True,
                                label="VAE / Text Encoder to load with it (empty: keep Forge's current selection)",
                                elem_id="gmi_modules",
                            )
                        )
            interrogated = gr.State("")
            identify_btn.click(do_identify, [image, files, prompt, method, top_k], [result, used_prompt, choice])
            refine_btn.click(  # renders with the WebUI pipeline: a queued job (Interrupt in the Build tab stops it)
                call_queue.wrap_gradio_gpu_call(do_refine, extra_outputs=[gr.update(), gr.update(), gr.update()]),
                [image, files, prompt, method, top_k, refine_cap],
                [result, used_prompt, choice, refine_note],
            )
            interrogate_btn.click(do_interrogate, [image, files], [prompt, result, interrogated])
            for source in (image, files):
                source.change(on_new_image, [prompt, interrogated], [prompt, used_prompt, interrogated])
            use_btn.click(None, switch_inputs, switch_inputs, **forge.gradio_js(switch_js(len(switch_inputs))))
        with gr.Tab("Build specs") as build_tab:
            note_html = gr.HTML("<p>Spec status loads when this tab opens (or press Refresh).</p>")
            table = gr.Dataframe(
                [],
                headers=["checkpoint", "hash", "family", "spec", "images / budget", "detail"],
                interactive=False,
                elem_id="gmi_spec_table",
            )
            selected = gr.CheckboxGroup([], value=[], label="Checkpoints (default: all without a current spec)")
            with gr.Row():
                prompt_set = gr.Textbox(
                    str(runtime.opt("gmi_prompt_set")), label=f"Prompt set ('{DEFAULT_PROMPT_SET}' or a file)"
                )
                budget = gr.Textbox(
                    str(runtime.opt("gmi_budget")), label="{1}: {2}".format(*runtime.OPTIONS["gmi_budget"])
                )
                sampler = gr.Dropdown(_sampler_names(), value=str(runtime.opt("gmi_sampler")), label="Sampler")
            with gr.Row():
                refresh_btn = gr.Button("Refresh")
                build_btn = gr.Button("Build specs", variant="primary", elem_id="gmi_build")
                interrupt_btn = gr.Button("Interrupt", elem_id="gmi_interrupt")
            task_id = gr.Textbox(visible=False)
            build_message = gr.Textbox(label="Last progress", interactive=False)
            build_result = gr.HTML(elem_id="gmi_build_result")

            refresh = refresh_status
            build_tab.select(refresh, [], [note_html, table, selected])
            refresh_btn.click(refresh, [], [note_html, table, selected])
            build_btn.click(
                call_queue.wrap_gradio_gpu_call(do_build, extra_outputs=[""]),
                [task_id, selected, prompt_set, budget, sampler],
                [build_message, build_result],
                **forge.gradio_js(BUILD_JS),
            ).then(refresh, [], [note_html, table, selected])
            interrupt_btn.click(lambda: shared.state.interrupt(), [], [])
            with gr.Accordion("Specs without generating", open=False):
                with gr.Row():
                    import_root = gr.Dropdown(list(library.ROOTS), value="outputs", label="Images from")
                    import_sub = gr.Textbox("", label="Subfolder (empty: all, scanned recursively)")
                    import_btn = gr.Button("Import images as observed specs", elem_id="gmi_import_images")
                import_result = gr.HTML(elem_id="gmi_import_result")
                groups_btn = gr.Button("Show near-duplicate groups", elem_id="gmi_groups")
                groups_result = gr.HTML(elem_id="gmi_groups_result")
            import_btn.click(library.import_images_html, [import_root, import_sub], [import_result]).then(
                refresh, [], [note_html, table, selected]
            )
            groups_btn.click(library.groups_html, [], [groups_result])
    return [(tab, "GMI", "gmi")]
