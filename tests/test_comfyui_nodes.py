"""The node pack inside the real ComfyUI 0.3.75, as a library (fast; the server tests are in
test_comfyui_server.py).

The pack is loaded by ComfyUI's own `nodes.load_custom_node`; models are loaded by ComfyUI's
own checkpoint loader from a full SD1.5-format fp16 pair (tests/comfy_pair.py), held in fp16
like a GPU user's. Checked: node definitions (ids, tooltips, docs), Compress on loaded models
gives exactly what the core gives on the files, Apply gives exactly LoraLoader's patches for the
same file plus the extras, patched inputs are read as ComfyUI computes them, the precision
warning, Cancel, Save/Load and their refusals, Resize, Spectrum.
"""

import json
import os
from pathlib import Path

import pytest
import torch

import comfy_env
from deltasvd.apply import delta_for, records_by_key
from deltasvd.resize import copy_delta

REPO = Path(__file__).resolve().parent.parent
NODE_IDS = ["DeltaSVDCompress", "DeltaSVDCompressFiles", "DeltaSVDSave", "DeltaSVDLoad",
            "DeltaSVDApply", "DeltaSVDResize", "DeltaSVDSpectrum"]


pytestmark = pytest.mark.usefixtures("single_torch_thread")


@pytest.fixture(scope="module")
def host(tmp_path_factory):
    """ComfyUI imported as a library, the pack loaded by ComfyUI's own loader, temp folders."""
    comfy_env.require_comfy()
    comfy = comfy_env.import_comfy()
    import comfy.lora  # noqa: F401
    import comfy.model_management as mm
    import folder_paths
    import nodes as comfy_nodes
    assert Path(comfy_nodes.__file__).parent == comfy_env.comfy_dir(), comfy_nodes.__file__
    pack = comfy_env.load_pack(REPO)
    loras = tmp_path_factory.mktemp("loras")
    folder_paths.add_model_folder_path("loras", str(loras), is_default=True)
    assert folder_paths.get_folder_paths("loras")[0] == str(loras)

    class Host:
        pass
    h = Host()
    h.comfy, h.mm, h.folder_paths, h.nodes = comfy, mm, folder_paths, comfy_nodes
    h.loras = loras
    h.node = lambda name: comfy_nodes.NODE_CLASS_MAPPINGS[name]()
    # the pack imports its own copy of the core (as <pack>.deltasvd): its exception classes
    h.pack = pack
    return h


@pytest.fixture(scope="module")
def DeltaError(host):
    return host.pack.deltasvd.errors.DeltaError


@pytest.fixture(scope="module")
def pair(host, sd15_full_pair):
    """Base and tuned as ComfyUI loads them (fp16 UNet and text encoder, no VAE)."""
    base_path, tuned_path = sd15_full_pair
    host.folder_paths.add_model_folder_path("checkpoints", os.path.dirname(base_path))

    def load(path, dtype=torch.float16):
        model, clip, _, _ = host.comfy.sd.load_checkpoint_guess_config(
            path, output_vae=False, model_options={"dtype": dtype},
            te_model_options={"dtype": dtype})
        return model, clip

    class Pair:
        pass
    p = Pair()
    p.base_path, p.tuned_path, p.load = base_path, tuned_path, load
    p.base_model, p.base_clip = load(base_path)
    p.tuned_model, p.tuned_clip = load(tuned_path)
    return p


@pytest.fixture(scope="module")
def made(host, pair):
    """Compress on the loaded models (energy 0.5)."""
    out = host.node("DeltaSVDCompress").compress(
        pair.tuned_model, pair.base_model, "energy", 0.5, "fp16", pair.tuned_clip,
        pair.base_clip)
    return out


@pytest.fixture(scope="module")
def made_files(host, pair):
    """Compress the same pair from the files (DeltaSVDCompressFiles, energy 0.5)."""
    return host.node("DeltaSVDCompressFiles").compress(
        os.path.basename(pair.tuned_path), os.path.basename(pair.base_path), "energy", 0.5,
        "fp16")


