"""The threshold explorer page (Gradio): the only module of deltasvd that imports gradio.

One page for three hosts: A1111 1.10 (gradio 3.41), Forge (gradio 4.x) and the standalone
`deltasvd ui` (current gradio). It uses only what all of them have (Blocks, Tab, Row, Column,
Textbox, Dropdown, Radio, Slider, Number, Checkbox, Button, Dataframe, HTML, State, Progress,
update: value, choices and label updates only) and drops keyword arguments a version does not
know (`_make`, `_on`), so nothing is pinned. The status lines are HTML, so an error can carry a
class of its own (gradio 3 cannot update a component's elem_classes). The work is in
ui_actions.py and explorer.py; this file only wires it to components.
"""

import inspect
import os
from html import escape

import gradio as gr

from . import families
from . import ui_actions as actions
from .errors import DeltaError
from .explorer import LAYER_HEADERS, MODES
from .svg_plot import caption, threshold_plot

# The page's rules; style.css (which A1111 / Forge load) holds the same text (a test checks).
CSS = """.dsvd-mono textarea { font-family: ui-monospace, monospace !important; }
.dsvd-status { padding: 8px 12px; border-radius: 6px; border: 1px solid #d1d5db; }
.dsvd-status.dsvd-error { border-color: #dc2626; background: #fef2f2; color: #991b1b;
  font-weight: 600; }
.dsvd-status.dsvd-done { border-color: #16a34a; background: #f0fdf4; color: #14532d; }
.dsvd-caption { font-size: 0.85em; color: #4b5563; max-width: 600px; margin: 4px 0 0 0; }
#dsvd-layers, #dsvd-file-layers { overflow-x: auto; }
#dsvd-layers table, #dsvd-file-layers table { font-size: 0.85em; }
"""
TITLE = ("<h2 style='margin:0'>Delta-SVD threshold explorer</h2>"
         "<p style='margin:4px 0 0 0'>Pick how much of a fine-tune to keep before anything is "
         "written: choose a base and its fine-tune, press Analyze, and every setting of the "
         "slider shows the file's size, error and ranks at once; Save writes the file "
         "<code>deltasvd compress</code> would.</p>")
PROMPT = "Choose the base and the fine-tuned checkpoint, then press Analyze."
SLIDER_LABELS = {
    "energy": "energy threshold: per layer, the smallest rank t with sum(s[:t]) / sum(s) "
              ">= this",
    "fro": "Frobenius threshold: the same on s^2",
    "rank": "rank of every layer",
    "size_mb": "file size (MiB): ranks shared out across all layers to fit",
}
DTYPES = ["fp16", "bf16", "fp32"]
SORTS = ["size", "rank", "error", "name"]
MODE_DEFAULTS = {"fro": 0.9, "rank": 16}


def _accepted(fn, kw):
    """The keyword arguments `fn` takes: newer gradio options are dropped on older ones."""
    params = inspect.signature(fn).parameters
    return {k: v for k, v in kw.items() if k in params}


def _make(cls, *args, **kw):
    return cls(*args, **_accepted(cls.__init__, kw))


def _on(event, fn, inputs, outputs, **kw):
    return event(fn, inputs, outputs, **_accepted(event, kw))


# What a handler catches: the core's refusals and file errors, and, as this is where a console
# would otherwise be the only place to see it, anything else (shown with its type).
FAILURES = Exception


def _message(e):
    if isinstance(e, (DeltaError, OSError)):
        return f"Error: {e}"
    return f"Error: {type(e).__name__}: {e}"


def _status(text, kind=""):
    """A status line: kind "error" (red, "Error: ..."), "done" (green) or "" (plain)."""
    return f'<div class="dsvd-status dsvd-{kind or "info"}">{escape(text)}</div>'


def _failed(e):
    return _status(_message(e), "error")


def _progress(progress):
    """compress's (stage, done, total, key) callback -> a gradio progress bar."""
    def update(stage, done, total, key):
        progress(done / max(total, 1), desc=f"{stage} {done}/{total}: {key[-60:]}")
    return update


def _table(rows):
    import pandas as pd   # a gradio dependency; a DataFrame is what every version accepts
    return pd.DataFrame(rows, columns=LAYER_HEADERS)


