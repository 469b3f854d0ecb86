"""Cutting an existing delta to a smaller threshold or size, without the checkpoints.

Exact: factors are ordered by singular value, so the rank-t' truncation of the stored rank-t
factors is A[:, :t'] B[:t'], and the file keeps each layer's float64 spectrum head and totals,
so the rules see the same numbers `compress` saw. A layer made by `compress --rank`'s
randomized SVD keeps the head alone, with ||M||^2 but not sum(s): --rank, --fro and --size-mb
cut it as any other, the energy rule cannot (head_only_problem)."""

from dataclasses import replace

import numpy as np
import torch

from .delta_file import (RANDOMIZED, STORAGE_DTYPES, Delta, head_only_layers, lora_parts,
                         tensor_names)
from .errors import DeltaError
from .measures import layer_weight
from .ranks import allocate_budget, is_dense


def truncate_record(delta, i, t):
    """Keep the first t components of SVD record i (t <= its rank)."""
    rec = delta.records[i]
    names = tensor_names(rec)
    src = delta.extras if rec.extra else delta.tensors
    head = delta.spectra[i][1]
    src[names["up"]] = src[names["up"]][:, :t].contiguous()
    src[names["down"]] = src[names["down"]][:t].contiguous()
    if "alpha" in names:
        src[names["alpha"]] = torch.tensor(float(t), dtype=torch.float32)
    # Dropped components are orthogonal to the kept ones: their energy adds to the error.
    rec.err2 += float(np.sum(np.asarray(head[t: rec.rank], dtype=np.float64) ** 2))
    rec.rank = t


def new_rank(rule, rec, head):
    """Rank `rule` picks for a record from its stored head and totals (as compress did)."""
    n = rec.n
    if rule.mode == "rank":
        t = min(int(rule.value), n)
    else:
        values, total = (head, rec.sum_s) if rule.mode == "energy" else (head * head, rec.sum_s2)
        if rule.value >= 1.0 or total <= 0:
            t = n if total > 0 else 0
        else:
            hit = np.nonzero(np.cumsum(values) / total >= rule.value)[0]
            t = int(hit[0]) + 1 if hit.size else n
    return rule.clamp(t, n)


def head_only_problem(delta, mode):
    """Why the rule `mode` cannot cut `delta`, or None: the energy rule needs sum(s) over the
    whole spectrum, which a randomized SVD never measured."""
    n = head_only_layers(delta)
    if mode != "energy" or not n:
        return None
    return (f"{n} layers of this delta were made by compress --rank's randomized SVD, which "
            "keeps only their first singular values, and the energy rule needs the sum of all "
            "of them: resize it with --rank, --fro or --size-mb, or compress again with "
            "--energy (or --rank with --exact-ranks, which keeps every spectrum whole)")


def copy_delta(delta):
    """A copy whose records and tensor dicts can be changed without touching `delta`."""
    return Delta(family=delta.family, records=[replace(r) for r in delta.records],
                 tensors=dict(delta.tensors), extras=dict(delta.extras),
                 spectra=dict(delta.spectra), info=dict(delta.info))


def _coded(delta):
    return [i for i, r in enumerate(delta.records) if r.n and i in delta.spectra]


def _mark(out, delta, rule):
    out.info.update({"mode": rule.mode, "value": repr(float(rule.value)),
                     "resized_from": f"{delta.info.get('mode')}={delta.info.get('value')}"})


def resize(delta, rule):
    """A new Delta cut to a per-layer `rule`. Refuses to grow a layer beyond the file."""
    problem = head_only_problem(delta, rule.mode)
    if problem:
        raise DeltaError(problem, delta.info.get("file"))
    out = copy_delta(delta)
    for i in _coded(out):
        _cut(out, i, new_rank(rule, out.records[i], out.spectra[i][1]))
    _mark(out, delta, rule)
    return out


def _cut(delta, i, t):
    rec = delta.records[i]
    d, k = rec.matrix_shape
    if rec.kind == "svd":
        if t > rec.rank:
            # a head-only record knows only that its rule was not met within the head
            needs = f"more than rank {rec.rank}" if rec.precision == RANDOMIZED else f"rank {t}"
            raise DeltaError(f"the new setting needs {needs} but the file stores {rec.rank}: "
                             "a delta can only be cut smaller; compress again from the "
                             "checkpoints", delta.info.get("file"), rec.name)
        if t < rec.rank:
            truncate_record(delta, i, max(t, 1))
    elif rec.kind == "dense" and not is_dense(t, d, k):
        _dense_to_svd(delta, i, max(t, 1))


def _dense_to_svd(delta, i, t):
    """A dense layer cut to a rank where factors are smaller: factor the stored delta."""
    rec = delta.records[i]
    names = tensor_names(rec)
    src = delta.extras if rec.extra else delta.tensors
    dense = src.pop(names["diff"])
    m = dense.double().reshape(dense.shape[0], -1)
    u, s, vh = torch.linalg.svd(m, full_matrices=False)
    a = (u[:, :t] * s[:t]).to(dense.dtype)
    b = vh[:t].to(dense.dtype)
    rec.kind, rec.rank = "svd", t
    rec.err2 = float((m - a.double() @ b.double()).pow(2).sum())
    new_names = tensor_names(rec)
    for part, tensor in lora_parts(rec, a, b).items():
        if part in new_names:
            src[new_names[part]] = tensor


def resize_to_size(delta, rule, file_size_fn):
    """Size mode: allocate the budget over the stored heads, then fit exactly."""
    from .compress import trim_to_size
    out = copy_delta(delta)
    limit = rule.value * 2**20
    coded = _coded(out)
    esize = STORAGE_DTYPES[out.info.get("dtype", "fp16")].itemsize
    recs = [out.records[i] for i in coded]
    factor_bytes = sum(r.rank * sum(r.matrix_shape) * esize for r in recs if r.kind == "svd")
    dense_bytes = sum(r.matrix_shape[0] * r.matrix_shape[1] * esize for r in recs
                      if r.kind == "dense")
    # The float64 heads (about 11 bytes per kept component, base64'd) are part of each
    # component's cost below, so they leave the fixed part too (else it is counted twice).
    heads = 11 * sum(r.rank for r in recs)
    fixed = file_size_fn(out) - factor_bytes - dense_bytes - heads
    layers = [(np.asarray(out.spectra[i][1][: rule.max_rank]), sum(r.matrix_shape) * esize + 11,
               layer_weight(r.base2, r.norm2) if rule.objective == "weight" else 1.0)
              for i, r in zip(coded, recs)]
    for i, t in zip(coded, allocate_budget(layers, max(limit - fixed, 0))):
        _cut(out, i, rule.clamp(t, out.records[i].n))
    trim_to_size(out, limit, file_size_fn, rule.objective)
    _mark(out, delta, rule)
    return out
