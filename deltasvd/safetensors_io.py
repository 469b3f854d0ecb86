"""Reading and writing .safetensors files: lazy tensor-by-tensor reads, streamed atomic writes.

The stock `safetensors.torch.save_file` needs every tensor in memory at once; a merged SDXL
checkpoint does not fit that way on a small machine, so the writer here streams: the header is
built from (name, dtype, shape) up front and each tensor is written as it is produced. Every
write goes to a temporary file beside the target and is renamed into place only on success.
"""

import hashlib
import json
import math
import os
import secrets
import stat
import struct
import tempfile
from contextlib import contextmanager

import torch

from .errors import DeltaError
from .spill import chunks

DTYPE_TO_ST = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
    torch.uint8: "U8", torch.bool: "BOOL",
    torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
    torch.uint16: "U16", torch.uint32: "U32", torch.uint64: "U64",
}
ST_TO_DTYPE = {v: k for k, v in DTYPE_TO_ST.items()}
ITEMSIZE = {st: torch.empty((), dtype=dt).element_size() for st, dt in ST_TO_DTYPE.items()}
HEADER_LIMIT = 100_000_000  # the limit safetensors itself enforces
OVERWRITE_HINT = "pass --overwrite to replace it"   # a page words it its own way (ui_actions)


def open_input(path):
    """Open a file to read, refusing anything but a regular file (after following links): a
    FIFO would block forever, a device would read without end. Returns a binary file object."""
    path = os.fspath(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise DeltaError("file not found", path) from None
    except OSError as e:
        raise DeltaError(f"cannot be read ({e.strerror})", path) from None
    if stat.S_ISDIR(st.st_mode):
        raise DeltaError("is a folder, not a file", path)
    if not stat.S_ISREG(st.st_mode):
        raise DeltaError("is not a regular file (a pipe, device or socket)", path)
    try:   # O_NONBLOCK: should it have become a FIFO since the stat, opening does not hang
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        raise DeltaError(f"cannot be read ({e.strerror})", path) from None
    f = os.fdopen(fd, "rb")
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        f.close()
        raise DeltaError("is not a regular file (a pipe, device or socket)", path)
    return f


def _no_duplicates(pairs):
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        raise ValueError(f"duplicate key {sorted(k for k in keys if keys.count(k) > 1)[0]!r}")
    return dict(pairs)


def _parse_json(raw, path):
    try:
        return json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        why = "nested too deeply" if isinstance(e, RecursionError) else "not valid JSON"
        if isinstance(e, ValueError) and str(e).startswith("duplicate key"):
            why = str(e)
        raise DeltaError(f"not a safetensors file (its header is {why})", path) from None


def _is_count(v):
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _check_entry(name, info, path):
    """One tensor's entry, as strictly as the safetensors library checks it."""
    if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= set(info):
        raise DeltaError("malformed header entry (wants dtype, shape and data_offsets)",
                         path, name)
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if not isinstance(dtype, str) or dtype not in ST_TO_DTYPE:
        raise DeltaError(f"unsupported dtype {str(dtype)[:40]!r}", path, name)
    if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
        raise DeltaError("malformed header entry: shape is not a list of counts", path, name)
    if (not isinstance(offsets, list) or len(offsets) != 2 or not all(map(_is_count, offsets))
            or offsets[0] > offsets[1]):
        raise DeltaError("malformed header entry: data_offsets is not [begin, end]", path, name)
    if offsets[1] - offsets[0] != math.prod(shape) * ITEMSIZE[dtype]:
        raise DeltaError("malformed header: byte range does not match shape and dtype",
                         path, name)


def _check_layout(header, data_size, path):
    """The tensors' byte ranges tile the data section exactly: no gap, no overlap, nothing
    outside it (so no tensor reads another's bytes, or the header's)."""
    at = 0
    for name, info in sorted(header.items(), key=lambda kv: tuple(kv[1]["data_offsets"])):
        begin, end = info["data_offsets"]
        if begin != at:
            why = "overlaps another tensor" if begin < at else "leaves a gap before it"
            raise DeltaError(f"malformed header: the tensor's byte range {why}", path, name)
        at = end
    if at != data_size:
        if at > data_size:
            raise DeltaError(f"truncated: the header promises {at} bytes of tensor data, the "
                             f"file has {data_size} (an interrupted download?)", path)
        raise DeltaError(f"malformed: {data_size - at} bytes after the last tensor", path)


def _parse_header(f, path):
    """(header, metadata, data offset) of an open file, every part validated."""
    size = os.fstat(f.fileno()).st_size
    head = f.read(8)
    if len(head) < 8:
        raise DeltaError("not a safetensors file (shorter than its 8-byte header length)", path)
    (n,) = struct.unpack("<Q", head)
    if n > HEADER_LIMIT or 8 + n > size:
        raise DeltaError("not a safetensors file (header length is out of range; "
                         "a pickle .ckpt or a truncated download?)", path)
    header = _parse_json(f.read(n), path)
    if not isinstance(header, dict):
        raise DeltaError("not a safetensors file (its header is not a JSON object)", path)
    metadata = header.pop("__metadata__", None)
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                 for k, v in metadata.items()):
        raise DeltaError("malformed header: __metadata__ is not a map of strings to strings",
                         path)
    for name, info in header.items():
        _check_entry(name, info, path)
    _check_layout(header, size - 8 - n, path)
    return header, metadata, 8 + n


