"""deltasvd.sources: compressing open, in-memory models gives what compressing their files gives."""

import pytest
import torch

from deltasvd.api import compress_to_delta
from deltasvd.checkpoint import Checkpoint
from deltasvd.errors import DeltaError
from deltasvd.ranks import RankRule
from deltasvd.sources import TensorSource, compress_sources


def source_of(path, label):
    """A TensorSource over a file's tensors held in memory (like a host's loaded model)."""
    ck = Checkpoint(path)
    state = {k: ck.get(k) for k in ck.keys()}
    ck.close()
    closed = []
    src = TensorSource({k: (tuple(v.shape), v.dtype, (lambda v=v: v)) for k, v in state.items()},
                       label, on_close=[lambda: closed.append(label)])
    return src, closed


@pytest.mark.parametrize("rule", [RankRule("energy", 0.5), RankRule("size_mb", 0.05)])
def test_sources_equal_files(tiny_pair, rule):
    base, tuned = tiny_pair
    want, want_counts, _ = compress_to_delta(base, tuned, rule)
    b, b_closed = source_of(base, "<base>")
    t, t_closed = source_of(tuned, "<tuned>")
    got, counts, tuned_bytes = compress_sources(b, t, rule, base_name="b", tuned_name="t")
    assert b_closed == ["<base>"] and t_closed == ["<tuned>"]
    assert got.family == want.family == "sd1"
    assert [r.__dict__ for r in got.records] == [r.__dict__ for r in want.records]
    assert got.tensors.keys() == want.tensors.keys()
    for k in want.tensors:
        assert torch.equal(got.tensors[k], want.tensors[k]), k
    assert got.extras.keys() == want.extras.keys()
    assert counts.changed == want_counts.changed
    assert got.info["base_name"] == "b" and got.info["base_sha256"] == ""
    assert tuned_bytes == t.total_bytes() > 0


def test_sources_refuse_family_and_shape_mismatch(tiny_pair):
    base, tuned = tiny_pair
    b, _ = source_of(base, "<base>")
    entries = {k: (b.shape(k), b.dtype(k), (lambda k=k: b.get(k))) for k in b.keys()}
    key = next(k for k in entries if k.endswith("proj_in.weight"))
    shape, dtype, _ = entries[key]
    entries[key] = ((shape[0] + 1,) + shape[1:], dtype, lambda: None)
    bad = TensorSource(entries, "<odd>")
    with pytest.raises(DeltaError, match="shape mismatch"):
        compress_sources(b, bad, RankRule("energy", 0.5))
    xl = {k: v for k, v in entries.items() if not k.startswith("model.")}
    xl = {k.replace("cond_stage_model.transformer.",
                    "conditioner.embedders.1.model.transformer."): v for k, v in xl.items()}
    assert TensorSource(xl, "<xl>").family == "sdxl"
    b, _ = source_of(base, "<base>")
    with pytest.raises(DeltaError, match="family mismatch"):
        compress_sources(b, TensorSource(xl, "<xl>"), RankRule("energy", 0.5))
