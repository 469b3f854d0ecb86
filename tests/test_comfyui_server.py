"""The node pack in a real ComfyUI 0.3.75 server, driven the way the frontend drives it.

One server (`main.py --cpu --fp16-unet`, so models are held in fp16 like on a GPU) on
127.0.0.1 with a temporary base directory: models/checkpoints holds a generated full SD1.5
fp16 pair (tests/comfy_pair.py), models/loras starts empty, custom_nodes holds this repository
(symlinked, as a user's git clone would be) and a test-only probe node (tests/comfy_probe) that
writes weights as ComfyUI computes them when it loads a model. Workflows are the example API
workflows (example_workflows/api) with the test's names, posted to /prompt and read back from
/history:

* compress two loaded checkpoints, save, load, apply; the applied weights equal base + A B
  within fp16 rounding; the stock LoraLoader applying the same file gives the same weights; a
  KSampler step at 64x64 runs on the applied model; the A/B workflow runs;
* Cancel during a compress stops it and leaves no file;
* bad inputs (an SDXL delta on SD1.5, a corrupt file, a filename with '..', the same model as
  fine-tune and base): a node error each, nothing written;
* Save onto an existing file with overwrite off: refused by /prompt, before anything runs.
Plus `main.py --quick-test-for-ci` with the pack, and what the frontend fetches (node
definitions, the extension's JS, node docs, workflow templates and their thumbnails).
tests/test_comfyui_frontend_browser.py drives the same server from the real frontend.
"""

import asyncio
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from urllib.parse import quote

import pytest
import torch
from safetensors import safe_open

import comfy_env
from comfy_pair import EXTRAS, FROM_FIXTURE, NUDGED
from deltasvd import fixtures
from deltasvd.api import compress_files
from deltasvd.apply import delta_for, records_by_key
from deltasvd.delta_file import read_delta
from deltasvd.ranks import RankRule

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "example_workflows" / "api"
PACK = "deltasvd"            # the folder name the repository is installed under
NODE_IDS = ["DeltaSVDCompress", "DeltaSVDCompressFiles", "DeltaSVDSave", "DeltaSVDLoad",
            "DeltaSVDApply", "DeltaSVDResize", "DeltaSVDSpectrum"]
# the templates (example_workflows/<name>.json), named as the template browser titles them
COMPRESS = "Delta-SVD compress and save"
APPLY = "Delta-SVD apply and sample"
COMPARE = "Delta-SVD A-B comparison"
UNCHANGED = "model.diffusion_model.input_blocks.4.1.proj_in.weight"
START_TIMEOUT = 180
RUN_TIMEOUT = 600


def comfy_key(ckpt_key):
    """Checkpoint key -> the key ComfyUI's SD1.5 MODEL / CLIP holds it under."""
    if ckpt_key.startswith("model."):
        return ckpt_key[len("model."):]
    assert ckpt_key.startswith("cond_stage_model.")
    return "clip_l." + ckpt_key[len("cond_stage_model."):]


# ---------------------------------------------------------------------------------------------
# A temporary ComfyUI home and one server for the module


class Env:
    pass


