// gmi for ComfyUI: the ranking (with thumbnails) inside the GMI Identify node, and a "GMI" sidebar tab with the
// spec status per checkpoint and per LoRA spec (filtered: checkpoints / LoRAs / both), "Build missing specs", live
// build progress, and specs from the user's own images (import the output folder, near-duplicate groups).
//
// Everything here stays inside elements this extension owns and goes through the front end's own APIs: the
// sidebar tab API, extension settings, a DOM widget on our node, the Popover API for the enlarged thumbnail,
// toasts. Styles live in <style> elements inside our own elements and every selector starts with ".gmi-", so
// nothing restyles the rest of the page (checked by `comfy-test lint --strict`, tests/test_lint.py).
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const EXTENSION = "gmi.identify";
const SETTING = {
  thumbSize: "gmi.Ranking.ThumbnailSize",
  thumbCount: "gmi.Ranking.ThumbnailCount",
  toastOnBuild: "gmi.Panel.ToastOnBuild",
  models: "gmi.Panel.Models",
};
const MODEL_KINDS = ["both", "checkpoints", "loras"];  // the panel's filter: its rows and what "Build missing" builds

let chosenModels = null;  // the filter picked in this page (also saved as the setting where the front end can)

function modelsFilter() {
  const value = chosenModels ?? setting(SETTING.models, "both");
  return MODEL_KINDS.includes(value) ? value : "both";
}

const RANKING_STYLE = `<style>
.gmi-ranking { font: 12px sans-serif; color: var(--input-text, #ddd); overflow-y: auto; padding: 4px;
  box-sizing: border-box; background: var(--comfy-input-bg, #222); border-radius: 6px; }
.gmi-ranking .gmi-head { opacity: .8; margin-bottom: 4px; white-space: normal; }
.gmi-ranking .gmi-row { display: flex; align-items: center; gap: 6px; padding: 3px 2px; border-bottom: 1px solid #ffffff14; }
.gmi-ranking .gmi-row.gmi-chosen { background: #2d6a4f55; border-radius: 4px; }
.gmi-ranking .gmi-rank { width: 22px; text-align: right; font-weight: bold; }
.gmi-ranking .gmi-name { flex: 1; overflow: hidden; text-overflow: ellipsis; white-space: nowrap; }
.gmi-ranking .gmi-score { width: 64px; text-align: right; font-family: monospace; opacity: .85; }
.gmi-ranking .gmi-thumbs img { border-radius: 3px; margin-left: 2px; image-rendering: pixelated; cursor: zoom-in; }
.gmi-popover { padding: 8px; border: 1px solid #555; border-radius: 8px; background: var(--comfy-menu-bg, #353535);
  color: var(--input-text, #ddd); font: 12px sans-serif; max-width: 300px; }
.gmi-popover img { width: 256px; height: 256px; image-rendering: pixelated; display: block; margin-bottom: 6px; }
</style>`;

const PANEL_STYLE = `<style>
.gmi-panel { padding: 8px; font: 13px sans-serif; color: var(--input-text, #ddd); }
.gmi-panel .gmi-info { opacity: .85; margin: 4px 0 8px; }
.gmi-panel .gmi-table { width: 100%; border-collapse: collapse; margin: 6px 0; }
.gmi-panel .gmi-table td { padding: 2px 4px; border-bottom: 1px solid #ffffff14; }
.gmi-panel .gmi-state-ready { color: #74c69d; } .gmi-panel .gmi-state-missing { color: #f4a261; }
.gmi-panel .gmi-state-partial, .gmi-panel .gmi-state-stale { color: #e9c46a; }
.gmi-panel .gmi-state-corrupt, .gmi-panel .gmi-state-skipped { color: #e76f51; }
.gmi-panel .gmi-progress { width: 100%; } .gmi-panel .gmi-actions button { margin: 0 6px 6px 0; }
.gmi-panel .gmi-lora-base { opacity: .7; font-size: 11px; }
</style>`;

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v;
    else if (k === "text") node.textContent = v;
    else node.setAttribute(k, v);
  }
  for (const c of children) if (c) node.append(c);
  return node;
}

