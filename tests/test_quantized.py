"""deltasvd.quantized: fp8 storage formats (plain, ComfyUI's legacy scaled_fp8, comfy_quant).

Rounding is checked against a float64 reference that knows nothing of torch's fp8 casts: the
table of every finite fp8 value, nearest value with ties to the even code. ComfyUI's own
dequantization and quantization (comfy/ops.py, comfy/quant_ops.py) are checked against ours
on the same tensors when ComfyUI is installed.
"""

import json

import pytest
import torch

import comfy_env
from deltasvd import quantized as Q
from deltasvd.errors import DeltaError
from deltasvd.safetensors_io import SafeTensorsFile, write_tensors

FP8 = [torch.float8_e4m3fn, torch.float8_e5m2]
FP8_IDS = ["e4m3fn", "e5m2"]


# ---------------------------------------------------------------- float64 reference rounding

def _grid(dtype):
    """(non-negative finite values ascending as float64, their uint8 codes)."""
    codes = torch.arange(128, dtype=torch.uint8)        # sign bit clear
    vals = codes.view(dtype).to(torch.float64)
    ok = torch.isfinite(vals)
    vals, codes = vals[ok], codes[ok]
    order = torch.argsort(vals)
    return vals[order], codes[order]


def ref_round(x64, dtype):
    """x (float64) to the nearest finite value of dtype, ties to the even code, clamped to the
    largest finite value: IEEE round-to-nearest-even, computed from the value table."""
    vals, codes = _grid(dtype)
    a = x64.abs().clamp(max=vals[-1].item()).reshape(-1)
    hi = torch.searchsorted(vals, a).clamp(max=len(vals) - 1)
    lo = (hi - 1).clamp(min=0)
    dlo, dhi = a - vals[lo], vals[hi] - a
    pick_hi = (dhi < dlo) | ((dhi == dlo) & (codes[hi] % 2 == 0))
    out = torch.where(pick_hi, vals[hi], vals[lo]).reshape(x64.shape)
    return torch.where(x64 < 0, -out, out)


def ref_scale(scale, shape):
    """The float64 scale, per row or scalar, to multiply a weight of `shape`."""
    s = scale.to(torch.float64)
    if s.numel() == 1:
        return s.reshape(())
    return s.reshape((shape[0],) + (1,) * (len(shape) - 1))


def random_codes(shape, dtype, g):
    """Uniformly random finite fp8 values (every code but NaN/inf)."""
    f = torch.randint(0, 256, shape, generator=g, dtype=torch.uint8).view(dtype).float()
    return torch.where(torch.isfinite(f), f, torch.zeros_like(f)).to(dtype)


def bits(t):
    """A float32 tensor's bit patterns, for bit-for-bit comparisons (-0.0 != 0.0)."""
    return t.contiguous().view(torch.int32)


SCALES = {
    "scalar": lambda g, rows: torch.rand((), generator=g) * 0.02 + 1e-4,
    "scalar1": lambda g, rows: torch.rand((1,), generator=g) * 0.02 + 1e-4,
    "rows": lambda g, rows: torch.rand((rows,), generator=g) * 0.02 + 1e-4,
    "rows1": lambda g, rows: torch.rand((rows, 1), generator=g) * 0.02 + 1e-4,
}


# ---------------------------------------------------------------- dequantize / quantize_like

@pytest.mark.parametrize("dtype", FP8, ids=FP8_IDS)
@pytest.mark.parametrize("kind", list(SCALES))
def test_dequantize_matches_float64(dtype, kind):
    g = torch.Generator().manual_seed(11)
    q = random_codes((48, 40), dtype, g)
    s = SCALES[kind](g, 48)
    ref = (q.to(torch.float64) * ref_scale(s, q.shape)).to(torch.float32)
    out = Q.dequantize(q, s)
    assert out.dtype == torch.float32
    assert torch.equal(bits(out), bits(ref))