def result(out):
    return out["result"] if isinstance(out, dict) else out


# ---------------------------------------------------------------------------------------------
# Definitions


def test_pack_defines_every_node_with_tooltips_and_docs(host):
    mappings = host.nodes.NODE_CLASS_MAPPINGS
    for node_id in NODE_IDS:
        cls = mappings[node_id]
        assert host.nodes.NODE_DISPLAY_NAME_MAPPINGS[node_id].startswith("Delta-SVD")
        assert cls.DESCRIPTION and cls.CATEGORY == "deltasvd"
        types = cls.INPUT_TYPES()
        for section in ("required", "optional"):
            for name, spec in types.get(section, {}).items():
                assert len(spec) == 2 and spec[1].get("tooltip"), (node_id, name)
        doc = REPO / "javascript" / "docs" / f"{node_id}.md"
        assert doc.is_file(), doc
        text = doc.read_text()
        for name in list(types["required"]) + list(types.get("optional", {})):
            assert f"`{name}`" in text, (node_id, name)
    assert mappings["DeltaSVDSave"].OUTPUT_NODE
    assert mappings["DeltaSVDCompress"].RETURN_TYPES == ("DELTA", "STRING")
    assert mappings["DeltaSVDApply"].RETURN_TYPES == ("MODEL", "CLIP")
    assert mappings["DeltaSVDSpectrum"].RETURN_TYPES == ("IMAGE",)
    ct = mappings["DeltaSVDCompress"].INPUT_TYPES()["required"]
    assert ct["mode"][0] == ["energy", "frobenius", "rank", "size_mb"]


def test_validate_inputs_reject_bad_rules_and_filenames(host):
    compress = host.nodes.NODE_CLASS_MAPPINGS["DeltaSVDCompress"]
    assert compress.VALIDATE_INPUTS(mode="energy", value=0.5) is True
    assert "value (energy) must be in (0, 1]" in compress.VALIDATE_INPUTS(mode="energy",
                                                                         value=1.5)
    assert "whole number" in compress.VALIDATE_INPUTS(mode="rank", value=2.5)
    assert compress.VALIDATE_INPUTS(mode="rank", value=None) is True  # linked: checked later
    save = host.nodes.NODE_CLASS_MAPPINGS["DeltaSVDSave"]
    assert save.VALIDATE_INPUTS(filename="deltas/x") is True
    for bad in ("../x", "deltas/../../x", "/tmp/x", "", "a//b", "deltas/"):
        assert save.VALIDATE_INPUTS(filename=bad) is not True, bad


# ---------------------------------------------------------------------------------------------
# Compress


def test_compress_loaded_models_equals_core_on_files(made, made_files):
    """Models held in fp16 from fp16 files: the same delta, bit for bit, as from the files."""
    delta, text = result(made)
    want = result(made_files)[0]
    assert delta.family == "sd1"
    assert sorted(r.key for r in delta.records) == sorted(r.key for r in want.records)
    assert delta.tensors.keys() == want.tensors.keys()
    for k in want.tensors:
        assert torch.equal(delta.tensors[k], want.tensors[k]), k
    assert delta.extras.keys() == want.extras.keys() and delta.extras
    for k in want.extras:
        assert torch.equal(delta.extras[k], want.extras[k]), k
    assert "rel.err" in text and "compression ratio" in text
    assert "x against the weights in memory (" in text
    assert "PRECISION" not in text   # fp16 files held in fp16
    info = made["ui"]["deltasvd"][0]
    assert info["size_mb"] > 0 and info["ratio"] > 10 and 0 < info["rel_error"] < 1
    assert info["ratio_against"].startswith("the weights in memory (")
    assert made["ui"]["text"] == [text]