function withStyle(root, style) {
  root.insertAdjacentHTML("afterbegin", style);
  return root;
}

function setting(id, fallback) {
  const value = app.extensionManager?.setting?.get?.(id);
  return value === undefined || value === null ? fallback : value;
}

function toast(severity, summary, detail) {
  app.extensionManager?.toast?.add?.({ severity, summary, detail, life: 6000 });
}

async function getJson(path) {
  const r = await api.fetchApi(path);
  const data = await r.json();
  if (!r.ok) throw new Error(data.error || r.statusText);
  return data;
}

// ---- ranking inside the Identify node ------------------------------------------------------

// One shared popover per ranking element: the enlarged spec image of a clicked thumbnail (top layer, so the
// canvas transform does not clip it).
function thumbnailPopover(container) {
  let pop = container.querySelector(":scope > .gmi-popover");
  if (!pop) {
    pop = el("div", { class: "gmi-popover", popover: "auto" }, el("img", { alt: "" }), el("div"));
    container.append(pop);
  }
  return pop;
}

function showThumbnail(container, match) {
  const pop = thumbnailPopover(container);
  pop.querySelector("img").src = api.apiURL(match.thumbnail);
  pop.querySelector("div").textContent = `${match.prompt} (weight ${match.weight.toFixed(3)})`;
  if (!pop.matches(":popover-open")) pop.showPopover();
}

function rankingRow(data, row, container) {
  const size = setting(SETTING.thumbSize, 40);
  const thumbs = el("span", { class: "gmi-thumbs" });
  for (const m of row.top_prompts.slice(0, setting(SETTING.thumbCount, 3))) {
    const img = el("img", { src: api.apiURL(m.thumbnail), title: `${m.prompt} (weight ${m.weight.toFixed(3)})`, alt: "" });
    img.style.width = img.style.height = `${size}px`;
    img.onclick = () => showThumbnail(container, m);
    thumbs.append(img);
  }
  return el("div", { class: "gmi-row" + (row.name === data.chosen ? " gmi-chosen" : ""), title: row.sha256 },
    el("span", { class: "gmi-rank", text: String(row.rank) }),
    el("span", { class: "gmi-name", text: row.name + rowMarks(row) +
      (row.partial ? ` (partial spec: ${row.images_done} images)` : "") }),
    el("span", { class: "gmi-score", text: Number(row.score).toFixed(4) }),
    el("span", { class: "gmi-score", title: "confidence: the winner's chance to beat every runner-up; a runner-up's chance to beat the winner",
      text: row.confidence == null ? "–" : `${Math.round(row.confidence * 100)}%` }),
    thumbs);
}

// "ambiguous: A, B" / "unambiguous" (gmi_core.confidence), and what a refine did: the ranking before, images rendered
function confidenceLines(data) {
  const lines = [];
  const refine = data.refine;
  if (refine) {
    const before = (refine.before?.ranking || []).slice(0, 4).map((r) => `${r.rank}. ${r.name}`).join(", ");
    const rendered = (refine.checkpoints || []).map((c) => `${c.name} +${c.images_rendered}`).join(", ") || "nothing";
    lines.push(`before refine: ${before}`);
    lines.push(`refine to ${refine.budget}: ${refine.images_rendered} image(s) rendered (${rendered})` +
      (refine.cancelled ? " — interrupted, the rendered images are kept" : ""));
  }
  if (data.ambiguous === true) lines.push(`ambiguous: ${data.contenders.join(", ")} cannot be told apart yet`);
  else if (data.ambiguous === false) lines.push("unambiguous: the winner is separated from every runner-up");
  return lines;
}

export function renderRanking(container, data) {
  container.querySelectorAll(":scope > .gmi-head, :scope > .gmi-row").forEach((e) => e.remove());
  if (!data) return;
  const who = data.prompt_source === "user" ? "prompt" : "pseudo-prompt";
  container.append(el("div", { class: "gmi-head", text: `${data.method} · ${who}: “${data.pseudo_prompt}”` }));
  for (const line of confidenceLines(data)) container.append(el("div", { class: "gmi-head", text: line }));
  for (const row of data.ranking) container.append(rankingRow(data, row, container));
  for (const ex of data.excluded || []) {
    container.append(el("div", { class: "gmi-head", text: `left out: ${ex.name} (${ex.reason})` }));
  }
}

