"""Synthetic base / fine-tuned checkpoint pairs for tests, benchmarks and demos.

Key names, shapes and dtypes come from deltasvd/specs/<family>.json.gz, which
tools/gen_arch_spec.py (SD1.5 / SD2.1 / SDXL checkpoints) and tools/gen_dit_specs.py (the
diffusion models of Flux, Chroma, Qwen-Image, Wan, HiDream, Lumina 2, Z-Image, SD3.5) derive
from ComfyUI's model classes, so a pair looks like a real checkpoint and its fine-tune, without
any weights being downloaded.

The base is random; the tuned file is base + a fine-tuning-like delta: per matrix a low-rank
part with a decaying spectrum plus a small dense noise floor, some layers left bit-identical
(the whole VAE, text embeddings, time embedding, ~10% of the other layers), some biases and
norm weights nudged. Every tensor is a pure function of (seed, key), so the two files are
written in two streaming passes and no more than one tensor is ever held at a time (full SDXL
is 3.5 B parameters).
"""

import gzip
import hashlib
import json
import math
import os
import random
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache

import torch

from .safetensors_io import ST_TO_DTYPE, write_streaming

SD_FAMILIES = ("sd15", "sd21", "sdxl")
DIT_FAMILIES = ("flux_dev", "flux_schnell", "chroma", "qwen_image", "wan21_14b", "wan22_5b",
                "hidream_i1", "lumina2", "zimage", "sd35_medium", "sd35_large")
FAMILIES = SD_FAMILIES + DIT_FAMILIES
SMALL_MAX_NUMEL = 30_000_000   # a small DiT pair keeps real widths, but no tensor above this,
SMALL_GRAM_BUDGET = 60e9       # and big matrices only up to this much float64 Gram work
SMALL_CHEAP_FLOPS = 2e9        # (smaller matrices all stay)
SCALES = ("small", "full")
SPEC_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "specs")

UNET = "model.diffusion_model."
VAE = "first_stage_model."
POOL_SIZE = 1 << 25     # 32 M normal samples (128 MB), see _pool
UNTOUCHED_LAYERS = 0.1  # fraction of layers a fine-tune leaves bit-identical
CHANGED_1D = 0.5        # fraction of 1-D tensors (biases, norms) of changed layers that move
NOISE_FRACTION = 0.1    # dense noise floor, as a fraction of the low-rank delta's norm


@lru_cache(maxsize=None)
def _read_spec(family):
    """The parsed spec file (read once: pair_spec, spec_dtype and spec_blocks all need it);
    callers only read it."""
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")
    with gzip.open(os.path.join(SPEC_DIR, f"{family}.json.gz"), "rt", encoding="utf-8") as f:
        return json.load(f)


def load_spec(family):
    """[(key, shape tuple, safetensors dtype string)] of a full `family` checkpoint, by key."""
    return [(key, tuple(shape), st) for key, shape, st in _read_spec(family)["tensors"]]


def spec_dtype(family):
    """The torch dtype most float tensors of the released files have."""
    counts = {}
    for _, shape, st in load_spec(family):
        if ST_TO_DTYPE[st].is_floating_point:
            counts[st] = counts.get(st, 0) + math.prod(shape)
    return ST_TO_DTYPE[max(counts, key=counts.get)]


def spec_blocks(family):
    """{repeated-block prefix (bare): count} of a DiT spec ({} for the SD checkpoints)."""
    return _read_spec(family).get("blocks", {})


# ---------------------------------------------------------------------------------------------
# Which keys a "small" pair keeps


def _attention_blocks(keys, prefix):
    """Sorted N of the `<prefix>N.1.` blocks that are attention blocks."""
    return sorted({int(k[len(prefix):].split(".")[0]) for k in keys
                   if k.startswith(prefix) and ".1.transformer_blocks." in k})