def test_compress_refuses_one_clip_and_bad_rule(host, pair, DeltaError):
    node = host.node("DeltaSVDCompress")
    with pytest.raises(ValueError, match="both clip_tuned and clip_base"):
        node.compress(pair.tuned_model, pair.base_model, "energy", 0.5, "fp16", pair.tuned_clip)
    with pytest.raises(DeltaError, match=r"value \(energy\) must be in"):
        node.compress(pair.tuned_model, pair.base_model, "energy", 2.0, "fp16")
    with pytest.raises(DeltaError, match=r"value \(size_mb\) 0.001 is smaller than the fixed"):
        node.compress(pair.tuned_model, pair.base_model, "size_mb", 0.001, "fp16")
    with pytest.raises(DeltaError, match="nothing changed: every tensor equals the base's"):
        node.compress(pair.base_model, pair.base_model.clone(), "energy", 0.5, "fp16")


def test_host_state_speaks_in_node_words(host, DeltaError):
    common = host.pack.nodes.common
    with pytest.raises(DeltaError, match="value \\(size_mb\\) 1 is"):
        with common.host_state():
            raise DeltaError("--size-mb 1 is too small")


def test_cancel_stops_compress(host, pair):
    """Cancel (ComfyUI's interrupt flag) raised from the progress callback, mid-job."""
    import comfy.utils
    calls = []

    def hook(value, total, preview, node_id=None):
        calls.append(value)
        if len(calls) == 3:
            host.mm.interrupt_current_processing(True)
    old = comfy.utils.PROGRESS_BAR_HOOK
    comfy.utils.set_progress_bar_global_hook(hook)
    try:
        with pytest.raises(host.mm.InterruptProcessingException):
            host.node("DeltaSVDCompress").compress(pair.tuned_model, pair.base_model, "energy",
                                                   0.4, "fp16")
    finally:
        comfy.utils.set_progress_bar_global_hook(old)
        host.mm.interrupt_current_processing(False)
    assert len(calls) == 3 and calls[-1] < calls[0] + 100   # stopped right there


def test_compress_reads_patched_inputs(host, pair, made):
    """A MODEL/CLIP with patches (here Apply's) is read as ComfyUI computes its weights: the
    compressor's source for it gives base + delta, and the unpatched base is untouched."""
    delta = result(made)[0]
    model, clip = result(host.node("DeltaSVDApply").apply(pair.base_model, delta, 1.0,
                                                            pair.base_clip, 1.0))
    models = host.pack.nodes.comfy_models
    patched = models.model_source(model, clip, "applied")
    base = models.model_source(pair.base_model, pair.base_clip, "base")
    for key, recs in records_by_key(delta).items():
        want = base.get(key).float() + delta_for(delta, recs, _shape(recs))
        got = patched.get(key)
        assert got.dtype == torch.float32 and patched.dtype(key) == torch.float32, key
        assert (got - want).abs().max() <= 1e-6 * want.abs().max(), key
        assert base.dtype(key) == torch.float16
    assert torch.equal(patched.get(UNCHANGED), base.get(UNCHANGED))
    assert patched.dtype(UNCHANGED) == torch.float16
    assert not pair.base_model.patches and not pair.base_clip.patcher.patches


UNCHANGED = "model.diffusion_model.input_blocks.4.1.proj_in.weight"


def _shape(recs):
    return recs[0].shape if not recs[0].rows else None


