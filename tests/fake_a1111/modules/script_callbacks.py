"""on_ui_tabs / on_ui_settings as A1111 has them: register a callback; A1111 calls the tab
callbacks while building its UI and expects [(gradio_component, title, elem_id)] or None."""

callback_map = {"callbacks_ui_tabs": [], "callbacks_ui_settings": []}


def on_ui_tabs(callback, *, name=None):
    callback_map["callbacks_ui_tabs"].append(callback)


def on_ui_settings(callback, *, name=None):
    callback_map["callbacks_ui_settings"].append(callback)


def ui_tabs_callback():
    res = []
    for c in callback_map["callbacks_ui_tabs"]:
        res += c() or []
    return res


def ui_settings_callback():
    for c in callback_map["callbacks_ui_settings"]:
        c()
