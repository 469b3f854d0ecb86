"""The node pack in the real ComfyUI frontend (the comfyui_frontend_package ComfyUI 0.3.75
serves), in headless Chromium, against the server of test_comfyui_server.py (its fixtures):

* the template browser lists the three templates under this pack with readable titles, and
  each thumbnail loads (no 404);
* each shipped template (example_workflows/*.json), loaded the way the template browser loads
  it and pointed at the test's models, runs from the page's queue to completion; no node
  changes size in the run and no two nodes overlap after it (app.graph's node bounds);
* the Delta-SVD Load and Load LoRA nodes already on the page list the file Save just wrote,
  with no page reload;
* queued again with overwrite off, Save is refused before the graph runs and its box says
  so instead of the previous "saved ..." line.

Screenshots of each template after its run are left in tests/out/comfyui_<name>.png. With
DELTASVD_WRITE_THUMBNAILS=1, test_write_thumbnails rewrites the template browser's thumbnails
(example_workflows/<name>.jpg)."""

import json
import os
import time

import pytest

from test_comfyui_nodes import intersecting
from test_comfyui_server import (APPLY, COMPARE, COMPRESS, PACK, REPO,  # noqa: F401
                                 env, server)   # module fixtures
from ui_env import CHROMEDRIVER, CHROMIUM, _missing
from ui_env import chromium as browser_session

SHOTS = REPO / "tests" / "out"
TEMPLATES = REPO / "example_workflows"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--window-size=1600,1000"]
PAGE_TIMEOUT = 120
RUN_TIMEOUT = 300
SAVED = "deltas/browser.safetensors"
ENDS = ("execution_success", "execution_error", "execution_interrupted")   # of a run


@pytest.fixture(scope="module")
def chromium():
    """Skips (fails on CI) without selenium and Chromium, before the server starts."""
    import importlib.util
    if importlib.util.find_spec("selenium") is None:
        _missing("selenium")
    for path in (CHROMIUM, CHROMEDRIVER):
        if not os.path.exists(path):
            _missing(path)


class Page:
    """The ComfyUI page; JS helpers are installed once as window.__dsvd."""

    HELPERS = r"""
    const api = window.comfyAPI.api.api;
    // the page load filled the browser's buffer of fetched resources (250): what comes next
    performance.clearResourceTimings();
    performance.setResourceTimingBufferSize(5000);
    const events = [];
    for (const kind of ["execution_success", "execution_error", "execution_interrupted",
                        "execution_cached", "executed", "promptQueued"]) {
      api.addEventListener(kind, (e) => events.push([kind, e.detail ?? null]));
    }
    window.__dsvd = {
      events,
      // what the template browser does: fetch the file from the pack's templates, load it
      async load(name, changes) {
        const url = api.apiURL(`/workflow_templates/${arguments[2]}/${name}.json`);
        const wf = await (await fetch(url)).json();
        await app.loadGraphData(wf, true, true, name, { openSource: "template" });
        for (const [id, values] of Object.entries(changes)) {
          const node = app.graph.getNodeById(Number(id));
          for (const [name, value] of Object.entries(values)) {
            node.widgets.find((w) => w.name === name).value = value;
          }
        }
      },
      bounds() {
        return app.graph.nodes.map((n) => ({ id: n.id, type: n.type, title: n.title,
                                             box: Array.from(n.getBounding()),
                                             size: Array.from(n.size) }));
      },
      box(id) {
        const w = app.graph.getNodeById(id).widgets.find((w) => w.name === "deltasvd_summary");
        return { head: w.head.textContent, body: w.body.textContent,
                 color: w.box.style.color };
      },
      combo(id, name) {
        return app.graph.getNodeById(id).widgets.find((w) => w.name === name).options.values;
      },
    };
    """

    def __init__(self, driver, url):
        self.d, self.url = driver, url

    def js(self, script, *args):
        return self.d.execute_script(script, *args)

    def wait(self, script, timeout=PAGE_TIMEOUT, *args):
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            value = self.js(script, *args)
            if value:
                return value
            time.sleep(0.3)
        raise TimeoutError(f"{script[:200]} still false after {timeout}s")

    def open(self):
        self.d.get(self.url)
        self.wait("return !!(window.app && app.graph && window.comfyAPI?.api?.api && "
                  "LiteGraph.registered_node_types.DeltaSVDLoad)")
        self.js(self.HELPERS)

    def close_dialogs(self):
        """Close the open dialog with its X (the visible button in its top right corner)."""
        self.js("const x = [...document.querySelectorAll('.p-dialog button.absolute')].filter("
                "  b => getComputedStyle(b).opacity !== '0'); x.at(-1)?.click();")
        self.wait("return !document.querySelector('.p-dialog')", 10)

    def load(self, name, changes):
        self.d.execute_async_script(
            "const done = arguments[arguments.length - 1];"
            "__dsvd.load(arguments[0], arguments[1], arguments[2]).then(() => done(null),"
            " (e) => done(String(e)));", name, changes, PACK)
        return self.js("return __dsvd.bounds()")

    def add_node(self, node_type, pos):
        """A node added to the graph (unconnected: the run ignores it); its id."""
        return self.js("const n = LiteGraph.createNode(arguments[0]); n.pos = arguments[1];"
                       "app.graph.add(n); return n.id;", node_type, pos)

    def queue(self):
        """Queue the graph as the Run button does; the events of that run (once the frontend
    has read the queue's answer and the run has ended)."""
        start = self.js("return __dsvd.events.length")
        self.js("app.queuePrompt(0, 1)")
        done = ("const e = __dsvd.events.slice(arguments[0]);"
                "return e.some(x => arguments[1].includes(x[0])) &&"
                "  e.some(x => x[0] === 'promptQueued') && e;")
        return self.wait(done, RUN_TIMEOUT, start, ENDS)

    def command(self, name):
        self.js("app.extensionManager.command.execute(arguments[0])", name)

    def screenshot(self, path, types=None, aspect=None):
        """A picture of the nodes of `types` (default: all), side and top bars hidden (focus
        mode), widened to `aspect` (width / height) if given. Returns their box in it."""
        self.command("Workspace.ToggleFocusMode")
        time.sleep(0.5)
        box = self.js(FRAME, types, aspect)
        time.sleep(1.0)
        self.d.save_screenshot(str(path))
        self.command("Workspace.ToggleFocusMode")
        return box