def test_precision_warning_for_bf16_inputs(host, pair):
    """A fine-tune held in bf16 from an fp16 file (the base held in fp16, as its file): the
    summary says so, naming the file (found through the prompt, past a pass-through node), and
    estimates the rounding."""
    tuned_model = host.comfy.sd.load_checkpoint_guess_config(
        pair.tuned_path, output_vae=False, output_clip=False,
        model_options={"dtype": torch.bfloat16})[0]
    base_model = pair.base_model
    prompt = {
        "1": {"class_type": "CheckpointLoaderSimple",
              "inputs": {"ckpt_name": os.path.basename(pair.tuned_path)}},
        "2": {"class_type": "CheckpointLoaderSimple",
              "inputs": {"ckpt_name": os.path.basename(pair.base_path)}},
        "4": {"class_type": "LoraLoaderModelOnly", "inputs": {"model": ["1", 0]}},
        "3": {"class_type": "DeltaSVDCompress",
              "inputs": {"model_tuned": ["4", 0], "model_base": ["2", 0]}},
    }
    out = host.node("DeltaSVDCompress").compress(tuned_model, base_model, "energy", 0.5,
                                                 "fp16", prompt=prompt, unique_id="3")
    text = result(out)[1]
    assert (f"PRECISION WARNING: model_tuned is held in bf16 but "
            f"'{os.path.basename(pair.tuned_path)}' stores fp16.") in text
    assert "model_base is held" not in text
    assert "DeltaSVDCompressFiles" in text and "of this delta's norm" in text
    assert out["ui"]["deltasvd"][0]["precision_warning"]
    assert result(out)[0].info["tuned_name"] == os.path.basename(pair.tuned_path)
    # without the graph only bf16 (not fp16) is worth a note
    note = host.pack.nodes.provenance.precision_note
    assert "PRECISION NOTE: the inputs are held in bf16" in note(
        {"tuned": "BF16", "base": "BF16"}, {"tuned": None, "base": None}, 0.5)
    assert note({"tuned": "F16", "base": "F16"}, {"tuned": None, "base": None}, 0.1) is None
    assert note({"tuned": "F16", "base": "F16"}, {"tuned": ("t", "F16"), "base": None},
                0.1) is None


def test_compress_files_node(host, pair, made_files):
    node = host.node("DeltaSVDCompressFiles")
    names = node.INPUT_TYPES()["required"]["ckpt_tuned"][0]
    tuned, base = os.path.basename(pair.tuned_path), os.path.basename(pair.base_path)
    assert tuned in names and base in names
    delta, text = result(made_files)
    assert delta.info["tuned_name"] == tuned and len(delta.info["base_sha256"]) == 64
    assert "compression ratio" in text
    assert "x against the tuned file (" in text
    info = made_files["ui"]["deltasvd"][0]
    assert info["ratio"] > 10
    size = os.path.getsize(pair.tuned_path) / 2**20
    assert info["ratio_against"] == f"the tuned file ({size:.1f} MiB)"


# ---------------------------------------------------------------------------------------------
# Apply


def same_as_loraloader(host, pair, model, clip, lora, strength_model, strength_clip):
    """Apply's patches (on `model`, `clip`) give exactly Load LoRA's weights for `lora` (a file,
    or the tensors a file would hold), and the only patches Load LoRA lacks are the two extras.
    Returns (our patches, the base weights, calculate_weight)."""
    if not isinstance(lora, dict):
        lora = host.comfy.utils.load_torch_file(str(lora), safe_load=True)
    ref_model, ref_clip = host.comfy.sd.load_lora_for_models(
        pair.base_model, pair.base_clip, lora, strength_model, strength_clip)
    ours = {**model.patches, **clip.patcher.patches}
    ref = {**ref_model.patches, **ref_clip.patcher.patches}
    extras = {k: v for k, v in ours.items() if k not in ref}
    assert sorted(extras) == ["clip_l.transformer.text_model.embeddings.token_embedding.weight",
                              "clip_l.transformer.text_model.final_layer_norm.weight"]
    assert len(ref) > 10
    states = {**pair.base_model.model.state_dict(),
              **pair.base_clip.cond_stage_model.state_dict()}
    calc = host.comfy.lora.calculate_weight
    for key, patches in ref.items():
        w = states[key].float()
        assert torch.equal(calc(ours[key], w.clone(), key), calc(patches, w.clone(), key)), key
    return ours, states, calc


