"""Emulation of how AUTOMATIC1111 stable-diffusion-webui 1.10 loads a LoRA file.

A1111 cannot be installed here, so this module re-implements (from reading its sources; no code
copied) the parts of the built-in Lora extension that decide what happens to each key of a LoRA
file (`extensions-builtin/Lora/`):

* `networks.assign_network_names_to_compvis_modules` -> `layer_mapping_from_checkpoint`
  (network names of the model's modules, built from a full checkpoint's keys and shapes);
* `networks.convert_diffusers_name_to_compvis` -> `convert_diffusers_name_to_compvis`
  (in 1.10 it lives in networks.py; `lora_convert.py` with a `KeyConvert` class is SD.Next's, not
  A1111's, and it differs: SD.Next applies the `lora_unet` fallback to the converted key);
* `networks.load_network` key resolution -> `resolve_key`;
* `load_network`'s grouping + `module_types[*].create_module` acceptance, the `NetworkModule*`
  constructors (network.py, network_lora.py, network_full.py, network_norm.py, and the required
  keys of network_hada/ia3/lokr/glora/oft.py) and `network_apply_weights` (incl. its
  MultiheadAttention branch) -> `check_lora_file`.

Findings from the 1.10 sources that this emulator encodes:

* `diff_b` beside `lora_up`/`lora_down`: never read. `network.NetworkModule.__init__` reads only
  `alpha`, `scale`, `bias` (a weight-shaped add, not a layer bias) and `dora_scale`;
  `NetworkModuleLora.calc_updown` calls `finalize_updown` without `ex_bias`. Only
  `NetworkModuleFull` (`diff_b`) and `NetworkModuleNorm` (`b_norm`) return a bias delta. So a
  `diff_b` on a lora module is silently ignored; a lone `diff_b` (or `w_norm` without `b_norm`) is
  accepted by no module type and `load_network` raises AssertionError -> the whole LoRA fails.
* `lora_A.weight`/`lora_B.weight` are accepted by ModuleTypeLora, but it then clears the dict and
  keeps only up/down: `alpha` and every other part of such a module are dropped.
* MultiheadAttention (open_clip text encoders: SD2, SDXL te2): a `..._attn_{q,k,v}_proj` key is
  not in the mapping; `re_x_proj` finds the MHA for it but the module is stored under the
  un-stripped key. `network_apply_weights` changes an MHA only if `_q_proj`, `_k_proj`, `_v_proj`
  AND `_out_proj` modules all exist (out_proj is a named submodule found directly; its own Linear
  forward is never called by MHA). The q/k/v `ex_bias` is discarded (`updown_q, _ = ...`), so a
  `diff_b` on q/k/v never reaches `in_proj_bias`; only the out_proj bias delta is applied.
* Norms: lora_patches.py patches the forward of torch.nn.Linear, Conv2d, GroupNorm, LayerNorm and
  MultiheadAttention, so `w_norm`/`b_norm` are added to weight/bias of GroupNorm (UNet, incl. the
  GroupNorm32 subclass, which calls super().forward) and torch LayerNorm (UNet transformer
  blocks, HF CLIP). open_clip's LayerNorm subclass (SD2 / SDXL te2 `ln_1`, `ln_2`, `ln_final`)
  overrides forward with F.layer_norm, so the patched forward never runs: accepted, never applied.
  A lora_up/lora_down pair on a norm or an Embedding makes NetworkModuleLora raise
  ("matched a layer with unsupported type") -> the whole LoRA fails to load.
* `bundle_emb.*` keys are collected as embeddings and (no `continue`) then also fall through to
  name resolution, fail it, and are logged among the unmatched keys; harmless.
* `is_sd2 = 'model_transformer_resblocks' in network_layer_mapping` - a dict-key test, true only
  for SD2 (SDXL's open_clip names carry a `1_` prefix).
Not modelled: SD3 (`diffusers_weight_map`, rsplit of keys), the SD.Next/Forge backends, inpainting
9-channel padding, dyn_dim, DoRA maths, and the internal shapes of hada/ia3/lokr/glora/oft.
"""

