// Delta-SVD frontend extension: after a Delta-SVD node runs, show on the node what it made:
// file size, compression ratio, relative error, ranks (Compress, Resize, Load, Save) and what
// was applied or matched nothing (Apply), with the full summary text below.
//
// The nodes send {text: [summary], deltasvd: [numbers]} as their `ui` output; ComfyUI passes
// it to onExecuted. The display is a read-only DOM widget that is never saved in the workflow
// (serialize: false), so workflows stay loadable without this extension.
import { app } from "../../scripts/app.js";

const NODES = new Set([
  "DeltaSVDCompress",
  "DeltaSVDCompressFiles",
  "DeltaSVDApply",
  "DeltaSVDResize",
  "DeltaSVDLoad",
  "DeltaSVDSave",
]);
const WIDGET = "deltasvd_summary";

function num(v, digits) {
  return typeof v === "number" ? v.toFixed(digits) : String(v);
}

export function headline(s) {
  if (!s) return "";
  const parts = [];
  if (s.size_mb !== undefined) parts.push(`${num(s.size_mb, 2)} MB`);
  if (s.ratio !== undefined) parts.push(`${num(s.ratio, 1)}x smaller`);
  if (s.rel_error !== undefined) parts.push(`rel. error ${num(s.rel_error, 4)}`);
  if (s.rank_median !== undefined) {
    parts.push(`ranks ${s.rank_min}-${s.rank_max} (median ${s.rank_median})`);
  }
  if (s.applied !== undefined) parts.push(`${s.applied}/${s.modules} modules applied`);
  if (s.extras_applied) parts.push(`${s.extras_applied} extras applied`);
  const missed = (s.unmatched || 0) + (s.extras_unmatched || 0);
  if (missed) parts.push(`${missed} NOT applied (see below)`);
  if (s.precision_warning) parts.push("PRECISION WARNING (see below)");
  return parts.join("  |  ");
}

function summaryWidget(node) {
  let widget = node.widgets?.find((w) => w.name === WIDGET);
  if (widget) return widget;
  const el = document.createElement("pre");
  Object.assign(el.style, {
    margin: "0",
    padding: "4px 6px",
    overflow: "auto",
    whiteSpace: "pre",
    fontFamily: "monospace",
    fontSize: "10px",
    lineHeight: "1.25",
    color: "var(--input-text, #ddd)",
    background: "var(--comfy-input-bg, #222)",
    borderRadius: "4px",
    userSelect: "text",
  });
  widget = node.addDOMWidget(WIDGET, "deltasvd_summary", el, {
    serialize: false,
    hideOnZoom: false,
    getValue: () => el.textContent,
    setValue: (v) => {
      el.textContent = v ?? "";
    },
    getMinHeight: () => 60,
  });
  widget.serialize = false;
  widget.element = el;
  return widget;
}

function show(node, message) {
  const stats = message?.deltasvd?.[0];
  const text = message?.text?.[0] ?? "";
  if (!stats && !text) return;
  const widget = summaryWidget(node);
  const head = headline(stats);
  widget.element.textContent = [head, text].filter(Boolean).join("\n\n");
  widget.element.style.color = /NOT APPLIED|PRECISION WARNING/.test(text)
    ? "var(--error-text, #f88)"
    : "var(--input-text, #ddd)";
  const lines = widget.element.textContent.split("\n").length;
  const width = Math.max(node.size[0], 560);
  const height = Math.max(node.size[1], node.computeSize()[1] + Math.min(lines, 24) * 13);
  node.setSize([width, height]);
  node.setDirtyCanvas?.(true, true);
}

app.registerExtension({
  name: "deltasvd.summary",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!NODES.has(nodeData.name)) return;
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