def test_dequantize_without_scale_and_conv_rows():
    g = torch.Generator().manual_seed(12)
    q = random_codes((8, 4, 3, 3), torch.float8_e4m3fn, g)
    assert torch.equal(Q.dequantize(q), q.float())
    s = torch.rand((8,), generator=g) + 0.5
    ref = (q.double() * s.double().reshape(8, 1, 1, 1)).float()
    assert torch.equal(Q.dequantize(q, s), ref)


@pytest.mark.parametrize("dtype", FP8, ids=FP8_IDS)
@pytest.mark.parametrize("kind", list(SCALES))
def test_quantize_like_is_nearest_representable(dtype, kind):
    """quantize_like = the float64 nearest fp8 value of w / s, times s (round trip)."""
    g = torch.Generator().manual_seed(13)
    w = torch.randn((64, 32), generator=g, dtype=torch.float64) * 0.05
    s = SCALES[kind](g, 64)
    ref_q = ref_round(w / ref_scale(s, w.shape), dtype)
    ref = (ref_q * ref_scale(s, w.shape)).to(torch.float32)
    out = Q.quantize_like(w, dtype, s)
    assert torch.equal(out, ref)
    # and it is a round trip: dequantize of the fp8 codes gives the same numbers
    assert torch.equal(Q.dequantize(ref_q.to(dtype), s), out)


@pytest.mark.parametrize("dtype", FP8, ids=FP8_IDS)
def test_quantize_like_ties_to_even_and_clamps(dtype):
    vals, _ = _grid(dtype)
    mids = ((vals[1:20] + vals[:19]) / 2).to(torch.float32)     # exact midpoints
    out = Q.quantize_like(mids, dtype)
    assert torch.equal(out.double(), ref_round(mids.double(), dtype))
    top = torch.finfo(dtype).max
    big = torch.tensor([1e9, -1e9, top * 1.5, -top * 1.5])
    assert Q.quantize_like(big, dtype).tolist() == [top, -top, top, -top]
    s = torch.tensor(0.5)
    assert Q.quantize_like(big, dtype, s).tolist() == [top / 2, -top / 2, top / 2, -top / 2]


@pytest.mark.parametrize("dtype", FP8, ids=FP8_IDS)
@pytest.mark.parametrize("kind", list(SCALES))
def test_quantize_like_is_idempotent(dtype, kind):
    """Rounding a tensor the format can already hold changes nothing, bit for bit."""
    g = torch.Generator().manual_seed(14)
    s = SCALES[kind](g, 96)
    w = Q.dequantize(random_codes((96, 50), dtype, g), s)
    once = Q.quantize_like(w, dtype, s)
    assert torch.equal(bits(once), bits(w))
    assert torch.equal(bits(Q.quantize_like(once, dtype, s)), bits(once))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_quantize_like_plain_dtypes(dtype):
    g = torch.Generator().manual_seed(15)
    w = torch.randn((30, 20), generator=g, dtype=torch.float64)
    out = Q.quantize_like(w, dtype)
    assert torch.equal(out, w.to(dtype).float())
    assert torch.equal(bits(Q.quantize_like(out, dtype)), bits(out))


def test_quantize_like_zero_scale_holds_only_zero():
    out = Q.quantize_like(torch.tensor([[1.0, -2.0], [3.0, 4.0]]), torch.float8_e4m3fn,
                          torch.tensor([0.0, 2.0]))
    assert out.tolist() == [[0.0, 0.0], [3.0, 4.0]]


@pytest.mark.parametrize("dtype", FP8, ids=FP8_IDS)
def test_base_cast_to_scaled_fp8_gives_empty_delta(dtype):
    """A 'fine-tune' that is only the base cast to scaled fp8 (per-tensor absmax scale, as
    ComfyUI computes it; rounded by the float64 reference) quantizes to exactly its tensor."""
    g = torch.Generator().manual_seed(16)
    base = (torch.randn((80, 72), generator=g) * 0.03).to(torch.bfloat16)
    scale = (base.float().abs().amax() / torch.finfo(dtype).max).reshape(())
    tuned_q = ref_round(base.double() / scale.double(), dtype).to(dtype)
    tuned = Q.dequantize(tuned_q, scale)
    assert torch.equal(bits(Q.quantize_like(base, dtype, scale)), bits(tuned))
    assert torch.count_nonzero(tuned - Q.quantize_like(base, dtype, scale)) == 0