# Zoom the canvas onto nodes (arguments[0]: their types, or null for all), their box widened
# to an aspect ratio (arguments[1], or null); returns the box in page pixels.
FRAME = """
const c = app.canvas;
const b = app.graph.nodes.filter(n => !arguments[0] || arguments[0].includes(n.type))
  .map(n => n.getBounding());
let x0 = Math.min(...b.map(r => r[0])), y0 = Math.min(...b.map(r => r[1]));
let x1 = Math.max(...b.map(r => r[0] + r[2])), y1 = Math.max(...b.map(r => r[1] + r[3]));
const aspect = arguments[1];
if (aspect && (x1 - x0) / (y1 - y0) > aspect) {
  const grow = ((x1 - x0) / aspect - (y1 - y0)) / 2; y0 -= grow; y1 += grow;
} else if (aspect) {
  const grow = ((y1 - y0) * aspect - (x1 - x0)) / 2; x0 -= grow; x1 += grow;
}
const s = Math.min(c.canvas.clientWidth / (x1 - x0 + 80),
                   c.canvas.clientHeight / (y1 - y0 + 80), 1.2);
c.ds.scale = s;
c.ds.offset = [-x0 + 40 / s, -y0 + 40 / s];
c.setDirty(true, true);
return [...app.canvasPosToClientPos([x0, y0]), ...app.canvasPosToClientPos([x1, y1])];
"""


@pytest.fixture(scope="module")
def page(chromium, server):  # noqa: F811  (the imported fixture)
    with browser_session(FLAGS, prefix="dsvd-comfy-") as driver:
        driver.set_script_timeout(PAGE_TIMEOUT)
        # no first-visit template browser, no minimap over the graph
        # and no canvas info; text drawn at any zoom (the screenshots show whole graphs)
        status, _ = server.post("/settings", {"Comfy.TutorialCompleted": True,
                                              "Comfy.Minimap.Visible": False,
                                              "Comfy.Graph.CanvasInfo": False,
                                              "LiteGraph.Canvas.MinFontSizeForLOD": 0})
        assert status == 200
        p = Page(driver, server.url)
        p.open()
        yield p


def overlaps(bounds):
    """Pairs of nodes whose rectangles (title bar included) intersect."""
    return intersecting({f"{b['id']} {b['title']}": b["box"] for b in bounds})