def _small_filter(keys):
    """A predicate keeping a representative subset of a spec: everything family detection
    needs (attn2.to_k, label_emb, text-encoder layer 0) plus conv_in, out, the time embedding,
    an early resblock and attention block (transformer_blocks.0 only: SDXL's have up to 10),
    a late resblock, part of a late and of the middle attention block, a few VAE tensors."""
    ins = _attention_blocks(keys, UNET + "input_blocks.")
    outs = _attention_blocks(keys, UNET + "output_blocks.")
    last_out = max(int(k[len(UNET + "output_blocks."):].split(".")[0])
                   for k in keys if k.startswith(UNET + "output_blocks."))
    late = f"output_blocks.{outs[-1]}.1."
    mid = "middle_block.1.transformer_blocks.0."
    unet = ["input_blocks.0.0.", "input_blocks.1.0.", f"input_blocks.{ins[0]}.1.",
            f"output_blocks.{last_out}.0.",
            late + "norm.", late + "proj_in.", late + "proj_out.",
            late + "transformer_blocks.0.attn1.", late + "transformer_blocks.0.norm1.",
            mid + "attn2.to_k.", mid + "attn2.to_v.", mid + "norm2.",
            "out.", "time_embed.", "label_emb."]
    prefixes = tuple(UNET + p for p in unet) + tuple(
        VAE + p for p in ("quant_conv.", "post_quant_conv.", "decoder.conv_in."))
    text_parts = ("encoder.layers.0.", "resblocks.0.", "final_layer_norm.", "ln_final.",
                  "position", "logit_scale")

    def keep(key):
        if ".transformer_blocks." in key and ".transformer_blocks.0." not in key:
            return False
        if key.startswith(prefixes):
            return True
        is_text = key.startswith(("cond_stage_model.", "conditioner."))
        return is_text and any(part in key for part in text_parts)
    return keep


def _first_only(path):
    """Whether a key path names only item 0 of every numbered list of layers, blocks or
    experts in it (HiDream's MoE experts, Chroma's guidance layers)."""
    parts = path.split(".")
    return not any(a.endswith(("layers", "blocks", "experts")) and b.isdigit() and b != "0"
                   for a, b in zip(parts, parts[1:]))


def _gram_flops(shape):
    """What the spectrum of a matrix of this shape costs (its Gram matrix)."""
    if len(shape) < 2:
        return 0
    d, k = shape[0], math.prod(shape[1:])
    return min(d, k) ** 2 * max(d, k)


@lru_cache(maxsize=1)
def _detection_keys():
    """Every key a family's recognition looks at: a small pair is recognised like a full one."""
    from . import families
    return frozenset(UNET + k for fam in families.REGISTRY
                     for k in (*fam.signature, *fam.detection_keys))


def _small_dit_entries(spec, blocks):
    """Block 0 of every repeated block, item 0 of nested lists, everything else (embedders,
    final layer): real names and widths. At real widths every big matrix costs seconds of
    float64 Gram, so the cheapest big matrix of the blocks is kept, then others cheapest first
    while their Gram work stays within SMALL_GRAM_BUDGET; cheap ones (1-D, thin embedders) and
    the keys family detection reads always."""
    prefixes = tuple(UNET + p for p in blocks)

    def in_block_zero(key):
        for p in prefixes:
            if key.startswith(p):
                return key[len(p):].startswith("0.")
        return True

    keep, big = set(), []
    for key, shape, _ in spec:
        if key in _detection_keys():
            keep.add(key)
        elif math.prod(shape) <= SMALL_MAX_NUMEL and _first_only(key) and in_block_zero(key):
            cost = _gram_flops(shape)
            if cost <= SMALL_CHEAP_FLOPS:
                keep.add(key)
            else:
                big.append((cost, key))
    in_blocks = sorted(b for b in big if b[1].startswith(prefixes))
    spent = in_blocks[0][0] if in_blocks else 0    # one block matrix, whatever its cost
    keep.update(key for _, key in in_blocks[:1])
    for cost, key in sorted(big):
        if key not in keep and spent + cost <= SMALL_GRAM_BUDGET:
            keep.add(key)
            spent += cost
    return [entry for entry in spec if entry[0] in keep]


def pair_spec(family, scale="small"):
    """The spec entries a pair of this family and scale holds."""
    if scale not in SCALES:
        raise ValueError(f"unknown scale {scale!r}; expected one of {SCALES}")
    spec = load_spec(family)
    if scale == "full":
        return spec
    if family in DIT_FAMILIES:
        return _small_dit_entries(spec, spec_blocks(family))
    keep = _small_filter([k for k, _, _ in spec])
    return [entry for entry in spec if keep(entry[0])]


# ---------------------------------------------------------------------------------------------
# Deterministic randomness


def _rng(seed, *parts):
    """A random.Random seeded from (seed, parts): stable across runs, processes and platforms
    (Python's own hash() is salted per process)."""
    digest = hashlib.blake2b("\0".join([str(seed), *parts]).encode("utf-8"), digest_size=8)
    return random.Random(int.from_bytes(digest.digest(), "little"))