def test_apply_equals_loraloader_plus_extras(host, pair, made, tmp_path):
    delta = result(made)[0]
    base_model, base_clip = pair.base_model, pair.base_clip
    before = (dict(base_model.patches), dict(base_clip.patcher.patches))
    out = host.node("DeltaSVDApply").apply(base_model, delta, 0.8, base_clip, 1.2)
    model, clip = result(out)
    assert (dict(base_model.patches), dict(base_clip.patcher.patches)) == before  # not mutated
    assert model is not base_model and clip is not base_clip
    text = out["ui"]["text"][0]
    assert "NOT APPLIED" not in text and "applied 2 extras" in text

    from deltasvd.api import save_delta
    path = tmp_path / "d.safetensors"
    save_delta(delta, path)
    ours, states, calc = same_as_loraloader(host, pair, model, clip, path, 0.8, 1.2)
    # the extras: base + strength * delta
    by_key = records_by_key(delta)
    for key, ck in (("clip_l.transformer.text_model.final_layer_norm.weight",
                     "cond_stage_model.transformer.text_model.final_layer_norm.weight"),
                    ("clip_l.transformer.text_model.embeddings.token_embedding.weight",
                     "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight")):
        w = states[key].float()
        want = w + 1.2 * delta_for(delta, by_key[ck], list(w.shape))
        got = calc(ours[key], w.clone(), key)
        assert (got - want).abs().max() <= 1e-6 * want.abs().max(), key


def test_apply_refuses_other_family_and_reports_unmatched(host, pair, made, DeltaError):
    delta = result(made)[0]
    node = host.node("DeltaSVDApply")
    xl = copy_delta(delta)
    xl.family = "sdxl"
    with pytest.raises(DeltaError, match="for Stable Diffusion XL, the model is Stable "
                                         "Diffusion 1.x"):
        node.apply(pair.base_model, xl, 1.0, pair.base_clip, 1.0)
    odd = copy_delta(delta)
    odd.tensors["lora_unet_no_such_block.lora_up.weight"] = torch.zeros(4, 1)
    odd.tensors["lora_unet_no_such_block.lora_down.weight"] = torch.zeros(1, 4)
    odd.tensors["lora_unet_no_such_block.alpha"] = torch.tensor(1.0)
    out = node.apply(pair.base_model, odd, 1.0)          # and no CLIP connected
    text = out["ui"]["text"][0]
    assert "NOT APPLIED: 1 LoRA modules matched no weight of the model: " \
           "lora_unet_no_such_block" in text
    assert "text-encoder modules not applied: no CLIP connected" in text
    assert "extra cond_stage_model.transformer.text_model.final_layer_norm.weight not " \
           "applied: no CLIP connected" in text
    assert result(out)[1] is None


@pytest.mark.parametrize("codec", ["dct", "qsvd"])
def test_apply_coded_delta_equals_loraloader_on_its_decoded_file(host, pair, codec,
                                                                 DeltaError):
    """A Delta-DCT or quantized-factor file (not LoRA-loadable): saved and loaded by the nodes,
    Apply patches exactly what LoraLoader patches from the decoded LoRA-format file, plus the
    extras, equal to base + strength * the decoded delta; Resize and Spectrum refuse it."""
    from deltasvd.api import compress_to_delta, make_codec, make_rule
    from deltasvd.delta_file import decoded_delta
    c = make_codec("dct", bits=2) if codec == "dct" else make_codec("svd", factor_bits=8)
    made_delta, _, _ = compress_to_delta(pair.base_path, pair.tuned_path,
                                         make_rule("energy", 0.5), codec=c)
    host.node("DeltaSVDSave").save(made_delta, f"deltas/coded_{codec}")
    delta, info = result(host.node("DeltaSVDLoad").load(f"deltas/coded_{codec}.safetensors"))
    assert f"codec     {codec}" in info and "not LoRA-loadable" in info
    assert any(r.kind == codec for r in delta.records)
    base_model, base_clip = pair.base_model, pair.base_clip
    out = host.node("DeltaSVDApply").apply(base_model, delta, 0.7, base_clip, 1.3)
    model, clip = result(out)
    text = out["ui"]["text"][0]
    assert "NOT APPLIED" not in text and "applied 2 extras" in text

    # the decoded file's tensors (not written: the DCT-decoded token embedding, a dense extra,
    # would pass safetensors' 100 MB header limit in the extras blob)
    lora = dict(decoded_delta(delta).tensors)
    ours, states, calc = same_as_loraloader(host, pair, model, clip, lora, 0.7, 1.3)
    # one UNet weight against the core's decoder (deltasvd apply's path)
    by_key = records_by_key(delta)
    ck = next(k for k, recs in by_key.items() if recs[0].kind == codec and
              k.startswith("model.diffusion_model."))
    hk = "diffusion_model." + ck[len("model.diffusion_model."):]
    w = states[hk].float()
    want = w + 0.7 * delta_for(delta, by_key[ck], list(w.shape))
    got = calc(ours[hk], w.clone(), hk)
    assert (got - want).abs().max() <= 1e-5 * want.abs().max(), hk
    with pytest.raises(DeltaError, match=f"coded \\({codec}\\)"):
        host.node("DeltaSVDResize").resize(delta, "energy", 0.3)
    with pytest.raises(DeltaError, match="convert it first"):
        host.node("DeltaSVDSpectrum").plot(delta, 800, 480)