from __future__ import annotations

import json
import math
import re
import struct
from dataclasses import dataclass, field

__all__ = [
    "ModuleRecord", "A1111Report", "layer_mapping_from_checkpoint", "mapping_is_sd2",
    "convert_diffusers_name_to_compvis", "resolve_key", "check_lora_file", "accepting_type",
    "read_safetensors_shapes", "MODULE_TYPE_ORDER",
]


# --------------------------------------------------------------------------------------------
# network_layer_mapping
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ModuleRecord:
    """One entry of A1111's `sd_model.network_layer_mapping` (a torch module in A1111)."""
    name: str                 # network name, e.g. "diffusion_model_input_blocks_1_1_proj_in"
    kind: str                 # 'linear' | 'conv' | 'norm' | 'mha' | 'other'
    shape: tuple | None       # weight shape (MHA: in_proj_weight shape); None for containers
    has_bias: bool
    torch_type: str           # Linear, NonDynamicallyQuantizableLinear, Conv2d, GroupNorm,
                              # LayerNorm, open_clip.LayerNorm, MultiheadAttention, Embedding,
                              # container
    forward_patched: bool     # does A1111's patched forward (network_apply_weights) run for it

    @property
    def lora_shape(self):
        """`NetworkModule.shape` in 1.10: weight shape, or out_proj's for an MHA, else None."""
        if self.kind == "mha":
            d = self.shape[1]
            return (d, d)
        return self.shape


# torch module types NetworkModuleLora.create_module treats as linear / conv (exact type match)
_LORA_LINEAR_TYPES = {"Linear", "NonDynamicallyQuantizableLinear", "MultiheadAttention"}
_LORA_CONV_TYPES = {"Conv2d"}


def _family(family):
    f = re.sub(r"[^a-z0-9]", "", str(family).lower())
    if f.startswith("sdxl"):
        return "sdxl"
    if f.startswith("sd1") or f in ("v1", "sd"):
        return "sd1"
    if f.startswith("sd2") or f == "v2":
        return "sd2"
    raise ValueError(f"unknown model family {family!r} (use 'sd1', 'sd2' or 'sdxl')")


def _sections(family):
    """(checkpoint key prefix, network-name prefix, module path prefix, domain) per sub-model."""
    unet = ("model.diffusion_model.", "", "diffusion_model.", "unet")
    if family == "sdxl":
        # conditioner.embedders.{i}.wrapped.named_modules() -> f"{i}_{name}"
        return [("conditioner.embedders.", None, "", "te"), unet]
    # cond_stage_model.wrapped.named_modules() -> name
    return [("cond_stage_model.", "", "", "te"), unet]


def _items(keys_and_shapes):
    if hasattr(keys_and_shapes, "items"):
        keys_and_shapes = keys_and_shapes.items()
    for k, v in keys_and_shapes:
        yield k, _shape(v)


def _shape(v):
    if hasattr(v, "shape"):
        v = v.shape
    return tuple(int(x) for x in v)


def _numel(shape):
    return math.prod(shape) if shape is not None else 0


