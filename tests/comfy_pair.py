"""A FULL SD1.5-format fp16 pair that ComfyUI loads as checkpoints, cheap to compress.

The base is `deltasvd.fixtures`' full SD1.5 base (every key and shape of the real model). The
fine-tune changes a representative handful of tensors only: UNet linear, conv 1x1 and 3x3
layers with their biases, a GroupNorm, the big feed-forward of the middle block, conv_out,
text-encoder attention and MLP layers (taken from the fixture's own fine-tune), plus the
text encoder's final LayerNorm and token embedding (deltas no LoRA loader maps: the file's
extras). Compressing a fixture fine-tune of every layer takes ~3 minutes on 2 cores; this one
takes seconds, and the node glue under test is the same either way (the core's math has its
own tests).
"""

import os
import time

import torch

from deltasvd import fixtures
from deltasvd.safetensors_io import SafeTensorsFile, write_streaming

UNET = "model.diffusion_model."
TE = "cond_stage_model.transformer.text_model."
FROM_FIXTURE = [   # matrices the fixture fine-tunes
    UNET + "input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight",
    UNET + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight",
    UNET + "input_blocks.1.1.proj_in.weight",
    UNET + "input_blocks.1.0.in_layers.2.weight",
    UNET + "middle_block.1.transformer_blocks.0.ff.net.0.proj.weight",
    UNET + "out.2.weight",
    TE + "encoder.layers.0.self_attn.q_proj.weight",
    TE + "encoder.layers.11.mlp.fc1.weight",
]
NUDGED = [        # biases and norms (the fixture moves only some), and the extras
    UNET + "input_blocks.1.1.proj_in.bias",
    UNET + "input_blocks.1.0.in_layers.0.weight",
    UNET + "input_blocks.1.0.in_layers.0.bias",
    TE + "encoder.layers.0.self_attn.q_proj.bias",
]
EXTRAS = [TE + "final_layer_norm.weight", TE + "embeddings.token_embedding.weight"]


def _nudge(key, t):
    """A small deterministic change: a scaled random vector (1-D) or a rank-4 product."""
    g = torch.Generator().manual_seed(sum(key.encode()))
    w = t.float()
    if w.ndim == 1:
        return (w + 0.01 * torch.randn(w.shape, generator=g)).to(t.dtype)
    d, k = w.shape
    u, v = torch.randn(d, 4, generator=g), torch.randn(4, k, generator=g)
    dw = u * torch.tensor([1.0, 0.5, 0.25, 0.125]) @ v
    return (w + dw * (0.005 * w.norm() / dw.norm())).to(t.dtype)


def make_sparse_pair(folder):
    """(base, tuned) paths in `folder`; ~20 s and 4 GB of disk (two 2 GB files)."""
    t0 = time.perf_counter()
    base, dense_tuned = fixtures.make_pair(folder, "sd15", "full", 0, torch.float16,
                                           torch.float16)
    tuned = os.path.join(folder, "sd15_sparse_tuned.safetensors")
    with SafeTensorsFile(base) as b, SafeTensorsFile(dense_tuned) as t:
        keys = b.keys()
        layout = [(k, b.dtype(k), b.shape(k)) for k in keys]
        changed = []

        def produce(writer):
            for k in keys:
                if k in FROM_FIXTURE:
                    v = t.get(k)
                elif k in NUDGED or k in EXTRAS:
                    v = _nudge(k, b.get(k))
                else:
                    v = b.get(k)
                if k in FROM_FIXTURE or k in NUDGED or k in EXTRAS:
                    if not torch.equal(v, b.get(k)):
                        changed.append(k)
                writer.write(k, v)

        write_streaming(tuned, layout, produce, metadata=b.metadata or None, overwrite=True)
    os.remove(dense_tuned)
    missing = sorted(set(FROM_FIXTURE + NUDGED + EXTRAS) - set(changed))
    assert not missing, f"the fixture left these unchanged: {missing}"
    print(f"\n[sd15 full fp16 pair] made in {time.perf_counter() - t0:.1f}s; {len(changed)} "
          "tensors changed")
    return base, tuned