@pytest.fixture(scope="module")
def env(tmp_path_factory, sd15_full_pair):
    comfy_env.require_comfy()
    e = Env()
    e.root = tmp_path_factory.mktemp("comfy_home")
    e.ckpts = e.root / "models" / "checkpoints"
    e.loras = e.root / "models" / "loras"
    e.output = e.root / "output"
    custom = e.root / "custom_nodes"
    for d in (e.ckpts, e.loras, custom, e.output):
        d.mkdir(parents=True)
    e.base_file, e.tuned_file = sd15_full_pair
    e.base, e.tuned = "sd15_base.safetensors", "sd15_tuned.safetensors"
    os.symlink(e.base_file, e.ckpts / e.base)
    os.symlink(e.tuned_file, e.ckpts / e.tuned)
    os.symlink(REPO, custom / PACK, target_is_directory=True)
    shutil.copytree(REPO / "tests" / "comfy_probe", custom / "deltasvd_test_probe")
    e.args = ["--cpu", "--fp16-unet", "--base-directory", str(e.root),
              "--database-url", "sqlite:///:memory:"]
    e.environ = comfy_env.server_env()
    e.environ.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return e


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, url, proc, log):
        self.url, self.proc, self.log = url, proc, log

    def get(self, path, raw=False):
        with urllib.request.urlopen(self.url + path, timeout=60) as r:
            data = r.read()
        return data if raw else json.loads(data)

    def post(self, path, payload):
        req = urllib.request.Request(self.url + path, data=json.dumps(payload).encode(),
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                return r.status, json.loads(r.read() or b"{}")
        except urllib.error.HTTPError as err:
            return err.code, json.loads(err.read() or b"{}")

    def queue(self, workflow, client_id=None):
        status, body = self.post("/prompt", {"prompt": workflow,
                                             "client_id": client_id or uuid.uuid4().hex})
        assert status == 200, (status, json.dumps(body)[:2000])
        return body["prompt_id"]

    def wait(self, prompt_id, timeout=RUN_TIMEOUT):
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            hist = self.get(f"/history/{prompt_id}")
            if prompt_id in hist and hist[prompt_id].get("status", {}).get("completed") is not None:
                status = hist[prompt_id]["status"]
                if status.get("status_str") in ("success", "error"):
                    return hist[prompt_id]
            time.sleep(0.5)
        raise TimeoutError(f"prompt {prompt_id} did not finish in {timeout}s\n{self.tail()}")

    def run(self, workflow):
        t0 = time.monotonic()
        entry = self.wait(self.queue(workflow))
        entry["seconds"] = time.monotonic() - t0
        return entry

    def tail(self, n=60):
        return "".join(Path(self.log).read_text(errors="replace").splitlines(True)[-n:])


@pytest.fixture(scope="module")
def server(env):
    port = _free_port()
    log = env.root / "server.log"
    t0 = time.monotonic()
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "main.py", *env.args, "--listen", "127.0.0.1",
                                 "--port", str(port)], cwd=comfy_env.comfy_dir(), env=env.environ,
                                stdout=out, stderr=subprocess.STDOUT)
    srv = Server(f"http://127.0.0.1:{port}", proc, log)
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {proc.returncode}\n{srv.tail()}")
            try:
                srv.get("/system_stats")
                break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                if time.monotonic() - t0 > START_TIMEOUT:
                    raise RuntimeError(f"ComfyUI did not start in {START_TIMEOUT}s\n{srv.tail()}")
                time.sleep(0.5)
        print(f"\n[server] up in {time.monotonic() - t0:.1f}s on port {port}")
        yield srv
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def example(name, **changes):
    """An example API workflow with {node id: {input: value}} changes."""
    wf = json.loads((EXAMPLES / f"{name}.json").read_text())
    for node_id, inputs in changes.items():
        wf[node_id.lstrip("n")]["inputs"].update(inputs)
    return wf


def node_of(wf, class_type):
    ids = [k for k, v in wf.items() if v["class_type"] == class_type]
    assert len(ids) == 1, (class_type, ids)
    return ids[0]


def errors_of(entry):
    return [m[1] for m in entry["status"]["messages"] if m[0] == "execution_error"]


def assert_success(entry, server):
    assert entry["status"]["status_str"] == "success", \
        f"{json.dumps(errors_of(entry), indent=1)[:3000]}\n{server.tail()}"


def files_under(folder):
    return sorted(str(p.relative_to(folder)) for p in Path(folder).rglob("*") if p.is_file())


def written(env):
    """Every file in the models and output folders (where a node could write)."""
    return files_under(env.root / "models") + files_under(env.output)


# ---------------------------------------------------------------------------------------------
# Import and what the frontend fetches