// "not installed" (an imported spec, never loaded) and the spec kind when it is not generated
function rowMarks(row) {
  const marks = [];
  if (row.installed === false) marks.push(`not installed, ${row.short_hash}`);
  if (row.kind && row.kind !== "generated") marks.push(row.kind);
  return marks.length ? ` (${marks.join("; ")})` : "";
}

function attachRanking(nodeType) {
  const onExecuted = nodeType.prototype.onExecuted;
  nodeType.prototype.onExecuted = function (message) {
    onExecuted?.apply(this, arguments);
    const data = message?.gmi_ranking?.[0];
    if (!data) return;
    if (!this.gmiRankingEl) {
      this.gmiRankingEl = withStyle(el("div", { class: "gmi-ranking" }), RANKING_STYLE);
      const rowHeight = 8 + Math.max(24, setting(SETTING.thumbSize, 40));
      this.addDOMWidget("gmi_ranking", "gmi_ranking", this.gmiRankingEl, { serialize: false, hideOnZoom: false,
        getMinHeight: () => 64 + rowHeight * Math.min(8, (this.gmiLastRanking?.ranking?.length || 1)) });
    }
    this.gmiLastRanking = data;
    renderRanking(this.gmiRankingEl, data);
    const size = this.computeSize();
    this.setSize([Math.max(this.size[0], 380), Math.max(this.size[1], size[1])]);
    this.setDirtyCanvas?.(true, true);
  };
}

// ---- the sidebar panel -----------------------------------------------------------------------
// The panel is a list of sections. A section is a small function returning { element, update(status) }:
// `update` gets each /gmi/status answer; a section may also listen to the server's gmi.* events. A new
// section (library groups, import actions, ETA, ...) is one more function in PANEL_SECTIONS.

function summarySection() {
  const element = el("div", { class: "gmi-info", text: "loading…" });
  return {
    element,
    update(status) {
      const loras = status.checkpoints.filter((s) => s.model_kind === "lora").length;
      element.textContent = `${status.encoder_id} · ${status.prompt_set.name} (${status.prompt_set.size} prompts) · ` +
        `budget ${status.budget.name}: ${status.budget.images} img/spec · ` +
        `${status.checkpoints.length - loras} checkpoint(s), ${loras} LoRA spec(s) · ${status.images_missing} to render`;
    },
  };
}

// The build prompt the panel queues: the same two nodes a user would wire. The server sends the Build node's
// inputs (its defaults with the last used settings, GET /gmi/options -> build_inputs), so no input is repeated here;
// `models` is the panel's filter: the LoRA specs it lists (LoRA strengths and bases as last built) are built too.
export function buildPrompt(options, models) {
  return {
    gmi_encoder: { class_type: "GMILoadEncoder", inputs: { encoder: options.config.encoder, allow_download: false } },
    gmi_build: { class_type: "GMIBuildSpecs",
      inputs: { ...options.build_inputs, models, encoder: ["gmi_encoder", 0] } },
  };
}

async function queueBuildMissing() {
  const options = await getJson("/gmi/options");
  const r = await api.fetchApi("/prompt", { method: "POST", headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ prompt: buildPrompt(options, modelsFilter()), client_id: api.clientId }) });
  if (!r.ok) throw new Error((await r.text()).slice(0, 300));
}

// The ETA text comes from the server (gmi_core.protocols.format_eta), the same in every front end.
export function buildProgressText(p) {
  return `${p.index + 1}/${p.count} ${p.checkpoint}: ${p.images_done}/${p.images_total} images · ` +
    `build ${p.images_rendered}/${p.images_planned} · ${p.eta}`;
}