def test_real_weight_casts_to_the_config_dtype():
    conf = Q.QuantConfig("float8_e4m3fn", torch.float8_e4m3fn)
    w = torch.tensor([[0.3, 1.7], [2.9, -5.1]], dtype=torch.bfloat16)
    s = torch.tensor(0.25)
    assert torch.equal(Q.real_weight(w, s, conf), w.float().to(torch.float8_e4m3fn).float() * 0.25)
    assert torch.equal(Q.real_weight(w, s), w.float() * 0.25)


def test_bad_scale_shape_names_the_key():
    with pytest.raises(DeltaError) as e:
        Q.dequantize(torch.zeros(4, 6), torch.ones(6), "f.safetensors", "a.weight_scale")
    assert e.value.tensor == "a.weight_scale" and "f.safetensors" in str(e.value)


def test_mantissa_bits_and_coarser():
    want = {torch.float64: 52, torch.float32: 23, torch.float16: 10, torch.bfloat16: 7,
            torch.float8_e4m3fn: 3, torch.float8_e5m2: 2}
    for dtype, n in want.items():
        assert Q.mantissa_bits(dtype) == n
    assert Q.coarser(torch.float8_e4m3fn, torch.bfloat16)
    assert Q.coarser(torch.float8_e5m2, torch.float8_e4m3fn)
    assert Q.coarser(torch.bfloat16, torch.float16)
    assert not Q.coarser(torch.float32, torch.float32)
    assert not Q.coarser(torch.float16, torch.float8_e4m3fn)
    for bad in (torch.int8, torch.uint8, torch.bool):
        with pytest.raises(DeltaError):
            Q.mantissa_bits(bad)
    with pytest.raises(DeltaError):
        Q.quantize_like(torch.zeros(2), torch.int8)


# ---------------------------------------------------------------- files: which keys are what

P = "model.diffusion_model."
TE = "text_encoders.t5xxl.transformer."


def _comfy_quant(conf):
    """A config tensor exactly as ComfyUI writes it (comfy/ops.py, comfy/utils.py)."""
    return torch.tensor(list(json.dumps(conf).encode("utf-8")), dtype=torch.uint8)


def _write(tmp_path, name, tensors, metadata=None):
    path = tmp_path / name
    write_tensors(str(path), tensors, (lambda _h: metadata) if metadata else None)
    return SafeTensorsFile(path)


def _fp8(shape, dtype=torch.float8_e4m3fn, seed=0):
    return random_codes(shape, dtype, torch.Generator().manual_seed(seed))


def legacy_tensors():
    one = torch.ones((), dtype=torch.float32)
    return {
        P + "scaled_fp8": torch.empty((0,), dtype=torch.float8_e4m3fn),
        P + "blocks.0.attn.qkv.weight": _fp8((12, 4)),
        P + "blocks.0.attn.qkv.scale_weight": one * 0.01,
        P + "blocks.0.attn.qkv.scale_input": one,
        P + "blocks.0.attn.qkv.bias": torch.zeros(12, dtype=torch.bfloat16),
        P + "blocks.0.mlp.fc.weight": _fp8((8, 4)),
        P + "blocks.0.mlp.fc.scale_weight": torch.full((1,), 0.02),
        P + "blocks.0.norm.weight": torch.ones(4, dtype=torch.bfloat16),
        P + "conv_in.weight": torch.zeros((4, 4, 3, 3), dtype=torch.bfloat16),
        TE + "scaled_fp8": torch.zeros((2,), dtype=torch.float8_e5m2),
        TE + "encoder.block.0.layer.0.SelfAttention.q.weight": _fp8((4, 4), torch.float8_e5m2),
        TE + "encoder.block.0.layer.0.SelfAttention.q.scale_weight": one * 0.5,
        # a scale with no marker over it: ComfyUI ignores it, so the weight stays plain
        "first_stage_model.decoder.conv.weight": torch.zeros((2, 2)),
        "first_stage_model.decoder.conv.scale_weight": one,
    }