@lru_cache(maxsize=2)
def _pool(seed):
    """One block of N(0, 1) samples per seed. Tensors are slices of it at (seed, key)-derived
    offsets: torch.randn runs at ~90 M samples/s per core here, which would make a full SD1.5
    pair (1.07 B parameters, generated twice) take a minute; slicing costs a memcpy. Within a
    tensor the values are i.i.d. normal (up to 32 M elements; longer ones, the token
    embeddings, wrap around); different tensors may share stretches of the pool, scaled
    differently, which no SVD of a single tensor can notice."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(POOL_SIZE, generator=g)


def _normal(seed, numel, rnd):
    """`numel` N(0, 1) samples (flat; may be a view into the pool: never write into it)."""
    pool = _pool(seed)
    if numel <= POOL_SIZE:
        start = rnd.randrange(POOL_SIZE - numel + 1)
        return pool[start:start + numel]
    reps = -(-numel // POOL_SIZE)
    return pool.roll(-rnd.randrange(POOL_SIZE)).repeat(reps)[:numel]


class _Scratch:
    """Reusable flat buffers. A fresh tensor of many MB is mmap'd and unmapped on free, so each
    of its 4 KB pages faults on first touch: that made generation ~4x slower than the
    arithmetic itself. Computing into the same buffers again avoids it."""

    def __init__(self):
        self._bufs = {}

    def get(self, name, shape, dtype=torch.float32):
        numel = math.prod(shape)
        buf = self._bufs.get((name, dtype))
        if buf is None or buf.numel() < numel:
            buf = self._bufs[(name, dtype)] = torch.empty(numel, dtype=dtype)
        return buf[:numel].view(shape)

    def cast(self, t, dtype, name):
        """`t` as `dtype` (t itself when it already is)."""
        return t if t.dtype == dtype else self.get(name, t.shape, dtype).copy_(t)


# ---------------------------------------------------------------------------------------------
# Base weights


def _fan_in(shape):
    return math.prod(shape[1:]) if len(shape) >= 2 else 1


def _base_tensor(seed, key, shape, st_dtype, scratch):
    """The base value of `key`: float32 in a scratch buffer for float tensors, the stored dtype
    for the others."""
    dtype = ST_TO_DTYPE[st_dtype]
    if not dtype.is_floating_point:
        # position_ids and the like: 0, 1, 2, ... along the last axis.
        return torch.arange(shape[-1] if shape else 1, dtype=dtype).expand(shape).clone()
    z = _normal(seed, math.prod(shape), _rng(seed, key, "base")).view(shape)
    out = scratch.get("base", shape)
    if len(shape) >= 2:
        return torch.mul(z, 1.0 / math.sqrt(_fan_in(shape)), out=out)
    if key.endswith("bias"):
        return torch.mul(z, 0.02, out=out)
    return torch.mul(z, 0.05, out=out).add_(1.0)  # norm weights, scales: near 1


# ---------------------------------------------------------------------------------------------
# The fine-tuning delta


def _module(key):
    return key.rsplit(".", 1)[0]


_FROZEN_EMBEDDINGS = ("token_embedding", "position_embedding", "positional_embedding",
                      "position_ids")


def _is_untouched(seed, key):
    """Whether the fine-tune leaves `key` bit-identical."""
    if key.startswith(VAE) or key.startswith(UNET + "time_embed."):
        return True
    if any(e in key for e in _FROZEN_EMBEDDINGS) or key.endswith("logit_scale"):
        return True  # text encoders' token / position embeddings and CLIP's logit scale
    module = _module(key)
    if ".emb_layers." in key:  # resblocks' time-embedding projections: half frozen
        return _rng(seed, module, "emb").random() < 0.5
    return _rng(seed, module, "layer").random() < UNTOUCHED_LAYERS


def _tuned_matrix(seed, base, rnd, scratch):
    """base + delta for a weight viewed as (out, in*k*k). The delta is U diag(s) V^T over rank
    ~min(d, k)/4 with a power-law spectrum, scaled to 1e-3..1e-2 of the weight's norm, plus a
    dense noise floor. Built from rank-r factors: never a full-rank product."""
    d, k = base.shape[0], _fan_in(base.shape)
    r = max(1, min(d, k) // 4)
    weight_norm = math.sqrt(d)  # d*k entries of std 1/sqrt(k)
    target = weight_norm * 10.0 ** rnd.uniform(-3.0, -2.0)
    s = torch.arange(1, r + 1, dtype=torch.float32) ** -rnd.uniform(0.7, 1.3)
    s *= target / s.norm()
    # Columns of N(0, 1/n) factors are nearly orthonormal, so the spectrum is close to s.
    u = torch.mul(_normal(seed, d * r, rnd).view(d, r), s / math.sqrt(d),
                  out=scratch.get("u", (d, r)))
    v = torch.mul(_normal(seed, r * k, rnd).view(r, k), 1.0 / math.sqrt(k),
                  out=scratch.get("v", (r, k)))
    noise_std = NOISE_FRACTION * target / math.sqrt(d * k)
    out = torch.mul(_normal(seed, d * k, rnd).view(d, k), noise_std,
                    out=scratch.get("tuned", (d, k)))
    return out.addmm_(u, v).add_(base.view(d, k)).view(base.shape)


def _tuned_tensor(seed, key, base, scratch):
    """The fine-tuned value (float32) of a float tensor whose base value is `base`, or None if
    the fine-tune leaves it untouched."""
    if _is_untouched(seed, key):
        return None
    rnd = _rng(seed, key, "delta")
    if base.ndim >= 2:
        return _tuned_matrix(seed, base, rnd, scratch)
    if rnd.random() >= CHANGED_1D:
        return None
    scale = 10.0 ** rnd.uniform(-3.0, -2.0) * max(base.abs().mean().item(), 0.02)
    return base + scale * _normal(seed, base.numel(), rnd).view(base.shape)


# ---------------------------------------------------------------------------------------------
# Writing a pair


def _stored_dtype(st_dtype, float_dtype):
    dtype = ST_TO_DTYPE[st_dtype]
    return float_dtype if dtype.is_floating_point else dtype


def _write(path, entries, float_dtype, make, metadata):
    """Stream `make(key, shape, st_dtype, scratch)` for every entry into a safetensors file.

    Tensor i+1 is made in a worker thread while tensor i is written (torch math and file
    writes both release the GIL); the two alternate between two sets of scratch buffers."""
    layout = [(key, _stored_dtype(st, float_dtype), shape) for key, shape, st in entries]
    scratches = (_Scratch(), _Scratch())

    def produce(writer):
        with ThreadPoolExecutor(max_workers=1) as worker:
            future = worker.submit(make, *entries[0], scratches[0]) if entries else None
            for i, (key, dtype, _) in enumerate(layout):
                tensor = future.result()
                if i + 1 < len(entries):
                    future = worker.submit(make, *entries[i + 1], scratches[(i + 1) % 2])
                writer.write(key, scratches[i % 2].cast(tensor, dtype, "out"))

    write_streaming(path, layout, produce, metadata=metadata, overwrite=True)


def make_pair(out_dir, family="sd15", scale="small", seed=0, base_dtype=torch.float32,
              tuned_dtype=torch.float16):
    """Write `<family>_<scale>_seed<seed>_{base,tuned}.safetensors` into out_dir (replacing any
    previous ones) and return (base_path, tuned_path).

    Float tensors are stored in base_dtype / tuned_dtype, others unchanged. The tuned file is
    computed from the base as stored, so an untouched tensor of the tuned file equals the
    stored base tensor cast to tuned_dtype, bit for bit. The same arguments give the same
    files on one machine; on another CPU the matrix products of the tuned file may round
    differently in the last bit."""
    entries = pair_spec(family, scale)
    stem = os.path.join(os.fspath(out_dir), f"{family}_{scale}_seed{seed}")
    base_path, tuned_path = stem + "_base.safetensors", stem + "_tuned.safetensors"
    info = {"deltasvd_fixture": json.dumps({"family": family, "scale": scale, "seed": seed})}

    def base(key, shape, st, scratch):
        return _base_tensor(seed, key, shape, st, scratch)

    def tuned(key, shape, st, scratch):
        t = _base_tensor(seed, key, shape, st, scratch)
        if not t.is_floating_point():
            return t
        if base_dtype != torch.float32:  # start from the base as stored: round it in place
            t.copy_(t.to(base_dtype))
        changed = _tuned_tensor(seed, key, t, scratch)
        return t if changed is None else changed

    # One core is kept for the writing thread: with every core in torch's pool the two fight
    # (on 2 cores the tuned pass ran ~30% slower). torch's thread count is process-wide, so it
    # is restored afterwards.
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, threads - 1))
    try:
        _write(base_path, entries, base_dtype, base, info)
        _write(tuned_path, entries, tuned_dtype, tuned, info)
    finally:
        torch.set_num_threads(threads)
    return base_path, tuned_path