def run_template(page, name, changes, setup=None):
    """Load, `setup(page, bounds)`, queue, wait; checks the layout before and after the run.
    Returns the run's events."""
    page.load(name, changes)
    if setup:
        setup(page, page.js("return __dsvd.bounds()"))
    before = page.js("return __dsvd.bounds()")
    assert not overlaps(before), (name, overlaps(before))
    events = page.queue()
    ends = [e for e in events if e[0] in ENDS]
    assert [e[0] for e in ends] == ["execution_success"], (name, json.dumps(ends)[:3000])
    time.sleep(0.5)   # let the frontend draw the outputs
    after = page.js("return __dsvd.bounds()")
    assert not overlaps(after), (name, overlaps(after))
    sizes = {b["id"]: b["size"] for b in before}
    grown = [(b["title"], sizes[b["id"]], b["size"]) for b in after if b["size"] !=
             sizes[b["id"]]]
    assert not grown, (name, grown)
    return events


def keep_picture(page, name):
    """tests/out/comfyui_<name>.png: the whole graph after its run."""
    SHOTS.mkdir(exist_ok=True)
    page.screenshot(SHOTS / f"comfyui_{name.replace(' ', '_')}.png")


def changes_for(name, env):  # noqa: F811  (the imported fixture's name)
    """{node id: {widget: value}}: a template pointed at the test's models, small and quick."""
    small = {"width": 64, "height": 64}
    return {
        COMPRESS: {1: {"ckpt_name": env.tuned}, 2: {"ckpt_name": env.base},
                   4: {"filename": SAVED[:-len(".safetensors")]},
                   5: {"width": 640, "height": 360}},
        APPLY: {1: {"ckpt_name": env.base}, 2: {"delta_name": SAVED}, 6: small,
                7: {"steps": 1}},
        COMPARE: {1: {"ckpt_name": env.tuned}, 2: {"ckpt_name": env.base},
                  3: {"delta_name": SAVED}, 9: small, 10: {"steps": 1}, 11: {"steps": 1}},
    }[name]


# ---------------------------------------------------------------------------------------------


def test_template_browser_shows_titles_and_thumbnails(page):
    names = sorted(p.stem for p in TEMPLATES.glob("*.json"))
    assert names == sorted([COMPRESS, APPLY, COMPARE])
    assert sorted(p.stem for p in TEMPLATES.glob("*.jpg")) == names
    page.command("Comfy.BrowseTemplates")
    page.wait("return [...document.querySelectorAll('.p-dialog span')].some("
              "e => e.textContent.trim() === arguments[0])", PAGE_TIMEOUT, PACK)
    page.js("[...document.querySelectorAll('.p-dialog span')].filter("
            "e => e.textContent.trim() === arguments[0]).at(-1).click()", PACK)
    # each card: the title and the picture (the frontend shows it from a blob: URL)
    cards = page.wait(
        "const cards = arguments[1].map(name => {"
        "  let e = [...document.querySelectorAll('.p-dialog *')].find("
        "    x => x.children.length === 0 && x.textContent.trim() === name);"
        "  while (e && !e.querySelector('img')) e = e.parentElement;"
        "  const img = e && e.querySelector('img');"
        "  return img && img.complete && img.naturalWidth > 0 && [name, img.naturalWidth];"
        "});"
        "return cards.every(Boolean) && cards;", PAGE_TIMEOUT, PACK, names)
    assert [c[0] for c in cards] == names, cards
    fetched = page.js(
        "return performance.getEntriesByType('resource').filter("
        "  e => e.name.includes('/workflow_templates/' + arguments[0] + '/')).map("
        "  e => [decodeURIComponent(new URL(e.name).pathname), e.responseStatus]);", PACK)
    for name in names:
        assert [f"/api/workflow_templates/{PACK}/{name}.jpg", 200] in fetched, fetched
    assert all(status == 200 for _, status in fetched), fetched
    page.close_dialogs()


def node_id(page, node_type):
    (found,) = [b["id"] for b in page.js("return __dsvd.bounds()") if b["type"] == node_type]
    return found


@pytest.fixture(scope="module")
def compressed(page, env):  # noqa: F811  (the imported fixture)
    """The compress template run from the page, with a Delta-SVD Load and a Load LoRA node
    added below it first (their lists are the page's, from before the file existed)."""
    added = {}

    def add_loaders(page, bounds):
        bottom = max(b["box"][1] + b["box"][3] for b in bounds)
        added["load"] = page.add_node("DeltaSVDLoad", [40, bottom + 100])
        added["lora"] = page.add_node("LoraLoader", [480, bottom + 100])
        assert SAVED not in page.js("return __dsvd.combo(arguments[0], 'delta_name')",
                                    added["load"])
    run_template(page, COMPRESS, changes_for(COMPRESS, env), add_loaders)
    listed = {}
    for node, widget in ((added["load"], "delta_name"), (added["lora"], "lora_name")):
        try:
            page.wait("return __dsvd.combo(arguments[0], arguments[1]).includes(arguments[2])",
                      30, node, widget, SAVED)
        except TimeoutError:
            pass
        listed[widget] = page.js("return __dsvd.combo(arguments[0], arguments[1])", node, widget)
        page.js("app.graph.remove(app.graph.getNodeById(arguments[0]))", node)
    keep_picture(page, COMPRESS)
    return listed


