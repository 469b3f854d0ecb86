"""The second codecs: Delta-DCT and quantized SVD factors. The math against float64 references
(fresh random inputs), every stored bit counted, the files through compress / apply / convert /
inspect, and the refusals."""

import math
import os
import struct

import numpy as np
import pytest
import torch

from conftest import save, tiny_state
from deltasvd import bitpack, cli, dct_codec, quant
from deltasvd.delta_file import CODED_PREFIX, read_delta, reconstruct
from deltasvd.safetensors_io import SafeTensorsFile
from deltasvd.summary import bits_per_param, delta_params


def run(*args):
    return cli.main([str(a) for a in args])


def rng(seed):
    return torch.Generator().manual_seed(seed)


# ---- the math ---------------------------------------------------------------------------------

def dct2_reference(x):
    """Orthonormal 2-D DCT-II of one p x p patch, straight from the definition, in float64."""
    p = x.shape[0]
    n = np.arange(p)
    c = np.full(p, math.sqrt(2.0 / p))
    c[0] = math.sqrt(1.0 / p)
    basis = c[:, None] * np.cos(np.pi * (2 * n[None, :] + 1) * n[:, None] / (2 * p))
    out = np.zeros((p, p))
    for u in range(p):
        for v in range(p):
            out[u, v] = np.sum(x * basis[u][:, None] * basis[v][None, :])
    return out


def test_dct_matches_the_definition_and_inverts():
    p = 8
    m = torch.randn(3 * p, 2 * p, generator=rng(1), dtype=torch.float64)
    c = dct_codec.dct2(m, p)
    for a in range(3):
        for b in range(2):
            want = dct2_reference(m[a * p:(a + 1) * p, b * p:(b + 1) * p].numpy())
            got = c[a * p:(a + 1) * p, b * p:(b + 1) * p].numpy()
            assert np.abs(got - want).max() < 1e-12
    assert torch.allclose(dct_codec.idct2(c, p), m, atol=1e-12)
    d = dct_codec.dct_matrix(16, torch.float64)
    assert torch.allclose(d @ d.T, torch.eye(16, dtype=torch.float64), atol=1e-13)


@pytest.mark.parametrize("bits", range(0, 9))
def test_bitpack_round_trip(bits):
    values = torch.randint(0, 2 ** bits, (1001,), generator=rng(bits)).numpy().astype(np.uint8)
    packed = bitpack.pack(values, bits)
    assert packed.size == bitpack.packed_bytes(1001, bits) == math.ceil(1001 * bits / 8)
    assert np.array_equal(bitpack.unpack(packed, 1001, bits), values)
    if bits:
        with pytest.raises(ValueError):
            bitpack.unpack(packed[:-1], 1001, bits)


def test_bit_allocation_meets_the_budget_and_favours_loud_patches():
    sigma = np.exp(torch.randn(5000, generator=rng(2)).numpy() * 2)
    sigma[:50] = 0.0
    for budget in (0.3, 1.0, 2.5):
        bits = dct_codec.allocate_bits(sigma, budget * 5000 * 256, 256)
        assert bits.sum() <= budget * 5000
        assert bits.sum() >= 0.97 * budget * 5000          # the budget is used, not wasted
        assert (bits[:50] == 0).all() and bits.min() >= 0 and bits.max() <= 8
        order = np.argsort(sigma)
        assert (np.diff(bits[order]) >= 0).all()           # louder patch, no fewer bits


