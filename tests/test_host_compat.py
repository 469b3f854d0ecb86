"""Do the stock LoRA loaders of the hosts load our delta files, whole, and apply what we mean?

* ComfyUI 0.3.75 (the real one, `tests/comfy_env.py`), SD1.5 / SD2.1 / SDXL: the file goes
  through `comfy.sd.load_lora_for_models` itself (key map from `model_lora_keys_unet` +
  `model_lora_keys_clip`, `convert_lora`, `load_lora`, `add_patches` on the model and the CLIP
  patcher), with the models built on the meta device. No "lora key not loaded" / "NOT LOADED"
  warning may appear, and every patched weight, computed by `comfy.lora.calculate_weight`, must
  equal base + the delta our records describe (float64 from the file's tensors).
* A1111 1.10 (emulated by `tests/a1111_rules.py`) against the network-layer mapping of the FULL
  checkpoint spec: nothing unmatched / rejected / failing to load, no shape errors, no
  incomplete MultiheadAttention, nothing loaded-but-never-applied, and LoRA scale alpha/dim = 1.
* Negative controls: broken copies of a good file that each check must flag.

The pairs are the "small" fixtures (exact key names and shapes of a subset of the real model);
each pair and delta is made once per module.
"""

import logging
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import safetensors.torch
import torch
from safetensors import safe_open

from deltasvd import fixtures
from deltasvd.api import compress_files
from deltasvd.apply import delta_for
from deltasvd.delta_file import read_delta
from deltasvd.ranks import RankRule

try:
    from tests import a1111_rules as ar
except ImportError:  # tests/ not importable as a package
    import a1111_rules as ar

REPO = Path(__file__).resolve().parent.parent
FAMILIES = ("sd15", "sd21", "sdxl")
A1111_FAMILY = {"sd15": "sd1", "sd21": "sd2", "sdxl": "sdxl"}
RULE = RankRule("energy", 0.5)
REL_TOL = 1e-5           # of the weight-delta norm
EPS32 = torch.finfo(torch.float32).eps

# Checkpoint prefixes of the text encoders, per family: (ComfyUI prefix, checkpoint prefix).
CLIP_L = {"sd15": ("clip_l.transformer.text_model.", "cond_stage_model.transformer.text_model."),
          "sdxl": ("clip_l.transformer.text_model.",
                   "conditioner.embedders.0.transformer.text_model.")}
OPEN_CLIP = {"sd21": ("clip_h.transformer.text_model.encoder.layers.",
                      "cond_stage_model.model.transformer.resblocks."),
             "sdxl": ("clip_g.transformer.text_model.encoder.layers.",
                      "conditioner.embedders.1.model.transformer.resblocks.")}
# HF-layout module of an open_clip resblock (ComfyUI) -> open_clip module (checkpoint)
OPEN_CLIP_MODULES = {"self_attn.out_proj": "attn.out_proj", "mlp.fc1": "mlp.c_fc",
                     "mlp.fc2": "mlp.c_proj", "layer_norm1": "ln_1", "layer_norm2": "ln_2"}
QKV = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")


# ---------------------------------------------------------------------------------------------
# Pairs and deltas (made once per module)


@dataclass
class Made:
    family: str
    base: str
    tuned: str
    path: str          # the delta file
    delta: object      # read_delta(path)


pytestmark = pytest.mark.usefixtures("single_torch_thread")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("host_compat")


@pytest.fixture(scope="module")
def made(workdir):
    cache = {}

    def get(family):
        if family not in cache:
            t0 = time.perf_counter()
            base, tuned = fixtures.make_pair(workdir, family, "small")
            t1 = time.perf_counter()
            out = os.path.join(workdir, f"{family}_delta.safetensors")
            compress_files(base, tuned, out, RULE)
            t2 = time.perf_counter()
            print(f"\n[{family}] small pair {t1 - t0:.1f}s, compress ({RULE.mode}="
                  f"{RULE.value}) {t2 - t1:.1f}s, delta {os.path.getsize(out) / 2**20:.2f} MB")
            cache[family] = Made(family, base, tuned, out, read_delta(out))
        return cache[family]
    return get


