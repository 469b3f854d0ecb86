"""Layers coded side by side: the same file as one at a time, and the hosts' threads restored."""

import time

import torch

from deltasvd import compress
from deltasvd.blas_threads import _openblas, blas_threads
from deltasvd.ranks import RankRule


def _coded(pair, monkeypatch, workers):
    # Single-threaded BLAS in both runs: a different thread count may round differently.
    monkeypatch.setattr(compress, "MAX_WORKERS", workers)
    monkeypatch.setattr(compress.os, "cpu_count", lambda: workers)
    delta, _ = compress.Compressor(RankRule("energy", 0.5)).run_readers(
        *compress.open_pair(*pair))
    return delta


def test_parallel_file_equals_serial(tiny_pair, monkeypatch):
    one = _coded(tiny_pair, monkeypatch, 1)
    four = _coded(tiny_pair, monkeypatch, 4)
    assert [r.name for r in one.records] == [r.name for r in four.records]
    assert [r.rank for r in one.records] == [r.rank for r in four.records]
    assert one.tensors.keys() == four.tensors.keys()
    for name, t in one.tensors.items():
        assert torch.equal(t, four.tensors[name]), name
    assert any(r.kind == "svd" and r.rank > 0 for r in four.records)


def test_blas_threads_are_set_inside_and_restored_after():
    blas = _openblas()
    assert blas is not None, "numpy's OpenBLAS not found: the workers would oversubscribe"
    before = (torch.get_num_threads(), blas[1]())
    with blas_threads(1):
        assert torch.get_num_threads() == 1 and blas[1]() == 1
    assert (torch.get_num_threads(), blas[1]()) == before


def test_worker_error_reaches_the_caller(tiny_pair, monkeypatch):
    """A failure inside a worker (here: the math) is raised by the job, not lost in a thread."""
    def boom(*a, **k):
        raise RuntimeError("boom in a worker")
    monkeypatch.setattr(compress.spectrum, "decide_rank", boom)
    try:
        compress.Compressor(RankRule("energy", 0.5)).run_readers(*compress.open_pair(*tiny_pair))
    except RuntimeError as e:
        assert "boom in a worker" in str(e)
    else:
        raise AssertionError("the worker's error was swallowed")


def test_cancel_from_progress_starts_no_more_layers(tiny_pair, monkeypatch):
    """A host's Cancel is raised from the progress callback: the keys still queued are
    dropped, not coded, and progress arrives in key order."""
    monkeypatch.setattr(compress, "MAX_WORKERS", 2)
    monkeypatch.setattr(compress, "QUEUED_PER_WORKER", 2)
    monkeypatch.setattr(compress.os, "cpu_count", lambda: 2)
    coded, seen = [], []
    real = compress.Compressor._code_pair

    def counting(self, key, *args):
        coded.append(key)
        time.sleep(0.2)              # slow layers: the queue is still full at the cancel
        return real(self, key, *args)
    monkeypatch.setattr(compress.Compressor, "_code_pair", counting)

    def progress(stage, done, total, key):
        seen.append(key)
        if done == 3:
            raise KeyboardInterrupt("cancelled")
    base, tuned = compress.open_pair(*tiny_pair)
    keys = compress.plan_keys(base, tuned, compress.Counts())
    try:
        compress.Compressor(RankRule("energy", 0.5), progress=progress).run_readers(base, tuned)
    except KeyboardInterrupt:
        pass
    else:
        raise AssertionError("the cancel was swallowed")
    assert seen == keys[:3]
    # Keys 4-7 were handed out; the two workers may have started two of them, not more.
    assert 3 <= len(coded) <= 5 < len(keys), coded