def _render(explorer, mode, value, sort):
    """numbers, group table, plot, layer table for one setting."""
    mode = MODES.get(mode, mode)
    preview = explorer.preview(mode, value)
    measure = "fro" if mode == "fro" else "energy"
    grid, mb, kept = explorer.curve(measure)
    # a rank or size setting stands at the energy (sum of s) it keeps: see the caption
    x_now = value if mode in ("energy", "fro") else preview.kept
    plot = threshold_plot(grid, mb, kept, x_now, preview.file_bytes / 2**20, preview.kept_fro,
                          "Frobenius threshold" if measure == "fro" else "energy threshold")
    return (actions.numbers(explorer, preview), explorer.group_table(preview),
            f'<div id="dsvd-plot-box">{plot}'
            f'<p class="dsvd-caption">{escape(caption(mode))}</p></div>',
            _table(explorer.layer_rows(preview.delta, sort)))


def _analysed(explorer):
    """The status line of a finished analysis."""
    base, tuned = explorer.paths
    return _status(f"analysed {os.path.basename(tuned)} against {os.path.basename(base)} "
                   f"({families.title(explorer.analysis.family)}): "
                   f"{len(explorer.analysis.records)} stored pieces, "
                   f"{len(explorer.coded)} of them matrices whose ranks the setting picks "
                   f"({explorer.analysis.info.get('dtype', 'fp16')}); move the slider", "done")


def _slider_update(explorer, mode, host):
    mode = MODES.get(mode, mode)
    lo, hi, step = explorer.range_of(mode) if explorer else (0.01, 1.0, 0.01)
    value = {"energy": host.default_threshold, "size_mb": round((lo + hi) / 4, 2)}.get(
        mode, MODE_DEFAULTS.get(mode, lo))
    return gr.update(minimum=lo, maximum=hi, step=step, value=min(max(value, lo), hi),
                     label=SLIDER_LABELS[mode])


