"""Factors kept on disk, not in memory, while a delta is built.

A Flux delta at a high threshold holds gigabytes of factors; held in memory until the file is
written, they were most of the peak RSS (9.7 GB of it for a 7.4 GB file). A SpillFile is an
anonymous scratch file (unlinked at once, so nothing is left behind whatever happens): each
tensor put there is written out and handed back as a read-only view of the file (a memory map
the kernel can drop and read again), so a Delta still holds ordinary tensors. Writers copy a
spilled tensor's bytes straight from the scratch file (`chunks`), without mapping it in.
"""

import mmap
import os
import tempfile

import numpy as np
import torch

from .errors import DeltaError

SPILL_MIN_BYTES = 256 << 10    # smaller tensors stay in memory: not worth a memory map each
CHUNK = 16 << 20
_ATTR = "_deltasvd_spill"      # set on a spilled tensor: (SpillFile, offset, nbytes)


class SpillFile:
    def __init__(self, folder=None):
        self.folder = folder or tempfile.gettempdir()
        try:
            self._f = tempfile.TemporaryFile(dir=self.folder)
        except OSError as e:
            raise DeltaError(f"cannot create a scratch file ({e.strerror})", self.folder) from None
        self._end = 0

    def keep(self, t):
        """`t` itself if small, else the same values backed by the scratch file."""
        nbytes = t.numel() * t.element_size()
        if nbytes == 0 or nbytes < SPILL_MIN_BYTES:
            return t
        flat = t.detach().to("cpu").contiguous().reshape(-1)
        # Align each tensor to the page size: a map's offset must be a multiple of it.
        offset = -(-self._end // mmap.ALLOCATIONGRANULARITY) * mmap.ALLOCATIONGRANULARITY
        data = memoryview(flat.view(torch.uint8).numpy())
        try:
            done = 0
            while done < nbytes:      # one write moves at most 2 GiB on Linux
                done += os.pwrite(self._f.fileno(), data[done: done + CHUNK], offset + done)
        except OSError as e:
            raise DeltaError(f"cannot write the scratch file ({e.strerror}); free some space "
                             "or choose another folder", self.folder) from None
        self._end = offset + nbytes
        raw = np.memmap(self._f, dtype=np.uint8, mode="c", offset=offset, shape=(nbytes,))
        out = torch.from_numpy(raw).view(t.dtype).reshape(t.shape)
        setattr(out, _ATTR, (self, offset, nbytes))
        return out

    def read(self, offset, nbytes):
        """The bytes at [offset, offset + nbytes), in chunks, through the page cache."""
        end = offset + nbytes
        while offset < end:
            piece = os.pread(self._f.fileno(), min(CHUNK, end - offset), offset)
            if not piece:
                raise DeltaError("scratch file ended early", self.folder)
            yield piece
            offset += len(piece)


def chunks(t):
    """A tensor's bytes (C order) as memoryviews: from the scratch file for a spilled tensor,
    else from memory."""
    spilled = getattr(t, _ATTR, None)
    if spilled is not None:
        spill, offset, nbytes = spilled
        yield from spill.read(offset, nbytes)
        return
    t = t.detach().to("cpu").contiguous().reshape(-1)
    yield memoryview(t.view(torch.uint8).numpy())
