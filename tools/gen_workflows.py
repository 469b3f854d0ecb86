"""Write the example workflows (example_workflows/*.json in the UI format, example_workflows/api/
*.json in the API format) from one description each, with widget order taken from the node
definitions of the real ComfyUI (tests/comfy_env.py) and this pack.

    python tools/gen_workflows.py            # rewrite the files
    python tools/gen_workflows.py --check    # exit 1 if the files differ from what it writes

The UI files are what the ComfyUI frontend lists under Workflow -> Browse Templates for this
pack; the API files are what `POST /prompt` takes (tests/test_comfyui_server.py runs them).
"""

import argparse
import asyncio
import json
import os
import sys
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "example_workflows"
WIDGET_TYPES = ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")

TUNED_CKPT = "my_finetune.safetensors"
BASE_CKPT = "v1-5-pruned-emaonly.safetensors"
DELTA_NAME = "deltas/my_finetune"
POSITIVE = "a photo of sks dog on a beach, detailed, sharp focus"
NEGATIVE = "blurry, low quality"

# File names are what the frontend's template browser shows as titles (ComfyUI 0.3.75 lists
# example_workflows/<name>.json and shows <name>, with <name>.jpg as its thumbnail).
COMPRESS = "Delta-SVD compress and save"
APPLY = "Delta-SVD apply and sample"
COMPARE = "Delta-SVD A-B comparison"

NOTES = {
    COMPRESS: (
        "## Compress a fine-tune into a LoRA-sized delta\n\n"
        "1. Pick the **fine-tune** and the **base** it was trained from (same family).\n"
        "2. *Delta-SVD Compress* keeps, per layer, the smallest rank reaching `value` of the "
        "singular-value energy (the paper's rule; 0.5 is a good start).\n"
        "3. *Delta-SVD Save* writes `loras/deltas/my_finetune.safetensors`: the stock "
        "LoraLoader lists it at once.\n\n"
        "The spectrum plot shows the size each threshold would give. If ComfyUI holds your "
        "models in bf16, use *Delta-SVD Compress (files)* instead (the summary tells you)."),
    APPLY: (
        "## Use a delta\n\n*Delta-SVD Apply* patches the base like LoraLoader does with the same "
        "file, plus the text-encoder norms/embeddings LoRA loaders cannot apply. Strength 1 "
        "reproduces the fine-tune."),
    COMPARE: (
        "## A/B: full fine-tune vs compressed delta\n\nSame prompt, same seed: left the full "
        "fine-tune, right base + delta. *Delta-SVD Compare* scores right against left: SSIM "
        "(1 = identical) and PSNR (dB, higher is closer), per picture and on average. Raise "
        "the batch size for more pictures; lower the threshold until the difference shows."),
}


def N(node_id, class_type, pos, widgets=None, inputs=None, title=None, size=None):
    return {"id": node_id, "type": class_type, "pos": pos, "widgets": widgets or {},
            "inputs": inputs or {}, "title": title, "size": size}


