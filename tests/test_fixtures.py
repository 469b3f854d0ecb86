"""deltasvd.fixtures and the architecture specs it reads (deltasvd/specs/*.json.gz)."""

import gzip
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from deltasvd import fixtures
from deltasvd.safetensors_io import read_header

REPO = Path(__file__).resolve().parent.parent


def _gen_arch_spec():
    import comfy_env
    return comfy_env.gen_arch_spec_module()


@pytest.mark.parametrize("family", fixtures.SD_FAMILIES)
def test_committed_spec_matches_comfyui(family):
    gen = _gen_arch_spec()
    with gzip.open(REPO / "deltasvd" / "specs" / f"{family}.json.gz", "rt") as f:
        committed = json.load(f)
    assert committed == gen.derive_spec(family), \
        f"deltasvd/specs/{family}.json.gz is stale: run python tools/gen_arch_spec.py"


def _params(entries, prefix=""):
    return sum(math.prod(shape) for key, shape, _ in entries if key.startswith(prefix))


def test_spec_param_counts():
    assert _params(fixtures.load_spec("sd15"), "model.diffusion_model.") == 859_520_964
    assert _params(fixtures.load_spec("sd21"), "model.diffusion_model.") == 865_910_724
    assert _params(fixtures.load_spec("sdxl"), "model.diffusion_model.") == 2_567_463_684


def test_spec_layouts():
    keys = {f: {k for k, _, _ in fixtures.load_spec(f)} for f in fixtures.SD_FAMILIES}
    assert "cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight" \
        in keys["sd15"]
    assert "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight" in keys["sd21"]
    assert "conditioner.embedders.1.model.text_projection" in keys["sdxl"]
    assert "conditioner.embedders.0.transformer.text_model.embeddings.position_ids" \
        in keys["sdxl"]
    for family in fixtures.SD_FAMILIES:
        assert any(k.startswith("first_stage_model.decoder.") for k in keys[family])
        entries = fixtures.load_spec(family)
        assert [k for k, _, _ in entries] == sorted(k for k, _, _ in entries)


@pytest.mark.parametrize("family", fixtures.SD_FAMILIES)
def test_small_pair_subset(family):
    full = {k: (s, st) for k, s, st in fixtures.load_spec(family)}
    small = fixtures.pair_spec(family, "small")
    assert all(full[k] == (s, st) for k, s, st in small)  # exact names and shapes
    keys = [k for k, _, _ in small]
    assert any(k.endswith("transformer_blocks.0.attn2.to_k.weight") for k in keys)
    assert any("label_emb" in k for k in keys) == (family == "sdxl")
    assert _params(small) < (60e6 if family == "sdxl" else 30e6)


def _tensors(path):
    with safe_open(path, framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


@pytest.fixture(scope="module")
def sd15_small(tmp_path_factory):
    out = tmp_path_factory.mktemp("pair")
    base, tuned = fixtures.make_pair(out, "sd15", "small", seed=0)
    return _tensors(base), _tensors(tuned), out


def test_small_pair_contents(sd15_small):
    base, tuned, _ = sd15_small
    assert list(base) == list(tuned)
    identical, changed = [], []
    for key, b in base.items():
        t = tuned[key]
        assert t.shape == b.shape
        if not b.is_floating_point():
            assert t.dtype == b.dtype and torch.equal(t, b)
            continue
        assert b.dtype == torch.float32 and t.dtype == torch.float16
        (identical if torch.equal(t, b.half()) else changed).append(key)
    assert any(k.startswith("first_stage_model.") for k in identical)
    assert any(".time_embed." in k for k in identical)
    assert any(k.startswith("cond_stage_model.") for k in changed)
    assert any(k.startswith("model.diffusion_model.") and base[k].ndim == 4 for k in changed)
    assert any(base[k].ndim == 1 for k in changed)
    assert any(base[k].ndim == 1 for k in identical if k.startswith("model.diffusion_model."))


def test_small_pair_delta_is_low_rank_plus_noise(sd15_small):
    base, tuned, _ = sd15_small
    key = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight"
    b = base[key]
    delta = tuned[key].float() - b
    rel = delta.norm() / b.norm()
    assert 1e-4 < rel < 2e-2
    s = torch.linalg.svdvals(delta)
    # Decaying spectrum: the top quarter of the rank holds most of the energy.
    assert (s[: len(s) // 4] ** 2).sum() > 0.8 * (s ** 2).sum()


def test_small_pair_deterministic(sd15_small, tmp_path):
    base, tuned, _ = sd15_small
    again_base, again_tuned = fixtures.make_pair(tmp_path, "sd15", "small", seed=0)
    for want, path in ((base, again_base), (tuned, again_tuned)):
        got = _tensors(path)
        assert all(torch.equal(got[k], want[k]) for k in want)
    other_base, other_tuned = fixtures.make_pair(tmp_path, "sd15", "small", seed=1)
    other = _tensors(other_tuned)
    key = "model.diffusion_model.input_blocks.0.0.weight"
    assert not torch.equal(other[key], tuned[key])
    assert read_header(other_base)[1]["deltasvd_fixture"] == \
        json.dumps({"family": "sd15", "scale": "small", "seed": 1})


def test_pair_dtypes(tmp_path):
    base, tuned = fixtures.make_pair(tmp_path, "sdxl", "small", seed=3,
                                     base_dtype=torch.float16, tuned_dtype=torch.bfloat16)
    bh, th = read_header(base)[0], read_header(tuned)[0]
    assert {h["dtype"] for h in bh.values()} == {"F16", "I64"}
    assert {h["dtype"] for h in th.values()} == {"BF16", "I64"}
    b, t = _tensors(base), _tensors(tuned)
    key = "first_stage_model.post_quant_conv.weight"  # untouched: base as stored, recast
    assert torch.equal(t[key], b[key].to(torch.bfloat16))
