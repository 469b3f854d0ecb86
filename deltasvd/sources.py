"""Compressing models that are already open (a host's loaded weights), not files.

`compress.Compressor.run` opens two checkpoint files; a host such as ComfyUI holds the models in
memory instead, in its own key layout. A `TensorSource` presents such a model the way
`checkpoint.Checkpoint` presents a file (canonical single-file keys, shape, dtype, get,
key_map, family, path, close), each tensor fetched only when the compressor asks for it, so
the same streaming job runs over it. `compress_sources` is `api.compress_to_delta` for two
open sources.

Host-free: the host-side adapter (nodes/comfy_models.py) builds the getters.
"""

from .checkpoint import FAMILIES, detect_family, is_ignored
from .compress import (Compressor, Counts, _complete_modules, _fmt, _module_index, plan_keys,
                       trim_to_size)
from .delta_file import Delta, file_size
from .errors import DeltaError


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


def check_pair(base, tuned):
    """What `checkpoint.open_pair` checks, for two open sources."""
    if base.family != tuned.family:
        raise DeltaError(f"family mismatch: base is {FAMILIES[base.family]}, tuned is "
                         f"{FAMILIES[tuned.family]}", tuned.path)
    for key in tuned.keys():
        if key in base.key_map and not is_ignored(key) and base.shape(key) != tuned.shape(key):
            raise DeltaError(f"shape mismatch: base {list(base.shape(key))}, tuned "
                             f"{list(tuned.shape(key))}", tuned.path, key)


class SourceCompressor(Compressor):
    """`Compressor.run` for already-open sources: the same steps, without opening files or
    fingerprinting them (a model in memory has no file hash; the fields stay empty, so
    `deltasvd apply` does not check the base)."""

    def run_sources(self, base, tuned, base_name="", tuned_name=""):
        try:
            check_pair(base, tuned)
            counts = Counts()
            keys = plan_keys(base, tuned, counts)
            fixed_ranks = None
            if not self.rule.per_layer:
                fixed_ranks = self._allocate(base, tuned, keys)
                counts = Counts()  # pass 2 counts again
            records, tensors, extras, spectra = self._code_all(base, tuned, keys, counts,
                                                               fixed_ranks)
            _complete_modules(records, tensors, _module_index(base), self.dtype)
        finally:
            base.close()
            tuned.close()
        delta = Delta(family=base.family, records=records, tensors=tensors, extras=extras,
                      spectra=spectra)
        delta.info.update({
            "codec": "svd", "mode": self.rule.mode, "value": _fmt(self.rule.value),
            "min_rank": self.rule.min_rank, "max_rank": self.rule.max_rank or "",
            "dtype": self.dtype_name, "base_sha256": "", "tuned_sha256": "",
            "base_name": base_name, "tuned_name": tuned_name,
        })
        return delta, counts


def compress_sources(base, tuned, rule, dtype="fp16", device="cpu", progress=None,
                     name="delta", base_name="", tuned_name=""):
    """Two open sources -> (delta, counts, tuned_bytes), like `api.compress_to_delta`
    (size mode fitted exactly). Closes both sources."""
    from .api import host_meta_fn
    tuned_bytes = tuned.total_bytes()
    delta, counts = SourceCompressor(rule, dtype, device, progress).run_sources(
        base, tuned, base_name, tuned_name)
    delta.info["tuned_bytes"] = tuned_bytes
    if rule.mode == "size_mb":
        trim_to_size(delta, rule.value * 2**20, lambda d: file_size(d, host_meta_fn(d, name)))
    return delta, counts, tuned_bytes