def _explore_tab(host):
    c = {}
    checkpoints = list(host.checkpoints())          # one walk of the models folder
    with gr.Row():
        # both start empty (gradio 5+ would select the first file in both: the same file)
        c["base"] = _make(gr.Dropdown, choices=checkpoints, value=None,
                          label="base checkpoint", allow_custom_value=True,
                          info="the model the fine-tune started from", elem_id="dsvd-base")
        c["tuned"] = _make(gr.Dropdown, choices=checkpoints, value=None,
                           label="fine-tuned checkpoint", allow_custom_value=True,
                           info="a file from the list, or type a path", elem_id="dsvd-tuned")
        c["dtype"] = _make(gr.Radio, choices=DTYPES, value="fp16", label="factor dtype",
                           elem_id="dsvd-dtype")
    with gr.Row():
        refresh = _make(gr.Button, "Refresh lists", elem_id="dsvd-refresh")
        analyze = _make(gr.Button, "Analyze", variant="primary", elem_id="dsvd-analyze")
    c["status"] = _make(gr.HTML, value=_status(PROMPT), elem_id="dsvd-status")
    with gr.Row():
        c["mode"] = _make(gr.Radio, choices=list(MODES), value="energy", label="mode",
                          elem_id="dsvd-mode")
        c["value"] = _make(gr.Slider, minimum=0.01, maximum=1.0, step=0.01,
                           value=host.default_threshold, label=SLIDER_LABELS["energy"],
                           elem_id="dsvd-value")
    with gr.Row():
        c["numbers"] = _make(gr.Textbox, label=actions.NUMBERS_LABEL, lines=7,
                             interactive=False, elem_id="dsvd-numbers",
                             elem_classes=["dsvd-mono"])
        c["plot"] = _make(gr.HTML, elem_id="dsvd-plot")
    c["groups"] = _make(gr.Textbox, label="ranks per group (the paper's Table 2)", lines=12,
                        interactive=False, elem_id="dsvd-groups", elem_classes=["dsvd-mono"])
    c["sort"] = _make(gr.Radio, choices=SORTS, value="size", label="sort layers by",
                      elem_id="dsvd-sort")
    c["layers"] = _layer_table("layers (click a column header to sort)", "dsvd-layers")
    with gr.Row():
        c["name"] = _make(gr.Textbox, label="save as (in the LoRA folder)",
                          value="deltas/my_finetune", elem_id="dsvd-name")
        c["overwrite"] = _make(gr.Checkbox, value=False, label="overwrite an existing file",
                               elem_id="dsvd-overwrite")
        save = _make(gr.Button, "Save", variant="primary", elem_id="dsvd-save")
    c["saved"] = _make(gr.Textbox, label="saved", lines=12, interactive=False,
                       elem_id="dsvd-saved", elem_classes=["dsvd-mono"])
    state = gr.State(None)
    view = [c["numbers"], c["groups"], c["plot"], c["layers"]]
    keep = [gr.update()] * len(view)

    def do_refresh(base, tuned):
        names = list(host.checkpoints())
        return gr.update(choices=names, value=base), gr.update(choices=names, value=tuned)

    def do_analyze(base, tuned, dtype, mode, sort, progress=gr.Progress()):
        try:
            names = host.checkpoints()
            b = actions.resolve(base, names, "choose the base checkpoint",
                                "base checkpoint not found")
            t = actions.resolve(tuned, names, "choose the fine-tuned checkpoint",
                                "fine-tuned checkpoint not found")
            explorer = actions.analyse(b, t, dtype, _progress(progress))
            slider = _slider_update(explorer, mode, host)
            return [explorer, _analysed(explorer), slider,
                    *_render(explorer, mode, slider["value"], sort)]
        except FAILURES as e:
            # a refused pair leaves no numbers of an earlier one behind
            return [None, _failed(e), gr.update(), "", "", "", _table([])]

    def do_setting(explorer, mode, value, sort):
        if explorer is None:
            return [gr.update(), *keep]
        try:
            return [_analysed(explorer), *_render(explorer, mode, value, sort)]
        except FAILURES as e:   # e.g. a size below the smallest file
            return [_failed(e), *keep]

    def do_mode(explorer, mode, sort):
        slider = _slider_update(explorer, mode, host)
        if explorer is None:
            return [slider, gr.update(), *keep]
        return [slider, *do_setting(explorer, mode, slider["value"], sort)]

    def do_save(explorer, mode, value, name, overwrite, progress=gr.Progress()):
        if explorer is None:
            return _status("Error: press Analyze first", "error"), gr.update(), gr.update()
        try:
            # the pair that was analysed, whatever the dropdowns show now
            preview = explorer.preview(MODES.get(mode, mode), value)
            path, summary = actions.save(*explorer.paths, preview, host.lora_dir(), name,
                                         explorer.analysis.info.get("dtype", "fp16"),
                                         _progress(progress), overwrite=bool(overwrite))
            # "overwrite" is for this Save only: the next one asks again
            return (_status(f"saved {path}", "done"), f"{path}\n\n{summary}",
                    gr.update(value=False))
        except FAILURES as e:
            return _failed(e), gr.update(), gr.update()

    fast = {"show_progress": "hidden", "trigger_mode": "always_last"}
    refresh.click(do_refresh, [c["base"], c["tuned"]], [c["base"], c["tuned"]])
    _on(analyze.click, do_analyze, [c["base"], c["tuned"], c["dtype"], c["mode"], c["sort"]],
        [state, c["status"], c["value"], *view])
    setting = [state, c["mode"], c["value"], c["sort"]]
    shown = [c["status"], *view]
    for event in (c["value"].change, c["sort"].change):
        _on(event, do_setting, setting, shown, **fast)
    if "trigger_mode" not in inspect.signature(c["value"].change).parameters:
        # gradio 3 drops a slider's changes while one is being answered, so the value the
        # drag ends on could go unanswered; its release event answers that one.
        _on(c["value"].release, do_setting, setting, shown, **fast)
    _on(c["mode"].change, do_mode, [state, c["mode"], c["sort"]], [c["value"], *shown],
        **fast)
    return _on(save.click, do_save,
               [state, c["mode"], c["value"], c["name"], c["overwrite"]],
               [c["status"], c["saved"], c["overwrite"]])


