// Delta-SVD frontend extension.
//
// * Each Delta-SVD node that reports (Compress, Resize, Load, Apply, Save, Compare) carries a
//   summary box of a fixed height from the moment it is created: a headline (file size, ratio
//   and what it is against, error, ranks; Apply: what was applied; Compare: the mean scores)
//   over the full summary, which scrolls inside the box. A run never resizes a node, so it cannot grow over its neighbours. The box
//   is never saved in the workflow (serialize: false): workflows load without this extension.
// * Queueing dims the boxes (their numbers are the previous run's); a node refused before the
//   run (ComfyUI's validation: Save onto an existing file) or failing in it says why instead.
// * After Save writes a file, every node's file lists (Delta-SVD Load, Load LoRA) are fetched
//   again, so the new file can be picked without reloading the page.
//
// The nodes send {text: [summary], deltasvd: [numbers]} as their `ui` output; ComfyUI passes
// it to onExecuted.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

// Each node's box: its height in pixels (tables scroll in it) and whether lines wrap (Save's
// one line does; a table's columns must not).
const TABLE = { height: 150, wrap: false };
const BOXES = {
  DeltaSVDCompress: TABLE,
  DeltaSVDCompressFiles: TABLE,
  DeltaSVDResize: TABLE,
  DeltaSVDLoad: TABLE,
  DeltaSVDApply: { height: 120, wrap: false },
  DeltaSVDSave: { height: 56, wrap: true },
  DeltaSVDCompare: { height: 120, wrap: false },
};
const WIDGET = "deltasvd_summary";
const ERROR_COLOR = "var(--error-text, #f88)";
const TEXT_COLOR = "var(--input-text, #ddd)";
// Load's input is `delta_name` (saved API workflows use it); its label is shortened so that
// the file name, not the label, gets the node's width.
const LABELS = { DeltaSVDLoad: { delta_name: "file" } };
const REFRESH_DELAY_MS = 200;

function num(v, digits) {
  return typeof v === "number" ? v.toFixed(digits) : String(v);
}

export function headline(s) {
  if (!s) return "";
  if (s.applied !== undefined) return appliedHeadline(s);
  if (s.ssim_mean !== undefined) return compareHeadline(s);
  const parts = [];
  if (s.size_mb !== undefined) parts.push(`${num(s.size_mb, 2)} MiB`);
  if (s.ratio !== undefined) {
    const against = s.ratio_against ? ` than ${s.ratio_against}` : "";
    parts.push(`${num(s.ratio, 1)}x smaller${against}`);
  }
  if (s.rel_error !== undefined) parts.push(`rel. error ${num(s.rel_error, 4)}`);
  if (s.rank_median !== undefined) {
    parts.push(`ranks ${s.rank_min}-${s.rank_max} (median ${s.rank_median})`);
  }
  if (s.precision_warning) parts.push("PRECISION WARNING (see below)");
  return parts.join("  |  ");
}

// Apply: what went into the model (the delta's own numbers are on the node that made it).
function appliedHeadline(s) {
  const parts = [`${s.applied}/${s.modules} modules applied`];
  if (s.extras_applied) parts.push(`${s.extras_applied} extras applied`);
  const missed = (s.unmatched || 0) + (s.extras_unmatched || 0);
  if (missed) parts.push(`${missed} NOT applied (see below)`);
  if (s.size_mb !== undefined) parts.push(`delta ${num(s.size_mb, 2)} MiB`);
  return parts.join("  |  ");
}

// Compare: the means, and the picture furthest from its reference. PSNR comes as the string
// "inf" when every picture is identical (JSON has no infinity).
function compareHeadline(s) {
  const parts = [`mean SSIM ${num(s.ssim_mean, 4)}`, `mean PSNR ${num(s.psnr_mean, 2)} dB`];
  if (s.pictures > 1) {
    parts.push(`lowest SSIM ${num(s.ssim_min, 4)} (picture ${s.ssim_min_picture})`);
  }
  parts.push(`${s.pictures} picture${s.pictures === 1 ? "" : "s"}`);
  return parts.join("  |  ");
}

function element(tag, style) {
  const el = document.createElement(tag);
  Object.assign(el.style, style);
  return el;
}

function summaryBox({ height, wrap }) {
  const box = element("div", {
    display: "flex",
    flexDirection: "column",
    gap: "2px",
    boxSizing: "border-box",
    height: `${height}px`,
    overflow: "hidden",
    padding: "3px 6px",
    fontFamily: "monospace",
    fontSize: "10px",
    lineHeight: "1.25",
    color: TEXT_COLOR,
    background: "var(--comfy-input-bg, #222)",
    borderRadius: "4px",
    userSelect: "text",
  });
  const head = element("div", { flex: "none", whiteSpace: "normal", fontWeight: "bold" });
  const body = element("pre", {
    flex: "1 1 auto",
    minHeight: "0",
    margin: "0",
    overflow: "auto",
    overflowWrap: "anywhere",
    font: "inherit",
  });
  box.appendChild(head);
  box.appendChild(body);
  return { box, head, body, wrap };
}