def layer_mapping_from_checkpoint(keys_and_shapes, family):
    """A1111's network_layer_mapping (name -> ModuleRecord) for a full SD1/SD2/SDXL checkpoint.

    keys_and_shapes: dict (or iterable of pairs) checkpoint key -> shape (or tensor).
    """
    fam = _family(family)
    # per network name: collected params, plus domain info needed for the torch type
    mods = {}

    def touch(net_name, path, domain):
        return mods.setdefault(net_name, {"params": {}, "path": path, "domain": domain})

    for key, shape in _items(keys_and_shapes):
        for ck_prefix, net_prefix, path_prefix, domain in _sections(fam):
            if not key.startswith(ck_prefix):
                continue
            rest = key[len(ck_prefix):]
            if net_prefix is None:  # SDXL: embedder index
                idx, _, rest = rest.partition(".")
                if not idx.isdigit():
                    break
                prefix = f"{idx}_"
            else:
                prefix = net_prefix
            full = path_prefix + rest
            path, _, param = full.rpartition(".")
            # named_modules() lists every ancestor (root included) as well
            parts = path.split(".") if path else []
            for i in range(len(parts) + 1):
                anc = ".".join(parts[:i])
                touch(prefix + anc.replace(".", "_"), anc, domain)
            touch(prefix + path.replace(".", "_"), path, domain)["params"][param] = shape
            break

    mapping = {}
    for name, info in mods.items():
        mapping[name] = _classify(name, info)
    # the out_proj of a MultiheadAttention is a NonDynamicallyQuantizableLinear
    for name, rec in list(mapping.items()):
        if rec.kind == "mha":
            out = mapping.get(name + "_out_proj")
            if out is not None and out.kind == "linear":
                mapping[out.name] = ModuleRecord(out.name, "linear", out.shape, out.has_bias,
                                                 "NonDynamicallyQuantizableLinear", True)
    return mapping


_EMBEDDING_LEAVES = ("token_embedding", "position_embedding", "word_embeddings",
                     "position_embeddings")


def _classify(name, info):
    params, path, domain = info["params"], info["path"], info["domain"]
    leaf = path.rsplit(".", 1)[-1]
    if "in_proj_weight" in params:
        return ModuleRecord(name, "mha", params["in_proj_weight"], "in_proj_bias" in params,
                            "MultiheadAttention", True)
    w = params.get("weight")
    has_bias = "bias" in params
    if w is None:
        return ModuleRecord(name, "other", None, has_bias, "container", False)
    if len(w) == 4:
        return ModuleRecord(name, "conv", w, has_bias, "Conv2d", True)
    if len(w) == 2:
        if leaf in _EMBEDDING_LEAVES or leaf.endswith("embedding"):
            return ModuleRecord(name, "other", w, has_bias, "Embedding", False)
        return ModuleRecord(name, "linear", w, has_bias, "Linear", True)
    if len(w) == 1:
        if domain == "unet":
            # LDM/SGM: LayerNorm inside BasicTransformerBlock, GroupNorm(32) everywhere else
            ttype = "LayerNorm" if ".transformer_blocks." in f".{path}." else "GroupNorm"
            return ModuleRecord(name, "norm", w, has_bias, ttype, True)
        if path.startswith("model.") or path == "model":
            # open_clip text tower (SD2, SDXL embedder 1): LayerNorm subclass whose forward calls
            # F.layer_norm directly, so A1111's patched LayerNorm.forward never runs.
            return ModuleRecord(name, "norm", w, has_bias, "open_clip.LayerNorm", False)
        return ModuleRecord(name, "norm", w, has_bias, "LayerNorm", True)
    return ModuleRecord(name, "other", w, has_bias, "unknown", False)


def mapping_is_sd2(mapping):
    """`is_sd2` exactly as load_network computes it."""
    return "model_transformer_resblocks" in mapping


# --------------------------------------------------------------------------------------------
# key resolution
# --------------------------------------------------------------------------------------------

_RESNET_RENAMES = {"conv1": "in_layers_2", "conv2": "out_layers_3", "norm1": "in_layers_0",
                   "norm2": "out_layers_0", "time_emb_proj": "emb_layers_1",
                   "conv_shortcut": "skip_connection"}
_LEADING_DIGITS = re.compile(r"\d+")


def _num(g):
    # 1.10 turns every regex group that *starts* with digits into int(); a group such as "1abc"
    # would make int() raise (and the LoRA fail to load). Same here.
    return int(g) if _LEADING_DIGITS.match(g) else g


def _suffix(block_kind, suffix):
    return _RESNET_RENAMES.get(suffix, suffix) if block_kind == "resnets" else suffix


