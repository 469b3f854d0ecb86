"""The threshold explorer page (Gradio): the only module of deltasvd that imports gradio.

One page for three hosts: A1111 1.10 (gradio 3.41), Forge (gradio 4.x) and the standalone
`deltasvd ui` (current gradio). It uses only what all of them have (Blocks, Tab, Row, Column,
Textbox, Dropdown, Radio, Slider, Number, Button, Dataframe, HTML, State, Progress, update)
and drops keyword arguments a version does not know (`_make`, `_on`), so nothing is pinned.
The work is in ui_actions.py and explorer.py; this file only wires it to components.
"""

import inspect
import os

import gradio as gr

from . import families
from . import ui_actions as actions
from .errors import DeltaError
from .explorer import LAYER_HEADERS, MODES
from .svg_plot import threshold_plot

CSS = ".dsvd-mono textarea { font-family: ui-monospace, monospace !important; }"
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
    x_now = value if mode in ("energy", "fro") else preview.kept
    plot = threshold_plot(grid, mb, kept, x_now, preview.file_bytes / 2**20,
                          1.0 - preview.rel_error ** 2,
                          "Frobenius threshold" if measure == "fro" else "energy threshold")
    return (actions.numbers(explorer, preview), explorer.group_table(preview),
            f'<div id="dsvd-plot-box">{plot}</div>',
            _table(explorer.layer_rows(preview.delta, sort)))


def _slider_update(explorer, mode, host):
    mode = MODES.get(mode, mode)
    lo, hi, step = explorer.range_of(mode) if explorer else (0.01, 1.0, 0.01)
    value = {"energy": host.default_threshold, "size_mb": round((lo + hi) / 4, 2)}.get(
        mode, MODE_DEFAULTS.get(mode, lo))
    return gr.update(minimum=lo, maximum=hi, step=step, value=min(max(value, lo), hi))


def _explore_tab(host):
    c = {}
    checkpoints = list(host.checkpoints())          # one walk of the models folder
    with gr.Row():
        c["base"] = _make(gr.Dropdown, choices=checkpoints, label="base checkpoint",
                          allow_custom_value=True, elem_id="dsvd-base")
        c["tuned"] = _make(gr.Dropdown, choices=checkpoints,
                           label="fine-tuned checkpoint", allow_custom_value=True,
                           elem_id="dsvd-tuned")
        c["dtype"] = _make(gr.Radio, choices=DTYPES, value="fp16", label="factor dtype",
                           elem_id="dsvd-dtype")
    with gr.Row():
        refresh = _make(gr.Button, "Refresh lists", elem_id="dsvd-refresh")
        analyze = _make(gr.Button, "Analyze", variant="primary", elem_id="dsvd-analyze")
    c["status"] = _make(gr.Textbox, label="status", interactive=False, elem_id="dsvd-status")
    with gr.Row():
        c["mode"] = _make(gr.Radio, choices=list(MODES), value="energy", label="mode",
                          elem_id="dsvd-mode")
        c["value"] = _make(gr.Slider, minimum=0.01, maximum=1.0, step=0.01,
                           value=host.default_threshold, label="threshold / rank / MB",
                           elem_id="dsvd-value")
    with gr.Row():
        c["numbers"] = _make(gr.Textbox, label="this setting", lines=6, interactive=False,
                             elem_id="dsvd-numbers", elem_classes=["dsvd-mono"])
        c["plot"] = _make(gr.HTML, elem_id="dsvd-plot")
    c["groups"] = _make(gr.Textbox, label="ranks per group (the paper's Table 2)", lines=12,
                        interactive=False, elem_id="dsvd-groups", elem_classes=["dsvd-mono"])
    c["sort"] = _make(gr.Radio, choices=SORTS, value="size", label="sort layers by",
                      elem_id="dsvd-sort")
    c["layers"] = _make(gr.Dataframe, headers=LAYER_HEADERS, interactive=False,
                        label="layers (click a column header to sort)", elem_id="dsvd-layers")
    with gr.Row():
        c["name"] = _make(gr.Textbox, label="save as (in the LoRA folder)",
                          value="deltas/my_finetune", elem_id="dsvd-name")
        save = _make(gr.Button, "Save", variant="primary", elem_id="dsvd-save")
    c["saved"] = _make(gr.Textbox, label="saved", lines=12, interactive=False,
                       elem_id="dsvd-saved", elem_classes=["dsvd-mono"])
    state = gr.State(None)
    view = [c["numbers"], c["groups"], c["plot"], c["layers"]]
    keep = [gr.update()] * len(view)

    def do_refresh():
        names = list(host.checkpoints())
        return gr.update(choices=names), gr.update(choices=names)

    def do_analyze(base, tuned, dtype, mode, sort, progress=gr.Progress()):
        try:
            names = host.checkpoints()
            b = actions.resolve(base, names, "choose the base checkpoint",
                                "base checkpoint not found")
            t = actions.resolve(tuned, names, "choose the fine-tuned checkpoint",
                                "fine-tuned checkpoint not found")
            explorer = actions.analyse(b, t, dtype, _progress(progress))
            slider = _slider_update(explorer, mode, host)
            value = slider["value"]
            status = (f"analysed {os.path.basename(t)} against {os.path.basename(b)} "
                      f"({families.title(explorer.analysis.family)}): "
                      f"{len(explorer.analysis.records)} changed pieces, "
                      f"{len(explorer.coded)} matrices ({dtype}); move the slider")
            return [explorer, status, slider, *_render(explorer, mode, value, sort)]
        except FAILURES as e:
            return [None, _message(e), gr.update(), *keep]

    def do_setting(explorer, mode, value, sort):
        if explorer is None:
            return keep
        try:
            return list(_render(explorer, mode, value, sort))
        except FAILURES as e:   # e.g. a size below the smallest file
            return [_message(e), *keep[1:]]

    def do_mode(explorer, mode, sort):
        slider = _slider_update(explorer, mode, host)
        if explorer is None:
            return [slider, *keep]
        return [slider, *do_setting(explorer, mode, slider["value"], sort)]

    def do_save(explorer, mode, value, name, progress=gr.Progress()):
        if explorer is None:
            return "Error: press Analyze first", gr.update()
        try:
            # the pair that was analysed, whatever the dropdowns show now
            preview = explorer.preview(MODES.get(mode, mode), value)
            path, summary = actions.save(*explorer.paths, preview, host.lora_dir(), name,
                                         explorer.analysis.info.get("dtype", "fp16"),
                                         _progress(progress))
            return f"saved {path}", f"{path}\n\n{summary}"
        except FAILURES as e:
            return _message(e), gr.update()

    fast = {"show_progress": "hidden", "trigger_mode": "always_last"}
    refresh.click(do_refresh, [], [c["base"], c["tuned"]])
    _on(analyze.click, do_analyze, [c["base"], c["tuned"], c["dtype"], c["mode"], c["sort"]],
        [state, c["status"], c["value"], *view])
    setting = [state, c["mode"], c["value"], c["sort"]]
    for event in (c["value"].change, c["sort"].change):
        _on(event, do_setting, setting, view, **fast)
    if "trigger_mode" not in inspect.signature(c["value"].change).parameters:
        # gradio 3 drops a slider's changes while one is being answered, so the value the
        # drag ends on could go unanswered; its release event answers that one.
        _on(c["value"].release, do_setting, setting, view, **fast)
    _on(c["mode"].change, do_mode, [state, c["mode"], c["sort"]], [c["value"], *view], **fast)
    return _on(save.click, do_save,
               [state, c["mode"], c["value"], c["name"]],
               [c["status"], c["saved"]])