def test_scale_keys_legacy(tmp_path):
    with _write(tmp_path, "legacy.safetensors", legacy_tensors()) as f:
        lay = Q.scale_keys(f.keys())
        full = Q.file_layout(f)
    qkv, fc = P + "blocks.0.attn.qkv.", P + "blocks.0.mlp.fc."
    q = TE + "encoder.block.0.layer.0.SelfAttention.q."
    for layout in (lay, full):
        assert layout.weight_scale == {qkv + "weight": qkv + "scale_weight",
                                       fc + "weight": fc + "scale_weight",
                                       q + "weight": q + "scale_weight"}
        assert layout.hidden == {P + "scaled_fp8", TE + "scaled_fp8", qkv + "scale_weight",
                                 qkv + "scale_input", fc + "scale_weight", q + "scale_weight",
                                 "first_stage_model.decoder.conv.scale_weight"}
        assert layout.orphans == ("first_stage_model.decoder.conv.scale_weight",)
        assert layout.scheme_of(qkv + "weight") == Q.LEGACY == layout.scheme_of(q + "weight")
        for plain in (qkv + "bias", P + "blocks.0.norm.weight", P + "conv_in.weight",
                      "first_stage_model.decoder.conv.weight"):
            assert layout.scheme_of(plain) == Q.PLAIN and layout.scale_of(plain) is None
    assert lay.config == {}
    assert full.config[qkv + "weight"] == Q.QuantConfig("float8_e4m3fn", torch.float8_e4m3fn)
    assert full.config[q + "weight"] == Q.QuantConfig("float8_e5m2", torch.float8_e5m2, True)


def test_legacy_marker_formats():
    assert Q.marker_format(torch.float32) == torch.float8_e4m3fn
    assert Q.marker_format(torch.float8_e5m2) == torch.float8_e5m2
    with pytest.raises(DeltaError):
        Q.marker_format(torch.float16)
    lay = Q.scale_keys(["scaled_fp8", "a.weight", "a.scale_weight"],
                       dtypes={"scaled_fp8": torch.float32}, shapes={"scaled_fp8": (0,)})
    assert lay.config["a.weight"] == Q.QuantConfig("float8_e4m3fn", torch.float8_e4m3fn, False)
    assert lay.weight_scale == {"a.weight": "a.scale_weight"}


def comfy_quant_tensors():
    return {
        P + "a.weight": _fp8((6, 4)),
        P + "a.weight_scale": torch.tensor(0.125),
        P + "a.input_scale": torch.tensor(1.0),
        P + "a.comfy_quant": _comfy_quant({"format": "float8_e4m3fn"}),
        P + "a.bias": torch.zeros(6, dtype=torch.bfloat16),
        P + "b.weight": _fp8((6, 4), torch.float8_e5m2),
        P + "b.weight_scale": torch.tensor(2.0),
        P + "b.comfy_quant": _comfy_quant({"format": "float8_e5m2",
                                           "full_precision_matrix_mult": True}),
        P + "c.weight": torch.zeros((6, 4), dtype=torch.bfloat16),
        P + "d.weight_scale": torch.tensor(3.0),      # no weight: an orphan
    }


def test_scale_keys_comfy_quant(tmp_path):
    with _write(tmp_path, "cq.safetensors", comfy_quant_tensors()) as f:
        lay = Q.scale_keys(f.keys())
        full = Q.file_layout(f)
        raw = f.get(P + "a.comfy_quant")
    assert raw.dtype == torch.uint8 and raw.ndim == 1
    for layout in (lay, full):
        assert layout.weight_scale == {P + "a.weight": P + "a.weight_scale",
                                       P + "b.weight": P + "b.weight_scale"}
        assert layout.config_key == {P + "a.weight": P + "a.comfy_quant",
                                     P + "b.weight": P + "b.comfy_quant"}
        assert layout.scheme == {P + "a.weight": Q.COMFY_QUANT, P + "b.weight": Q.COMFY_QUANT}
        assert layout.hidden == {P + "a.weight_scale", P + "a.input_scale", P + "a.comfy_quant",
                                 P + "b.weight_scale", P + "b.comfy_quant", P + "d.weight_scale"}
        assert layout.orphans == (P + "d.weight_scale",)
        assert layout.scheme_of(P + "c.weight") == Q.PLAIN
    assert full.config == {
        P + "a.weight": Q.QuantConfig("float8_e4m3fn", torch.float8_e4m3fn, False),
        P + "b.weight": Q.QuantConfig("float8_e5m2", torch.float8_e5m2, True)}


