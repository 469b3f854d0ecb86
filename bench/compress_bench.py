"""Benchmark: deltasvd against ComfyUI's LoRA extraction, LyCORIS' extractor and a plain SVD.

    python bench/compress_bench.py [--family sd15|sdxl] [--scale small|full] [--data DIR]
    python bench/compress_bench.py --scaling          # Gram route vs torch.linalg.svd per shape

Every tool runs in its own subprocess (wall time and peak RSS from os.wait4, per child); the
bench then reads each tool's output file and measures it itself, against float64 deltas of the
pair: per-layer ||dW - AB||_F / ||dW||_F over the UNet + text-encoder matrix layers the
fine-tune changed (a layer a tool does not store counts as 1.0), and for ours whether every
layer's rank is the one the energy rule gives on float64 singular values of the float64 delta.
See bench/README.md for what each row is and the caveats.
"""

import argparse
import base64
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from deltasvd import fixtures  # noqa: E402
from deltasvd import families  # noqa: E402
from deltasvd.ranks import RankRule, is_dense  # noqa: E402

FAMILIES = {"sd15": dict(lora="sd1", dtype=torch.float32, clips=("clip_l",)),
            "sdxl": dict(lora="sdxl", dtype=torch.float16, clips=("clip_l", "clip_g"))}
DTYPE_NAME = {torch.float32: "fp32", torch.float16: "fp16"}
PREFIXES = ("model.diffusion_model.", "cond_stage_model.", "conditioner.embedders.")
UNET = "model.diffusion_model."
# ComfyUI holds OpenCLIP's text_projection transposed, as clip_g.transformer.text_projection.
TEXT_PROJECTION = {"conditioner.embedders.1.model.text_projection": "lora_te2_text_projection"}
_L = ".transformer.text_model.embeddings."
EMBEDDINGS = {
    "sd15": {f"cond_stage_model{_L}{e}.weight": f"lora_te_text_model_embeddings_{e}"
             for e in ("token_embedding", "position_embedding")},
    "sdxl": {**{f"conditioner.embedders.0{_L}{e}.weight": f"lora_te1_text_model_embeddings_{e}"
                for e in ("token_embedding", "position_embedding")},
             "conditioner.embedders.1.model.token_embedding.weight":
                 "lora_te2_text_model_embeddings_token_embedding",
             "conditioner.embedders.1.model.positional_embedding":
                 "lora_te2_text_model_embeddings_position_embedding"}}
# kohya prefix of each ComfyUI text encoder, per family
TE_PREFIX = {"sd15": {"clip_l": "lora_te_"}, "sdxl": {"clip_l": "lora_te1_", "clip_g": "lora_te2_"}}
ENERGY = 0.5
PEER_RANK = 64
ALL_TOOLS = ("ours", "ours-exact", "ours-r64", "ours-r64-exact", "comfy", "lycoris", "baseline",
             "lowrank")
LOWRANK_ITERS = 7   # torch.svd_lowrank power iterations: KJNodes' default (lowrank_iters)


# ---------------------------------------------------------------------------------------------
# Fixtures


def ensure_pair(data_dir, family, scale):
    """The pair for (family, scale), made once into data_dir and reused afterwards."""
    dtype = FAMILIES[family]["dtype"]
    folder = Path(data_dir) / f"{family}_{scale}_{DTYPE_NAME[dtype]}"
    base = folder / f"{family}_{scale}_seed0_base.safetensors"
    tuned = folder / f"{family}_{scale}_seed0_tuned.safetensors"
    stamp = folder / "complete.json"
    want = {"family": family, "scale": scale, "seed": 0, "dtype": DTYPE_NAME[dtype]}
    if stamp.is_file() and base.is_file() and tuned.is_file():
        info = json.loads(stamp.read_text())
        if (info.get("pair") == want and info.get("sizes") ==
                [base.stat().st_size, tuned.stat().st_size]):
            return str(base), str(tuned)
    folder.mkdir(parents=True, exist_ok=True)
    stamp.unlink(missing_ok=True)
    print(f"making the {family} {scale} pair ({DTYPE_NAME[dtype]}) in {folder} ...", flush=True)
    t0 = time.perf_counter()
    b, t = fixtures.make_pair(folder, family, scale, seed=0, base_dtype=dtype, tuned_dtype=dtype)
    stamp.write_text(json.dumps({"pair": want, "sizes": [os.path.getsize(b), os.path.getsize(t)]}))
    print(f"  made in {time.perf_counter() - t0:.0f} s", flush=True)
    return b, t


# ---------------------------------------------------------------------------------------------
# Running one tool in its own process


@dataclass
class Run:
    tool: str
    label: str
    wall_s: float = None
    peak_rss_mb: float = None
    out_mb: float = None
    rc: int = None
    note: str = ""
    outputs: list = field(default_factory=list)
    parts: list = field(default_factory=list)   # (label, wall, rss) of multi-process rows


def mem_available_mb():
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def default_limit_mb():
    """The watchdog's RSS limit: what the machine has free now, less 1.5 GB (a missing row is
    better than the OOM killer on a shared machine)."""
    avail = mem_available_mb()
    return max(avail - 1536, 2048) if avail else None


