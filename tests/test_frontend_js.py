"""javascript/deltasvd.js under Node.js, with the ComfyUI frontend stubbed: it registers one
extension that, after a Delta-SVD node runs, shows the numbers and the summary on the node in
a widget that is never saved into the workflow, and leaves other nodes alone."""

import json
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
NODE = shutil.which("node")

RUNNER = r"""
globalThis.document = { createElement: (tag) => ({ tag, style: {}, textContent: "" }) };
await import("./extensions/deltasvd/deltasvd.js");
const ext = globalThis.__ext;
class FakeNode {
  constructor() { this.widgets = []; this.size = [300, 100]; }
  addDOMWidget(name, type, element, options) {
    const w = { name, type, element, options };
    this.widgets.push(w);
    return w;
  }
  computeSize() { return [300, 100]; }
  setSize(s) { this.size = s; }
  setDirtyCanvas() {}
}
const out = { name: ext.name };
for (const [nodeName, message] of [
  ["DeltaSVDCompress", { text: ["group layers\n...\ncompression ratio 375.6x"],
    deltasvd: [{ size_mb: 4.99, ratio: 375.6, rel_error: 0.1181, rank_min: 1,
                 rank_median: 18, rank_max: 174 }] }],
  ["DeltaSVDApply", { text: ["applied 8 of 9\nNOT APPLIED: 1 LoRA modules matched no weight"],
    deltasvd: [{ size_mb: 4.99, rel_error: 0.1181, applied: 8, modules: 9, unmatched: 1,
                 extras_applied: 2, extras_unmatched: 0 }] }],
  ["KSampler", { text: ["x"] }],
]) {
  class T extends FakeNode {}
  let called = 0;
  T.prototype.onExecuted = function () { called += 1; };
  await ext.beforeRegisterNodeDef(T, { name: nodeName });
  const node = new T();
  node.onExecuted(message);
  node.onExecuted(message);   // twice: one widget, updated
  const w = node.widgets.find((w) => w.name === "deltasvd_summary");
  out[nodeName] = { called, widgets: node.widgets.length, text: w && w.element.textContent,
                    serialize: w && w.serialize, optionSerialize: w && w.options.serialize,
                    color: w && w.element.style.color, size: node.size };
}
console.log(JSON.stringify(out));
"""


@pytest.mark.skipif(NODE is None, reason="Node.js is not installed")
def test_extension_shows_numbers_on_deltasvd_nodes_only(tmp_path):
    (tmp_path / "scripts").mkdir()
    (tmp_path / "scripts" / "app.js").write_text(
        "export const app = { registerExtension(e) { globalThis.__ext = e; } };\n")
    ext_dir = tmp_path / "extensions" / "deltasvd"
    ext_dir.mkdir(parents=True)
    shutil.copy(REPO / "javascript" / "deltasvd.js", ext_dir / "deltasvd.js")
    (tmp_path / "run.mjs").write_text(RUNNER)
    r = subprocess.run([NODE, "run.mjs"], cwd=tmp_path, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["name"] == "deltasvd.summary"
    c = out["DeltaSVDCompress"]
    assert c["called"] == 2 and c["widgets"] == 1
    assert c["text"].startswith("4.99 MB  |  375.6x smaller  |  rel. error 0.1181  |  "
                                "ranks 1-174 (median 18)")
    assert "compression ratio 375.6x" in c["text"]
    assert c["serialize"] is False and c["optionSerialize"] is False
    assert c["size"][0] >= 560 and c["size"][1] > 100
    a = out["DeltaSVDApply"]
    assert "8/9 modules applied" in a["text"] and "1 NOT applied" in a["text"]
    assert "error" in a["color"]
    k = out["KSampler"]
    assert k["called"] == 2 and k["widgets"] == 0