# ---------------------------------------------------------------------------------------------
# Files, resize, spectrum


def test_save_load_round_trip_and_refusals(host, made, DeltaError):
    delta = result(made)[0]
    save, load = host.node("DeltaSVDSave"), host.node("DeltaSVDLoad")
    out = save.save(delta, "deltas/unit")
    path = host.loras / "deltas" / "unit.safetensors"
    assert path.is_file() and "saved loras/deltas/unit.safetensors" in out["ui"]["text"][0]
    assert "deltas/unit.safetensors" in host.folder_paths.get_filename_list("loras")
    assert "deltas/unit.safetensors" in load.INPUT_TYPES()["required"]["delta_name"][0]
    loaded, info = result(load.load("deltas/unit.safetensors"))
    assert loaded.tensors.keys() == delta.tensors.keys()
    assert all(torch.equal(loaded.tensors[k], delta.tensors[k]) for k in delta.tensors)
    assert "Stable Diffusion 1.x" in info
    assert out["ui"]["text"][0].endswith(" MiB)") and out["ui"]["deltasvd"] == [
        {"file": "deltas/unit.safetensors"}]      # the frontend refreshes its lists on `file`
    mtime = path.stat().st_mtime_ns
    exists = "loras/deltas/unit.safetensors exists; choose another filename or enable overwrite"
    # before the graph runs (ComfyUI calls VALIDATE_INPUTS with the widget values)
    validate = host.nodes.NODE_CLASS_MAPPINGS["DeltaSVDSave"].VALIDATE_INPUTS
    assert validate(filename="deltas/unit", overwrite=False) == exists
    assert validate(filename="deltas/unit.safetensors", overwrite=False) == exists
    assert validate(filename="deltas/unit", overwrite=True) is True
    assert validate(filename="deltas/unit") is True    # linked overwrite: checked in the run
    assert validate(filename="deltas/other", overwrite=False) is True
    with pytest.raises(DeltaError, match="exists"):      # and when it runs
        save.save(delta, "deltas/unit")
    assert path.stat().st_mtime_ns == mtime
    save.save(delta, "deltas/unit", overwrite=True)
    listing = sorted(p.name for p in host.loras.rglob("*"))
    for bad in ("../escape", "deltas/../../escape", str(host.loras / "abs")):
        with pytest.raises(DeltaError, match="loras folder|absolute"):
            save.save(delta, bad)
    assert sorted(p.name for p in host.loras.rglob("*")) == listing
    assert not (host.loras.parent / "escape.safetensors").exists()


