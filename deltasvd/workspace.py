"""Buffers a compressor worker thread keeps from layer to layer: the layer's float32 delta and
its Gram matrices.

On the machines measured here (virtual machines), memory new to the process costs more than
the arithmetic done on it: the kernel zeroes each page at its first touch (0.06 s for a
12288 x 3072 float32 delta, fifteen times the subtraction that fills it). These arrays are far
over the size the C allocator keeps for reuse, so each layer's came fresh from the kernel, and
page zeroing was a third of the CPU time of a Flux.1 run. A buffer kept by its thread is zeroed
once.

A thread keeps buffers only after `keep_buffers()` (the compressor's workers call it when they
start; they are dropped with the thread); elsewhere `array` and `tensor` give new memory, so a
host's threads hold nothing. A buffer is handed out again by the next request of its name in
the same thread: what a layer keeps after it is coded is always a new tensor
(compress._stored copies), never one of these.
"""

import threading
from contextlib import contextmanager

import numpy as np
import torch

_local = threading.local()


def keep_buffers():
    """From now on this thread keeps its named buffers (a ThreadPoolExecutor initializer)."""
    _local.buffers = {}


@contextmanager
def kept_buffers():
    """keep_buffers() for the calling thread, for the length of the block."""
    old = getattr(_local, "buffers", None)
    _local.buffers = {}
    try:
        yield
    finally:
        _local.buffers = old


def array(name, shape, dtype):
    """An uninitialised numpy array: this thread's buffer `name` (grown as needed) where it keeps
    buffers, else new memory."""
    dtype = np.dtype(dtype)
    buffers = getattr(_local, "buffers", None)
    if buffers is None:
        return np.empty(shape, dtype)
    need = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    buf = buffers.get(name)
    if buf is None or buf.nbytes < need:
        buffers[name] = None                      # the old one goes before the new one comes
        buf = buffers[name] = np.empty(max(need, 1), np.uint8)
    return buf[:need].view(dtype).reshape(shape)


def tensor(name, shape, dtype=torch.float32):
    """`array` as a CPU torch tensor."""
    np_dtype = torch.empty((), dtype=dtype).numpy().dtype
    return torch.from_numpy(array(name, tuple(shape), np_dtype))
