"""shared.opts (add_option, attribute access to values), shared.OptionInfo, shared.cmd_opts."""

import types


class OptionInfo:
    def __init__(self, default=None, label="", component=None, component_args=None,
                 onchange=None, section=None, refresh=None, comment_before="",
                 comment_after="", infotext=None, restrict_api=False, category_id=None):
        self.default, self.label, self.section = default, label, section


class Options:
    def __init__(self):
        self.__dict__["data"] = {}
        self.__dict__["data_labels"] = {}

    def add_option(self, key, info):
        self.data_labels[key] = info
        self.data.setdefault(key, info.default)

    def __getattr__(self, item):
        if item in self.data:
            return self.data[item]
        if item in self.data_labels:
            return self.data_labels[item].default
        raise AttributeError(item)


opts = Options()
cmd_opts = types.SimpleNamespace(lora_dir=None)   # the Lora extension's --lora-dir