def workflows():
    sampler = {"seed": 42, "steps": 25, "cfg": 7.0, "sampler_name": "euler",
               "scheduler": "normal", "denoise": 1.0}
    return {
        COMPRESS: [
            N(1, "CheckpointLoaderSimple", [40, 60], {"ckpt_name": TUNED_CKPT},
              title="Fine-tune", size=[300, 100]),
            N(2, "CheckpointLoaderSimple", [40, 230], {"ckpt_name": BASE_CKPT}, title="Base",
              size=[300, 100]),
            N(3, "DeltaSVDCompress", [380, 60],
              {"mode": "energy", "value": 0.5, "dtype": "fp16"},
              {"model_tuned": (1, 0), "model_base": (2, 0), "clip_tuned": (1, 1),
               "clip_base": (2, 1)}, size=[500, 340]),
            N(4, "DeltaSVDSave", [920, 60], {"filename": DELTA_NAME, "overwrite": False},
              {"delta": (3, 0)}, size=[340, 150]),
            N(5, "DeltaSVDSpectrum", [920, 280], {"width": 1024, "height": 560},
              {"delta": (3, 0)}, size=[340, 90]),
            N(6, "PreviewImage", [1300, 60], {}, {"images": (5, 0)}, size=[560, 360]),
        ],
        APPLY: [
            N(1, "CheckpointLoaderSimple", [40, 60], {"ckpt_name": BASE_CKPT}, title="Base",
              size=[340, 100]),
            N(2, "DeltaSVDLoad", [40, 230], {"delta_name": DELTA_NAME + ".safetensors"},
              size=[340, 240]),
            N(3, "DeltaSVDApply", [420, 60], {"strength_model": 1.0, "strength_clip": 1.0},
              {"model": (1, 0), "delta": (2, 0), "clip": (1, 1)}, size=[320, 250]),
            N(4, "CLIPTextEncode", [780, 60], {"text": POSITIVE}, {"clip": (3, 1)},
              title="Positive", size=[400, 150]),
            N(5, "CLIPTextEncode", [780, 260], {"text": NEGATIVE}, {"clip": (3, 1)},
              title="Negative", size=[400, 150]),
            N(6, "EmptyLatentImage", [780, 460], {"width": 512, "height": 512, "batch_size": 1},
              size=[400, 110]),
            N(7, "KSampler", [1220, 60], sampler,
              {"model": (3, 0), "positive": (4, 0), "negative": (5, 0), "latent_image": (6, 0)},
              size=[320, 270]),
            N(8, "VAEDecode", [1580, 60], {}, {"samples": (7, 0), "vae": (1, 2)},
              size=[220, 50]),
            N(9, "SaveImage", [1580, 150], {"filename_prefix": "deltasvd"}, {"images": (8, 0)},
              size=[400, 440]),
        ],
        COMPARE: [
            N(1, "CheckpointLoaderSimple", [40, 60], {"ckpt_name": TUNED_CKPT},
              title="A: full fine-tune", size=[340, 100]),
            N(2, "CheckpointLoaderSimple", [40, 420], {"ckpt_name": BASE_CKPT}, title="Base",
              size=[340, 100]),
            N(3, "DeltaSVDLoad", [40, 590], {"delta_name": DELTA_NAME + ".safetensors"},
              size=[340, 240]),
            N(4, "DeltaSVDApply", [420, 420], {"strength_model": 1.0, "strength_clip": 1.0},
              {"model": (2, 0), "delta": (3, 0), "clip": (2, 1)}, title="B: base + delta",
              size=[320, 250]),
            N(5, "CLIPTextEncode", [780, 60], {"text": POSITIVE}, {"clip": (1, 1)},
              title="A positive", size=[400, 130]),
            N(6, "CLIPTextEncode", [780, 240], {"text": NEGATIVE}, {"clip": (1, 1)},
              title="A negative", size=[400, 130]),
            N(7, "CLIPTextEncode", [780, 420], {"text": POSITIVE}, {"clip": (4, 1)},
              title="B positive", size=[400, 130]),
            N(8, "CLIPTextEncode", [780, 600], {"text": NEGATIVE}, {"clip": (4, 1)},
              title="B negative", size=[400, 130]),
            N(9, "EmptyLatentImage", [780, 780], {"width": 512, "height": 512,
                                                   "batch_size": 1}, size=[400, 110]),
            N(10, "KSampler", [1220, 60], sampler,
              {"model": (1, 0), "positive": (5, 0), "negative": (6, 0),
               "latent_image": (9, 0)}, title="A: same seed", size=[320, 270]),
            N(11, "KSampler", [1220, 420], sampler,
              {"model": (4, 0), "positive": (7, 0), "negative": (8, 0),
               "latent_image": (9, 0)}, title="B: same seed", size=[320, 270]),
            N(12, "VAEDecode", [1580, 60], {}, {"samples": (10, 0), "vae": (1, 2)},
              size=[220, 50]),
            N(13, "VAEDecode", [1580, 420], {}, {"samples": (11, 0), "vae": (2, 2)},
              size=[220, 50]),
            N(14, "ImageStitch", [1840, 230], {"direction": "right", "match_image_size": True,
                                              "spacing_width": 8, "spacing_color": "white"},
              {"image1": (12, 0), "image2": (13, 0)}, size=[300, 160]),
            N(15, "SaveImage", [2180, 230], {"filename_prefix": "deltasvd_ab"},
              {"images": (14, 0)}, size=[640, 420]),
            N(16, "DeltaSVDCompare", [1840, 480], {},
              {"reference": (12, 0), "candidate": (13, 0)}, size=[320, 230]),
        ],
    }


# ---------------------------------------------------------------------------------------------
# Node definitions


def node_classes():
    sys.path.insert(0, str(REPO / "tests"))
    import comfy_env
    comfy_env.import_comfy()
    # main.py imports ComfyUI's `utils` package first; later imports put comfy/ on sys.path,
    # where comfy/utils.py would be found as `utils` instead.
    import utils.install_util  # noqa: F401
    import nodes
    asyncio.run(nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False))
    assert asyncio.run(nodes.load_custom_node(str(REPO)))
    return nodes.NODE_CLASS_MAPPINGS, nodes.NODE_DISPLAY_NAME_MAPPINGS


def _kind(spec):
    t = spec[0]
    opts = spec[1] if len(spec) > 1 else {}
    if isinstance(t, list) or t == "COMBO":
        return "COMBO", opts
    if t in WIDGET_TYPES and not opts.get("forceInput"):
        return t, opts
    return None, opts      # a socket