def _openclip_layer(prefix, n, rest):
    if "mlp_fc1" in rest:
        rest = rest.replace("mlp_fc1", "mlp_c_fc")
    elif "mlp_fc2" in rest:
        rest = rest.replace("mlp_fc2", "mlp_c_proj")
    else:
        rest = rest.replace("self_attn", "attn")
    return f"{prefix}model_transformer_resblocks_{n}_{rest}"


def _te(g, is_sd2):
    n, rest = g
    if is_sd2:
        return _openclip_layer("", n, rest)
    return f"transformer_text_model_encoder_layers_{n}_{rest}"


# (regex applied with re.match, i.e. anchored at the start only; builder(groups, is_sd2))
_CONVERSIONS = [
    (r"lora_unet_conv_in(.*)", lambda g, _: f"diffusion_model_input_blocks_0_0{g[0]}"),
    (r"lora_unet_conv_out(.*)", lambda g, _: f"diffusion_model_out_2{g[0]}"),
    (r"lora_unet_time_embedding_linear_(\d+)(.*)",
     lambda g, _: f"diffusion_model_time_embed_{g[0] * 2 - 2}{g[1]}"),
    (r"lora_unet_down_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)",
     lambda g, _: "diffusion_model_input_blocks_"
                  f"{1 + g[0] * 3 + g[2]}_{1 if g[1] == 'attentions' else 0}_{_suffix(g[1], g[3])}"),
    (r"lora_unet_mid_block_(attentions|resnets)_(\d+)_(.+)",
     lambda g, _: "diffusion_model_middle_block_"
                  f"{1 if g[0] == 'attentions' else g[1] * 2}_{_suffix(g[0], g[2])}"),
    (r"lora_unet_up_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)",
     lambda g, _: "diffusion_model_output_blocks_"
                  f"{g[0] * 3 + g[2]}_{1 if g[1] == 'attentions' else 0}_{_suffix(g[1], g[3])}"),
    (r"lora_unet_down_blocks_(\d+)_downsamplers_0_conv",
     lambda g, _: f"diffusion_model_input_blocks_{3 + g[0] * 3}_0_op"),
    (r"lora_unet_up_blocks_(\d+)_upsamplers_0_conv",
     lambda g, _: f"diffusion_model_output_blocks_{2 + g[0] * 3}_{2 if g[0] > 0 else 1}_conv"),
    (r"lora_te_text_model_encoder_layers_(\d+)_(.+)", _te),
    (r"lora_te2_text_model_encoder_layers_(\d+)_(.+)",
     lambda g, _: _openclip_layer("1_", g[0], g[1])),
]
_CONVERSIONS = [(re.compile(p), b) for p, b in _CONVERSIONS]
_X_PROJ = re.compile(r"(.*)_([qkv]_proj)$")


def convert_diffusers_name_to_compvis(key, is_sd2):
    """1.10's networks.convert_diffusers_name_to_compvis: first matching rule wins, else key."""
    for rx, build in _CONVERSIONS:
        m = rx.match(key)
        if m:
            return build([_num(g) for g in m.groups()], is_sd2)
    return key


def resolve_key(network_key_without_parts, mapping, is_sd2=None):
    """(key, record): the key A1111 files the module under (its `sd_key`) and the mapped module,
    or record None when A1111 would list the key as unmatched (key = the last name it tried).

    For `..._attn_{q,k,v}_proj` of an MHA the returned key keeps the `_q_proj` suffix while the
    record is the MultiheadAttention (`record.name` is the MHA's network name).
    """
    base = network_key_without_parts
    if is_sd2 is None:
        is_sd2 = mapping_is_sd2(mapping)
    key = convert_diffusers_name_to_compvis(base, is_sd2)
    rec = mapping.get(key)
    if rec is None:
        m = _X_PROJ.match(key)
        if m:
            rec = mapping.get(m.group(1))
    # fallbacks, tested on the *original* name (an if / elif chain in 1.10)
    if rec is None and "lora_unet" in base:
        key = base.replace("lora_unet", "diffusion_model")
        rec = mapping.get(key)
    elif rec is None and "lora_te1_text_model" in base:
        key = base.replace("lora_te1_text_model", "0_transformer_text_model")
        rec = mapping.get(key)
        if rec is None:  # some SD1 LoRAs use te1 names too
            key = base.replace("lora_te1_text_model", "transformer_text_model")
            rec = mapping.get(key)
    elif rec is None and "oft_unet" in base:
        key = base.replace("oft_unet", "diffusion_model")
        rec = mapping.get(key)
    if rec is None and "oft_diag" in key:
        # KohakuBlueLeaf OFT: 1.10 computes a lora_unet replacement and then overwrites it
        key = base.replace("lora_te1_text_model", "0_transformer_text_model")
        rec = mapping.get(key)
    return key, rec


