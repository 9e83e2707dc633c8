// gmi for ComfyUI: renders the ranking inside the GMI Identify node and adds a "GMI" side panel
// listing spec status per checkpoint with a "Build missing specs" action and live progress.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const STYLE = `
.gmi-ranking { font: 12px sans-serif; color: var(--input-text, #ddd); overflow-y: auto; padding: 4px;
  box-sizing: border-box; background: var(--comfy-input-bg, #222); border-radius: 6px; }
.gmi-ranking .gmi-head { opacity: .8; margin-bottom: 4px; white-space: normal; }
.gmi-row { display: flex; align-items: center; gap: 6px; padding: 3px 2px; border-bottom: 1px solid #ffffff14; }
.gmi-row.gmi-chosen { background: #2d6a4f55; border-radius: 4px; }
.gmi-rank { width: 22px; text-align: right; font-weight: bold; }
.gmi-name { flex: 1; overflow: hidden; text-overflow: ellipsis; white-space: nowrap; }
.gmi-score { width: 64px; text-align: right; font-family: monospace; opacity: .85; }
.gmi-thumbs img { width: 40px; height: 40px; border-radius: 3px; margin-left: 2px; image-rendering: pixelated; }
.gmi-panel { padding: 8px; font: 13px sans-serif; color: var(--input-text, #ddd); }
.gmi-panel table { width: 100%; border-collapse: collapse; margin: 6px 0; }
.gmi-panel td { padding: 2px 4px; border-bottom: 1px solid #ffffff14; }
.gmi-panel .gmi-state-ready { color: #74c69d; } .gmi-panel .gmi-state-missing { color: #f4a261; }
.gmi-panel .gmi-state-partial, .gmi-panel .gmi-state-stale { color: #e9c46a; } .gmi-panel .gmi-state-corrupt { color: #e76f51; }
.gmi-panel progress { width: 100%; } .gmi-panel button { margin-right: 6px; }
.gmi-float { position: fixed; right: 12px; top: 60px; width: 360px; max-height: 70vh; overflow: auto; z-index: 1000;
  background: var(--comfy-menu-bg, #353535); border: 1px solid #555; border-radius: 8px; }
`;

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

function apiUrl(path) {
  return api.apiURL ? api.apiURL(path) : "/api" + path;
}

// ---- ranking inside the Identify node ------------------------------------------------------
export function renderRanking(container, data) {
  container.replaceChildren();
  if (!data) return;
  const who = data.prompt_source === "user" ? "prompt" : "pseudo-prompt";
  container.append(el("div", { class: "gmi-head", text: `${data.method} · ${who}: “${data.pseudo_prompt}”` }));
  for (const row of data.ranking) {
    const thumbs = el("span", { class: "gmi-thumbs" });
    for (const m of row.top_prompts.slice(0, 3)) {
      thumbs.append(el("img", { src: apiUrl(m.thumbnail), title: `${m.prompt} (weight ${m.weight.toFixed(3)})`, alt: "" }));
    }
    container.append(
      el("div", { class: "gmi-row" + (row.name === data.chosen ? " gmi-chosen" : ""), title: row.sha256 },
        el("span", { class: "gmi-rank", text: String(row.rank) }),
        el("span", { class: "gmi-name", text: row.name + rowMarks(row) }),
        el("span", { class: "gmi-score", text: Number(row.score).toFixed(4) }),
        thumbs));
  }
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
      this.gmiRankingEl = el("div", { class: "gmi-ranking" });
      this.addDOMWidget("gmi_ranking", "gmi_ranking", this.gmiRankingEl, { serialize: false, hideOnZoom: false,
        getMinHeight: () => 60 + 46 * Math.min(6, (this.gmiLastRanking?.ranking?.length || 1)) });
    }
    this.gmiLastRanking = data;
    renderRanking(this.gmiRankingEl, data);
    const size = this.computeSize();
    this.setSize([Math.max(this.size[0], 380), Math.max(this.size[1], size[1])]);
    this.setDirtyCanvas?.(true, true);
  };
}

// ---- the side panel ----------------------------------------------------------------------------
class GmiPanel {
  constructor() {
    this.root = el("div", { class: "gmi-panel" });
    this.info = el("div");
    this.table = el("table");
    this.progressText = el("div");
    this.progress = el("progress", { max: "1", value: "0" });
    this.progress.style.display = "none";
    const refresh = el("button", { text: "Refresh" });
    refresh.onclick = () => this.refresh();
    this.buildButton = el("button", { text: "Build missing specs" });
    this.buildButton.onclick = () => this.buildMissing();
    this.root.append(el("h3", { text: "gmi specs" }), this.info, el("div", {}, this.buildButton, refresh),
      this.progress, this.progressText, this.table);
    this.addLibrarySection();
    api.addEventListener("gmi.build.progress", (e) => this.onProgress(e.detail));
    api.addEventListener("gmi.build.done", (e) => this.onDone(e.detail));
  }

  async refresh() {
    this.info.textContent = "loading…";
    try {
      const r = await api.fetchApi("/gmi/status");
      const data = await r.json();
      if (!r.ok) throw new Error(data.error || r.statusText);
      this.config = data.config;
      const c = data.config;
      this.info.textContent = `${data.encoder_id} · ${data.prompt_set.name} (${data.prompt_set.size} prompts) · ` +
        `${c.images_per_prompt} img/prompt · ${c.steps} steps · ${c.width}x${c.height}`;
      this.table.replaceChildren();
      for (const s of data.checkpoints) {
        this.table.append(el("tr", {},
          el("td", { text: s.name, title: s.sha256 }),
          el("td", { class: "gmi-state-" + s.state, text: s.state }),
          el("td", { text: `${s.prompts_done}/${s.prompts_total}` + (s.observed_images ? ` + ${s.observed_images} observed` : "") })));
      }
      for (const s of data.skipped) {
        this.table.append(el("tr", {}, el("td", { text: s.name }), el("td", { text: "skipped" }),
          el("td", { text: s.reason })));
      }
    } catch (err) {
      this.info.textContent = "gmi: " + err.message;
    }
  }

  async buildMissing() {
    const c = this.config || (await (await api.fetchApi("/gmi/options")).json()).config;
    const prompt = {
      gmi_encoder: { class_type: "GMILoadEncoder", inputs: { encoder: c.encoder, allow_download: false } },
      gmi_build: { class_type: "GMIBuildSpecs", inputs: {
        encoder: ["gmi_encoder", 0], which: "missing", prompt_set: c.prompt_set, max_prompts: c.max_prompts,
        images_per_prompt: c.images_per_prompt, steps: c.steps, cfg: c.cfg, sampler_name: c.sampler_name,
        scheduler: c.scheduler, width: c.width, height: c.height, seed: c.seed, checkpoints: "", negative_prompt: "" } },
    };
    const r = await api.fetchApi("/prompt", { method: "POST", headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ prompt, client_id: api.clientId }) });
    if (!r.ok) this.progressText.textContent = "could not queue the build: " + (await r.text()).slice(0, 300);
    else this.progressText.textContent = "build queued…";
  }

  // specs without generating: import the output folder's images, show near-duplicate groups
  addLibrarySection() {
    const importButton = el("button", { text: "Import images from output" });
    const groupsButton = el("button", { text: "Near-duplicate groups" });
    this.libraryText = el("div");
    importButton.onclick = () => this.importImages();
    groupsButton.onclick = () => this.showGroups();
    this.root.append(el("h4", { text: "specs from your images" }), el("div", {}, importButton, groupsButton), this.libraryText);
  }

  async importImages() {
    this.libraryText.textContent = "reading the output folder…";
    const c = this.config || {};
    const r = await api.fetchApi("/gmi/import-images", { method: "POST", headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ root: "output", subfolder: "", encoder: c.encoder, prompt_set: c.prompt_set, max_prompts: c.max_prompts }) });
    const data = await r.json();
    if (!r.ok) { this.libraryText.textContent = "gmi: " + data.error; return; }
    const skipped = Object.entries(data.skipped_by_reason).map(([k, v]) => `${v} ${k}`).join(", ");
    this.libraryText.textContent = `scanned ${data.scanned}, added ${data.added_total} image(s) to ` +
      `${Object.keys(data.added).length} observed spec(s)` + (skipped ? `; skipped: ${skipped}` : "");
    this.refresh();
  }

  async showGroups() {
    this.libraryText.textContent = "comparing specs…";
    const c = this.config || {};
    const q = new URLSearchParams({ encoder: c.encoder || "", prompt_set: c.prompt_set || "platform", max_prompts: c.max_prompts || 0 });
    const r = await api.fetchApi("/gmi/map?" + q);
    const data = await r.json();
    if (!r.ok) { this.libraryText.textContent = "gmi: " + data.error; return; }
    this.libraryText.replaceChildren(el("div", { text: data.groups.length ?
      `${data.groups.length} near-duplicate group(s) among ${data.checkpoints.length} checkpoints:` : "no near-duplicates" }));
    for (const g of data.groups) this.libraryText.append(el("div", { text: "• " + g.join(", ") }));
  }

  onProgress(p) {
    this.progress.style.display = "";
    this.progress.value = p.images_total ? p.images_done / p.images_total : 0;
    this.progressText.textContent = `${p.index + 1}/${p.count} ${p.checkpoint}: ${p.prompts_done}/${p.prompts_total} prompts`;
  }

  onDone(report) {
    this.progress.style.display = "none";
    const failed = report.failed.map((f) => `${f.name}: ${f.reason}`).join("; ");
    this.progressText.textContent = `built ${report.built.length}` + (report.cancelled ? " (interrupted)" : "") +
      (failed ? ` · failed: ${failed}` : "");
    this.refresh();
  }
}

app.registerExtension({
  name: "gmi.identify",
  async setup() {
    document.head.append(el("style", { text: STYLE }));
    const panel = new GmiPanel();
    if (app.extensionManager?.registerSidebarTab) {
      app.extensionManager.registerSidebarTab({
        id: "gmi", icon: "pi pi-search", title: "GMI", tooltip: "gmi: spec status and builds", type: "custom",
        render: (container) => { container.append(panel.root); panel.refresh(); },
      });
    } else {  // older frontends: a floating panel toggled from the menu
      const box = el("div", { class: "gmi-float" }, panel.root);
      box.style.display = "none";
      document.body.append(box);
      const button = el("button", { text: "GMI" });
      button.onclick = () => { box.style.display = box.style.display ? "" : "none"; if (!box.style.display) panel.refresh(); };
      document.querySelector(".comfy-menu")?.append(button);
    }
  },
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData.name === "GMIIdentify") attachRanking(nodeType);
  },
});