def _rss_mb(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def run_child(cmd, log_path, limit_mb, timeout_s):
    """Run cmd; returns (rc, wall s, peak RSS MiB from wait4, why killed or '').

    A watchdog kills the child (and its group) if its resident set passes limit_mb (the machine
    is shared: better a missing row than the OOM killer) or it runs past timeout_s."""
    with open(log_path, "w") as log:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        killed = ""
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            rss = _rss_mb(proc.pid)
            if limit_mb and rss > limit_mb and not killed:
                killed = (f"killed: RSS {rss / 1024:.1f} GiB passed the "
                          f"{limit_mb / 1024:.1f} GiB limit")
            elif timeout_s and time.perf_counter() - t0 > timeout_s and not killed:
                killed = f"killed: ran past {timeout_s:.0f} s"
            if killed:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                pid, status, usage = os.wait4(proc.pid, 0)
                break
            time.sleep(0.2)
        wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, wall, usage.ru_maxrss / 1024.0, killed


def warm_page_cache(paths, chunk=64 << 20):
    """Read the input files once, untimed, so that every tool starts from the page cache: the
    first tool of a run would otherwise pay for the disk alone (SD1.5: 48 s cold against 37 s
    warm for ours)."""
    buf = bytearray(chunk)
    for path in paths:
        with open(path, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass


def tail(path, n=15):
    try:
        return "".join(Path(path).read_text(errors="replace").splitlines(True)[-n:])
    except OSError:
        return ""


def tool_commands(tool, base, tuned, out_dir, family, scale):
    """[(part label, command, output file)] for a tool; several parts = several processes."""
    py = sys.executable
    me = str(Path(__file__).resolve())
    o = lambda name: str(out_dir / name)  # noqa: E731
    if tool.startswith("ours"):
        out, rule = {"ours": ("ours_e05.safetensors", ["--energy", str(ENERGY)]),
                     "ours-exact": ("ours_e05_exact.safetensors",
                                    ["--energy", str(ENERGY), "--exact-ranks"]),
                     "ours-r64": ("ours_r64.safetensors", ["--rank", str(PEER_RANK)]),
                     "ours-r64-exact": ("ours_r64_exact.safetensors",
                                        ["--rank", str(PEER_RANK), "--exact-ranks"])}[tool]
        return [("", [py, "-m", "deltasvd", "compress", base, tuned, "-o", o(out), *rule],
                 o(out))]
    if tool == "baseline":
        return [("", [py, str(BENCH / "baseline_fullsvd.py"), base, tuned, "-o",
                      o("baseline_e05.safetensors"), "--energy", str(ENERGY)],
                 o("baseline_e05.safetensors"))]
    if tool == "lowrank":
        return [("", [py, str(BENCH / "baseline_fullsvd.py"), base, tuned, "-o",
                      o("lowrank_r64.safetensors"), "--rank", str(PEER_RANK),
                      "--lowrank-iters", str(LOWRANK_ITERS)], o("lowrank_r64.safetensors"))]
    if tool == "comfy":
        # UNet and text encoder in two processes: in one, the UNet's patched model and its
        # backup are still resident when LoraSave SVDs the 49408 x 768 token embedding with
        # full_matrices=True (a 49408^2 float32 U, 9.8 GB): more than this machine has.
        return [(part, [py, me, "--worker", "comfy", "--part", part, "--family", family,
                        "--scale", scale, base, tuned, o(f"comfy_{part}_r64.safetensors")],
                 o(f"comfy_{part}_r64.safetensors")) for part in ("unet", "te")]
    if tool == "lycoris":
        return [("", [py, me, "--worker", "lycoris", "--family", family, "--scale", scale, base,
                      tuned, o("lycoris_r64.safetensors")], o("lycoris_r64.safetensors"))]
    raise ValueError(tool)


LABELS = {"ours": f"deltasvd --energy {ENERGY}",
          "ours-exact": f"deltasvd --energy {ENERGY} --exact-ranks",
          "lowrank": f"torch.svd_lowrank rank {PEER_RANK}, niter {LOWRANK_ITERS}",
          "ours-r64": f"deltasvd --rank {PEER_RANK}",
          "ours-r64-exact": f"deltasvd --rank {PEER_RANK} --exact-ranks",
          "comfy": f"ComfyUI LoraSave rank {PEER_RANK}",
          "lycoris": f"LyCORIS extract_diff rank {PEER_RANK}",
          "baseline": f"full fp32 SVD --energy {ENERGY}"}


def run_tool(tool, base, tuned, out_dir, family, scale, args):
    run = Run(tool, LABELS[tool])
    why = unavailable(tool)
    if why:
        run.note = f"not run: {why}"
        return run
    run.wall_s, run.peak_rss_mb, run.out_mb = 0.0, 0.0, 0.0
    for part, cmd, out in tool_commands(tool, base, tuned, out_dir, family, scale):
        Path(out).unlink(missing_ok=True)
        limit = args.mem_limit_gb * 1024 if args.mem_limit_gb else default_limit_mb()
        log = out_dir / f"{tool}{'_' + part if part else ''}.log"
        lim = f" [RSS limit {limit / 1024:.1f} GiB]" if limit else ""
        print(f"  {tool}{' (' + part + ')' if part else ''}: {' '.join(cmd[1:4])} ...{lim}",
              flush=True)
        warm_page_cache((base, tuned))
        rc, wall, rss, killed = run_child(cmd, log, limit, args.timeout)
        print(f"    rc {rc}, {wall:.1f} s, peak RSS {rss:.0f} MiB {killed}", flush=True)
        run.parts.append((part, round(wall, 2), round(rss)))
        run.wall_s += wall
        run.peak_rss_mb = max(run.peak_rss_mb, rss)
        if rc != 0 or killed or not os.path.isfile(out):
            run.rc = rc
            run.note = killed or f"failed (rc {rc}), see {log}:\n{tail(log)}"
            run.outputs = []
            return run
        run.out_mb += os.path.getsize(out) / 2**20
        run.outputs.append(out)
    run.rc = 0
    if len(run.parts) > 1:
        run.note = "; ".join(f"{p}: {w:.1f} s, {r:.0f} MiB" for p, w, r in run.parts)
    return run


def unavailable(tool):
    """Why a peer cannot run here ('' if it can)."""
    if tool in ("comfy", "lycoris"):
        sys.path.insert(0, str(REPO / "tests"))
        import comfy_env
        try:
            comfy_env.comfy_dir()
        except RuntimeError as e:
            return str(e)
    if tool == "lycoris":
        import importlib.util
        if importlib.util.find_spec("lycoris") is None:
            return ("lycoris-lora is not installed (pip install --no-deps lycoris-lora einops "
                    "toml)")
    return ""


# ---------------------------------------------------------------------------------------------
# Peers as workers (run in their own process by run_tool)


def comfy_load(path, family, scale, unet=True, clip=True):
    """ComfyUI's model patcher and CLIP for a checkpoint, weights in float32.

    Full-size pairs go through comfy.sd.load_checkpoint_guess_config itself. A small pair holds
    only part of the model, from which ComfyUI's detection cannot tell the architecture, so its
    steps are replayed with the config detected from the full key set of the family; the
    returned `present` sets name the ComfyUI keys the file really has (None at full size)."""
    sys.path.insert(0, str(REPO / "tests"))
    import comfy_env
    comfy_env.import_comfy()
    import comfy.model_detection
    import comfy.model_patcher
    import comfy.sd
    import comfy.utils
    fp32 = torch.float32
    if scale == "full":
        model, clip_, _, _ = comfy.sd.load_checkpoint_guess_config(
            path, output_vae=False, output_clip=clip, output_model=unet,
            model_options={"dtype": fp32}, te_model_options={"dtype": fp32})
        return model, clip_, None
    import logging
    logging.disable(logging.WARNING)  # the small file's many "unet missing" keys
    sd = comfy.utils.load_torch_file(path)
    probe = {k: torch.empty(shape, device="meta") for k, shape, _ in fixtures.load_spec(family)
             if k.startswith(UNET)}
    config = comfy.model_detection.model_config_from_unet(probe, UNET)
    config.set_inference_dtype(fp32, None)
    cpu = torch.device("cpu")
    present = {"unet": {"diffusion_model." + k[len(UNET):] for k in sd if k.startswith(UNET)}}
    model = clip_ = None
    if unet:
        model = config.get_model(sd, UNET, device=cpu)
        model.load_model_weights(sd, UNET)
        model = comfy.model_patcher.ModelPatcher(model, load_device=cpu, offload_device=cpu)
    if clip:
        clip_sd = config.process_clip_state_dict(dict(sd))
        present["te"] = set(clip_sd)
        clip_ = comfy.sd.CLIP(config.clip_target(state_dict=sd), tokenizer_data=clip_sd,
                              parameters=comfy.utils.calculate_parameters(clip_sd),
                              model_options={"dtype": fp32})
        clip_.load_sd(clip_sd, full_model=True)
    logging.disable(logging.NOTSET)
    return model, clip_, present


def _restrict(patcher, keys):
    """Small pairs only: keep a patcher's patches and state dict to the keys the file has (the
    rest of ComfyUI's full-size model is uninitialised memory)."""
    patcher.patches = {k: v for k, v in patcher.patches.items() if k in keys}
    whole = patcher.model_state_dict

    def model_state_dict(filter_prefix=None):
        return {k: v for k, v in whole(filter_prefix).items() if k in keys}
    patcher.model_state_dict = model_state_dict


def worker_comfy(args):
    """ComfyUI's own path: CheckpointLoader (fp32) x 2, ModelMergeSubtract / CLIPMergeSubtract
    (tuned - base, multiplier 1), LoraSave (standard, rank 64, bias_diff on): the node classes
    driven as a library."""
    unet, te = args.part == "unet", args.part == "te"
    base_m, base_c, present = comfy_load(args.base, args.family, args.scale, unet, te)
    tuned_m, tuned_c, _ = comfy_load(args.tuned, args.family, args.scale, unet, te)
    import folder_paths
    from comfy_extras.nodes_lora_extract import LoraSave
    from comfy_extras.nodes_model_merging import CLIPSubtract, ModelSubtract
    model_diff = ModelSubtract().merge(tuned_m, base_m, 1.0)[0] if unet else None
    te_diff = CLIPSubtract().merge(tuned_c, base_c, 1.0)[0] if te else None
    if present is not None:
        if unet:
            _restrict(model_diff, present["unet"])
        if te:
            _restrict(te_diff.patcher, present["te"])
    out = Path(args.out).resolve()
    folder = Path(tempfile.mkdtemp(prefix="comfy_out_", dir=out.parent))
    try:
        folder_paths.set_output_directory(str(folder))
        LoraSave.execute(filename_prefix="bench", rank=args.rank, lora_type="standard",
                         bias_diff=True, model_diff=model_diff, text_encoder_diff=te_diff)
        made = sorted(folder.rglob("*.safetensors"))
        if len(made) != 1:
            raise RuntimeError(f"LoraSave wrote {made}")
        os.replace(made[0], out)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _pruned(root, names):
    """A module tree holding only root's submodules `names`, at the same paths."""
    tree = torch.nn.Module()
    for name in sorted(names):
        *parents, leaf = name.split(".")
        node = tree
        for p in parents:
            if not hasattr(node, p):
                node.add_module(p, torch.nn.Module())
            node = getattr(node, p)
        node.add_module(leaf, root.get_submodule(name))
    return tree


def worker_lycoris(args):
    """LyCORIS' extractor (lycoris.utils.extract_diff, as its tools/extract_locon.py calls it,
    mode fixed, linear and conv dim 64, --disable_cp) on torch modules: the pip package has no
    checkpoint loader (extract_locon.py imports kohya's), so the modules are ComfyUI's model
    classes loaded with the checkpoints (LDM UNet paths and HF CLIP paths: kohya names)."""
    from lycoris.utils import extract_diff
    from safetensors.torch import save_file
    base_m, base_c, present = comfy_load(args.base, args.family, args.scale)
    tuned_m, tuned_c, _ = comfy_load(args.tuned, args.family, args.scale)
    clips = FAMILIES[args.family]["clips"]

    def modules(m, c):
        unet = m.model.diffusion_model
        tes = [getattr(c.cond_stage_model, name).transformer for name in clips]
        if present is None:
            return unet, tes
        keys = present["unet"]
        unet = _pruned(unet, {k[len("diffusion_model."):].rsplit(".", 1)[0] for k in keys
                              if k.endswith(".weight")})
        pruned = []
        for name, te in zip(clips, tes):
            head = name + ".transformer."
            pruned.append(_pruned(te, {k[len(head):].rsplit(".", 1)[0] for k in present["te"]
                                       if k.startswith(head) and k.endswith(".weight")}))
        return unet, pruned

    base_unet, base_tes = modules(base_m, base_c)
    db_unet, db_tes = modules(tuned_m, tuned_c)
    sd = extract_diff(base_tes, db_tes, base_unet, db_unet, mode="fixed",
                      linear_mode_param=args.rank, conv_mode_param=args.rank,
                      extract_device="cpu", use_bias=False, small_conv=False)
    tmp = args.out + ".tmp"
    save_file(sd, tmp)
    os.replace(tmp, args.out)


# ---------------------------------------------------------------------------------------------
# Reading the tools' files back


def lookup_table(shapes, family):
    """LoRA module name (kohya form) -> (layer id (key, rows), transposed)."""
    table = {}
    for key, shape in shapes.items():
        if len(shape) < 2:
            continue
        for t in families.family(FAMILIES[family]["lora"]).targets(key, shape, shapes) or ():
            if t.param == "weight":
                table[t.module] = ((key, t.rows), False)
        if key in TEXT_PROJECTION:
            table[TEXT_PROJECTION[key]] = ((key, None), True)
    # text embeddings: ComfyUI's LoraSave extracts them too (fine-tunes rarely change them)
    for key, name in EMBEDDINGS[family].items():
        if key in shapes:
            table[name] = ((key, None), False)
    return table


def kohya_name(module, family):
    """ComfyUI's LoraSave names (diffusion_model.* / text_encoders.clip_x.transformer.*) in
    kohya form; kohya names unchanged."""
    if module.startswith("diffusion_model."):
        return "lora_unet_" + module[len("diffusion_model."):].replace(".", "_")
    if module.startswith("text_encoders."):
        enc, _, path = module[len("text_encoders."):].partition(".")
        prefix = TE_PREFIX[family].get(enc)
        if prefix and path.startswith("transformer."):
            return prefix + path[len("transformer."):].replace(".", "_")
    return module


SUFFIXES = (".lora_up.weight", ".lora_down.weight", ".lora_mid.weight", ".alpha", ".diff_b",
            ".diff", ".w_norm", ".b_norm", ".bias_indices", ".bias_values", ".bias_size",
            ".lora_up", ".lora_down")


def _split(name):
    for suf in SUFFIXES:
        if name.endswith(suf):
            return name[: -len(suf)], suf.replace(".weight", "")
    return None, None


class LoraOutput:
    """A LoRA file (any of the tools) as {layer id: float64 delta matrix}, lazily."""

    def __init__(self, paths, table, family, keys):
        from safetensors import safe_open
        self.layers, self.unmapped, self.unsupported = {}, [], []
        self._files = []
        for path in paths:
            f = safe_open(path, "pt")
            self._files.append(f)
            modules = {}
            for name in f.keys():
                mod, part = _split(name)
                if mod is not None:
                    modules.setdefault(mod, {})[part] = (f.get_tensor, name,
                                                         len(f.get_slice(name).get_shape()))
            self._add(modules, lambda m: table.get(kohya_name(m, family)))
            meta = f.metadata() or {}
            if "deltasvd.extras" in meta:   # ours: deltas no stock loader maps, applied by us
                import safetensors.torch
                blob = safetensors.torch.load(zlib.decompress(base64.b64decode(
                    meta["deltasvd.extras"])))
                modules = {}
                for name, tensor in blob.items():
                    mod, part = _split(name)
                    if mod is not None:
                        modules.setdefault(mod, {})[part] = (lambda _n, t=tensor: t, name,
                                                             tensor.ndim)
                self._add(modules, lambda m: self._extra_id(m, keys))

    @staticmethod
    def _extra_id(module, keys):
        key, rows = module, None
        if module.endswith("]") and "[" in module:
            key, _, r = module[:-1].rpartition("[")
            rows = tuple(int(x) for x in r.split(":"))
        return ((key, rows), False) if key in keys else None

    def _add(self, modules, resolve):
        for mod, parts in modules.items():
            if ".lora_up" not in parts and (".diff" not in parts or parts[".diff"][2] < 2):
                continue                     # bias / norm only
            hit = resolve(mod)
            if hit is None:
                self.unmapped.append(mod)
            elif ".lora_mid" in parts:
                self.unsupported.append(mod)  # Tucker (LyCORIS CP): not with --disable_cp
            else:
                self.layers[hit[0]] = (parts, hit[1])

    def rank(self, lid):
        parts, _ = self.layers[lid]
        if ".lora_up" not in parts:
            return None
        get, name, _ = parts[".lora_down"]
        return int(get(name).shape[0])

    def matrix(self, lid):
        """float64 (rows x cols) delta the file applies to layer `lid` (None if not stored)."""
        if lid not in self.layers:
            return None
        parts, transposed = self.layers[lid]
        load = lambda p: parts[p][0](parts[p][1]).double()  # noqa: E731
        if ".lora_up" in parts:
            up, down = load(".lora_up"), load(".lora_down")
            r = down.shape[0]
            m = up.reshape(up.shape[0], r) @ down.reshape(r, -1)
            if ".alpha" in parts:
                m *= float(load(".alpha").reshape(-1)[0]) / r
        else:
            d = load(".diff")
            m = d.reshape(d.shape[0], -1)
        return m.T if transposed else m


def our_records(path):
    """{layer id: record} of a deltasvd file's matrix layers (svd or dense weights)."""
    from deltasvd.delta_file import read_delta
    delta = read_delta(path)
    return {(r.key, tuple(r.rows) if r.rows else None): r
            for r in delta.records if r.kind in ("svd", "dense") and r.param == "weight"}


# ---------------------------------------------------------------------------------------------
# Measuring



def svdvals64(m):
    """float64 singular values of a float64 matrix. A long-and-thin one is first reduced to the
    R of its Householder QR (same singular values, backward-stable: agrees with svdvals of the
    matrix itself to ~1e-15 of s_max; LAPACK's gesdd without vectors on a 1280 x 11520 matrix
    was ~10x slower here)."""
    a = m if m.shape[0] >= m.shape[1] else m.T
    if a.shape[0] > 1.2 * a.shape[1]:
        a = torch.linalg.qr(a, mode="r")[1]
    return torch.linalg.svdvals(a).numpy()


def evaluate(base, tuned, family, runs, rank_tools, rank_every):
    """Per run: mean / max relative error over the changed matrix layers (missing = 1.0), how
    many layers the file stores, and for `rank_tools` how many checked layers (every
    `rank_every`-th) have the rank the energy rule gives on float64 svdvals of the float64
    delta. One pass over the pair, one tensor at a time."""
    from safetensors import safe_open
    fb, ft = safe_open(base, "pt"), safe_open(tuned, "pt")
    shapes = {k: tuple(fb.get_slice(k).get_shape()) for k in fb.keys()}
    table = lookup_table(shapes, family)
    done = [r for r in runs if r.outputs]
    outputs = {r.tool: LoraOutput(r.outputs, table, family, shapes) for r in done}
    recs = {r.tool: our_records(r.outputs[0]) for r in done
            if r.tool in rank_tools and r.tool.startswith("ours")}
    checked = {t: [0, 0, 0] for t in rank_tools if t in outputs}
    rule = RankRule("energy", ENERGY)
    errs = {t: [] for t in outputs}
    ranks = {t: [] for t in recs}
    n_layers, t0 = 0, time.perf_counter()
    for key in sorted(shapes):
        if not key.startswith(PREFIXES) or len(shapes[key]) < 2:
            continue
        b, t = fb.get_tensor(key), ft.get_tensor(key)
        if not b.is_floating_point() or torch.equal(b, t):
            continue
        delta = (t.double() - b.double()).reshape(b.shape[0], -1)
        tg = families.family(FAMILIES[family]["lora"]).targets(key, shapes[key], shapes)
        for rows in ([x.rows for x in tg if x.param == "weight"] if tg else [None]):
            lid = (key, rows)
            m = delta[rows[0]: rows[1]] if rows else delta
            norm = float(m.norm())
            for tool in recs:
                rec = recs[tool].get(lid)
                ranks[tool].append(rec.rank if rec else None)
            for tool, out in outputs.items():
                got = out.matrix(lid)
                if got is None:
                    errs[tool].append(None)
                    continue
                if got.shape != m.shape:
                    raise RuntimeError(f"{tool}: {key} {rows}: shape {tuple(got.shape)} != "
                                       f"{tuple(m.shape)} (name mapping bug)")
                errs[tool].append(float((m - got).norm()) / norm if norm else 0.0)
            if checked and n_layers % rank_every == 0:
                s = svdvals64(m)
                d, k = m.shape
                t64 = rule.clamp(rule.raw_rank(s), min(d, k))
                for tool in checked:
                    if tool in recs:
                        rec = recs[tool].get(lid)
                        rank = rec.rank if rec else None
                        ok = rank == t64 and (rec.kind == "dense") == is_dense(t64, d, k)
                    else:
                        rank = outputs[tool].rank(lid) if lid in outputs[tool].layers else None
                        ok = rank == t64
                    checked[tool][0] += bool(ok)
                    checked[tool][1] += 1
                    checked[tool][2] += rank is not None and abs(rank - t64) <= 1
            n_layers += 1
    result = {}
    for tool, e in errs.items():
        vals = [1.0 if x is None else x for x in e]
        result[tool] = {"mean_rel_err": float(np.mean(vals)) if vals else None,
                        "max_rel_err": float(np.max(vals)) if vals else None,
                        "stored": sum(x is not None for x in e),
                        "unmapped": outputs[tool].unmapped,
                        "unsupported": outputs[tool].unsupported, "layer_errs": e}
    for tool, r in ranks.items():
        result[tool]["layer_ranks"] = r
    for tool, (ok, n, near) in checked.items():
        result[tool]["ranks_match"] = [ok, n]
        result[tool]["ranks_within_1"] = [near, n]
    return result, n_layers, time.perf_counter() - t0


# ---------------------------------------------------------------------------------------------
# Re-targeting a file from its stored spectra (no checkpoints)


def threshold_check(path, n=20):
    """Ranks, file size and error estimate for n new thresholds (<= the file's), from the
    stored spectra; and the real `resize` (a new Delta in memory) plus its exact file size."""
    from deltasvd.api import host_meta_fn
    from deltasvd.delta_file import STORAGE_DTYPES, file_size, read_delta
    from deltasvd.resize import new_rank, resize
    t0 = time.perf_counter()
    delta = read_delta(path)
    t_read = time.perf_counter() - t0
    esize = STORAGE_DTYPES[delta.info.get("dtype", "fp16")].itemsize
    coded = [(r, delta.spectra[i][1]) for i, r in enumerate(delta.records)
             if r.n and i in delta.spectra]

    def cost(rec, t, kind):
        d, k = rec.matrix_shape
        return d * k * esize if kind == "dense" else t * (d + k) * esize

    fixed = os.path.getsize(path) - sum(cost(r, r.rank, r.kind) for r, _ in coded)
    norm2 = sum(r.norm2 for r, _ in coded)

    def estimate(value):
        rule = RankRule("energy", float(value))
        size, err2 = fixed, 0.0
        for rec, head in coded:
            t = new_rank(rule, rec, head)
            d, k = rec.matrix_shape
            if rec.kind == "svd":
                size += cost(rec, t, "svd")
                err2 += rec.err2 + float(np.sum(np.square(head[t: rec.rank])))
            elif is_dense(t, d, k):
                size += cost(rec, t, "dense")
                err2 += rec.err2
            else:
                size += cost(rec, t, "svd")
                err2 += max(rec.sum_s2 - float(np.sum(np.square(head[:t]))), 0.0)
        return size, (err2 / norm2) ** 0.5 if norm2 else 0.0

    thresholds = np.linspace(ENERGY / n, ENERGY, n)
    t_est, t_resize, rows = [], [], []
    for value in thresholds:
        t0 = time.perf_counter()
        size, err = estimate(value)
        t_est.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        cut = resize(delta, RankRule("energy", float(value)))
        exact = file_size(cut, host_meta_fn(cut, "bench"))
        t_resize.append(time.perf_counter() - t0)
        rows.append((float(value), size, exact, err))
    return {"read_s": t_read, "thresholds": n, "layers": len(coded),
            "estimate_median_s": statistics.median(t_est),
            "resize_median_s": statistics.median(t_resize),
            "size_estimate_max_diff_kb": max(abs(s - e) for _, s, e, _ in rows) / 1024,
            "rows": rows}


# ---------------------------------------------------------------------------------------------
# Scaling: Gram route vs torch.linalg.svd per SD1.5 layer shape


def sd15_shapes():
    """{(d, k): number of layers} of SD1.5's UNet + text-encoder matrices (Conv as out x
    in*kh*kw; token / position embeddings left out)."""
    counts = {}
    for key, shape, _ in fixtures.load_spec("sd15"):
        if key.startswith(PREFIXES) and len(shape) >= 2 and "embedding" not in key:
            dk = (shape[0], int(np.prod(shape[1:])))
            counts[dk] = counts.get(dk, 0) + 1
    return counts


def scaling_table(repeats=3, max_shapes=None):
    from deltasvd.spectrum import factors, gram_spectrum
    rule = RankRule("energy", ENERGY)
    counts = sd15_shapes()
    order = sorted(counts, key=lambda s: (s[0] * s[1] * min(s), s))
    if max_shapes:
        order = order[:max_shapes]
    g = torch.Generator().manual_seed(0)
    rows = []
    for d, k in order:
        m = torch.randn(d, k, generator=g)

        def gram_route():
            dec = gram_spectrum(m)
            t = rule.clamp(rule.raw_rank(dec.s), min(d, k))
            if not is_dense(t, d, k):
                factors(dec, m, t)

        def svd_route():
            u, s, vh = torch.linalg.svd(m, full_matrices=False)
            t = rule.clamp(rule.raw_rank(s.double().numpy()), min(d, k))
            if not is_dense(t, d, k):
                (u[:, :t] * s[:t]).contiguous(), vh[:t].contiguous()

        times = {}
        for name, fn in (("gram", gram_route), ("svd", svd_route)):
            fn()  # warm-up (allocations, BLAS threads)
            ts = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                fn()
                ts.append(time.perf_counter() - t0)
            times[name] = statistics.median(ts)
        work = d * k * min(d, k)
        rows.append({"d": d, "k": k, "layers": counts[(d, k)], "dk_min": work,
                     "gram_ms": times["gram"] * 1e3, "svd_ms": times["svd"] * 1e3})
        print(f"  {d} x {k}: gram {times['gram'] * 1e3:.1f} ms, svd {times['svd'] * 1e3:.1f} ms",
              flush=True)
    return rows


def format_scaling(rows, repeats):
    lines = [f"Per-layer time, SD1.5 matrix shapes (random float32, energy {ENERGY} rank; median "
             f"of {repeats}; torch {torch.__version__}, {torch.get_num_threads()} threads)", "",
             "| d x k | layers | d*k*min(d,k) | Gram route ms | torch.linalg.svd ms | svd / Gram "
             "| Gram ns per d*k*min | svd ns per d*k*min |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['d']} x {r['k']} | {r['layers']} | {r['dk_min'] / 1e9:.3f} G | "
                     f"{r['gram_ms']:.1f} | {r['svd_ms']:.1f} | {r['svd_ms'] / r['gram_ms']:.1f} | "
                     f"{r['gram_ms'] * 1e6 / r['dk_min']:.2f} | "
                     f"{r['svd_ms'] * 1e6 / r['dk_min']:.2f} |")
    tg = sum(r["gram_ms"] * r["layers"] for r in rows) / 1e3
    ts = sum(r["svd_ms"] * r["layers"] for r in rows) / 1e3
    lines += ["", f"Summed over the {sum(r['layers'] for r in rows)} layers with these shapes: "
              f"Gram route {tg:.1f} s, torch.linalg.svd {ts:.1f} s ({ts / tg:.1f}x)."]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# The table


def _fraction(pair):
    return f"{pair[0]}/{pair[1]}" if pair else "n/a"


def _against_comfy(by):
    """ComfyUI's extraction as its node runs it (the UNet) and with the text encoder, each
    against our --energy row of this run."""
    ours, comfy = by.get("ours"), by.get("comfy")
    if not (ours and comfy and ours.rc == 0 and comfy.rc == 0 and ours.wall_s):
        return []
    parts = {p: w for p, w, _ in comfy.parts}
    unet = parts.get("unet")
    return ["", f"ComfyUI's LoraSave path against deltasvd --energy {ENERGY} (UNet + text "
            f"encoder, {ours.wall_s:.1f} s) in this run: UNet only, as its node extracts, "
            f"{unet:.1f} s = **{unet / ours.wall_s:.1f}x**; UNet + text encoder "
            f"{comfy.wall_s:.1f} s = **{comfy.wall_s / ours.wall_s:.1f}x**."] if unet else []


def _float32_tolerance(ev):
    """The default float32 route against --exact-ranks, layer by layer: rank agreement and,
    where the ranks agree, how far each layer's error moved."""
    fast, exact = ev.get("ours", {}), ev.get("ours-exact", {})
    if not (fast.get("layer_errs") and exact.get("layer_errs")):
        return []
    moved = [abs(a - b) / b for a, b, ra, rb in zip(fast["layer_errs"], exact["layer_errs"],
                                                    fast["layer_ranks"], exact["layer_ranks"])
             if a is not None and b and ra == rb]
    return ["", f"float32 route (default) against --exact-ranks: ranks = float64 rule on "
            f"{_fraction(fast.get('ranks_match'))} layers, within 1 on "
            f"{_fraction(fast.get('ranks_within_1'))}; per-layer error moved by at most "
            f"{max(moved):.1e} relative where the ranks agree (tolerance 1e-3)."] if moved else []


def _sketch_against_truncation(ev):
    """--rank's randomized SVD against the exact truncation (--exact-ranks), layer by layer."""
    fast, exact = ev.get("ours-r64", {}), ev.get("ours-r64-exact", {})
    if not (fast.get("layer_errs") and exact.get("layer_errs")):
        return []
    excess = [a / b - 1 for a, b in zip(fast["layer_errs"], exact["layer_errs"])
              if a is not None and b]
    if not excess:
        return []
    return ["", f"--rank {PEER_RANK}'s randomized SVD against the exact truncation "
            f"(--exact-ranks), per layer: error higher by a median {np.median(excess):.1e}, "
            f"at most {max(excess):.1e} relative ({len(excess)} layers)."]


def format_main(runs, ev, n_layers, family, scale, thr):
    by = {r.tool: r for r in runs}
    lines = [f"{family} {scale} pair: {n_layers} changed UNet + text-encoder matrix layers; "
             f"{os.cpu_count()} cores, torch {torch.__version__}", "",
             "| tool | wall s | peak RSS MiB | output MiB | mean rel. error | ranks = float64 rule "
             "| ranks within 1 | time / ours | layers stored | notes |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    notes = []
    for r in runs:
        e = ev.get(r.tool, {})
        ref = by.get("ours-r64" if r.tool in ("ours-r64", "ours-r64-exact", "comfy", "lycoris",
                                              "lowrank")
                     else "ours")
        ratio = (f"{r.wall_s / ref.wall_s:.1f}x" if r.rc == 0 and ref and ref.rc == 0 and
                 ref.wall_s else "")
        rm = e.get("ranks_match")
        note = r.note.splitlines()[0] if r.note else ""
        if e.get("unmapped"):
            note += (f"{'; ' if note else ''}{len(e['unmapped'])} modules the bench cannot map "
                     f"(e.g. {e['unmapped'][0]})")
        if e.get("unsupported"):
            note += f"{'; ' if note else ''}{len(e['unsupported'])} Tucker modules not read"
        if r.note and "\n" in r.note:
            notes.append(f"{r.tool}: {r.note}")
        fmt = lambda v, f: "" if v is None else format(v, f)  # noqa: E731
        lines.append(
            f"| {r.label} | {fmt(r.wall_s, '.1f')} | {fmt(r.peak_rss_mb, '.0f')} | "
            f"{fmt(r.out_mb, '.1f')} | {fmt(e.get('mean_rel_err'), '.4f')} | "
            f"{_fraction(rm)} | {_fraction(e.get('ranks_within_1'))} | "
            f"{ratio} | "
            f"{e.get('stored', '')}{'/' + str(n_layers) if e else ''} | {note} |")
    lines += ["", "time / ours: against deltasvd with the same rule (--energy rows against "
              f"--energy {ENERGY}, rank-{PEER_RANK} rows against --rank {PEER_RANK})."]
    lines += _against_comfy(by) + _float32_tolerance(ev) + _sketch_against_truncation(ev)
    if thr:
        lines += ["", f"Re-targeting the --energy {ENERGY} file without the checkpoints "
                  f"({thr['layers']} layers, {thr['thresholds']} thresholds "
                  f"{thr['rows'][0][0]:.3f}..{thr['rows'][-1][0]:.3f}): read once "
                  f"{thr['read_s']:.2f} s; ranks + size + error estimate per threshold, median "
                  f"{thr['estimate_median_s'] * 1e3:.1f} ms; full resize (new Delta) + exact "
                  f"size, median {thr['resize_median_s'] * 1e3:.1f} ms; estimated vs exact "
                  f"size within {thr['size_estimate_max_diff_kb']:.1f} KB."]
    if notes:
        lines += [""] + notes
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description="deltasvd vs ComfyUI / LyCORIS / plain SVD")
    p.add_argument("--family", choices=sorted(FAMILIES), default="sd15")
    p.add_argument("--scale", choices=fixtures.SCALES, default="full")
    p.add_argument("--data", default=str(BENCH / "data"), help="fixture cache folder")
    p.add_argument("--out", default=None, help="outputs (default bench/out/<family>_<scale>)")
    p.add_argument("--tools", default=",".join(ALL_TOOLS),
                   help=f"comma-separated subset of {','.join(ALL_TOOLS)}")
    p.add_argument("--rank-every", type=int, default=1,
                   help="check the float64 rank rule on every N-th layer (1 = all)")
    p.add_argument("--eval-threads", type=int, default=1,
                   help="torch threads of the evaluation (1: steady on a shared machine)")
    p.add_argument("--mem-limit-gb", type=float, default=None,
                   help="kill a tool whose RSS passes this (default: MemAvailable - 1.5 GB)")
    p.add_argument("--timeout", type=float, default=None, help="seconds per tool process")
    p.add_argument("--eval-only", action="store_true",
                   help="do not run the tools: measure the files of the last run again")
    p.add_argument("--scaling", action="store_true",
                   help="only the scaling table (Gram route vs torch.linalg.svd per shape)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None,
                   help="scaling: torch threads (default torch's own, one per core)")
    p.add_argument("--max-shapes", type=int, default=None, help="scaling: first N shapes only")
    # worker mode (internal): one peer in this process
    p.add_argument("--worker", choices=("comfy", "lycoris"), help=argparse.SUPPRESS)
    p.add_argument("--part", choices=("unet", "te"), help=argparse.SUPPRESS)
    p.add_argument("--rank", type=int, default=PEER_RANK, help=argparse.SUPPRESS)
    p.add_argument("paths", nargs="*", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.worker:
        args.base, args.tuned, args.out = args.paths
        {"comfy": worker_comfy, "lycoris": worker_lycoris}[args.worker](args)
        return 0

    if args.scaling:
        if args.threads:
            torch.set_num_threads(args.threads)
        load0 = os.getloadavg()[0]
        print(f"scaling: {len(sd15_shapes())} distinct SD1.5 shapes, load average {load0:.2f}",
              flush=True)
        rows = scaling_table(args.repeats, args.max_shapes)
        text = format_scaling(rows, args.repeats) + (
            f"\nLoad average (1 min) {load0:.2f} at the start, {os.getloadavg()[0]:.2f} at "
            f"the end, on {os.cpu_count()} cores.")
        out = Path(args.out or BENCH / "out")
        out.mkdir(parents=True, exist_ok=True)
        (out / "scaling.md").write_text(text + "\n")
        (out / "scaling.json").write_text(json.dumps(rows, indent=1))
        print("\n" + text)
        return 0

    tools = [t.strip() for t in args.tools.split(",") if t.strip()]
    bad = set(tools) - set(ALL_TOOLS)
    if bad:
        p.error(f"unknown tools {sorted(bad)}")
    out_dir = Path(args.out or BENCH / "out" / f"{args.family}_{args.scale}")
    out_dir.mkdir(parents=True, exist_ok=True)
    load0 = os.getloadavg()[0]
    print(f"load average {load0:.2f}, MemAvailable "
          f"{(mem_available_mb() or 0) / 1024:.1f} GiB", flush=True)
    base, tuned = ensure_pair(args.data, args.family, args.scale)
    if args.eval_only:   # measure the files of the last run again (its times and RSS kept)
        old = json.loads((out_dir / "results.json").read_text())["runs"]
        runs = [Run(**{**r, "parts": [tuple(x) for x in r["parts"]]}) for r in old
                if r["tool"] in tools]
    else:
        runs = []
        for tool in tools:
            runs.append(run_tool(tool, base, tuned, out_dir, args.family, args.scale, args))
            if runs[-1].note.startswith("not run"):
                print(f"  {tool}: {runs[-1].note}", flush=True)
    print("evaluating against float64 deltas ...", flush=True)
    torch.set_num_threads(args.eval_threads)
    rank_tools = [t for t in ("ours", "ours-exact", "baseline") if t in tools]
    ev, n_layers, t_eval = evaluate(base, tuned, args.family, runs, rank_tools, args.rank_every)
    print(f"  {t_eval:.0f} s", flush=True)
    ours = next((r for r in runs if r.tool == "ours" and r.rc == 0), None)
    thr = threshold_check(ours.outputs[0]) if ours else None
    text = format_main(runs, ev, n_layers, args.family, args.scale, thr)
    if not args.eval_only:
        text += (f"\n\nLoad average (1 min) {load0:.2f} when the tools started, "
                 f"{os.getloadavg()[0]:.2f} at the end, on {os.cpu_count()} cores.")
    (out_dir / "table.md").write_text(text + "\n")
    (out_dir / "results.json").write_text(json.dumps(
        {"family": args.family, "scale": args.scale, "layers": n_layers,
         "runs": [asdict(r) for r in runs], "eval": ev, "threshold_check": thr}, indent=1))
    print("\n" + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
