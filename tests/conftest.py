"""Shared test helpers: tiny hand-made checkpoint pairs (exact SD key names, few keys)."""

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))  # tests/comfy_env.py, tests/a1111_rules.py

from deltasvd.fixtures import load_spec  # noqa: E402
from deltasvd.safetensors_io import write_tensors  # noqa: E402

# A few real SD1.5 keys: the detection key, a conv, a linear, a norm pair, a bias, TE layers.
TINY_KEYS = [
    "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight",
    "model.diffusion_model.input_blocks.1.1.proj_in.weight",
    "model.diffusion_model.input_blocks.1.1.proj_in.bias",
    "model.diffusion_model.input_blocks.1.0.in_layers.2.weight",
    "model.diffusion_model.input_blocks.1.0.in_layers.0.weight",
    "model.diffusion_model.input_blocks.1.0.in_layers.0.bias",
    "model.diffusion_model.out.2.weight",
    "cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight",
    "cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj.bias",
    "cond_stage_model.transformer.text_model.final_layer_norm.weight",
]


def tiny_state(seed=0, keys=TINY_KEYS, dtype=torch.float32):
    shapes = {k: s for k, s, _ in load_spec("sd15")}
    g = torch.Generator().manual_seed(seed)
    return {k: (torch.randn(shapes[k], generator=g) * 0.05).to(dtype) for k in keys}


def fine_tune(state, seed=1, rank=8, scale=0.01, noise=1e-4, dtype=None):
    """A structured delta: decaying low rank plus noise on matrices, a nudge on 1-D tensors."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, w in state.items():
        w32 = w.float()
        if w.ndim >= 2:
            d, kk = w.shape[0], w[0].numel()
            r = min(rank, d, kk)
            s = scale * 0.7 ** torch.arange(r, dtype=torch.float32)
            u = torch.randn(d, r, generator=g)
            v = torch.randn(r, kk, generator=g)
            dw = (u * s) @ v / kk ** 0.5 + noise * torch.randn(d, kk, generator=g)
            w32 = w32 + dw.reshape(w.shape)
        else:
            w32 = w32 + 0.01 * torch.randn(w.shape, generator=g)
        out[k] = w32.to(dtype or w.dtype)
    return out


def save(path, state):
    write_tensors(str(path), state)
    return str(path)


@pytest.fixture(scope="module")
def single_torch_thread():
    """One intra-op thread while a module runs (`pytestmark = usefixtures(...)`). On this
    2-core machine, shared with other jobs, torch's default of one thread per core made
    compressing a small SD2.1 pair take ~40 s instead of ~5 s (its threads wait on each other
    whenever a core is taken)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def tiny_pair(tmp_path):
    base = tiny_state()
    return save(tmp_path / "base.safetensors", base), \
        save(tmp_path / "tuned.safetensors", fine_tune(base))


@pytest.fixture(scope="session")
def sd15_full_pair(tmp_path_factory):
    """A full SD1.5-format fp16 pair ComfyUI loads as checkpoints (tests/comfy_pair.py), made
    once per session and deleted at its end (4 GB: pytest would otherwise keep it around)."""
    from comfy_pair import make_sparse_pair
    keep = os.environ.get("DELTASVD_KEEP_PAIR_DIR")  # development: reuse a pair across runs
    if keep:
        os.makedirs(keep, exist_ok=True)
        done = os.path.join(keep, "pair.json")
        if not os.path.exists(done):
            with open(done + ".tmp", "w") as f:
                f.write(" ".join(make_sparse_pair(keep)))
            os.replace(done + ".tmp", done)
        with open(done) as f:
            yield tuple(f.read().split(" "))
        return
    folder = tmp_path_factory.mktemp("sd15_full_pair")
    base, tuned = make_sparse_pair(folder)
    yield base, tuned
    for path in (base, tuned):
        if os.path.exists(path):
            os.remove(path)
