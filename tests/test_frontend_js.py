"""javascript/deltasvd.js under Node.js, with the ComfyUI frontend stubbed: it registers one
extension that gives each reporting Delta-SVD node a fixed-size summary box when the node is
created (never saved into the workflow), fills it after a run without resizing the node,
dims it when the graph is queued, shows a validation refusal or a run's error instead of the
previous numbers, refreshes the nodes' file lists after Save, and leaves other nodes alone.
The real frontend runs it in tests/test_comfyui_frontend_browser.py."""

import json
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
NODE = shutil.which("node")

STUBS = {
    "scripts/app.js": """
export const app = {
  refreshed: 0,
  lastNodeErrors: null,
  graph: { nodes: {}, getNodeById(id) { return this.nodes[id]; } },
  registerExtension(e) { globalThis.__ext = e; },
  async refreshComboInNodes() { this.refreshed += 1; },
};
""",
    "scripts/api.js": """
export const api = {
  listeners: {},
  addEventListener(kind, fn) { this.listeners[kind] = fn; },
  emit(kind, detail) { this.listeners[kind]?.({ detail }); },
};
""",
}

RUNNER = r"""
class El {
  constructor(tag) { this.tag = tag; this.style = {}; this.textContent = ""; this.children = []; }
  appendChild(c) { this.children.push(c); }
}
globalThis.document = { createElement: (tag) => new El(tag) };
const { app } = await import("./scripts/app.js");
const { api } = await import("./scripts/api.js");
await import("./extensions/deltasvd/deltasvd.js");
const ext = globalThis.__ext;
ext.setup();
class FakeNode {
  constructor(type) {
    this.type = type;
    this.widgets = [{ name: "delta_name" }];
    this.size = [300, 100];
  }
  addDOMWidget(name, type, element, options) {
    const w = { name, type, element, options };
    this.widgets.push(w);
    return w;
  }
  computeSize() {
    const box = this.widgets.find((w) => w.name === "deltasvd_summary");
    return [280, 100 + (box ? box.options.getMinHeight() : 0)];
  }
  setSize(s) { this.size = s; }
  setDirtyCanvas() {}
}
const box = (node) => {
  const w = node.widgets.find((w) => w.name === "deltasvd_summary");
  return w && { head: w.head.textContent, body: w.body.textContent, color: w.box.style.color,
                opacity: w.box.style.opacity, serialize: w.serialize,
                optionSerialize: w.options.serialize,
                height: [w.options.getMinHeight(), w.options.getMaxHeight()] };
};
const make = async (type, id) => {
  class T extends FakeNode {}
  T.prototype.calls = 0;
  T.prototype.onExecuted = function () { this.calls += 1; };
  await ext.beforeRegisterNodeDef(T, { name: type });
  const node = new T(type);
  node.onNodeCreated?.();
  app.graph.nodes[id] = node;
  return node;
};
const settle = () => new Promise((r) => setTimeout(r, 400));
const out = { name: ext.name };

const compress = await make("DeltaSVDCompress", "3");
out.created = { box: box(compress), size: [...compress.size] };
const message = { text: ["group layers\n...\ncompression ratio 375.6x"],
  deltasvd: [{ size_mb: 4.99, ratio: 375.6, ratio_against: "the tuned file (1874.1 MiB)",
               rel_error: 0.1181, rank_min: 1, rank_median: 18, rank_max: 174 }] };
compress.onExecuted(message);
compress.onExecuted(message);   // twice: one box, updated
out.compress = { calls: compress.calls, widgets: compress.widgets.length, box: box(compress),
                 size: compress.size };
compress.widgets.find((w) => w.name === "deltasvd_summary").beforeQueued();
out.queued = box(compress);
api.emit("execution_error", { node_id: "3", exception_message: "nothing changed: ..." });
out.failed = box(compress);

const apply = await make("DeltaSVDApply", "4");
apply.onExecuted({ text: ["applied 8 of 9\nNOT APPLIED: 1 LoRA modules matched no weight"],
  deltasvd: [{ size_mb: 4.99, rel_error: 0.1181, applied: 8, modules: 9, unmatched: 1,
               extras_applied: 2, extras_unmatched: 0 }] });
out.apply = box(apply);

const save = await make("DeltaSVDSave", "5");
save.onExecuted({ text: ["saved loras/deltas/x.safetensors (4.99 MiB)"],
                  deltasvd: [{ file: "deltas/x.safetensors" }] });
save.onExecuted({ text: ["saved loras/deltas/y.safetensors (4.99 MiB)"],
                  deltasvd: [{ file: "deltas/y.safetensors" }] });
await settle();
out.save = { box: box(save), refreshed: app.refreshed };
app.lastNodeErrors = { "5": { errors: [
  { details: "filename - loras/deltas/y.safetensors exists; choose another filename" },
  { details: "overwrite - loras/deltas/y.safetensors exists; choose another filename" }] } };
api.emit("promptQueued", {});
out.refused = box(save);

const load = await make("DeltaSVDLoad", "6");
api.emit("execution_cached", { nodes: ["6", "4"] });
out.load = { box: box(load), label: load.widgets[0].label, apply: box(apply) };

const other = await make("KSampler", "7");
other.onExecuted({ text: ["x"] });
out.other = { calls: other.calls, widgets: other.widgets.length };
console.log(JSON.stringify(out));
"""