def read_header(path):
    """Return (header dict without __metadata__, metadata dict, data offset), validated."""
    with open_input(path) as f:
        return _parse_header(f, os.fspath(path))


class SafeTensorsFile:
    """A .safetensors file opened for lazy reads: keys, shapes and dtypes without reading data.

    Tensors are read with plain positioned reads, not mmap: pages of a mapped 4 GB checkpoint
    count towards the process's resident memory, plain reads leave them in the page cache."""

    def __init__(self, path):
        self.path = os.fspath(path)
        self._f = open_input(self.path)
        try:
            self.header, self.metadata, self.data_offset = _parse_header(self._f, self.path)
        except BaseException:
            self.close()
            raise

    def keys(self):
        return list(self.header.keys())

    def shape(self, key):
        return tuple(self.header[key]["shape"])

    def dtype(self, key):
        return ST_TO_DTYPE[self.header[key]["dtype"]]

    def nbytes(self, key):
        begin, end = self.header[key]["data_offsets"]
        return end - begin

    def get(self, key):
        begin, end = self.header[key]["data_offsets"]
        # torch.empty, not bytearray: no zero-fill pass over memory the read overwrites anyway.
        try:
            raw = torch.empty(end - begin, dtype=torch.uint8)
        except (RuntimeError, MemoryError):
            raise DeltaError(f"not enough memory to read this tensor ({(end - begin) / 2**30:.1f} "
                             "GiB)", self.path, key) from None
        try:
            n = os.preadv(self._f.fileno(), [raw.numpy()], self.data_offset + begin) \
                if len(raw) else 0
        except OSError as e:
            raise DeltaError(f"cannot be read ({e.strerror})", self.path, key) from None
        if n != len(raw):
            raise DeltaError("truncated while reading", self.path, key)
        return raw.view(self.dtype(key)).reshape(self.shape(key))

    def close(self):
        if self._f is not None:
            self._f.close()
            self._f = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def tensor_data_sha256(path, chunk=16 << 20):
    """sha256 of the tensor data (everything after the header), as A1111's addnet hash does.

    hashlib releases the GIL on large updates, so this can run in a thread beside the math."""
    _, _, offset = read_header(path)
    return file_sha256(path, offset, chunk)


def file_sha256(path, offset=0, chunk=8 << 20):
    """sha256 of a file from `offset` on, read into one reused buffer (no allocation, and no
    fresh pages to fault in, per chunk: a 4 GB checkpoint is hashed beside the math)."""
    h = hashlib.sha256()
    buf = bytearray(chunk)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        f.seek(offset)
        while True:
            n = f.readinto(buf)
            if not n:
                break
            h.update(view[:n])
    return h.hexdigest()


def layout_header(layout, metadata):
    header, offset = {}, 0
    for name, dtype, shape in layout:
        numel = 1
        for d in shape:
            numel *= int(d)
        size = numel * torch.empty((), dtype=dtype).element_size()
        header[name] = {"dtype": DTYPE_TO_ST[dtype], "shape": [int(d) for d in shape],
                        "data_offsets": [offset, offset + size]}
        offset += size
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # keep the data 8-byte aligned, as safetensors does
    return raw


def check_output_path(path, overwrite=False, inputs=()):
    """Refuse an output that is one of the inputs, a folder, in a missing folder, or an
    existing file (unless `overwrite`). Returns the absolute path."""
    path = os.path.abspath(os.fspath(path))
    for src in inputs:
        if src is None:
            continue
        src = os.path.abspath(os.fspath(src))
        if src == path or (os.path.exists(path) and os.path.exists(src)
                           and os.path.samefile(src, path)):
            raise DeltaError("output is one of the inputs; refusing to overwrite an input", path)
    if os.path.isdir(path):
        raise DeltaError("output is a folder", path)
    _refuse_special(path)
    if os.path.exists(path) and not overwrite:
        raise DeltaError(f"output exists ({OVERWRITE_HINT})", path)
    folder = os.path.dirname(path)
    if not os.path.isdir(folder):
        raise DeltaError("output folder does not exist", folder)
    try:   # a real probe: root passes os.access anywhere, even on /proc or a read-only mount
        tempfile.TemporaryFile(dir=folder).close()
    except OSError as e:
        raise DeltaError(f"cannot write in the output's folder ({e.strerror})", path) from None
    return path