def test_load_refuses_corrupt_and_foreign_files(host, DeltaError):
    load = host.node("DeltaSVDLoad")
    (host.loras / "corrupt.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(DeltaError, match="not a safetensors file"):
        load.load("corrupt.safetensors")
    from safetensors.torch import save_file
    save_file({"lora_unet_x.lora_up.weight": torch.zeros(2, 1)},
              str(host.loras / "plain_lora.safetensors"))
    with pytest.raises(DeltaError, match="not a deltasvd delta file"):
        load.load("plain_lora.safetensors")


def test_resize_and_spectrum(host, made, DeltaError):
    delta = result(made)[0]
    out = host.node("DeltaSVDResize").resize(delta, "energy", 0.3)
    small, text = result(out)
    assert out["ui"]["deltasvd"][0]["size_mb"] < made["ui"]["deltasvd"][0]["size_mb"]
    assert small is not delta and "resized" in text
    assert sum(r.rank for r in small.records) < sum(r.rank for r in delta.records)
    assert all(r.rank <= q.rank for r, q in zip(small.records, delta.records))
    with pytest.raises(DeltaError, match="can only be cut smaller"):
        host.node("DeltaSVDResize").resize(delta, "energy", 0.9)
    (image,) = host.node("DeltaSVDSpectrum").plot(delta, 800, 480)
    assert image.shape == (1, 480, 800, 3) and image.dtype == torch.float32
    assert 0.0 <= float(image.min()) and float(image.max()) <= 1.0
    assert float((image < 0.5).float().mean()) > 0.005     # something was drawn
    colours = torch.unique((image[0] * 255).round().reshape(-1, 3), dim=0)
    assert len(colours) > 20


def test_example_workflows_are_consistent(host):
    """Every UI workflow (example_workflows/, what the frontend lists as this pack's templates,
    titled by file name, with the .jpg of the same name as thumbnail) has its API twin
    (example_workflows/api/, what the server tests run): the same nodes, links and widget
    values. Both are written by tools/gen_workflows.py. No two nodes overlap (title bars
    included); the browser test checks it again after each template runs."""
    folder = REPO / "example_workflows"
    ui_files = sorted(folder.glob("*.json"))
    assert [f.name for f in ui_files] == ["Delta-SVD A-B comparison.json",
                                          "Delta-SVD apply and sample.json",
                                          "Delta-SVD compress and save.json"]
    for ui_file in ui_files:
        assert ui_file.with_suffix(".jpg").read_bytes().startswith(b"\xff\xd8\xff")
        ui_wf = json.loads(ui_file.read_text())
        assert not overlapping(ui_wf["nodes"]), (ui_file.name, overlapping(ui_wf["nodes"]))
        api_wf = json.loads((folder / "api" / ui_file.name).read_text())
        nodes_ = [n for n in ui_wf["nodes"] if n["type"] not in ("Note", "MarkdownNote")]
        assert sorted(str(n["id"]) for n in nodes_) == sorted(api_wf), ui_file.name
        for node in nodes_:
            api = api_wf[str(node["id"])]
            assert node["type"] == api["class_type"]
            if node["type"].startswith("DeltaSVD"):   # the others run in the server tests
                assert node["type"] in host.nodes.NODE_CLASS_MAPPINGS, node["type"]
            values = [v for v in api["inputs"].values() if not isinstance(v, list)]
            it = iter(node["widgets_values"])
            assert all(any(v == w for w in it) for v in values), (ui_file.name, node["id"])
        for _, src, slot, dst, _, _ in ui_wf["links"]:
            assert [str(src), slot] in api_wf[str(dst)]["inputs"].values(), ui_file.name
        n_links = sum(isinstance(v, list) for n in api_wf.values() for v in n["inputs"].values())
        assert n_links == len(ui_wf["links"]), ui_file.name


TITLE_HEIGHT = 30   # LiteGraph's title bar, above a node's `pos`


def overlapping(nodes_):
    """Pairs of node ids whose rectangles, title bars included, intersect."""
    return intersecting({n["id"]: (n["pos"][0], n["pos"][1] - TITLE_HEIGHT, n["size"][0],
                                   n["size"][1] + TITLE_HEIGHT) for n in nodes_})


def intersecting(rects):
    """{label: (x, y, width, height)} -> the pairs of labels whose rectangles intersect."""
    items = list(rects.items())
    return [(a, b) for i, (a, (ax, ay, aw, ah)) in enumerate(items)
            for b, (bx, by, bw, bh) in items[i + 1:]
            if ax < bx + bw and bx < ax + aw and ay < by + bh and by < ay + ah]