@pytest.mark.parametrize("shape", [(64, 96), (40, 36), (4, 2880 // 8)])
def test_dct_codec_error_and_bits_are_what_it_reports(shape):
    d, k = shape
    m = torch.randn(d, k, generator=rng(3)) * 1e-3
    m[: d // 2] *= 10                      # louder rows: unequal patches
    errs = []
    for b in (0.5, 1, 2, 4):
        parts, err2, norm2 = dct_codec.encode(m, b)
        assert norm2 == pytest.approx(float(m.double().pow(2).sum()), rel=1e-5)
        dec = dct_codec.decode(parts, d, k)
        true = float((m.double() - dec.double()).pow(2).sum())
        assert abs(err2 - true) <= 1e-4 * float(m.double().pow(2).sum())
        stored = sum(t.numel() * t.element_size() * 8 for t in parts.values())
        gr, gc = dct_codec.grid(d, k)
        # every byte is accounted for: scales, bit-widths, codes (+ byte padding per width)
        assert parts["scales"].numel() == gr * gc and parts["scales"].dtype == torch.bfloat16
        n = gr * gc
        assert stored == 16 * n + 8 * bitpack.packed_bytes(n, 4) + 8 * parts["codes"].numel()
        # within the budget, up to the byte padding of each width's stream and of the widths
        assert stored <= b * d * k + 8 * 7 + 4
        errs.append(math.sqrt(true / float(m.double().pow(2).sum())))
    # (4 x 360 is padded to 16 rows: its budget buys a quarter of the bits per coefficient)
    assert errs == sorted(errs, reverse=True) and errs[-1] < 0.7 * errs[0]


def test_dct_at_one_bit_is_near_a_gaussian_one_bit_quantizer():
    m = torch.randn(512, 512, generator=rng(4))
    parts, err2, _ = dct_codec.encode(m, 1.0)
    rel = math.sqrt(err2 / float(m.double().pow(2).sum()))
    # 1 bit per coefficient on a Gaussian: distortion 1 - 2/pi (0.60 relative); side data
    # takes 0.08 bits, so a few patches get 0 bits
    assert 0.55 < rel < 0.7
    stored = sum(t.numel() * t.element_size() * 8 for t in parts.values())
    assert 0.95 < stored / m.numel() <= 1.0


def test_quantized_factors():
    s = np.array([1.0, 0.6, 0.3, 0.1, 0.02, 0.001, 0.0])
    bits = quant.component_bits(s, 8)
    assert bits[0] == 8 and (np.diff(bits) <= 0).all() and bits[-1] == 4
    assert (quant.component_bits(s, 3) >= 2).all()
    d, k, t = 300, 200, 7
    a = torch.randn(d, t, generator=rng(5)) * torch.tensor(s, dtype=torch.float32)
    b = torch.randn(t, k, generator=rng(6))
    parts, ahat, bhat = quant.encode_factors(a, b, s, 8)
    a2, b2 = quant.decode_factors(parts, d, k)
    assert torch.equal(a2, ahat) and torch.equal(b2, bhat)
    assert parts["up_codes"].numel() == sum(bitpack.packed_bytes(d, x) for x in bits) or \
        parts["up_codes"].numel() <= (d * int(bits.sum()) + 8 * 8) // 8
    m = a @ b
    rel = float((m - ahat @ bhat).norm() / m.norm())
    assert rel < 0.02                                # int8 leading components
    # a spiky row keeps its spike (the step is chosen per row, not clipped at the Gaussian
    # range), and a tiny one (a small delta's tail, below float16's range) is not lost
    spiky = torch.randn(1, 1000, generator=rng(9)) * 1e-9
    spiky[0, 17] = 2e-8
    _, steps, xh = quant.quantize_rows(spiky, np.array([8]))
    assert steps.dtype == torch.bfloat16
    assert abs(float(xh[0, 17]) - 2e-8) < 0.02 * 2e-8
    assert float((xh - spiky).norm() / spiky.norm()) < 0.05   # 8 bits over a 20-sigma range


# ---- files ------------------------------------------------------------------------------------

@pytest.fixture
def pair(tmp_path):
    base = tiny_state(seed=7)
    g = rng(8)
    tuned = {k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in base.items()}
    return save(tmp_path / "base.safetensors", base), save(tmp_path / "tuned.safetensors", tuned)


def merged_error(base, tuned, merged):
    num = den = 0.0
    with SafeTensorsFile(base) as b, SafeTensorsFile(tuned) as t, SafeTensorsFile(merged) as m:
        for key in t.keys():
            num += float((m.get(key).double() - t.get(key).double()).pow(2).sum())
            den += float((t.get(key).double() - b.get(key).double()).pow(2).sum())
    return math.sqrt(num / den)


@pytest.mark.parametrize("args,codec", [(("--codec", "dct", "--bits", "1"), "dct"),
                                        (("--codec", "dct", "--bits", "3"), "dct"),
                                        (("--energy", "0.8", "--factor-bits", "8"), "qsvd"),
                                        (("--energy", "0.8", "--factor-bits", "4"), "qsvd")])
def test_coded_file_applies_with_the_error_it_reports(pair, tmp_path, capsys, args, codec):
    base, tuned = pair
    out, merged = tmp_path / "d.safetensors", tmp_path / "m.safetensors"
    assert run("compress", base, tuned, "-o", out, *args) == 0
    assert "bits per parameter" in capsys.readouterr().out
    delta = read_delta(out)
    assert delta.info["codec"] == codec
    with SafeTensorsFile(out) as f:
        assert f.metadata["deltasvd.codec"] == codec
        # nothing a stock LoRA loader would pick up (it would apply part of the delta only)
        assert all(k.startswith(CODED_PREFIX) for k in f.keys())
        assert "deltasvd.extras" not in f.metadata
    assert run("apply", base, out, "-o", merged, "--force") == 0
    reported = math.sqrt(sum(r.err2 for r in delta.records) / sum(r.norm2 for r in
                                                                  delta.records))
    assert np.isclose(merged_error(base, tuned, merged), reported, rtol=1e-3)
    assert 0 < reported < 1


def test_bits_per_parameter_counts_the_whole_file(pair, tmp_path, capsys):
    base, tuned = pair
    sizes = {}
    for bits in ("0.5", "1", "2"):
        out = tmp_path / f"d{bits}.safetensors"
        assert run("compress", base, tuned, "-o", out, "--codec", "dct", "--bits", bits) == 0
        delta = read_delta(out)
        size = os.path.getsize(out)
        bpp = bits_per_param(delta, size)
        assert bpp * delta_params(delta) == pytest.approx(8 * size, rel=1e-12)
        # the file (header and 1-D deltas included) sits a little above the matrix budget
        assert float(bits) < bpp < float(bits) + 0.35, bpp
        assert f"{bpp:.3f} bits per parameter" in capsys.readouterr().out
        sizes[bits] = size
        with SafeTensorsFile(out) as f:
            header = struct.unpack("<Q", out.read_bytes()[:8])[0]
            assert size == 8 + header + sum(f.nbytes(k) for k in f.keys())
    assert sizes["0.5"] < sizes["1"] < sizes["2"]


def test_convert_gives_a_lora_file_of_the_same_delta(pair, tmp_path):
    base, tuned = pair
    coded, lora = tmp_path / "dct.safetensors", tmp_path / "lora.safetensors"
    m1, m2 = tmp_path / "m1.safetensors", tmp_path / "m2.safetensors"
    assert run("compress", base, tuned, "-o", coded, "--codec", "dct", "--bits", "2") == 0
    assert run("convert", coded, "-o", lora, "--energy", "1", "--dtype", "fp32") == 0
    out = read_delta(lora)
    assert out.info["codec"] == "svd" and out.info["converted_from"] == "dct bits=2"
    with SafeTensorsFile(lora) as f:
        assert all(k.startswith("lora_") for k in f.keys())   # energy 1: full rank, dense
    src = read_delta(coded)
    for a, b in zip(src.records, out.records):
        want = reconstruct(a, src.stored(a))
        assert torch.allclose(reconstruct(b, out.stored(b)), want,
                              atol=1e-5 * float(want.abs().max()) + 1e-12), a.key
    assert run("apply", base, coded, "-o", m1) == 0
    assert run("apply", base, lora, "-o", m2) == 0
    with SafeTensorsFile(m1) as x, SafeTensorsFile(m2) as y:
        for key in x.keys():
            assert torch.allclose(x.get(key), y.get(key), atol=1e-6), key
    # qsvd converts too, and a smaller rule gives a smaller file
    q, q_lora = tmp_path / "q.safetensors", tmp_path / "q_lora.safetensors"
    assert run("compress", base, tuned, "-o", q, "--energy", "0.9", "--factor-bits", "6") == 0
    assert run("convert", q, "-o", q_lora, "--energy", "0.5") == 0
    assert os.path.getsize(q_lora) < os.path.getsize(lora)
    with SafeTensorsFile(q_lora) as f:
        assert any(k.endswith(".lora_up.weight") for k in f.keys())
        assert all(k.startswith("lora_") for k in f.keys())


def expect_failure(args, tmp_path, capsys, *words, code=1):
    before = sorted(os.listdir(tmp_path))
    try:
        got = run(*args)
    except SystemExit as e:     # argparse-level usage errors
        got = e.code
    assert got == code
    err = capsys.readouterr().err
    for w in words:
        assert str(w) in err, err
    assert sorted(os.listdir(tmp_path)) == before, "a failure left a file behind"


def test_refusals(pair, tmp_path, capsys):
    base, tuned = pair
    coded, svd = tmp_path / "dct.safetensors", tmp_path / "svd.safetensors"
    run("compress", base, tuned, "-o", coded, "--codec", "dct", "--bits", "1")
    run("compress", base, tuned, "-o", svd, "--energy", "0.5")
    capsys.readouterr()
    original = coded.read_bytes()
    expect_failure(("resize", coded, "-o", tmp_path / "r.safetensors", "--energy", "0.1"),
                   tmp_path, capsys, coded, "coded (dct)", "convert")
    expect_failure(("convert", svd, "-o", tmp_path / "c.safetensors", "--energy", "0.5"),
                   tmp_path, capsys, svd, "already a LoRA-format delta")
    # convert offers no --size-mb (its help says: convert, then resize --size-mb)
    expect_failure(("convert", coded, "-o", tmp_path / "c.safetensors", "--size-mb", "1"),
                   tmp_path, capsys, "--energy --fro --rank", code=2)
    expect_failure(("convert", coded, "-o", coded, "--energy", "0.5"), tmp_path, capsys)
    assert coded.read_bytes() == original                      # never overwrites its input
    for args in (("--codec", "dct"), ("--codec", "dct", "--bits", "1", "--energy", "0.5"),
                 ("--energy", "0.5", "--bits", "1"), ("--energy", "0.5", "--factor-bits", "9"),
                 ("--codec", "dct", "--bits", "0"), ("--size-mb", "1", "--factor-bits", "8")):
        expect_failure(("compress", base, tuned, "-o", tmp_path / "x.safetensors", *args),
                       tmp_path, capsys, code=2)   # every one a usage error


def test_unknown_codec_and_corrupt_coded_files_name_the_file(pair, tmp_path, capsys):
    base, tuned = pair
    out = tmp_path / "d.safetensors"
    run("compress", base, tuned, "-o", out, "--codec", "dct", "--bits", "1")
    raw = bytearray(out.read_bytes())
    n = struct.unpack("<Q", raw[:8])[0]
    for old, new, words in ((b'"deltasvd.codec":"dct"', b'"deltasvd.codec":"xyz"',
                             ("unknown codec 'xyz'", "reads svd, qsvd, dct")),
                            (b'"deltasvd:lora_unet_', b'"xxxxxxxx:lora_unet_',
                             ("corrupt dct delta", "prefix"))):
        header = bytes(raw[8: 8 + n]).replace(old, new, 1)
        bad = tmp_path / "bad.safetensors"
        bad.write_bytes(bytes(raw[:8]) + header + bytes(raw[8 + n:]))
        expect_failure(("inspect", bad), tmp_path, capsys, bad, *words)
        expect_failure(("apply", base, bad, "-o", tmp_path / "m.safetensors"), tmp_path, capsys,
                       bad, *words)
        bad.unlink()
    # codes cut short: the decoder names the tensor, nothing is written
    from deltasvd.delta_file import write_delta
    delta = read_delta(out)
    name = next(k for k in delta.tensors if k.endswith(".dct_codes"))
    delta.tensors[name] = delta.tensors[name][:-1].clone()
    write_delta(tmp_path / "short.safetensors", delta, lambda h: {})
    capsys.readouterr()
    expect_failure(("apply", base, tmp_path / "short.safetensors", "-o",
                    tmp_path / "m.safetensors"), tmp_path, capsys, "short.safetensors",
                   name[: -len(".dct_codes")])


def test_a_header_over_the_safetensors_limit_is_refused_before_writing(pair, tmp_path, capsys,
                                                                       monkeypatch):
    """Dense extras (e.g. a DCT-decoded token embedding converted at a high threshold) go into
    the header's extras blob; past safetensors' 100 MB header limit no reader could open it."""
    import deltasvd.delta_file as delta_file
    base, tuned = pair
    monkeypatch.setattr(delta_file, "HEADER_LIMIT", (1 << 20) + 1000)
    expect_failure(("compress", base, tuned, "-o", tmp_path / "d.safetensors", "--energy", "1",
                    "--dtype", "fp32"), tmp_path, capsys, "d.safetensors", "header",
                   "limit", "extras blob")