def test_quick_test_for_ci_imports_the_pack(env):
    r = subprocess.run([sys.executable, "main.py", *env.args, "--quick-test-for-ci"],
                       cwd=comfy_env.comfy_dir(), env=env.environ, capture_output=True,
                       text=True, timeout=300)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-3000:]
    ours = [line for line in out.splitlines() if line.rstrip().endswith(f"custom_nodes/{PACK}")]
    assert ours and not any("IMPORT FAILED" in line for line in ours), out[-3000:]
    assert f"custom_nodes/{PACK} module for custom nodes" not in out   # "Cannot import ..."


def test_frontend_sees_nodes_extension_docs_and_templates(server):
    info = server.get("/object_info")
    for node_id in NODE_IDS:
        assert node_id in info, node_id
        node = info[node_id]
        assert node["display_name"].startswith("Delta-SVD") and node["description"]
        assert node["python_module"] == f"custom_nodes.{PACK}"
        for section in ("required", "optional"):
            for name, spec in node["input"].get(section, {}).items():
                assert spec[1].get("tooltip"), (node_id, name)
        doc = server.get(f"/extensions/{PACK}/docs/{node_id}.md", raw=True).decode()
        assert doc.startswith("# ") and node["display_name"] in doc
    assert info["DeltaSVDSave"]["output_node"] is True
    assert f"/extensions/{PACK}/deltasvd.js" in server.get("/extensions")
    js = server.get(f"/extensions/{PACK}/deltasvd.js", raw=True).decode()
    assert "registerExtension" in js and "DeltaSVDCompress" in js
    templates = server.get("/workflow_templates")
    assert sorted(templates[PACK]) == sorted([COMPRESS, APPLY, COMPARE])
    for name in templates[PACK]:   # the thumbnail the template browser asks for
        jpg = server.get(f"/api/workflow_templates/{PACK}/{quote(name)}.jpg", raw=True)
        assert jpg.startswith(b"\xff\xd8\xff"), name
    ui_wf = json.loads(server.get(f"/api/workflow_templates/{PACK}/{quote(COMPARE)}.json",
                                  raw=True))
    assert {n["type"] for n in ui_wf["nodes"]} >= {"DeltaSVDLoad", "DeltaSVDApply", "KSampler"}


# ---------------------------------------------------------------------------------------------
# The main path


@pytest.fixture(scope="module")
def compressed(server, env):
    """compress-and-save on the two loaded checkpoints (energy 0.5) -> loras/deltas/server."""
    wf = example(COMPRESS, n1={"ckpt_name": env.tuned},
                 n2={"ckpt_name": env.base}, n4={"filename": "deltas/server"},
                 n5={"width": 640, "height": 360})
    entry = server.run(wf)
    assert_success(entry, server)
    print(f"[server] compress-and-save {entry['seconds']:.1f}s")
    return wf, entry


def test_compress_save_shows_summary_and_lists_file(server, env, compressed):
    wf, entry = compressed
    path = env.loras / "deltas" / "server.safetensors"
    assert path.is_file()
    delta = read_delta(path)
    assert delta.family == "sd1" and delta.extras
    out = entry["outputs"]
    summary = out[node_of(wf, "DeltaSVDCompress")]
    print("[server] DeltaSVDCompress summary:\n" + summary["text"][0])
    assert "compression ratio" in summary["text"][0] and "rel.err" in summary["text"][0]
    stats = summary["deltasvd"][0]
    assert stats["ratio"] > 10 and stats["size_mb"] == pytest.approx(
        path.stat().st_size / 2**20, abs=1e-3)
    assert out[node_of(wf, "DeltaSVDSave")]["text"][0].startswith(
        "saved loras/deltas/server.safetensors")
    preview = out[node_of(wf, "PreviewImage")]["images"]
    assert len(preview) == 1
    # the stock LoraLoader lists the new file at once
    lora_names = server.get("/object_info/LoraLoader")["LoraLoader"]["input"]["required"][
        "lora_name"][0]
    assert "deltas/server.safetensors" in lora_names
    assert "deltas/server.safetensors" in server.get("/object_info/DeltaSVDLoad")[
        "DeltaSVDLoad"]["input"]["required"]["delta_name"][0]