def _refuse_special(path):
    """Even with --overwrite: replacing /dev/null with a file, run as root, breaks a system."""
    if os.path.exists(path) and not os.path.isfile(path):
        raise DeltaError("output exists and is not a regular file (a device, pipe or socket); "
                         "refusing to replace it", path)


@contextmanager
def atomic_output(path, overwrite=False, inputs=()):
    """Yield a temporary path beside `path`; publish it there only if the block succeeds.
    Without `overwrite` the publishing fails, rather than replaces, when another process
    created `path` meanwhile."""
    path = check_output_path(path, overwrite, inputs)
    umask = os.umask(0)
    os.umask(umask)
    # The name is drawn before the file is made, and the file made inside the `try` that
    # removes it: Ctrl-C or SIGTERM at any moment in between leaves nothing behind.
    tmp = _temporary_name(path)
    try:
        _create_exclusive(tmp, path)
        yield tmp
        os.chmod(tmp, 0o666 & ~umask)  # made 0600 like mkstemp does; give the usual mode
        _publish(tmp, path, overwrite)
    except _NotOurs:
        raise DeltaError("cannot write here (a temporary file of that name exists)", path) \
            from None
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


class _NotOurs(Exception):
    """The temporary name was taken by someone else: theirs must not be removed."""


def _temporary_name(path):
    # a short prefix: a 255-character name must leave room for the temporary one
    prefix = "." + os.path.basename(path)[:200] + "."
    return os.path.join(os.path.dirname(path), prefix + secrets.token_hex(6) + ".part")


def _create_exclusive(tmp, path):
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0),
                     0o600)
    except FileExistsError:
        raise _NotOurs from None
    except OSError as e:
        raise DeltaError(f"cannot write here ({e.strerror})", path) from None
    os.close(fd)


def _publish(tmp, path, overwrite):
    if overwrite:
        _refuse_special(path)   # it may have become a device since the start
        os.replace(tmp, path)
        return
    appeared = DeltaError("output appeared while working (another run?); it was left as it "
                          f"is ({OVERWRITE_HINT})", path)
    try:    # a hard link never replaces: the name is taken atomically, or not at all
        os.link(tmp, path)
    except FileExistsError:
        raise appeared from None
    except OSError:            # a file system without hard links: check, then rename
        if os.path.lexists(path):
            raise appeared from None
        os.replace(tmp, path)
        return
    os.remove(tmp)


class StreamingWriter:
    """Writes tensors in a fixed layout order into an open file; see `write_streaming`."""

    def __init__(self, f, layout):
        self._f = f
        self._pending = [(n, d, tuple(s)) for n, d, s in layout]
        self._i = 0

    def write(self, name, tensor):
        want_name, want_dtype, want_shape = self._pending[self._i]
        if name != want_name or tensor.dtype != want_dtype or tuple(tensor.shape) != want_shape:
            raise ValueError(f"writer expected {want_name} {want_dtype} {want_shape}, "
                             f"got {name} {tensor.dtype} {tuple(tensor.shape)}")
        for piece in chunks(tensor):
            self._f.write(piece)
        self._i += 1

    def finished(self):
        return self._i == len(self._pending)


def write_streaming(path, layout, produce, metadata=None, overwrite=False, inputs=()):
    """Write a safetensors file whose tensors `produce(writer)` hands over one at a time, in
    `layout` order ([(name, dtype, shape)]). Atomic: on any exception nothing is left behind."""
    with atomic_output(path, overwrite=overwrite, inputs=inputs) as tmp:
        try:
            with open(tmp, "wb") as f:
                raw = layout_header(layout, metadata)
                f.write(struct.pack("<Q", len(raw)))
                f.write(raw)
                writer = StreamingWriter(f, layout)
                produce(writer)
                if not writer.finished():
                    raise ValueError("writer closed before every tensor was written")
                f.flush()
                os.fsync(f.fileno())
        except OSError as e:
            raise DeltaError(f"write failed ({e.strerror})", path) from None


def data_sha256(tensors):
    """sha256 of the data section a file of these tensors (in this order) would have."""
    h = hashlib.sha256()
    for t in tensors.values():
        for piece in chunks(t):
            h.update(piece)
    return h.hexdigest()


def write_tensors(path, tensors, metadata_fn=None, overwrite=False, inputs=()):
    """Write an in-memory dict of tensors (in dict order). `metadata_fn(data_sha256)` builds the
    metadata, so a file can carry the hash of its own data (kohya's `sshs_model_hash`)."""
    metadata = metadata_fn(data_sha256(tensors)) if metadata_fn else None
    layout = [(k, t.dtype, tuple(t.shape)) for k, t in tensors.items()]

    def produce(writer):
        for k, t in tensors.items():
            writer.write(k, t)

    write_streaming(path, layout, produce, metadata, overwrite=overwrite, inputs=inputs)