function buildSection(panel) {
  const button = el("button", { class: "gmi-build-missing", text: "Build missing specs" });
  const refresh = el("button", { text: "Refresh" });
  const progress = el("progress", { class: "gmi-progress", max: "1", value: "0" });
  const text = el("div", { class: "gmi-build-status" });
  progress.hidden = true;
  button.onclick = async () => {
    try {
      await queueBuildMissing();
      text.textContent = "build queued…";
    } catch (err) {
      text.textContent = "could not queue the build: " + err.message;
    }
  };
  refresh.onclick = () => panel.refresh();
  api.addEventListener("gmi.build.plan", ({ detail: plan }) => {
    progress.hidden = false;
    progress.value = 0;
    text.textContent = `budget ${plan.budget}: ${plan.images} images to render`;
  });
  api.addEventListener("gmi.build.progress", ({ detail: p }) => {
    progress.hidden = false;
    progress.value = p.images_planned ? p.images_rendered / p.images_planned : 0;
    text.textContent = buildProgressText(p);
  });
  const ended = (report) => {
    progress.hidden = true;
    const failed = report.failed.map((f) => `${f.name}: ${f.reason}`).join("; ");
    text.textContent = `built ${report.built.length}` + (report.cancelled ? " (interrupted)" : "") +
      (failed ? ` · failed: ${failed}` : "");
    if (setting(SETTING.toastOnBuild, true)) toast(failed ? "warn" : "success", "GMI", text.textContent);
    panel.refresh();
  };
  api.addEventListener("gmi.build.done", ({ detail: report }) => ended(report));
  for (const stopped of ["execution_interrupted", "execution_error"]) {  // a build stopped by ComfyUI itself
    api.addEventListener(stopped, () => { if (!progress.hidden) ended({ built: [], failed: [], cancelled: true }); });
  }
  return { element: el("div", {}, el("div", { class: "gmi-actions" }, button, refresh), progress, text) };
}

// A LoRA spec's row: the LoRA at its strength, and under it the base checkpoint it is applied to.
export function specRowName(s) {
  if (s.model_kind !== "lora" || !s.lora) return el("td", { text: s.name });
  return el("td", { text: `${s.lora.lora_name} @ ${s.lora.strength}` },
    el("div", { class: "gmi-lora-base", text: `LoRA on ${s.lora.base_name}` }));
}

// The filter (checkpoints / LoRAs / both): the rows shown, and what "Build missing specs" builds.
function filterSection(panel) {
  const select = el("select", { class: "gmi-models", title: "rows shown and built by Build missing specs" },
    ...MODEL_KINDS.map((kind) => el("option", { value: kind, text: kind === "loras" ? "LoRAs" : kind })));
  select.value = modelsFilter();
  select.onchange = async () => {
    chosenModels = select.value;
    await app.extensionManager?.setting?.set?.(SETTING.models, select.value);
    panel.refresh();
  };
  return { element: el("label", { class: "gmi-info" }, document.createTextNode("Show and build: "), select) };
}

function specTableSection() {
  const table = el("table", { class: "gmi-table" });
  const row = (name, title, state, detail) => el("tr", { title, class: "gmi-spec-row" },
    name, el("td", { class: "gmi-state-" + state, text: state }), el("td", { text: detail }));
  return {
    element: table,
    update(status) {
      table.replaceChildren(
        ...status.checkpoints.map((s) => row(specRowName(s), s.detail || s.sha256, s.state + (s.current ? "" : " *"),
          `${s.images_done}/${s.images_budget} img` + (s.observed_images ? ` + ${s.observed_images} observed` : ""))),
        ...status.skipped.map((s) => row(el("td", { text: s.name }), "", "skipped", s.reason)));
    },
  };
}