def test_scale_keys_header_metadata(tmp_path):
    """ComfyUI 0.3.75's form: the same configs in `__metadata__`, layer names relative to the
    diffusion model."""
    tensors = {k: v for k, v in comfy_quant_tensors().items() if not k.endswith("comfy_quant")}
    meta = {"_quantization_metadata": json.dumps(
        {"format_version": "1.0", "layers": {"a": {"format": "float8_e4m3fn"},
                                             P + "b": "float8_e5m2"}})}
    with _write(tmp_path, "meta.safetensors", tensors, meta) as f:
        lay = Q.file_layout(f)
    assert lay.scheme == {P + "a.weight": Q.COMFY_QUANT, P + "b.weight": Q.COMFY_QUANT}
    assert lay.weight_scale == {P + "a.weight": P + "a.weight_scale",
                                P + "b.weight": P + "b.weight_scale"}
    assert lay.config[P + "b.weight"].dtype == torch.float8_e5m2
    assert lay.config_key == {}


def test_scale_keys_plain_file(tmp_path):
    tensors = {P + "a.weight": torch.zeros(3, 3), P + "a.bias": torch.zeros(3),
               P + "x.input_scale": torch.zeros(3), "vae.w.weight": _fp8((2, 2))}
    with _write(tmp_path, "plain.safetensors", tensors) as f:
        for lay in (Q.scale_keys(f.keys()), Q.file_layout(f)):
            assert lay.hidden == frozenset() and lay.weight_scale == {} and lay.scheme == {}
            assert lay.orphans == () and lay.scheme_of("vae.w.weight") == Q.PLAIN


BAD_CONFIGS = [
    (torch.tensor(list(b"not json"), dtype=torch.uint8), "not JSON"),
    (torch.tensor(list(b"\xff\xfe"), dtype=torch.uint8), "not JSON"),
    (_comfy_quant(["float8_e4m3fn"]), "not a JSON object"),
    (_comfy_quant({"fmt": "float8_e4m3fn"}), "no 'format'"),
    (_comfy_quant({"format": 8}), "no 'format'"),
    (_comfy_quant({"format": "float9_e9"}), "unknown quantization layout 'float9_e9'"),
    (_comfy_quant({"format": "nvfp4"}), "'nvfp4' is not supported"),
    (_comfy_quant({"format": "float8_e4m3fn", "full_precision_matrix_mult": "yes"}),
     "full_precision_matrix_mult"),
    (_comfy_quant({"format": "float8_e4m3fn"}).to(torch.int32), "must be uint8"),
]


@pytest.mark.parametrize("raw,msg", BAD_CONFIGS)
def test_malformed_comfy_quant_names_the_key(raw, msg):
    with pytest.raises(DeltaError) as e:
        Q.parse_comfy_quant(raw, "m.safetensors", "x.comfy_quant")
    assert msg in str(e.value)
    assert e.value.tensor == "x.comfy_quant" and "tensor 'x.comfy_quant'" in str(e.value)


def test_malformed_comfy_quant_in_a_file(tmp_path):
    tensors = comfy_quant_tensors()
    tensors[P + "b.comfy_quant"] = _comfy_quant({"format": "int4_magic"})
    with _write(tmp_path, "bad.safetensors", tensors) as f:
        with pytest.raises(DeltaError) as e:
            Q.file_layout(f)
    assert e.value.tensor == P + "b.comfy_quant"
    assert "bad.safetensors" in str(e.value) and "int4_magic" in str(e.value)