function addSummaryWidget(node, layout) {
  const parts = summaryBox(layout);
  const height = layout.height;
  const widget = node.addDOMWidget(WIDGET, "deltasvd_summary", parts.box, {
    serialize: false,
    hideOnZoom: false,
    getValue: () => parts.body.textContent,
    setValue: () => {},
    getMinHeight: () => height,
    getMaxHeight: () => height,
  });
  widget.serialize = false;
  Object.assign(widget, parts);
  widget.beforeQueued = () => {
    parts.box.style.opacity = "0.5"; // the numbers shown are the previous run's
  };
  setBox(widget, "empty", "", "after a run, its numbers show here");
  return widget;
}

// state: "empty" (nothing to show yet), "shown" (a run's numbers), "failed" (an error)
function setBox(widget, state, head, body) {
  widget.state = state;
  widget.head.textContent = head;
  widget.head.style.display = head ? "" : "none";
  widget.body.textContent = body;
  widget.body.style.whiteSpace = widget.wrap || state === "empty" ? "pre-wrap" : "pre";
  widget.body.style.opacity = state === "empty" ? "0.6" : "";
  widget.box.style.opacity = "1";
  const alarm = state === "failed" || /NOT APPLIED|PRECISION WARNING/.test(body);
  widget.box.style.color = alarm ? ERROR_COLOR : TEXT_COLOR;
}

function summaryOf(node) {
  return node?.widgets?.find((w) => w.name === WIDGET);
}

// The node's minimum size now includes the box; keep any larger size the workflow gave it.
function fitBox(node) {
  const [w, h] = node.computeSize();
  node.setSize([Math.max(node.size[0], w), Math.max(node.size[1], h)]);
}

function show(node, message) {
  const widget = summaryOf(node);
  const stats = message?.deltasvd?.[0];
  const text = message?.text?.[0] ?? "";
  if (!widget || (!stats && !text)) return;
  setBox(widget, "shown", headline(stats), text);
  if (stats?.file) refreshFileLists();
  node.setDirtyCanvas?.(true, true);
}

function showFailure(node, why) {
  const widget = summaryOf(node);
  if (!widget) return;
  const what = node.type === "DeltaSVDSave" ? "NOT SAVED" : "ERROR";
  setBox(widget, "failed", `${what}: ${why}`, "");
  node.setDirtyCanvas?.(true, true);
}

// ComfyUI's validation errors, as the frontend keeps them: {node id: {errors: [...]}}. Each
// input VALIDATE_INPUTS received repeats the message as "<input> - <message>": show it once.
function validationMessage(entry) {
  const seen = new Set();
  for (const e of entry?.errors ?? []) {
    const why = String(e.details || e.message || "").replace(/^\w+ - /, "");
    if (why) seen.add(why);
  }
  return [...seen].join("; ");
}

function nodeById(id) {
  return app.graph?.getNodeById?.(id);
}

function showValidationErrors() {
  for (const [id, entry] of Object.entries(app.lastNodeErrors ?? {})) {
    const node = nodeById(id);
    if (summaryOf(node)) showFailure(node, validationMessage(entry));
  }
}

function showExecutionError(event) {
  const detail = event?.detail ?? {};
  const node = nodeById(detail.node_id);
  if (summaryOf(node)) showFailure(node, detail.exception_message ?? "failed");
}

// ComfyUI skips a node whose inputs are unchanged and sends nothing for it: numbers already
// on the node are current; a node new to the page (another workflow ran it) says why it has
// none.
function showCached(event) {
  for (const id of event?.detail?.nodes ?? []) {
    const widget = summaryOf(nodeById(id));
    if (widget?.state === "shown") widget.box.style.opacity = "1";
    if (widget?.state === "empty") {
      setBox(widget, "empty", "", "ComfyUI reused an earlier run's result (same inputs)");
    }
  }
}

// One refresh for the saves of a run (a graph may hold several Save nodes).
let refreshTimer = null;
function refreshFileLists() {
  clearTimeout(refreshTimer);
  refreshTimer = setTimeout(() => {
    Promise.resolve(app.refreshComboInNodes?.()).catch((err) =>
      console.warn("deltasvd: cannot refresh the file lists", err),
    );
  }, REFRESH_DELAY_MS);
}

function relabel(node) {
  for (const [name, label] of Object.entries(LABELS[node.type] ?? {})) {
    const widget = node.widgets?.find((w) => w.name === name);
    if (widget) widget.label = label;
  }
}

app.registerExtension({
  name: "deltasvd.summary",
  setup() {
    api.addEventListener("promptQueued", showValidationErrors);
    api.addEventListener("execution_error", showExecutionError);
    api.addEventListener("execution_cached", showCached);
  },
  async beforeRegisterNodeDef(nodeType, nodeData) {
    const layout = BOXES[nodeData.name];
    if (!layout) return;
    const onNodeCreated = nodeType.prototype.onNodeCreated;
    nodeType.prototype.onNodeCreated = function () {
      const r = onNodeCreated?.apply(this, arguments);
      try {
        relabel(this);
        addSummaryWidget(this, layout);
        fitBox(this);
      } catch (err) {
        console.warn("deltasvd: cannot add the summary box", err);
      }
      return r;
    };
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      const r = onExecuted?.apply(this, arguments);
      try {
        show(this, message);
      } catch (err) {
        console.warn("deltasvd: cannot show the summary", err);
      }
      return r;
    };
  },
});