// Specs without generating: import the output folder's images as observed specs, show near-duplicate groups.
function librarySection(panel) {
  const importButton = el("button", { text: "Import images from output" });
  const groupsButton = el("button", { text: "Near-duplicate groups" });
  const text = el("div", { class: "gmi-library" });
  let config = {};
  importButton.onclick = async () => {
    text.textContent = "reading the output folder…";
    try {
      const r = await api.fetchApi("/gmi/import-images", { method: "POST", headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ root: "output", subfolder: "", encoder: config.encoder, prompt_set: config.prompt_set,
          max_prompts: config.max_prompts }) });
      const data = await r.json();
      if (!r.ok) throw new Error(data.error || r.statusText);
      const skipped = Object.entries(data.skipped_by_reason).map(([k, v]) => `${v} ${k}`).join(", ");
      text.textContent = `scanned ${data.scanned}, added ${data.added_total} image(s) to ` +
        `${Object.keys(data.added).length} observed spec(s)` + (skipped ? `; skipped: ${skipped}` : "");
      panel.refresh();
    } catch (err) {
      text.textContent = "gmi: " + err.message;
    }
  };
  groupsButton.onclick = async () => {
    text.textContent = "comparing specs…";
    try {
      const q = new URLSearchParams({ encoder: config.encoder || "", prompt_set: config.prompt_set || "",
        max_prompts: config.max_prompts || 0 });
      const data = await getJson("/gmi/map?" + q);
      text.replaceChildren(el("div", { text: data.groups.length ?
        `${data.groups.length} near-duplicate group(s) among ${data.checkpoints.length} checkpoints:` : "no near-duplicates" }),
        ...data.groups.map((g) => el("div", { text: "• " + g.join(", ") })));
    } catch (err) {
      text.textContent = "gmi: " + err.message;
    }
  };
  return {
    element: el("div", {}, el("h4", { text: "Specs from your images" }),
      el("div", { class: "gmi-actions" }, importButton, groupsButton), text),
    update(status) { config = status.config; },
  };
}

const PANEL_SECTIONS = [summarySection, filterSection, buildSection, specTableSection, librarySection];

class GmiPanel {
  constructor(sections) {
    this.error = el("div", { class: "gmi-info" });
    this.sections = sections.map((make) => make(this));
    this.root = withStyle(el("div", { class: "gmi-panel" }, el("h3", { text: "GMI specs" }), this.error,
      ...this.sections.map((s) => s.element)), PANEL_STYLE);
  }

  async refresh() {
    try {
      const status = await getJson("/gmi/status?models=" + modelsFilter());
      if (status.encoder_state === "loading") {  // the server never waits for the encoder: ask again shortly
        this.error.textContent = "gmi: " + status.note;
        setTimeout(() => this.refresh(), 2000);
        return;
      }
      this.error.textContent = "";
      for (const s of this.sections) s.update?.(status);
    } catch (err) {
      this.error.textContent = "gmi: " + err.message;
    }
  }
}

app.registerExtension({
  name: EXTENSION,
  settings: [
    { id: SETTING.thumbSize, category: ["GMI", "Ranking", "Thumbnail size"], name: "Thumbnail size in the ranking (px)",
      type: "slider", attrs: { min: 24, max: 128, step: 4 }, defaultValue: 40 },
    { id: SETTING.thumbCount, category: ["GMI", "Ranking", "Thumbnails per checkpoint"],
      name: "Spec images shown per checkpoint", type: "slider", attrs: { min: 0, max: 5, step: 1 }, defaultValue: 3 },
    { id: SETTING.toastOnBuild, category: ["GMI", "Panel", "Toast"], name: "Show a notification when a build ends",
      type: "boolean", defaultValue: true },
    { id: SETTING.models, category: ["GMI", "Panel", "Models"], name: "Spec rows shown and built in the GMI panel",
      type: "combo", options: MODEL_KINDS, defaultValue: "both" },
  ],
  commands: [
    { id: "gmi.buildMissingSpecs", label: "GMI: Build missing specs", icon: "pi pi-search",
      function: () => queueBuildMissing().catch((err) => toast("error", "GMI", err.message)) },
  ],
  async setup() {
    if (!app.extensionManager?.registerSidebarTab) {  // front ends before the sidebar API: the node still works
      console.warn("gmi: this ComfyUI front end has no sidebar tab API; the GMI panel is not shown");
      return;
    }
    const panel = new GmiPanel(PANEL_SECTIONS);
    app.extensionManager.registerSidebarTab({
      id: "gmi", icon: "pi pi-search", title: "GMI", tooltip: "GMI: spec status and builds", type: "custom",
      render: (container) => { container.append(panel.root); panel.refresh(); },
    });
  },
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData.name === "GMIIdentify") attachRanking(nodeType);
  },
});