def _layer_table(label, elem_id):
    # wrap: a long LoRA name wraps instead of pushing the last columns out of sight
    return _make(gr.Dataframe, headers=LAYER_HEADERS, interactive=False, label=label,
                 wrap=True, elem_id=elem_id)


def _inspect_tab(host):
    def names():
        return actions.list_files(host.lora_dir(), (".safetensors",))

    with gr.Row():
        # listed on Refresh, not while the page is built: a LoRA folder can be large, and
        # A1111 builds every tab at start
        file = _make(gr.Dropdown, choices=[], value=None,
                     label="delta file (LoRA folder; Refresh lists it)",
                     allow_custom_value=True, elem_id="dsvd-file")
        refresh = _make(gr.Button, "Refresh", elem_id="dsvd-file-refresh")
        go = _make(gr.Button, "Inspect", variant="primary", elem_id="dsvd-inspect")
    status = _make(gr.HTML, value=_status("Choose a delta file, then press Inspect."),
                   elem_id="dsvd-file-status")
    info = _make(gr.Textbox, label="metadata and ranks per group", lines=18, interactive=False,
                 elem_id="dsvd-info", elem_classes=["dsvd-mono"])
    layers = _layer_table("layers", "dsvd-file-layers")
    with gr.Row():
        mode = _make(gr.Radio, choices=list(MODES), value="energy", label="resize to",
                     elem_id="dsvd-resize-mode")
        value = _make(gr.Number, value=0.3, label="value", elem_id="dsvd-resize-value")
        name = _make(gr.Textbox, label="new name", value="deltas/resized",
                     elem_id="dsvd-resize-name")
        overwrite = _make(gr.Checkbox, value=False, label="overwrite an existing file",
                          elem_id="dsvd-resize-overwrite")
        resize = _make(gr.Button, "Resize", elem_id="dsvd-resize")
    result = _make(gr.Textbox, label="resized", lines=12, interactive=False,
                   elem_id="dsvd-resized", elem_classes=["dsvd-mono"])

    def path_of(choice):
        return actions.resolve(choice, names(), "choose a delta file", "file not found")

    def do_inspect(choice):
        try:
            path = path_of(choice)
            text, rows = actions.inspect(path)
            return _status(f"inspected {path}", "done"), text, _table(rows)
        except FAILURES as e:
            return _failed(e), "", _table([])

    def do_resize(choice, m, v, new_name, replace):
        try:
            path, text = actions.resize(path_of(choice), host.lora_dir(), new_name,
                                        MODES.get(m, m), v, overwrite=bool(replace))
            return (_status(f"resized into {path}", "done"), f"{path}\n\n{text}",
                    gr.update(value=False))
        except FAILURES as e:
            return _failed(e), gr.update(), gr.update()

    def do_refresh(current=None):
        choices = list(names())   # keeps the file chosen (gradio 6 would clear it)
        return gr.update(choices=choices, value=current if current in choices else None)

    refresh.click(do_refresh, [file], [file])
    go.click(do_inspect, [file], [status, info, layers])
    resize.click(do_resize, [file, mode, value, name, overwrite],
                 [status, result, overwrite]).then(do_refresh, [file], [file])
    return do_refresh, [file]


def build(host):
    """The page as a gr.Blocks (A1111 / Forge put it in a tab; `launch` serves it alone)."""
    with _make(gr.Blocks, analytics_enabled=False, title="Delta-SVD", css=CSS) as blocks:
        _make(gr.HTML, value=TITLE, elem_id="dsvd-title")
        with gr.Tab("Explore"):
            saved = _explore_tab(host)
        with gr.Tab("Inspect / resize"):
            refresh, outputs = _inspect_tab(host)
        saved.then(refresh, outputs, outputs)   # a saved delta is listed for Inspect at once
    return blocks


def launch(host, port=7861, listen="127.0.0.1", block=True):
    """Serve the page alone (`deltasvd ui`); only on 127.0.0.1 unless told otherwise."""
    blocks = build(host)
    blocks.queue()   # gr.Progress needs the queue on gradio 3
    kw = {"server_name": listen, "server_port": port, "prevent_thread_lock": not block,
          "css": CSS, "inbrowser": False, "quiet": True}
    blocks.launch(**_accepted(blocks.launch, kw))
    return blocks