def test_compress_template_runs_without_overlap(page, env, compressed):  # noqa: F811
    assert (env.loras / SAVED).is_file()
    save = page.js("return __dsvd.box(arguments[0])", node_id(page, "DeltaSVDSave"))
    assert save["body"].startswith(f"saved loras/{SAVED} ("), save
    compress = page.js("return __dsvd.box(arguments[0])", node_id(page, "DeltaSVDCompress"))
    assert "x smaller than the weights in memory (" in compress["head"], compress
    assert "rel.err" in compress["body"] and "MiB" in compress["head"], compress


def test_new_file_is_listed_without_reload(compressed):
    """The lists of a Delta-SVD Load and a Load LoRA node on the page since before the save."""
    assert SAVED in compressed["delta_name"], compressed
    assert SAVED in compressed["lora_name"], compressed


def test_save_onto_existing_file_is_refused_before_the_run(page, env, compressed):  # noqa
    path = env.loras / SAVED
    mtime = path.stat().st_mtime_ns
    save = node_id(page, "DeltaSVDSave")
    events = page.queue()          # the same graph again, overwrite off
    ends = [e[0] for e in events if e[0] in ENDS]
    assert ends == ["execution_success"], events   # the other outputs ran (cached)
    errors = page.js("return app.lastNodeErrors")
    assert list(errors) == [str(save)], errors
    box = page.js("return __dsvd.box(arguments[0])", save)
    assert box["head"] == (f"NOT SAVED: loras/{SAVED} exists; choose another filename or "
                           "enable overwrite"), box
    assert "error" in box["color"] and box["body"] == "", box
    assert path.stat().st_mtime_ns == mtime


def test_apply_template_runs_without_overlap(page, env, compressed):  # noqa: F811
    run_template(page, APPLY, changes_for(APPLY, env))
    keep_picture(page, APPLY)
    assert SAVED in page.js("return __dsvd.combo(2, 'delta_name')")
    apply = page.js("return __dsvd.box(3)")
    assert "modules applied" in apply["head"], apply


def test_compare_template_runs_without_overlap(page, env, compressed):  # noqa: F811
    events = run_template(page, COMPARE, changes_for(COMPARE, env))
    keep_picture(page, COMPARE)
    # Load and Apply ran with the same inputs in the apply template: ComfyUI reuses them
    (cached,) = [e[1]["nodes"] for e in events if e[0] == "execution_cached"]
    assert {"3", "4"} <= set(cached), cached
    for node in (3, 4):
        box = page.js("return __dsvd.box(arguments[0])", node)
        assert box["body"] == "ComfyUI reused an earlier run's result (same inputs)", box


@pytest.mark.skipif(not os.environ.get("DELTASVD_WRITE_THUMBNAILS"),
                    reason="writes example_workflows/*.jpg only when DELTASVD_WRITE_THUMBNAILS "
                           "is set")
def test_write_thumbnails(page, server, env, compressed):  # noqa: F811
    """The template browser's thumbnails (example_workflows/<name>.jpg), 4:3: each template
    run with ComfyUI's cache emptied first (so every node shows its numbers)."""
    from PIL import Image
    shot = SHOTS / "comfyui_thumbnail.png"
    for name in (COMPRESS, APPLY, COMPARE):
        status, _ = server.post("/free", {"free_memory": True})
        assert status == 200
        time.sleep(2)      # the queue's worker empties the cache between prompts
        # the delta under the templates' own name (loras/deltas/my_finetune.safetensors)
        run_template(page, name, {k: v for k, v in changes_for(name, env).items()
                                  if not {"filename", "delta_name"} & set(v)})
        types = sorted({b["type"] for b in page.js("return __dsvd.bounds()")})
        if name != COMPARE:   # the Delta-SVD nodes; the comparison's two rows whole
            types = [t for t in types if t.startswith("DeltaSVD")]
        box = page.screenshot(shot, [t for t in types if t != "MarkdownNote"], 4 / 3)
        with Image.open(shot) as im:
            im = im.convert("RGB").crop(tuple(round(v) for v in box)).resize((512, 384))
            im.save(TEMPLATES / f"{name}.jpg", quality=85, optimize=True)