def definition(cls):
    """[(name, type or None for a socket, socket type, options)] in the node's input order."""
    types = cls.INPUT_TYPES()
    out = []
    for section in ("required", "optional"):
        for name, spec in types.get(section, {}).items():
            kind, opts = _kind(spec)
            out.append((name, kind, spec[0] if kind is None else kind, opts))
    return out


# ---------------------------------------------------------------------------------------------
# Formats


def api_format(nodes_, classes, names):
    out = {}
    for n in nodes_:
        inputs = dict(n["widgets"])
        for name, (src, slot) in n["inputs"].items():
            inputs[name] = [str(src), slot]
        known = {name for name, *_ in definition(classes[n["type"]])}
        assert set(inputs) <= known, (n["type"], set(inputs) - known)
        out[str(n["id"])] = {"inputs": inputs, "class_type": n["type"],
                             "_meta": {"title": n["title"] or names.get(n["type"], n["type"])}}
    return out


def _order(nodes_):
    done, order = set(), []
    while len(order) < len(nodes_):
        for n in nodes_:
            if n["id"] not in done and all(src in done for src, _ in n["inputs"].values()):
                done.add(n["id"])
                order.append(n["id"])
    return {nid: i for i, nid in enumerate(order)}


def ui_format(name, nodes_, classes, names):
    links, link_id = [], 0
    outputs_links = {}   # (node, slot) -> [link ids]
    input_link = {}      # (node, input name) -> link id
    by_id = {n["id"]: n for n in nodes_}
    for n in nodes_:
        for inp, (src, slot) in n["inputs"].items():
            link_id += 1
            rtype = classes[by_id[src]["type"]].RETURN_TYPES[slot]
            sockets = [d for d in definition(classes[n["type"]]) if d[1] is None]
            to_slot = [d[0] for d in sockets].index(inp)
            links.append([link_id, src, slot, n["id"], to_slot, rtype])
            outputs_links.setdefault((src, slot), []).append(link_id)
            input_link[(n["id"], inp)] = link_id
    order = _order(nodes_)
    ui_nodes = []
    for n in nodes_:
        cls = classes[n["type"]]
        defs = definition(cls)
        inputs = [{"name": d[0], "type": d[2], "link": input_link.get((n["id"], d[0]))}
                  for d in defs if d[1] is None]
        widgets = []
        for dname, kind, _, opts in defs:
            if kind is None:
                continue
            value = n["widgets"].get(dname, opts.get("default"))
            if kind == "COMBO" and value is None:
                value = cls.INPUT_TYPES().get("required", {}).get(dname, [[None]])[0][0]
            widgets.append(value)
            if opts.get("control_after_generate"):
                widgets.append("fixed")
        rnames = getattr(cls, "RETURN_NAMES", None) or cls.RETURN_TYPES
        outputs = [{"name": rn, "type": rt, "links": outputs_links.get((n["id"], i)),
                    "slot_index": i} for i, (rn, rt) in enumerate(zip(rnames, cls.RETURN_TYPES))]
        node = {"id": n["id"], "type": n["type"], "pos": n["pos"],
                "size": n["size"] or [300, 60 + 26 * (len(inputs) + len(widgets))],
                "flags": {}, "order": order[n["id"]], "mode": 0, "inputs": inputs,
                "outputs": outputs, "properties": {"Node name for S&R": n["type"]},
                "widgets_values": widgets}
        if n["title"]:
            node["title"] = n["title"]
        ui_nodes.append(node)
    last = max(n["id"] for n in nodes_)
    if name in NOTES:
        last += 1
        ui_nodes.append({"id": last, "type": "MarkdownNote", "pos": [40, -260],
                         "size": [560, 220], "flags": {}, "order": len(nodes_), "mode": 0,
                         "inputs": [], "outputs": [], "properties": {},
                         "widgets_values": [NOTES[name]], "color": "#432", "bgcolor": "#653"})
    return {"id": str(uuid.uuid5(uuid.NAMESPACE_URL, "deltasvd/" + name)), "revision": 0,
            "last_node_id": last, "last_link_id": link_id, "nodes": ui_nodes, "links": links,
            "groups": [], "config": {}, "extra": {"ds": {"scale": 0.8, "offset": [80, 320]}},
            "version": 0.4}


def render_all():
    classes, names = node_classes()
    files = {}
    for name, nodes_ in workflows().items():
        files[OUT / f"{name}.json"] = ui_format(name, nodes_, classes, names)
        files[OUT / "api" / f"{name}.json"] = api_format(nodes_, classes, names)
    return {p: json.dumps(v, indent=2) + "\n" for p, v in files.items()}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--check", action="store_true")
    args = p.parse_args(argv)
    files = render_all()
    stale = [p for p, text in files.items() if not p.exists() or p.read_text() != text]
    if args.check:
        for p in stale:
            print(f"stale: {p.relative_to(REPO)}")
        return 1 if stale else 0
    for path, text in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        print(f"wrote {path.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    sys.exit(main())