@pytest.mark.parametrize("meta,msg", [
    ("{oops", "not JSON"),
    (json.dumps({"format_version": "1.0"}), "no 'layers'"),
    (json.dumps({"layers": {"a": {"format": "float7"}}}), "layer 'a': unknown"),
])
def test_malformed_header_metadata(meta, msg):
    with pytest.raises(DeltaError) as e:
        Q.scale_keys(["a.weight"], metadata={"_quantization_metadata": meta}, path="h.safetensors")
    assert msg in str(e.value) and e.value.tensor == "_quantization_metadata"


def test_ambiguous_header_layer():
    keys = [P + "blocks.0.q.weight", TE + "blocks.0.q.weight"]
    meta = {"_quantization_metadata": json.dumps({"layers": {"blocks.0.q": "float8_e4m3fn"}})}
    with pytest.raises(DeltaError, match="matches 2 weights"):
        Q.scale_keys(keys, metadata=meta)


# ---------------------------------------------------------------- against ComfyUI itself

@pytest.fixture(scope="module")
def comfy():
    comfy_env.require_comfy()
    c = comfy_env.import_comfy()
    import comfy.ops  # noqa: F401
    import comfy.quant_ops  # noqa: F401
    return c


def test_comfy_legacy_scaled_fp8_dequantization(comfy):
    """scaled_fp8_ops' Linear, loaded from a legacy state dict, computes our real weight."""
    g = torch.Generator().manual_seed(21)
    q = random_codes((16, 12), torch.float8_e4m3fn, g)
    s = torch.rand((), generator=g) * 0.01 + 1e-4
    ops = comfy.ops.scaled_fp8_ops(fp8_matrix_mult=False, scale_input=False,
                                   override_dtype=torch.float8_e4m3fn)
    lin = ops.Linear(12, 16, bias=False)
    lin.load_state_dict({"weight": q, "scale_weight": s.reshape(1)}, strict=False)
    assert lin.weight.dtype == torch.float8_e4m3fn
    theirs = lin.convert_weight(lin.weight.detach())
    assert torch.equal(bits(theirs), bits(Q.dequantize(q, s)))


def test_comfy_quant_ops_layout_round_trip(comfy):
    """ComfyUI's TensorCoreFP8Layout: its quantize is our quantize_like, its dequantize ours."""
    layout = comfy.quant_ops.TensorCoreFP8Layout
    g = torch.Generator().manual_seed(22)
    for dtype in FP8:
        w = torch.randn((40, 24), generator=g) * 0.02
        s = (w.abs().amax() / torch.finfo(dtype).max).reshape(())
        w[0, 0] = torch.finfo(dtype).max * s * 3          # out of range: both clamp
        qdata, params = layout.quantize(w.clone(), scale=s, dtype=dtype)
        assert qdata.dtype == dtype
        assert torch.equal(bits(Q.dequantize(qdata, s)), bits(Q.quantize_like(w, dtype, s)))
        theirs = layout.dequantize(qdata, params["scale"], torch.float32)
        assert torch.equal(bits(theirs), bits(Q.dequantize(qdata, s)))


def test_comfy_mixed_precision_load(comfy):
    """ComfyUI's per-layer ops (the layer config of `_quantization_metadata`) load weight +
    weight_scale into a QuantizedTensor whose dequantization is our real weight."""
    g = torch.Generator().manual_seed(23)
    q = random_codes((10, 8), torch.float8_e4m3fn, g)
    s = torch.rand((), generator=g) + 0.1
    ops = comfy.ops.mixed_precision_ops({"lin": {"format": "float8_e4m3fn"}},
                                        compute_dtype=torch.float32)
    holder = torch.nn.Module()
    holder.lin = ops.Linear(8, 10, bias=False)
    holder.load_state_dict({"lin.weight": q, "lin.weight_scale": s}, strict=False)
    theirs = holder.lin.weight.dequantize()
    assert torch.equal(bits(theirs), bits(Q.dequantize(q, s)))