def load_file(path):
    with safe_open(path, "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def write_copy(made_, path, edit):
    """A copy of the delta file with `edit(tensors)` applied (metadata kept as is)."""
    tensors, meta = load_file(made_.path)
    edit(tensors)
    safetensors.torch.save_file(tensors, path, metadata=meta)
    return str(path)


# ---------------------------------------------------------------------------------------------
# What the file means, by our records: float64 delta per checkpoint key


def expected_deltas(made_):
    """{checkpoint key: float64 delta} from the non-extra records and the file's own tensors.

    A LoRA module is up @ down scaled by alpha / rank, and the records promise alpha = rank;
    that promise is checked here (a host applies alpha/dim, so it must be 1)."""
    tensors, _ = load_file(made_.path)
    shapes = dict(ar.read_safetensors_shapes(made_.base))
    out, extra_keys = {}, set()
    for rec in made_.delta.records:
        if rec.extra:
            extra_keys.add(rec.key)
            continue
        if rec.kind == "svd":
            names = {p: f"{rec.name}.{p}" for p in ("lora_up.weight", "lora_down.weight", "alpha")}
            up, down = tensors[names["lora_up.weight"]], tensors[names["lora_down.weight"]]
            rank = down.shape[0]
            assert up.shape[1] == rank == rec.rank, (rec.name, up.shape, down.shape, rec.rank)
            assert tensors[names["alpha"]].item() == rank, (rec.name, "alpha != rank")
            piece = up.double().reshape(up.shape[0], -1) @ down.double().reshape(rank, -1)
        else:
            suffix = {"dense": ".diff"}.get(rec.kind) or (
                (".w_norm" if rec.param == "weight" else ".b_norm") if rec.norm
                else (".diff" if rec.param == "weight" else ".diff_b"))
            piece = tensors[rec.name + suffix].double()
        shape = shapes[rec.key]
        full = out.setdefault(rec.key, torch.zeros(shape, dtype=torch.float64))
        if rec.rows:
            full[rec.rows[0]: rec.rows[1]] += piece.reshape(full[rec.rows[0]: rec.rows[1]].shape)
        else:
            full += piece.reshape(shape)
    both = extra_keys & set(out)
    assert not both, f"keys patched partly by the hosts, partly only via extras: {sorted(both)}"
    return out


# ---------------------------------------------------------------------------------------------
# ComfyUI


def _gen_arch_spec():
    import comfy_env
    return comfy_env.gen_arch_spec_module()


class _Capture(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@contextmanager
def capture_warnings():
    """Warnings and errors logged (ComfyUI logs through the root logger) while in the block."""
    root = logging.getLogger()
    handler = _Capture()
    level, disabled = root.level, logging.root.manager.disable
    root.addHandler(handler)
    root.setLevel(min(level, logging.WARNING) if level else logging.WARNING)
    logging.disable(logging.NOTSET)
    try:
        yield handler.messages
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
        logging.disable(disabled)


class ComfyHost:
    """ComfyUI's model (BaseModel in a ModelPatcher) and CLIP of one family, on the meta device."""

    def __init__(self, gen, family):
        self.comfy = gen.comfy_env.import_comfy()
        import comfy.lora  # noqa: F401
        import comfy.lora_convert  # noqa: F401
        import comfy.model_patcher
        self.family = family
        self.config = gen.model_config(family)
        meta, cpu = torch.device("meta"), torch.device("cpu")
        model = self.config.get_model({}, "", device=meta)
        self.model = comfy.model_patcher.ModelPatcher(model, load_device=cpu, offload_device=cpu)
        self.clip = self.comfy.sd.CLIP(self.config.clip_target(), model_options={
            "dtype": gen.FAMILIES[family]["dtype"], "initial_device": meta})

    def load(self, path):
        """The file through comfy.sd.load_lora_for_models, strength 1 / 1 (the LoraLoader node).

        Returns ({ComfyUI key: patch list for calculate_weight}, [logged warnings])."""
        lora = self.comfy.utils.load_torch_file(path, safe_load=True)
        with capture_warnings() as logs:
            model, clip = self.comfy.sd.load_lora_for_models(self.model, self.clip, lora, 1.0, 1.0)
        patches = dict(model.patches)
        overlap = set(patches) & set(clip.patcher.patches)
        assert not overlap, overlap
        patches.update(clip.patcher.patches)
        return patches, list(logs)

    def key_map(self):
        """The key map load_lora_for_models builds (0.3.75: unet map, then clip map into it)."""
        key_map = self.comfy.lora.model_lora_keys_unet(self.model.model, {})
        return self.comfy.lora.model_lora_keys_clip(self.clip.cond_stage_model, key_map)

    def comfy_state_dict(self, ckpt_sd):
        """The base checkpoint as ComfyUI holds it: UNet `diffusion_model.*`, CLIP as converted
        by the model config's process_clip_state_dict (which splits open_clip's in_proj)."""
        sd = {k[len("model."):]: v for k, v in ckpt_sd.items()
              if k.startswith("model.diffusion_model.")}
        sd.update(self.config.process_clip_state_dict(dict(ckpt_sd)))
        return sd


def comfy_to_checkpoint(family, key):
    """ComfyUI weight key -> (checkpoint key, (start, stop) rows or None), our own mapping."""
    if key.startswith("diffusion_model."):
        return "model." + key, None
    if family in CLIP_L and key.startswith(CLIP_L[family][0]):
        return CLIP_L[family][1] + key[len(CLIP_L[family][0]):], None
    if family in OPEN_CLIP and key.startswith(OPEN_CLIP[family][0]):
        layer, rest = key[len(OPEN_CLIP[family][0]):].split(".", 1)
        module, param = rest.rsplit(".", 1)
        head = OPEN_CLIP[family][1] + layer + "."
        if module in QKV:
            return head + "attn.in_proj_" + param, QKV.index(module)  # a third, see rows()
        if module in OPEN_CLIP_MODULES:
            return head + OPEN_CLIP_MODULES[module] + "." + param, None
    raise AssertionError(f"ComfyUI patched {key}, which no checkpoint key of ours maps to")


def comfy_problems(host, made_, path=None, stats=None):
    """Everything ComfyUI does with the file that is not 'base + our delta, all keys loaded'.

    `stats` (a dict), if given, receives the number of patched keys and the worst errors."""
    problems = []
    stats = {} if stats is None else stats
    stats.update(patched=0, worst_delta=0.0, worst_weight=0.0)
    patches, logs = host.load(path or made_.path)
    problems += [f"log: {m}" for m in logs]

    with safe_open(made_.base, "pt") as f:
        ckpt = {k: f.get_tensor(k) for k in f.keys()}
    comfy_sd = host.comfy_state_dict(ckpt)
    expected = expected_deltas(made_)
    shapes = {k: v.shape for k, v in ckpt.items()}

    got = {}  # checkpoint key -> float64 delta ComfyUI applies (q/k/v thirds put together)
    for key in sorted(patches):
        ckpt_key, part = comfy_to_checkpoint(made_.family, key)
        if ckpt_key not in ckpt:
            problems.append(f"{key}: ComfyUI patches {ckpt_key}, which the base does not have")
            continue
        rows = None
        if part is not None:
            third = shapes[ckpt_key][0] // 3
            rows = (part * third, (part + 1) * third)
        base_full = ckpt[ckpt_key].float()
        base = base_full[rows[0]: rows[1]] if rows else base_full
        # our mapping and ComfyUI's own checkpoint conversion agree on the base weight
        if key not in comfy_sd or not torch.equal(comfy_sd[key].float(), base):
            problems.append(f"{key}: ComfyUI's converted base weight is not {ckpt_key} {rows}")
            continue
        want = expected.get(ckpt_key, torch.zeros(shapes[ckpt_key], dtype=torch.float64))
        want = want[rows[0]: rows[1]] if rows else want

        with capture_warnings() as logs:
            alone = host.comfy.lora.calculate_weight(patches[key], torch.zeros_like(base), key)
            patched = host.comfy.lora.calculate_weight(patches[key], base.clone(), key)
        problems += [f"calculate_weight log: {m}" for m in logs]
        full = got.setdefault(ckpt_key, torch.zeros(shapes[ckpt_key], dtype=torch.float64))
        if rows:
            full[rows[0]: rows[1]] = alone.double()
        else:
            full.copy_(alone.double())
        # with the base: the float32 sum's own rounding (<= eps/2 per element) is allowed too
        norm = want.norm().item()
        target = base.double() + want
        err = (patched.double() - target).norm().item()
        tol = REL_TOL * norm + EPS32 * target.norm().item()
        stats["patched"] += 1
        stats["worst_weight"] = max(stats["worst_weight"], err / tol)
        if err > tol:
            problems.append(f"{key}: ComfyUI's patched weight is off: |err| {err:.3e} > "
                            f"{tol:.3e} (|delta| {norm:.3e})")

    # the delta ComfyUI applies, per checkpoint tensor, vs ours (exact but for float32 math)
    for ckpt_key in sorted(set(got) | set(expected)):
        want = expected.get(ckpt_key, torch.zeros(shapes[ckpt_key], dtype=torch.float64))
        have = got.get(ckpt_key, torch.zeros(shapes[ckpt_key], dtype=torch.float64))
        err, norm = (have - want).norm().item(), want.norm().item()
        stats["worst_delta"] = max(stats["worst_delta"], err / norm if norm else err)
        if err > REL_TOL * norm:
            problems.append(f"{ckpt_key}: ComfyUI's delta differs from ours: |err| {err:.3e} "
                            f"vs |delta| {norm:.3e}")
        # deltasvd's own apply path gives the same delta
        if ckpt_key in expected:
            recs = [r for r in made_.delta.records if r.key == ckpt_key]
            own = delta_for(made_.delta, recs, shapes[ckpt_key]).double()
            if (own - want).norm().item() > REL_TOL * norm:
                problems.append(f"{ckpt_key}: deltasvd.apply.delta_for differs from the file")

    changed = {k for k, v in got.items() if v.any()}
    nonzero = {k for k, v in expected.items() if v.any()}
    if changed != nonzero:
        problems.append(f"keys ComfyUI changes != non-zero record keys: only ComfyUI "
                        f"{sorted(changed - nonzero)}, only records {sorted(nonzero - changed)}")
    untouched = set(expected) - set(got)
    if untouched:
        problems.append(f"record keys ComfyUI never patches: {sorted(untouched)}")
    return problems


@pytest.fixture(scope="module")
def comfy_host():
    gen = _gen_arch_spec()
    cache = {}

    def get(family):
        if family not in cache:
            t0 = time.perf_counter()
            cache[family] = ComfyHost(gen, family)
            print(f"\n[{family}] ComfyUI model + CLIP on meta {time.perf_counter() - t0:.1f}s")
        return cache[family]
    return get


@pytest.mark.parametrize("family", FAMILIES)
def test_comfyui_loads_and_applies(family, made, comfy_host):
    made_, host = made(family), comfy_host(family)
    t0 = time.perf_counter()
    # the map load_lora_for_models uses covers every LoRA module name in the file
    key_map = host.key_map()
    tensors, _ = load_file(made_.path)
    modules = {k.split(".", 1)[0] for k in tensors}
    assert sorted(modules - set(key_map)) == []
    stats = {}
    problems = comfy_problems(host, made_, stats=stats)
    keys = {r.key for r in made_.delta.records if not r.extra}
    print(f"[{family}] ComfyUI: {len(tensors)} tensors, {len(modules)} modules -> "
          f"{stats['patched']} patched weights of {len(keys)} checkpoint keys; worst "
          f"|delta err|/|delta| {stats['worst_delta']:.2e}, worst weight err/tol "
          f"{stats['worst_weight']:.2f} ({time.perf_counter() - t0:.1f}s)")
    for p in problems[:20]:
        print(f"[{family}] ComfyUI problem: {p}")
    assert problems == []
    assert stats["patched"] >= len(keys) > 0


# ---------------------------------------------------------------------------------------------
# A1111 (emulated)


@pytest.fixture(scope="module")
def a1111_mapping():
    cache = {}

    def get(family):
        if family not in cache:
            spec = fixtures.load_spec(family)
            cache[family] = ar.layer_mapping_from_checkpoint(
                [(k, shape) for k, shape, _ in spec], A1111_FAMILY[family])
        return cache[family]
    return get


def a1111_problems(report, tensors):
    """What would keep A1111 1.10 from loading and applying the whole file as a LoRA at scale 1."""
    problems = []
    for field in ("rejected", "load_errors", "unmatched", "shape_errors", "incomplete_mha",
                  "not_applied"):
        value = getattr(report, field)
        if value:
            problems.append(f"{field}: {value}")
    # NetworkModule.calc_scale: alpha / dim, dim = lora_down.shape[0]; must be 1
    for name, t in tensors.items():
        if name.endswith(".lora_down.weight"):
            alpha = tensors.get(name[: -len("lora_down.weight")] + "alpha")
            if alpha is None or alpha.numel() != 1 or alpha.item() != t.shape[0]:
                problems.append(f"{name}: alpha {alpha} != dim {t.shape[0]}")
    return problems


def a1111_check(mapping, path):
    tensors, _ = load_file(path)
    report = ar.check_lora_file({k: tuple(v.shape) for k, v in tensors.items()}, mapping)
    return report, a1111_problems(report, tensors)


@pytest.mark.parametrize("family", FAMILIES)
def test_a1111_loads_clean(family, made, a1111_mapping):
    made_ = made(family)
    mapping = a1111_mapping(family)
    shapes = ar.read_safetensors_shapes(made_.path)
    report, problems = a1111_check(mapping, made_.path)
    print(f"[{family}] {report.summary()}, clean={report.clean}")
    if report.ignored_parts:
        print(f"[{family}] A1111 ignores (expected: diff_b beside lora_up/down): "
              f"{dict(sorted(report.ignored_parts.items()))}")
    if report.warnings:
        print(f"[{family}] A1111 warnings: {report.warnings}")
    assert problems == []
    assert len(report.modules) == len({k.split(".", 1)[0] for k in shapes})


# ---------------------------------------------------------------------------------------------
# Negative controls: each check must flag a broken copy


def _some(tensors, suffix, prefix=""):
    return sorted(k for k in tensors if k.endswith(suffix) and k.startswith(prefix))[0]


def test_negative_renamed_tensor(made, comfy_host, a1111_mapping, workdir):
    made_ = made("sd15")
    tensors, _ = load_file(made_.path)
    old = _some(tensors, ".lora_up.weight", "lora_unet_")
    new = "lora_unet_no_such_block_0" + old[old.index("."):]

    def edit(t):
        t[new] = t.pop(old)
    path = write_copy(made_, workdir / "renamed.safetensors", edit)

    problems = comfy_problems(comfy_host("sd15"), made_, path)
    assert f"log: lora key not loaded: {new}" in problems
    # the module left with lora_down + alpha only is not loaded either
    assert f"log: lora key not loaded: {old.replace('lora_up', 'lora_down')}" in problems

    report, problems = a1111_check(a1111_mapping("sd15"), path)
    assert new in report.unmatched
    assert not report.clean and problems


def test_negative_lone_diff_b(made, comfy_host, a1111_mapping, workdir):
    made_ = made("sd15")
    tensors, _ = load_file(made_.path)
    # a module of the full model that the (small) file does not touch, given only a bias delta
    mapping = a1111_mapping("sd15")
    spec = {k: s for k, s, _ in fixtures.load_spec("sd15")}
    key = "model.diffusion_model.output_blocks.2.1.conv.bias"
    module = "lora_unet_output_blocks_2_1_conv"
    assert key in spec and not any(k.startswith(module + ".") for k in tensors)

    def edit(t):
        t[module + ".diff_b"] = torch.zeros(spec[key], dtype=torch.float32)
    path = write_copy(made_, workdir / "lone_diff_b.safetensors", edit)
    report, problems = a1111_check(mapping, path)
    assert not report.loads
    assert [k for k in report.rejected if k.endswith("output_blocks_2_1_conv")]
    # ComfyUI takes a lone diff_b without complaint (it is A1111 that needs the weight part)
    patches, logs = comfy_host("sd15").load(path)
    assert logs == []
    assert "diffusion_model.output_blocks.2.1.conv.bias" in patches


def test_negative_wrong_alpha(made, comfy_host, a1111_mapping, workdir):
    made_ = made("sd15")
    tensors, _ = load_file(made_.path)
    alpha = _some(tensors, ".alpha", "lora_te_")
    module = alpha[: -len(".alpha")]
    rank = tensors[module + ".lora_down.weight"].shape[0]
    assert rank >= 2, rank

    def edit(t):
        t[alpha] = torch.tensor(float(rank // 2))
    path = write_copy(made_, workdir / "alpha.safetensors", edit)
    problems = comfy_problems(comfy_host("sd15"), made_, path)
    assert problems and all("delta differs" in p or "patched weight is off" in p
                            for p in problems), problems
    _, problems = a1111_check(a1111_mapping("sd15"), path)
    assert len(problems) == 1 and problems[0].startswith(f"{module}.lora_down.weight: alpha")


def test_negative_wrong_shape(made, comfy_host, a1111_mapping, workdir):
    made_ = made("sd15")
    tensors, _ = load_file(made_.path)
    down = _some(tensors, ".lora_down.weight", "lora_te_")  # a linear layer: [rank, in]

    def edit(t):
        t[down] = t[down][:, :-1].contiguous()
    path = write_copy(made_, workdir / "shape.safetensors", edit)
    report, problems = a1111_check(a1111_mapping("sd15"), path)
    assert report.shape_errors and problems
    problems = comfy_problems(comfy_host("sd15"), made_, path)
    assert any(p.startswith("calculate_weight log: ERROR") for p in problems), problems


def test_negative_incomplete_mha(made, comfy_host, a1111_mapping, workdir):
    made_ = made("sd21")
    tensors, _ = load_file(made_.path)
    k_proj = _some(tensors, "_self_attn_k_proj.lora_up.weight", "lora_te_")
    module = k_proj.split(".", 1)[0]

    def edit(t):
        for name in [n for n in t if n.split(".", 1)[0] == module]:
            del t[name]
    path = write_copy(made_, workdir / "mha.safetensors", edit)
    report, problems = a1111_check(a1111_mapping("sd21"), path)
    assert report.incomplete_mha and problems
    problems = comfy_problems(comfy_host("sd21"), made_, path)
    key = "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight"
    assert module.startswith("lora_te_text_model_encoder_layers_0_"), module
    assert any(p.startswith(key + ": ComfyUI's delta differs") for p in problems), problems


def test_negative_key_set(made, comfy_host, workdir):
    made_ = made("sd15")
    tensors, _ = load_file(made_.path)
    gone = _some(tensors, ".lora_up.weight", "lora_unet_").split(".", 1)[0]
    gone_key = next(r.key for r in made_.delta.records if r.name == gone)
    # a 2-D UNet weight of the base that no record patches (time_embed: never fine-tuned)
    record_keys = {r.key for r in made_.delta.records}
    add_key = "model.diffusion_model.time_embed.0.weight"
    assert add_key not in record_keys
    added = "lora_unet_time_embed_0"
    out, inp = ar.read_safetensors_shapes(made_.base)[add_key]

    def edit(t):
        for name in [n for n in t if n.split(".", 1)[0] == gone]:
            del t[name]
        t[added + ".lora_up.weight"] = torch.ones(out, 1, dtype=torch.float16)
        t[added + ".lora_down.weight"] = torch.full((1, inp), 1e-3, dtype=torch.float16)
        t[added + ".alpha"] = torch.tensor(1.0)
    path = write_copy(made_, workdir / "key_set.safetensors", edit)
    problems = comfy_problems(comfy_host("sd15"), made_, path)
    assert any(p.startswith("keys ComfyUI changes != non-zero record keys") and gone_key in p
               and add_key in p for p in problems), problems