@pytest.mark.skipif(NODE is None, reason="Node.js is not installed")
def test_extension_boxes_on_deltasvd_nodes_only(tmp_path):
    for path, text in STUBS.items():
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text(text)
    ext_dir = tmp_path / "extensions" / "deltasvd"
    ext_dir.mkdir(parents=True)
    shutil.copy(REPO / "javascript" / "deltasvd.js", ext_dir / "deltasvd.js")
    (tmp_path / "run.mjs").write_text(RUNNER)
    r = subprocess.run([NODE, "run.mjs"], cwd=tmp_path, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["name"] == "deltasvd.summary"
    # the box is there from the start, its height fixed: the node is sized once, for it
    created = out["created"]
    assert created["box"]["body"] == "after a run, its numbers show here"
    assert created["box"]["height"] == [150, 150] and created["size"] == [300, 250]
    assert created["box"]["serialize"] is False and created["box"]["optionSerialize"] is False
    c = out["compress"]
    assert c["calls"] == 2 and c["widgets"] == 2 and c["size"] == [300, 250]
    assert c["box"]["head"] == ("4.99 MiB  |  375.6x smaller than the tuned file (1874.1 MiB)"
                                "  |  rel. error 0.1181  |  ranks 1-174 (median 18)")
    assert "compression ratio 375.6x" in c["box"]["body"] and c["box"]["opacity"] == "1"
    assert out["queued"]["opacity"] == "0.5" and out["queued"]["head"] == c["box"]["head"]
    assert out["failed"]["head"] == "ERROR: nothing changed: ..." and not out["failed"]["body"]
    assert "error" in out["failed"]["color"] and out["failed"]["opacity"] == "1"
    a = out["apply"]
    assert a["head"] == ("8/9 modules applied  |  2 extras applied  |  1 NOT applied (see "
                         "below)  |  delta 4.99 MiB")
    assert "error" in a["color"] and a["height"] == [120, 120]
    s = out["save"]
    assert s["box"]["body"] == "saved loras/deltas/y.safetensors (4.99 MiB)"
    assert s["box"]["head"] == "" and s["refreshed"] == 1   # two saves, one refresh
    assert out["refused"]["head"] == ("NOT SAVED: loras/deltas/y.safetensors exists; choose "
                                      "another filename")
    assert "error" in out["refused"]["color"] and out["refused"]["body"] == ""
    # a node ComfyUI reused says so; numbers already shown stay
    assert out["load"]["box"]["body"] == "ComfyUI reused an earlier run's result (same inputs)"
    assert out["load"]["apply"]["head"] == a["head"]
    assert out["load"]["label"] == "file"
    assert out["other"] == {"calls": 1, "widgets": 1}
