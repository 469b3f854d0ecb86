"""Delta-SVD Compare inside the real ComfyUI 0.3.75, the pack loaded by ComfyUI's own
custom-node loader (no models needed): its definition and help page,
per-picture numbers equal to deltasvd.image_metrics on ComfyUI IMAGE batches (float32,
channel-last), the means, the FLOAT outputs, what the node shows (strict JSON: no infinity),
Cancel between pictures, and the refusals. The A/B template runs it in a server
(test_comfyui_server.py) and in the real frontend (test_comfyui_frontend_browser.py)."""

import json
import math
from pathlib import Path

import pytest
import torch

import comfy_env
from deltasvd.image_metrics import mean_psnr, psnr, ssim

REPO = Path(__file__).resolve().parent.parent
NODE = "DeltaSVDCompare"


@pytest.fixture(scope="module")
def host():
    """ComfyUI's `nodes` module with this pack loaded, and the pack's package."""
    comfy_env.require_comfy()
    comfy_env.import_comfy()
    import nodes
    pack = comfy_env.load_pack(REPO)
    return nodes, pack


@pytest.fixture(scope="module")
def compare(host):
    return host[0].NODE_CLASS_MAPPINGS[NODE]()


@pytest.fixture(scope="module")
def DeltaError(host):
    """The pack's own copy of the core's error (it imports the core as <pack>.deltasvd)."""
    return host[1].deltasvd.errors.DeltaError


def images(n, h=32, w=40, seed=0):
    """A ComfyUI IMAGE batch: float32 (n, h, w, 3) in [0, 1], never all zero."""
    g = torch.Generator().manual_seed(seed)
    return 0.05 + 0.9 * torch.rand((n, h, w, 3), generator=g)


def candidate_of(reference, seed=1):
    """Each picture a little different from its reference, by a different amount."""
    g = torch.Generator().manual_seed(seed)
    amount = torch.linspace(0.02, 0.1, reference.shape[0]).view(-1, 1, 1, 1)
    return (reference + amount * torch.randn(reference.shape, generator=g)).clamp(0, 1)


def test_definition_and_help_page(host):
    nodes, _ = host
    cls = nodes.NODE_CLASS_MAPPINGS[NODE]
    assert nodes.NODE_DISPLAY_NAME_MAPPINGS[NODE] == "Delta-SVD Compare"
    assert cls.CATEGORY == "deltasvd" and cls.DESCRIPTION and cls.OUTPUT_NODE is True
    assert cls.RETURN_TYPES == ("STRING", "FLOAT", "FLOAT")
    assert cls.RETURN_NAMES == ("summary", "mean_ssim", "mean_psnr")
    assert len(cls.OUTPUT_TOOLTIPS) == 3
    inputs = cls.INPUT_TYPES()
    assert list(inputs) == ["required"]
    assert list(inputs["required"]) == ["reference", "candidate"]
    for spec in inputs["required"].values():
        assert spec[0] == "IMAGE" and spec[1]["tooltip"]
    doc = (REPO / "javascript" / "docs" / f"{NODE}.md").read_text()
    assert doc.startswith("# Delta-SVD Compare\n")
    for name in list(inputs["required"]) + list(cls.RETURN_NAMES):
        assert f"`{name}`" in doc, name


def test_numbers_equal_the_core(compare):
    ref = images(3)
    cand = candidate_of(ref)
    out = compare.compare(ref, cand)
    text, mean_s, mean_p = out["result"]
    want_s, want_p = ssim(ref, cand).tolist(), psnr(ref, cand).tolist()
    assert want_s[0] > want_s[1] > want_s[2] > 0.3     # three distinct scores
    assert isinstance(mean_s, float) and isinstance(mean_p, float)
    assert mean_s == pytest.approx(sum(want_s) / 3, abs=1e-15, rel=0)
    assert mean_p == pytest.approx(sum(want_p) / 3, abs=1e-12, rel=0)
    lines = text.splitlines()
    assert lines[0] == "3 pictures of 40 x 32, candidate vs reference"
    assert lines[1].split() == ["picture", "SSIM", "PSNR", "dB"]
    for i in range(3):
        assert lines[2 + i].split() == [str(i + 1), f"{want_s[i]:.4f}", f"{want_p[i]:.2f}"]
    assert lines[5].split() == ["mean", f"{mean_s:.4f}", f"{mean_p:.2f}"]
    assert len(lines) == 6
    assert out["ui"]["text"] == [text]
    shown = out["ui"]["deltasvd"][0]
    assert shown == {"pictures": 3, "ssim_mean": mean_s, "psnr_mean": mean_p,
                     "ssim_min": want_s[2], "ssim_min_picture": 3}
    json.dumps(out["ui"], allow_nan=False)     # what the server sends the page