def _probe(model, clip, keys, filename):
    return {"inputs": {"model": model, "clip": clip, "keys": "\n".join(keys),
                       "filename": filename}, "class_type": "DeltaSVDTestProbe"}


def _ulp16(x):
    """Spacing of float16 numbers at |x| (float64)."""
    a = x.abs().clamp_min(2.0 ** -14)
    return torch.exp2(torch.floor(torch.log2(a)) - 10)


def test_apply_weights_loraloader_and_sampling(server, env, compressed):
    """Load + Apply, the stock LoraLoader on the same file, the base: their weights as ComfyUI
    loads them for sampling; and a KSampler step at 64x64 on the applied model."""
    wf = example(APPLY, n1={"ckpt_name": env.base},
                 n2={"delta_name": "deltas/server.safetensors"},
                 n6={"width": 64, "height": 64}, n7={"steps": 1},
                 n9={"filename_prefix": "deltasvd_test"})
    ckpt_keys = FROM_FIXTURE + NUDGED + EXTRAS + [UNCHANGED]
    keys = [comfy_key(k) for k in ckpt_keys]
    wf["20"] = {"inputs": {"model": ["1", 0], "clip": ["1", 1],
                           "lora_name": "deltas/server.safetensors", "strength_model": 1.0,
                           "strength_clip": 1.0}, "class_type": "LoraLoader"}
    wf["21"] = _probe(["3", 0], ["3", 1], keys, "applied.safetensors")
    wf["22"] = _probe(["20", 0], ["20", 1], keys, "loraloader.safetensors")
    wf["23"] = _probe(["1", 0], ["1", 1], keys, "base.safetensors")
    entry = server.run(wf)
    assert_success(entry, server)
    print(f"[server] load-apply-sample + probes {entry['seconds']:.1f}s")

    apply_text = entry["outputs"]["3"]["text"][0]
    print("[server] DeltaSVDApply report:\n" + apply_text)
    assert "NOT APPLIED" not in apply_text and "applied 2 extras" in apply_text
    images = entry["outputs"]["9"]["images"]
    assert images and (env.output / images[0]["subfolder"] / images[0]["filename"]).is_file()

    def load(name):
        with safe_open(str(env.output / name), "pt") as f:
            return {k: f.get_tensor(k).double() for k in f.keys()}
    applied, lora, base = load("applied.safetensors"), load("loraloader.safetensors"), \
        load("base.safetensors")
    delta = read_delta(env.loras / "deltas" / "server.safetensors")
    by_key = records_by_key(delta)
    with safe_open(env.base_file, "pt") as f:
        file_base = {k: f.get_tensor(k).double() for k in ckpt_keys}
    worst = 0.0
    for ck, key in zip(ckpt_keys, keys):
        assert torch.equal(base[key], file_base[ck].reshape(base[key].shape)), key
        if ck not in by_key:
            assert ck == UNCHANGED
            assert torch.equal(applied[key], base[key]) and torch.equal(lora[key], base[key])
            continue
        target = base[key] + delta_for(delta, by_key[ck], list(base[key].shape)).double()
        err = (applied[key] - target).abs() / _ulp16(target)
        worst = max(worst, float(err.max()))
        assert float(err.max()) <= 1.0 + 1e-3, (key, float(err.max()))
        assert not torch.equal(applied[key], base[key]), key
        if ck in EXTRAS:        # LoRA loaders do not apply these; Apply does
            assert torch.equal(lora[key], base[key]), key
        else:                   # the same patches, the same rounding: the same weights
            assert torch.equal(applied[key], lora[key]), key
    print(f"[server] applied weights within {worst:.2f} fp16 ulp of base + A B")


def test_ab_workflow_samples_side_by_side(server, env, compressed):
    wf = example(COMPARE, n1={"ckpt_name": env.tuned}, n2={"ckpt_name": env.base},
                 n3={"delta_name": "deltas/server.safetensors"},
                 n9={"width": 64, "height": 64}, n10={"steps": 1}, n11={"steps": 1},
                 n15={"filename_prefix": "deltasvd_ab_test"})
    entry = server.run(wf)
    assert_success(entry, server)
    image = entry["outputs"]["15"]["images"][0]
    from PIL import Image
    with Image.open(env.output / image["subfolder"] / image["filename"]) as im:
        assert im.size == (64 + 8 + 64, 64)


