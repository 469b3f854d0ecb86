"""One float32 buffer per worker thread, reused from layer to layer for the layer's delta.

On the machines measured here (virtual machines), memory new to the process costs more than
the arithmetic done on it: the kernel zeroes each page at its first touch (0.06 s for a
12288 x 3072 float32 delta, fifteen times the subtraction that fills it). Deltas are far over
the size the C allocator keeps for reuse, so each layer's came fresh from the kernel; page
zeroing was a third of the CPU time of a Flux.1 run. A buffer kept by its thread is zeroed once.

Only the compressor's workers use one, and only for the delta, which nothing keeps after its
layer is coded: what a layer stores is always a new tensor (compress._stored copies).
"""

import threading

import torch


class Workspace(threading.local):
    """`float32(shape)`: a float32 tensor of that shape over this thread's buffer (grown as
    needed); its previous contents are overwritten by the next call in the same thread."""

    buf = None

    def float32(self, shape):
        n = 1
        for dim in shape:
            n *= dim
        if self.buf is None or self.buf.numel() < n:
            self.buf = None                       # the old one goes before the new one comes
            self.buf = torch.empty(n, dtype=torch.float32)
        return self.buf[:n].view(shape)