def test_one_picture_scored_alike(compare):
    ref = images(1, 64, 48, seed=2)
    cand = candidate_of(ref, seed=3)
    _, mean_s, mean_p = compare.compare(ref, cand)["result"]
    assert mean_s == float(ssim(ref, cand)[0]) and mean_p == float(psnr(ref, cand)[0])


def test_identical_pictures(compare):
    """An identical picture is left out of the mean PSNR; all identical: inf, shown as "inf"."""
    ref = images(3, seed=4)
    cand = candidate_of(ref, seed=5)
    cand[1] = ref[1]
    out = compare.compare(ref, cand)
    text, mean_s, mean_p = out["result"]
    per_p = psnr(ref, cand).tolist()
    assert per_p[1] == math.inf
    assert mean_p == pytest.approx((per_p[0] + per_p[2]) / 2, abs=1e-12, rel=0)
    assert mean_p == mean_psnr(per_p)
    assert mean_s == pytest.approx(sum(ssim(ref, cand).tolist()) / 3, abs=1e-15, rel=0)
    lines = text.splitlines()
    assert lines[3].split() == ["2", "1.0000", "inf"]
    assert lines[-1] == "the mean PSNR leaves out 1 identical picture (PSNR inf)"
    json.dumps(out["ui"], allow_nan=False)

    out = compare.compare(ref, ref.clone())
    text, mean_s, mean_p = out["result"]
    assert mean_s == 1.0 and mean_p == math.inf
    assert out["ui"]["deltasvd"][0]["psnr_mean"] == "inf"
    assert text.splitlines()[-1] == "every picture is identical to its reference (PSNR inf)"
    json.dumps(out["ui"], allow_nan=False)


def test_refusals_name_both_inputs(compare, DeltaError):
    ref = images(2)
    cases = {
        "count": (images(1), ref, "reference is 1 picture of 40 x 32, 3 channels (shape "
                  "(1, 32, 40, 3)), candidate is 2 pictures of 40 x 32, 3 channels (shape "
                  "(2, 32, 40, 3))"),
        "size": (ref, images(2, 32, 48), "candidate is 2 pictures of 48 x 32"),
        "channels": (ref, torch.cat([ref, ref[..., :1]], dim=3), "4 channels"),
    }
    for what, (a, b, words) in cases.items():
        with pytest.raises(DeltaError) as e:
            compare.compare(a, b)
        message = str(e.value)
        assert message.startswith("reference and candidate must be the same number of "
                                  "pictures of the same size"), (what, message)
        assert words in message, (what, message)
    with pytest.raises(DeltaError, match=r"^SSIM needs pictures of at least 11 x 11 pixels, "
                                         r"got 8 x 30$"):
        compare.compare(images(1, 8, 30), images(1, 8, 30, seed=1))
    with pytest.raises(DeltaError, match="hold no pictures"):
        compare.compare(ref[:0], ref[:0])
    broken = ref.clone()
    broken[1, 3, 4, 0] = float("nan")
    with pytest.raises(DeltaError, match=r"^candidate holds NaN or infinite pixels"):
        compare.compare(ref, broken)


def test_cancel_stops_between_pictures(compare):
    import comfy.model_management as mm
    ref = images(2)
    mm.interrupt_current_processing(True)
    try:
        with pytest.raises(mm.InterruptProcessingException):
            compare.compare(ref, candidate_of(ref))
    finally:
        mm.interrupt_current_processing(False)