# ---------------------------------------------------------------------------------------------
# Cancel


async def _run_and_cancel(url, workflow, node_id):
    import aiohttp
    client = uuid.uuid4().hex
    seen, end = [], None
    async with aiohttp.ClientSession() as session:
        async with session.ws_connect(url.replace("http", "ws") + f"/ws?clientId={client}") as ws:
            async with session.post(url + "/prompt", json={"prompt": workflow,
                                                           "client_id": client}) as r:
                assert r.status == 200, await r.text()
                prompt_id = (await r.json())["prompt_id"]
            deadline = time.monotonic() + RUN_TIMEOUT
            while time.monotonic() < deadline:
                msg = await ws.receive(timeout=deadline - time.monotonic())
                if msg.type != aiohttp.WSMsgType.TEXT:
                    continue
                data = json.loads(msg.data)
                kind, body = data.get("type"), data.get("data", {})
                if kind == "progress" and body.get("node") == node_id:
                    seen.append((body["value"], body["max"]))
                    if len(seen) == 1:
                        async with session.post(url + "/interrupt", json={}) as r:
                            assert r.status == 200
                if kind in ("execution_interrupted", "execution_success", "execution_error") \
                        and body.get("prompt_id") == prompt_id:
                    end = kind
                    break
    return prompt_id, seen, end


def test_cancel_during_compress_leaves_no_file(server, env, compressed):
    before = files_under(env.loras)
    # another threshold, so ComfyUI's cache cannot answer without running the compress
    wf = example(COMPRESS, n1={"ckpt_name": env.tuned},
                 n2={"ckpt_name": env.base}, n3={"value": 0.45},
                 n4={"filename": "deltas/cancelled"})
    t0 = time.monotonic()
    prompt_id, seen, end = asyncio.run(_run_and_cancel(server.url, wf, "3"))
    print(f"[server] cancelled after {time.monotonic() - t0:.1f}s at progress {seen[-1:]}")
    assert end == "execution_interrupted", (end, seen, server.tail())
    assert seen and seen[-1][0] < seen[-1][1], seen          # stopped before the end
    entry = server.wait(prompt_id)
    kinds = [m[0] for m in entry["status"]["messages"]]
    assert "execution_interrupted" in kinds
    assert files_under(env.loras) == before                   # no file, no leftover .part


# ---------------------------------------------------------------------------------------------
# Bad inputs through the graph


SDXL_KEYS = ["model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight",
             "model.diffusion_model.label_emb.0.0.weight"]   # what makes it SDXL


@pytest.fixture(scope="module")
def sdxl_delta(env, tmp_path_factory):
    """A real SDXL delta (SDXL key names and shapes; one changed layer, so it is quick)."""
    from conftest import fine_tune, save
    folder = tmp_path_factory.mktemp("sdxl_tiny")
    shapes = {k: s for k, s, _ in fixtures.load_spec("sdxl")}
    g = torch.Generator().manual_seed(0)
    base = {k: torch.randn(shapes[k], generator=g) * 0.02 for k in SDXL_KEYS}
    tuned = dict(base)
    tuned.update(fine_tune({SDXL_KEYS[0]: base[SDXL_KEYS[0]]}))
    out = env.loras / "sdxl_delta.safetensors"
    compress_files(save(folder / "b.safetensors", base), save(folder / "t.safetensors", tuned),
                   str(out), RankRule("rank", 4))
    assert read_delta(out).family == "sdxl"
    return out.name


