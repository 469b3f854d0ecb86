"""The DiT architecture specs (deltasvd/specs/<family>.json.gz) that tools/gen_dit_specs.py
derives from ComfyUI's model classes."""

import functools
import gzip
import importlib.util
import json
import math
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SPECS = REPO / "deltasvd" / "specs"

# Element counts of the diffusion model (every tensor in the spec, buffers such as SD3.5's
# pos_embed included), measured from ComfyUI 0.3.75's classes. Published sizes in brackets.
PARAMS = {
    "flux_dev": 11_901_408_320,      # 11.9 B
    "flux_schnell": 11_891_178_560,  # 11.9 B (no guidance_in)
    "chroma": 8_899_983_424,         # 8.9 B
    "qwen_image": 20_430_401_088,    # 20.4 B
    "wan21_14b": 14_288_491_584,     # 14 B
    "wan22_5b": 4_999_787_712,       # 5 B
    "hidream_i1": 17_105_733_184,    # 17 B
    "lumina2": 2_609_771_456,        # 2.6 B
    "zimage": 6_154_912_576,         # 6 B
    "sd35_medium": 2_469_663_936,    # 2.5 B
    "sd35_large": 8_146_280_768,     # 8.1 B
}

BLOCKS = {
    "flux_dev": {"double_blocks.": 19, "single_blocks.": 38},
    "flux_schnell": {"double_blocks.": 19, "single_blocks.": 38},
    "chroma": {"double_blocks.": 19, "single_blocks.": 38},
    "qwen_image": {"transformer_blocks.": 60},
    "wan21_14b": {"blocks.": 40},
    "wan22_5b": {"blocks.": 30},
    "hidream_i1": {"caption_projection.": 49, "double_stream_blocks.": 16,
                   "single_stream_blocks.": 32},
    "lumina2": {"context_refiner.": 2, "layers.": 26, "noise_refiner.": 2},
    "zimage": {"context_refiner.": 2, "layers.": 30, "noise_refiner.": 2},
    "sd35_medium": {"joint_blocks.": 24},
    "sd35_large": {"joint_blocks.": 38},
}

DTYPES = {name: "BF16" for name in PARAMS}
DTYPES["wan22_5b"] = "F16"


@functools.lru_cache(maxsize=None)
def _committed(name):
    with gzip.open(SPECS / f"{name}.json.gz", "rt") as f:
        return json.load(f)


@functools.lru_cache(maxsize=None)
def _gen_module():
    path = REPO / "tools" / "gen_dit_specs.py"
    spec = importlib.util.spec_from_file_location("gen_dit_specs", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _gen():
    import comfy_env
    comfy_env.require_comfy()  # skips without ComfyUI, fails on CI
    return _gen_module()


@pytest.mark.parametrize("name", sorted(PARAMS))
def test_committed_spec_matches_comfyui(name):
    gen = _gen()
    assert set(gen.FAMILIES) == set(PARAMS)
    assert _committed(name) == gen.derive_spec(name), \
        f"deltasvd/specs/{name}.json.gz is stale: run python tools/gen_dit_specs.py"


@pytest.mark.parametrize("name", sorted(PARAMS))
def test_spec_contents(name):
    spec = _committed(name)
    assert spec["family"] == name
    entries = spec["tensors"]
    keys = [k for k, _, _ in entries]
    assert keys == sorted(keys) and len(set(keys)) == len(keys)
    assert all(k.startswith("model.diffusion_model.") for k in keys)
    assert sum(math.prod(shape) for _, shape, _ in entries) == PARAMS[name]
    assert {st for _, _, st in entries} == {DTYPES[name]}
    assert spec["blocks"] == BLOCKS[name]
    for prefix, n in spec["blocks"].items():
        assert any(k.startswith(f"model.diffusion_model.{prefix}{n - 1}.") for k in keys)
        assert not any(k.startswith(f"model.diffusion_model.{prefix}{n}.") for k in keys)


def test_family_differences():
    keys = {name: {k for k, _, _ in _committed(name)["tensors"]} for name in PARAMS}
    p = "model.diffusion_model."
    assert keys["flux_dev"] - keys["flux_schnell"] == {
        p + f"guidance_in.{layer}.{end}" for layer in ("in_layer", "out_layer")
        for end in ("weight", "bias")}
    assert p + "distilled_guidance_layer.norms.0.scale" in keys["chroma"]
    assert p + "cap_pad_token" in keys["zimage"] and p + "cap_pad_token" not in keys["lumina2"]
    assert p + "joint_blocks.12.x_block.attn2.qkv.weight" in keys["sd35_medium"]
    assert p + "joint_blocks.13.x_block.attn2.qkv.weight" not in keys["sd35_medium"]
    assert not any(".attn2." in k for k in keys["sd35_large"])
    shapes = {name: {k: s for k, s, _ in _committed(name)["tensors"]} for name in PARAMS}
    assert shapes["wan22_5b"][p + "patch_embedding.weight"] == [3072, 48, 1, 2, 2]
    assert shapes["wan21_14b"][p + "head.modulation"] == [1, 2, 5120]
