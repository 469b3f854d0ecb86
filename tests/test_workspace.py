"""deltasvd.workspace: a worker that keeps its buffers gets the same memory back for a name,
other threads get new memory; and what a compress run stores never shares a worker's buffer
(each layer's stored delta is its own, even where storing it is a plain float32 copy)."""

import threading

import numpy as np
import torch
from safetensors.torch import save_file

from deltasvd import api, workspace
from deltasvd.compress import Codec
from deltasvd.delta_file import read_delta, reconstruct, tensor_names
from deltasvd.ranks import RankRule


def in_thread(fn):
    out = []
    th = threading.Thread(target=lambda: out.append(fn()))
    th.start()
    th.join()
    return out[0]


def test_a_keeping_thread_gets_its_buffer_back():
    def job():
        workspace.keep_buffers()
        a = workspace.array("x", (64, 32), np.float32)
        b = workspace.array("x", (16, 8), np.float64)        # smaller: the same memory
        c = workspace.array("y", (64, 32), np.float32)       # another name: its own
        d = workspace.array("x", (128, 64), np.float32)      # bigger: grown
        return a, b, c, d
    a, b, c, d = in_thread(job)
    assert np.shares_memory(a, b) and not np.shares_memory(a, c)
    assert not np.shares_memory(a, d) and d.shape == (128, 64)
    assert b.dtype == np.float64 and b.shape == (16, 8)


def test_other_threads_get_new_memory():
    def job():
        return workspace.tensor("x", (8, 8)), workspace.tensor("x", (8, 8))
    a, b = in_thread(job)
    assert a.dtype == torch.float32 and a.data_ptr() != b.data_ptr()
    with workspace.kept_buffers():
        c, e = workspace.tensor("x", (8, 8)), workspace.tensor("x", (4, 4))
        assert c.data_ptr() == e.data_ptr()
    assert workspace.tensor("x", (8, 8)).data_ptr() != c.data_ptr()   # kept only in the block


def test_stored_deltas_do_not_share_the_workers_buffer(tmp_path):
    """Layers of several shapes, stored dense in float32 (energy 1): each stored diff must be
    its own layer's tuned - base, not a later layer's values written over a shared buffer."""
    g = torch.Generator().manual_seed(7)
    shapes = [(48, 40), (96, 64), (40, 48), (128, 96), (64, 64), (96, 128)]
    base = {f"blocks.{i}.weight": torch.randn(s, generator=g) for i, s in enumerate(shapes)}
    tuned = {k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in base.items()}
    save_file(base, str(tmp_path / "base.safetensors"))
    save_file(tuned, str(tmp_path / "tuned.safetensors"))
    out = tmp_path / "d.safetensors"
    api.compress_files(str(tmp_path / "base.safetensors"), str(tmp_path / "tuned.safetensors"),
                       str(out), RankRule("energy", 1.0), "fp32", "cpu", codec=Codec())
    delta = read_delta(str(out))
    assert len(delta.records) == len(shapes)
    for rec in delta.records:
        assert rec.kind == "dense", rec.kind
        parts = {p: delta.tensors[n] for p, n in tensor_names(rec).items()}
        key = rec.key.removeprefix("model.diffusion_model.")    # the canonical name
        want = tuned[key] - base[key]
        assert torch.equal(reconstruct(rec, parts), want), rec.key
