"""Compressing models that are already open (a host's loaded weights), not files.

`compress.Compressor.run` opens two checkpoint files; a host such as ComfyUI holds the models in
memory instead, in its own key layout. A `TensorSource` presents such a model the way
`checkpoint.Checkpoint` presents a file (canonical single-file keys, shape, dtype, get,
key_map, family, path, close), each tensor fetched only when the compressor asks for it, so
the same streaming job runs over it. `compress_sources` is `api.compress_to_delta` for two
open sources.

Host-free: the host-side adapter (nodes/comfy_models.py) builds the getters.
"""

from .checkpoint import check_pair, detect_family
from .compress import Compressor


class TensorSource:
    """A model in memory with canonical checkpoint keys.

    `entries`: {canonical key: (shape, dtype, getter)}; getter() returns the tensor on the CPU
    (the compressor never writes into it). `path` is a description used in error messages.
    `on_close` callbacks run once, from close(); `observe(key, tensor)`, if given, sees every
    tensor handed out (a host can measure what was read)."""

    def __init__(self, entries, path, family=None, on_close=(), observe=None):
        self.path = str(path)
        self._entries = dict(entries)
        self.key_map = {k: k for k in self._entries}
        self.metadata = {}
        self._on_close = list(on_close)
        self.observe = observe
        self.family = family or detect_family(self)

    def keys(self):
        return list(self._entries)

    def shape(self, key):
        return tuple(self._entries[key][0])

    def dtype(self, key):
        return self._entries[key][1]

    def nbytes(self, key):
        shape, dtype, _ = self._entries[key]
        numel = 1
        for d in shape:
            numel *= int(d)
        return numel * dtype.itemsize

    def scale(self, key):
        """A host holds real weights: nothing is stored scaled."""
        return None

    def get(self, key):
        t = self._entries[key][2]()
        if self.observe is not None:
            self.observe(key, t)
        return t

    def total_bytes(self, float_only=True):
        return sum(self.nbytes(k) for k in self._entries
                   if not float_only or self.dtype(k).is_floating_point)

    def close(self):
        callbacks, self._on_close = self._on_close, []
        for fn in callbacks:
            fn()


def compress_sources(base, tuned, rule, dtype="fp16", device="cpu", progress=None,
                     name="delta", base_name="", tuned_name=""):
    """Two open sources -> (delta, counts, tuned_bytes), like `api.compress_to_delta`
    (size mode fitted exactly). Closes both sources."""
    from .api import fit_size
    tuned_bytes = tuned.total_bytes()
    try:
        check_pair(base, tuned)
    except BaseException:
        base.close()
        tuned.close()
        raise
    delta, counts = Compressor(rule, dtype, device, progress).run_readers(
        base, tuned, base_name, tuned_name)
    delta.info["tuned_bytes"] = tuned_bytes
    fit_size(delta, rule, name)
    return delta, counts, tuned_bytes