def test_sdxl_delta_on_sd15_is_a_node_error(server, env, sdxl_delta, compressed):
    before = written(env)
    wf = {"1": {"inputs": {"ckpt_name": env.base}, "class_type": "CheckpointLoaderSimple"},
          "2": {"inputs": {"delta_name": sdxl_delta}, "class_type": "DeltaSVDLoad"},
          "3": {"inputs": {"model": ["1", 0], "delta": ["2", 0], "strength_model": 1.0,
                           "clip": ["1", 1], "strength_clip": 1.0},
                "class_type": "DeltaSVDApply"},
          "4": _probe(["3", 0], ["3", 1], ["diffusion_model.out.2.weight"], "never.safetensors")}
    entry = server.run(wf)
    (err,) = errors_of(entry)
    assert err["node_type"] == "DeltaSVDApply" and err["node_id"] == "3"
    assert "this delta is for Stable Diffusion XL, the model is Stable Diffusion 1.x" in \
        err["exception_message"]
    assert written(env) == before


def test_corrupt_delta_file_is_a_node_error(server, env, compressed):
    (env.loras / "corrupt.safetensors").write_bytes(b"\x20\x00\x00\x00\x00\x00\x00\x00{broken")
    before = written(env)
    wf = {"1": {"inputs": {"delta_name": "corrupt.safetensors"}, "class_type": "DeltaSVDLoad"},
          "2": {"inputs": {"delta": ["1", 0], "filename": "deltas/from_corrupt"},
                "class_type": "DeltaSVDSave"}}
    entry = server.run(wf)
    (err,) = errors_of(entry)
    assert err["node_type"] == "DeltaSVDLoad"
    assert "corrupt.safetensors" in err["exception_message"]
    assert "not a safetensors file" in err["exception_message"]
    assert written(env) == before


def test_filename_escaping_loras_is_refused(server, env, compressed):
    before = written(env)
    for bad in ("../escaped", "deltas/../../escaped", "/tmp/escaped"):
        wf = {"1": {"inputs": {"delta_name": "deltas/server.safetensors"},
                    "class_type": "DeltaSVDLoad"},
              "2": {"inputs": {"delta": ["1", 0], "filename": bad},
                    "class_type": "DeltaSVDSave"}}
        status, body = server.post("/prompt", {"prompt": wf, "client_id": "t"})
        assert status == 400, body
        errors = body["node_errors"]["2"]["errors"]
        assert errors and errors[0]["type"] == "custom_validation_failed", errors
        assert ("'..'" in errors[0]["details"]) or ("absolute" in errors[0]["details"]), errors
    assert written(env) == before
    assert not (env.root / "models" / "escaped.safetensors").exists()


def test_save_onto_existing_file_is_refused_before_the_run(server, env, compressed):
    """Overwrite off and the file there: /prompt refuses the graph (Save's VALIDATE_INPUTS),
    so the compress upstream never starts."""
    before = written(env)
    wf = example(COMPRESS, n1={"ckpt_name": env.tuned}, n2={"ckpt_name": env.base},
                 n3={"value": 0.42}, n4={"filename": "deltas/server", "overwrite": False})
    for spectrum in ("5", "6"):     # Save is the only output left
        del wf[spectrum]
    status, body = server.post("/prompt", {"prompt": wf, "client_id": "t"})
    assert status == 400 and body["error"]["type"] == "prompt_outputs_failed_validation", body
    errors = body["node_errors"]["4"]["errors"]
    assert errors[0]["type"] == "custom_validation_failed", errors
    assert ("loras/deltas/server.safetensors exists; choose another filename or enable "
            "overwrite") in errors[0]["details"], errors
    assert written(env) == before
    assert server.get("/queue")["queue_running"] == []


def test_identical_models_are_a_node_error(server, env, compressed):
    """The core's refusal of an empty delta is an ordinary node error."""
    before = written(env)
    wf = example(COMPRESS, n1={"ckpt_name": env.base}, n2={"ckpt_name": env.base},
                 n4={"filename": "deltas/never"})
    entry = server.run(wf)
    (err,) = errors_of(entry)
    assert err["node_type"] == "DeltaSVDCompress", err
    assert "nothing changed: every tensor equals the base's" in err["exception_message"], err
    assert written(env) == before