# --------------------------------------------------------------------------------------------
# module types
# --------------------------------------------------------------------------------------------

# networks.module_types order in 1.10: the first type whose create_module accepts the part set wins
MODULE_TYPE_ORDER = ("lora", "hada", "ia3", "lokr", "full", "norm", "glora", "oft")


def _accepts(typ, parts):
    has = parts.__contains__
    if typ == "lora":
        return (has("lora_up.weight") and has("lora_down.weight")) or \
               (has("lora_A.weight") and has("lora_B.weight"))
    if typ == "hada":
        return all(map(has, ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")))
    if typ == "ia3":
        return has("weight")
    if typ == "lokr":
        return (has("lokr_w1") or (has("lokr_w1_a") and has("lokr_w1_b"))) and \
               (has("lokr_w2") or (has("lokr_w2_a") and has("lokr_w2_b")))
    if typ == "full":
        return has("diff")
    if typ == "norm":
        return has("w_norm") and has("b_norm")
    if typ == "glora":
        return all(map(has, ("a1.weight", "a2.weight", "alpha", "b1.weight", "b2.weight")))
    if typ == "oft":
        return has("oft_blocks") or has("oft_diag")
    raise ValueError(typ)


def accepting_type(parts):
    """The module type A1111 1.10 would build for this set of network parts, or None."""
    for typ in MODULE_TYPE_ORDER:
        if _accepts(typ, parts):
            return typ
    return None


# parts network.NetworkModule.__init__ reads for every type
_BASE_PARTS = {"alpha", "scale", "bias", "dora_scale"}
# parts each NetworkModule* subclass reads
_TYPE_PARTS = {
    "lora": {"lora_up.weight", "lora_down.weight", "lora_mid.weight"},
    "hada": {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2"},
    "ia3": {"weight", "on_input"},
    "lokr": {"lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2"},
    "full": {"diff", "diff_b"},
    "norm": {"w_norm", "b_norm"},
    "glora": {"a1.weight", "a2.weight", "b1.weight", "b2.weight"},
    "oft": {"oft_blocks", "oft_diag"},
}
# types whose NetworkModule.dim stays None: calc_scale() then ignores alpha
_NO_DIM_TYPES = {"full", "norm", "ia3"}


# --------------------------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------------------------

@dataclass
class A1111Report:
    is_sd2: bool
    # A1111 key -> {"module": record name, "type": module type or None, "parts": sorted parts}
    modules: dict = field(default_factory=dict)
    # LoRA-file key -> last name A1111 tried (logged only; the tensor is dropped)
    unmatched: dict = field(default_factory=dict)
    # A1111 key -> sorted parts no module type accepts (load_network raises AssertionError)
    rejected: dict = field(default_factory=dict)
    # A1111 key -> message: other exceptions while building the network (whole LoRA fails)
    load_errors: dict = field(default_factory=dict)
    # A1111 key -> [messages]: shapes that fail (or silently broadcast) at apply time
    shape_errors: dict = field(default_factory=dict)
    # MHA network name -> {"present": [...], "missing": [...]} of _q/_k/_v/_out_proj
    incomplete_mha: dict = field(default_factory=dict)
    # A1111 key -> sorted parts the accepting type reads but never applies / does not read
    ignored_parts: dict = field(default_factory=dict)
    # A1111 key -> reason a loaded module never changes the model
    not_applied: dict = field(default_factory=dict)
    # layout-only differences A1111 tolerates (reshape by numel)
    warnings: dict = field(default_factory=dict)
    # embedding names from bundle_emb.* keys
    bundle_embeddings: list = field(default_factory=list)

    @property
    def loads(self):
        """False when A1111 1.10 would raise while loading the file (nothing of it applied)."""
        return not self.rejected and not self.load_errors

    @property
    def clean(self):
        return self.loads and not (self.unmatched or self.shape_errors or self.incomplete_mha
                                   or self.ignored_parts or self.not_applied)

    def as_dict(self):
        return {k: getattr(self, k) for k in (
            "is_sd2", "modules", "unmatched", "rejected", "load_errors", "shape_errors",
            "incomplete_mha", "ignored_parts", "not_applied", "warnings", "bundle_embeddings")}

    def summary(self):
        return (f"A1111 1.10: {len(self.modules)} modules, loads={self.loads}, "
                f"unmatched={len(self.unmatched)}, rejected={len(self.rejected)}, "
                f"load_errors={len(self.load_errors)}, shape_errors={len(self.shape_errors)}, "
                f"incomplete_mha={len(self.incomplete_mha)}, "
                f"ignored_parts={len(self.ignored_parts)}, not_applied={len(self.not_applied)}")

    def _err(self, key, msg):
        self.shape_errors.setdefault(key, []).append(msg)


_MHA_SUFFIXES = ("_q_proj", "_k_proj", "_v_proj", "_out_proj")


def check_lora_file(tensors, mapping, is_sd2=None):
    """Emulate A1111 1.10 loading (and applying) a LoRA file against `mapping`.

    tensors: dict LoRA-file key -> shape (or tensor). Returns an A1111Report.
    """
    if is_sd2 is None:
        is_sd2 = mapping_is_sd2(mapping)
    rep = A1111Report(is_sd2=is_sd2)

    # load_network: group the keys by resolved module, as matched_networks does
    groups = {}  # key -> (record, {part: shape})
    for full_key, value in tensors.items():
        shape = _shape(value)
        base, _, part = full_key.partition(".")
        if base == "bundle_emb":
            emb = part.split(".", 1)[0]
            if emb not in rep.bundle_embeddings:
                rep.bundle_embeddings.append(emb)
            continue  # A1111 also logs it as unmatched after using it; not reported here
        try:
            key, rec = resolve_key(base, mapping, is_sd2)
        except ValueError as e:  # int() of a digit-led regex group
            rep.load_errors[base] = f"name conversion raised: {e}"
            continue
        if rec is None:
            rep.unmatched[full_key] = key
            continue
        if key not in groups:
            groups[key] = (rec, {})
        groups[key][1][part] = shape

    mha_members = {}  # MHA name -> set of suffixes with a loaded module
    for key, (rec, parts) in groups.items():
        typ = accepting_type(parts)
        rep.modules[key] = {"module": rec.name, "type": typ, "parts": sorted(parts)}
        if typ is None:
            rep.rejected[key] = sorted(parts)
            continue
        _check_module(rep, key, rec, typ, parts, mapping, mha_members)

    for mha, present in mha_members.items():
        if len(present) < 4:
            rep.incomplete_mha[mha] = {
                "present": [s for s in _MHA_SUFFIXES if s in present],
                "missing": [s for s in _MHA_SUFFIXES if s not in present],
            }
    return rep


def _mha_role(key, rec, mapping):
    """(mha name, suffix) if the module takes part in the MHA branch of network_apply_weights."""
    if rec.kind == "mha":
        for s in _MHA_SUFFIXES[:3]:
            if key == rec.name + s:
                return rec.name, s
        return None
    if rec.torch_type == "NonDynamicallyQuantizableLinear" and key == rec.name \
            and key.endswith("_out_proj"):
        mha = key[: -len("_out_proj")]
        if mha in mapping and mapping[mha].kind == "mha":
            return mha, "_out_proj"
    return None


def _check_module(rep, key, rec, typ, parts, mapping, mha_members):
    used = set(_BASE_PARTS) | _TYPE_PARTS[typ]
    if typ == "lora" and not ("lora_up.weight" in parts and "lora_down.weight" in parts):
        # lora_A/lora_B: create_module clears weights.w and keeps only up/down
        used = {"lora_A.weight", "lora_B.weight"}
        parts = {"lora_up.weight": parts["lora_B.weight"],
                 "lora_down.weight": parts["lora_A.weight"],
                 **{p: s for p, s in parts.items() if p not in ("lora_A.weight", "lora_B.weight")}}
        ignored = set(parts) - {"lora_up.weight", "lora_down.weight"}
    else:
        ignored = set(parts) - used
    if typ in _NO_DIM_TYPES and "alpha" in parts:
        ignored.add("alpha")  # read, but calc_scale() uses alpha only when dim is set

    role = _mha_role(key, rec, mapping)
    if role is not None:
        mha_members.setdefault(role[0], set()).add(role[1])
        if role[1] != "_out_proj":
            # network_apply_weights: `updown_q, _ = module_q.calc_updown(qw)` drops the bias delta
            ignored |= {p for p in ("diff_b", "b_norm") if p in parts}

    # --- NetworkModule.__init__ (load time) ---
    target = rec.lora_shape
    if target is None:
        rep.load_errors[key] = (f"module {rec.name} ({rec.torch_type}) has no weight: "
                                "NetworkModule takes len(None) -> TypeError")
        return
    for p in ("alpha", "scale"):
        if p in parts and _numel(parts[p]) != 1:
            msg = f"{p} has shape {parts[p]}; .item() needs one element"
            rep._err(key, msg)
            rep.load_errors[key] = msg
    if typ == "ia3" and "on_input" not in parts:
        rep.load_errors[key] = "ia3 module without on_input -> KeyError"

    # the tensor the update is computed against at apply time
    if role is not None and role[1] != "_out_proj":
        apply_shape = (rec.shape[0] // 3, rec.shape[1])  # a q/k/v chunk of in_proj_weight
    else:
        apply_shape = rec.shape

    if typ == "lora":
        if rec.torch_type not in _LORA_LINEAR_TYPES | _LORA_CONV_TYPES:
            rep.load_errors[key] = (f"Lora layer matched a layer with unsupported type: "
                                    f"{rec.torch_type}")
        elif rec.torch_type in _LORA_CONV_TYPES:
            _check_lora_conv(rep, key, apply_shape, parts)
        else:
            _check_lora_linear(rep, key, apply_shape, parts)
    elif typ == "full":
        _check_numel(rep, key, "diff", parts["diff"], apply_shape)
        if "diff_b" in parts and parts["diff_b"] != (apply_shape[0],):
            rep._err(key, f"diff_b {parts['diff_b']} != bias shape {(apply_shape[0],)}")
    elif typ == "norm":
        _check_numel(rep, key, "w_norm", parts["w_norm"], apply_shape)
        if _numel(parts["b_norm"]) != apply_shape[0]:
            rep._err(key, f"b_norm {parts['b_norm']} != bias shape {(apply_shape[0],)}")
    if "bias" in parts and _numel(parts["bias"]) != _numel(apply_shape):
        rep._err(key, f"bias part {parts['bias']} is added to the weight delta; "
                      f"needs {_numel(apply_shape)} elements")

    # --- network_apply_weights (does the module ever change the model?) ---
    if role is None:
        if rec.kind == "mha":
            rep.not_applied[key] = ("module on a MultiheadAttention itself: it has no .weight, "
                                    "only _q/_k/_v/_out_proj modules are applied")
        elif not rec.forward_patched:
            rep.not_applied[key] = (f"{rec.torch_type} forward is not patched by lora_patches; "
                                    "network_apply_weights never runs for it")
    if ignored:
        rep.ignored_parts[key] = sorted(ignored)


def _check_numel(rep, key, part, shape, target):
    if tuple(shape) == tuple(target):
        return
    if _numel(shape) == _numel(target):
        rep.warnings.setdefault(key, []).append(
            f"{part} {shape} reshaped to {target} by finalize_updown")
    else:
        rep._err(key, f"{part} {shape} does not match weight {target}")


def _check_lora_linear(rep, key, target, parts):
    up, down = parts["lora_up.weight"], parts["lora_down.weight"]
    if len(up) < 1 or len(down) < 1:
        rep.load_errors[key] = "0-d lora weight"
        return
    out, inp = target[0], _numel(target[1:])
    r_up, r_down, d_in = _numel(up[1:]), down[0], _numel(down[1:])
    if "lora_mid.weight" in parts:
        rep.warnings.setdefault(key, []).append("lora_mid on a linear layer: not checked")
        return
    if up[0] != out:
        rep._err(key, f"lora_up {up}: out {up[0]} != weight out {out}")
    if r_up != r_down:
        rep._err(key, f"rank mismatch: lora_up {up} vs lora_down {down}")
    if d_in != inp:
        rep._err(key, f"lora_down {down}: in {d_in} != weight in {inp}")


def _check_lora_conv(rep, key, target, parts):
    up, down = parts["lora_up.weight"], parts["lora_down.weight"]
    mid = parts.get("lora_mid.weight")
    out, inp, kernel = target[0], target[1], tuple(target[2:])
    # lora_down: 2-D -> 1x1; 4-D with a non-1x1 kernel -> built with the layer's kernel
    if len(down) == 2:
        down4 = (down[0], down[1], 1, 1)
    elif len(down) == 4:
        down4 = down
        if down[2:] != (1, 1) and down[2:] != kernel:
            msg = f"lora_down {down}: kernel {down[2:]} != layer kernel {kernel}"
            rep._err(key, msg)
            if _numel(down) != down[0] * down[1] * _numel(kernel):
                rep.load_errors[key] = msg + " (reshape fails while loading)"
    else:
        msg = f"lora_down {down} must be 2-D or 4-D for a Conv2d"
        rep._err(key, msg)
        rep.load_errors[key] = msg
        return
    # lora_up: always built as a 1x1 Conv2d(up[1] -> up[0])
    if len(up) < 2 or _numel(up) != up[0] * up[1]:
        msg = f"lora_up {up} must be [out, rank] or [out, rank, 1, 1]"
        rep._err(key, msg)
        rep.load_errors[key] = msg
        return
    if up[0] != out:
        rep._err(key, f"lora_up {up}: out {up[0]} != weight out {out}")
    if down4[1] != inp:
        rep._err(key, f"lora_down {down}: in {down4[1]} != weight in {inp}")
    if mid is not None:
        if len(mid) != 4 or mid[2:] != kernel or mid[0] != up[1] or mid[1] != down4[0]:
            rep._err(key, f"lora_mid {mid} inconsistent with up {up}, down {down}, "
                          f"kernel {kernel}")
        return
    if up[1] != down4[0]:
        rep._err(key, f"rank mismatch: lora_up {up} vs lora_down {down}")
    if down4[2:] != kernel:
        rep._err(key, f"1x1 LoRA on a {kernel} conv: the [out,in,1,1] delta is broadcast "
                      "over every kernel tap")


# --------------------------------------------------------------------------------------------
# convenience
# --------------------------------------------------------------------------------------------

def read_safetensors_shapes(path):
    """{key: shape} from a .safetensors header (no tensor data read); metadata dropped."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    return {k: tuple(v["shape"]) for k, v in header.items() if k != "__metadata__"}