def _inspect_tab(host):
    def names():
        return actions.list_files(host.lora_dir(), (".safetensors",))

    with gr.Row():
        # listed on Refresh, not while the page is built: a LoRA folder can be large, and
        # A1111 builds every tab at start
        file = _make(gr.Dropdown, choices=[], label="delta file (LoRA folder; Refresh lists it)",
                     allow_custom_value=True, elem_id="dsvd-file")
        refresh = _make(gr.Button, "Refresh", elem_id="dsvd-file-refresh")
        go = _make(gr.Button, "Inspect", variant="primary", elem_id="dsvd-inspect")
    info = _make(gr.Textbox, label="metadata and ranks per group", lines=18, interactive=False,
                 elem_id="dsvd-info", elem_classes=["dsvd-mono"])
    layers = _make(gr.Dataframe, headers=LAYER_HEADERS, interactive=False, label="layers",
                   elem_id="dsvd-file-layers")
    with gr.Row():
        mode = _make(gr.Radio, choices=list(MODES), value="energy", label="resize to",
                     elem_id="dsvd-resize-mode")
        value = _make(gr.Number, value=0.3, label="value", elem_id="dsvd-resize-value")
        name = _make(gr.Textbox, label="new name", value="deltas/resized",
                     elem_id="dsvd-resize-name")
        resize = _make(gr.Button, "Resize", elem_id="dsvd-resize")
    result = _make(gr.Textbox, label="resized", lines=12, interactive=False,
                   elem_id="dsvd-resized", elem_classes=["dsvd-mono"])

    def path_of(choice):
        return actions.resolve(choice, names(), "choose a delta file", "file not found")

    def do_inspect(choice):
        try:
            text, rows = actions.inspect(path_of(choice))
            return text, _table(rows)
        except FAILURES as e:
            return _message(e), gr.update()

    def do_resize(choice, m, v, new_name):
        try:
            path, text = actions.resize(path_of(choice), host.lora_dir(), new_name,
                                        MODES.get(m, m), v)
            return f"{path}\n\n{text}"
        except FAILURES as e:
            return _message(e)

    def do_refresh(current=None):
        choices = list(names())   # keeps the file chosen (gradio 6 would clear it)
        return gr.update(choices=choices, value=current if current in choices else None)

    refresh.click(do_refresh, [file], [file])
    go.click(do_inspect, [file], [info, layers])
    resize.click(do_resize, [file, mode, value, name], [result]).then(do_refresh, [file],
                                                                      [file])
    return do_refresh, [file]


def build(host):
    """The page as a gr.Blocks (A1111 / Forge put it in a tab; `launch` serves it alone)."""
    with _make(gr.Blocks, analytics_enabled=False, title="Delta-SVD", css=CSS) as blocks:
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
