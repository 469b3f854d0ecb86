"""Self-tests of the A1111 1.10 Lora-loading emulator (tests/a1111_rules.py) on hand-made cases."""

import pytest

try:
    from tests import a1111_rules as ar
except ImportError:  # tests/ not importable as a package
    import a1111_rules as ar


# ---------------------------------------------------------------- small made-up checkpoints

def _linear(prefix, out, inp, bias=True):
    d = {prefix + ".weight": (out, inp)}
    if bias:
        d[prefix + ".bias"] = (out,)
    return d


def _norm(prefix, c):
    return {prefix + ".weight": (c,), prefix + ".bias": (c,)}


def _sd1_keys():
    u = "model.diffusion_model."
    t = "cond_stage_model.transformer.text_model."
    keys = {
        u + "input_blocks.1.1.proj_in.weight": (320, 320, 1, 1),
        u + "input_blocks.1.1.proj_in.bias": (320,),
        u + "input_blocks.1.0.in_layers.2.weight": (320, 320, 3, 3),
        u + "input_blocks.1.0.in_layers.2.bias": (320,),
        u + "input_blocks.3.0.op.weight": (320, 320, 3, 3),
        u + "output_blocks.2.1.conv.weight": (1280, 1280, 3, 3),
        u + "middle_block.0.in_layers.2.weight": (1280, 1280, 3, 3),
        u + "time_embed.0.weight": (1280, 320),
        u + "input_blocks.0.0.weight": (320, 4, 3, 3),
        t + "embeddings.token_embedding.weight": (49408, 768),
        t + "embeddings.position_ids": (1, 77),
        "cond_stage_model.transformer.text_model.final_layer_norm.weight": (768,),
    }
    keys.update(_norm(u + "input_blocks.1.0.in_layers.0", 320))
    keys.update(_norm(u + "input_blocks.1.1.norm", 320))
    keys.update(_norm(u + "input_blocks.1.1.transformer_blocks.0.norm1", 320))
    keys.update(_linear(u + "input_blocks.1.0.emb_layers.1", 320, 1280))
    for p in ("to_q", "to_k", "to_v"):
        keys.update(_linear(u + f"input_blocks.1.1.transformer_blocks.0.attn1.{p}", 320, 320, False))
    keys.update(_linear(u + "input_blocks.1.1.transformer_blocks.0.attn1.to_out.0", 320, 320))
    for p in ("q_proj", "k_proj", "v_proj", "out_proj"):
        keys.update(_linear(t + f"encoder.layers.0.self_attn.{p}", 768, 768))
    keys.update(_linear(t + "encoder.layers.0.mlp.fc1", 3072, 768))
    keys.update(_norm(t + "encoder.layers.0.layer_norm1", 768))
    return keys


def _sd2_keys():
    c = "cond_stage_model.model."
    r = c + "transformer.resblocks.0."
    keys = {
        r + "attn.in_proj_weight": (3072, 1024),
        r + "attn.in_proj_bias": (3072,),
        c + "token_embedding.weight": (49408, 1024),
        c + "positional_embedding": (77, 1024),
        c + "text_projection": (1024, 1024),
        "model.diffusion_model.input_blocks.1.1.proj_in.weight": (320, 320),
    }
    keys.update(_linear(r + "attn.out_proj", 1024, 1024))
    keys.update(_linear(r + "mlp.c_fc", 4096, 1024))
    keys.update(_linear(r + "mlp.c_proj", 1024, 4096))
    keys.update(_norm(r + "ln_1", 1024))
    keys.update(_norm(c + "ln_final", 1024))
    return keys


def _sdxl_keys():
    e0 = "conditioner.embedders.0.transformer.text_model.encoder.layers.0."
    e1 = "conditioner.embedders.1.model.transformer.resblocks.0."
    u = "model.diffusion_model."
    keys = {
        e1 + "attn.in_proj_weight": (3840, 1280),
        e1 + "attn.in_proj_bias": (3840,),
        u + "input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight": (640, 640),
        u + "input_blocks.4.1.proj_in.weight": (640, 640),
    }
    for p in ("q_proj", "k_proj", "v_proj", "out_proj"):
        keys.update(_linear(e0 + f"self_attn.{p}", 768, 768))
    keys.update(_linear(e1 + "attn.out_proj", 1280, 1280))
    keys.update(_linear(e1 + "mlp.c_fc", 5120, 1280))
    keys.update(_norm(e1 + "ln_1", 1280))
    return keys


@pytest.fixture(scope="module")
def sd1():
    return ar.layer_mapping_from_checkpoint(_sd1_keys(), "sd1")


@pytest.fixture(scope="module")
def sd2():
    return ar.layer_mapping_from_checkpoint(_sd2_keys(), "sd2")


@pytest.fixture(scope="module")
def sdxl():
    return ar.layer_mapping_from_checkpoint(_sdxl_keys(), "sdxl")


def lora(name, out, inp, rank=4, conv_kernel=None, alpha=True):
    """kohya-style lora_up/lora_down(/alpha) keys for one module."""
    if conv_kernel is None:
        d = {f"{name}.lora_down.weight": (rank, inp), f"{name}.lora_up.weight": (out, rank)}
    else:
        d = {f"{name}.lora_down.weight": (rank, inp, *conv_kernel),
             f"{name}.lora_up.weight": (out, rank, 1, 1)}
    if alpha:
        d[f"{name}.alpha"] = ()
    return d


# ---------------------------------------------------------------- the mapping

def test_mapping_records(sd1, sd2, sdxl):
    r = sd1["diffusion_model_input_blocks_1_1_proj_in"]
    assert (r.kind, r.shape, r.has_bias, r.torch_type) == ("conv", (320, 320, 1, 1), True, "Conv2d")
    r = sd1["transformer_text_model_encoder_layers_0_self_attn_q_proj"]
    assert (r.kind, r.shape) == ("linear", (768, 768))
    assert sd1["diffusion_model_input_blocks_1_0_in_layers_0"].torch_type == "GroupNorm"
    assert sd1["diffusion_model_input_blocks_1_1_norm"].torch_type == "GroupNorm"
    r = sd1["diffusion_model_input_blocks_1_1_transformer_blocks_0_norm1"]
    assert (r.kind, r.torch_type, r.forward_patched) == ("norm", "LayerNorm", True)
    assert sd1["transformer_text_model_final_layer_norm"].kind == "norm"
    assert sd1["transformer_text_model_embeddings_token_embedding"].torch_type == "Embedding"
    # containers from named_modules()
    assert sd1["diffusion_model_input_blocks_1_1"].kind == "other"
    assert sd1["diffusion_model_input_blocks_1_1"].shape is None
    assert "transformer_text_model_encoder_layers" in sd1

    mha = sd2["model_transformer_resblocks_0_attn"]
    assert (mha.kind, mha.shape, mha.has_bias) == ("mha", (3072, 1024), True)
    assert mha.lora_shape == (1024, 1024)
    assert sd2["model_transformer_resblocks_0_attn_out_proj"].torch_type == \
        "NonDynamicallyQuantizableLinear"
    assert sd2["model_transformer_resblocks_0_mlp_c_fc"].shape == (4096, 1024)
    ln = sd2["model_transformer_resblocks_0_ln_1"]
    assert (ln.kind, ln.torch_type, ln.forward_patched) == ("norm", "open_clip.LayerNorm", False)
    assert sd2["diffusion_model_input_blocks_1_1_proj_in"].kind == "linear"

    assert sdxl["0_transformer_text_model_encoder_layers_0_self_attn_q_proj"].shape == (768, 768)
    assert sdxl["1_model_transformer_resblocks_0_attn"].shape == (3840, 1280)
    assert sdxl["1_model_transformer_resblocks_0_attn"].lora_shape == (1280, 1280)
    assert "transformer_text_model_encoder_layers_0_self_attn_q_proj" not in sdxl


def test_is_sd2(sd1, sd2, sdxl):
    assert ar.mapping_is_sd2(sd2)
    assert not ar.mapping_is_sd2(sd1)
    assert not ar.mapping_is_sd2(sdxl)  # SDXL's open_clip names carry the "1_" prefix


def test_unknown_family():
    with pytest.raises(ValueError):
        ar.layer_mapping_from_checkpoint({}, "flux")


# ---------------------------------------------------------------- name conversion

@pytest.mark.parametrize("src, sd2, want", [
    ("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q", False,
     "diffusion_model_input_blocks_1_1_transformer_blocks_0_attn1_to_q"),
    ("lora_unet_down_blocks_1_resnets_1_conv1", False, "diffusion_model_input_blocks_5_0_in_layers_2"),
    ("lora_unet_down_blocks_0_resnets_0_time_emb_proj", False,
     "diffusion_model_input_blocks_1_0_emb_layers_1"),
    ("lora_unet_mid_block_resnets_1_conv_shortcut", False, "diffusion_model_middle_block_2_skip_connection"),
    ("lora_unet_mid_block_attentions_0_proj_out", False, "diffusion_model_middle_block_1_proj_out"),
    ("lora_unet_up_blocks_1_attentions_2_proj_in", False, "diffusion_model_output_blocks_5_1_proj_in"),
    ("lora_unet_down_blocks_2_downsamplers_0_conv", False, "diffusion_model_input_blocks_9_0_op"),
    ("lora_unet_up_blocks_0_upsamplers_0_conv", False, "diffusion_model_output_blocks_2_1_conv"),
    ("lora_unet_up_blocks_2_upsamplers_0_conv", False, "diffusion_model_output_blocks_8_2_conv"),
    ("lora_unet_conv_in", False, "diffusion_model_input_blocks_0_0"),
    ("lora_unet_conv_out", False, "diffusion_model_out_2"),
    ("lora_unet_time_embedding_linear_2", False, "diffusion_model_time_embed_2"),
    ("lora_te_text_model_encoder_layers_3_self_attn_q_proj", False,
     "transformer_text_model_encoder_layers_3_self_attn_q_proj"),
    ("lora_te_text_model_encoder_layers_3_self_attn_q_proj", True,
     "model_transformer_resblocks_3_attn_q_proj"),
    ("lora_te_text_model_encoder_layers_0_mlp_fc1", True, "model_transformer_resblocks_0_mlp_c_fc"),
    ("lora_te_text_model_encoder_layers_0_mlp_fc2", True, "model_transformer_resblocks_0_mlp_c_proj"),
    ("lora_te2_text_model_encoder_layers_0_self_attn_out_proj", False,
     "1_model_transformer_resblocks_0_attn_out_proj"),
    ("lora_te2_text_model_encoder_layers_5_mlp_fc1", False, "1_model_transformer_resblocks_5_mlp_c_fc"),
    ("lora_unet_input_blocks_1_1_proj_in", False, "lora_unet_input_blocks_1_1_proj_in"),  # no rule
])
def test_convert_diffusers_name_to_compvis(src, sd2, want):
    assert ar.convert_diffusers_name_to_compvis(src, sd2) == want


# ---------------------------------------------------------------- resolution

def test_resolve_kohya_sd15(sd1):
    key, rec = ar.resolve_key("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",
                              sd1, False)
    assert key == rec.name == "diffusion_model_input_blocks_1_1_transformer_blocks_0_attn1_to_q"
    key, rec = ar.resolve_key("lora_te_text_model_encoder_layers_0_self_attn_q_proj", sd1, False)
    assert key == rec.name == "transformer_text_model_encoder_layers_0_self_attn_q_proj"


def test_resolve_ldm_style(sd1, sdxl):
    key, rec = ar.resolve_key("lora_unet_input_blocks_1_1_proj_in", sd1, False)
    assert key == "diffusion_model_input_blocks_1_1_proj_in" and rec.kind == "conv"
    key, rec = ar.resolve_key("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q", sdxl)
    assert key == "diffusion_model_input_blocks_4_1_transformer_blocks_0_attn1_to_q"
    assert rec is not None


def test_resolve_sdxl_te2_q_proj_to_mha(sdxl):
    key, rec = ar.resolve_key("lora_te2_text_model_encoder_layers_0_self_attn_q_proj", sdxl, False)
    assert key == "1_model_transformer_resblocks_0_attn_q_proj"  # sd_key keeps the suffix
    assert rec.name == "1_model_transformer_resblocks_0_attn" and rec.kind == "mha"
    key, rec = ar.resolve_key("lora_te2_text_model_encoder_layers_0_self_attn_out_proj", sdxl)
    assert key == rec.name == "1_model_transformer_resblocks_0_attn_out_proj"


def test_resolve_sdxl_te1(sdxl):
    key, rec = ar.resolve_key("lora_te1_text_model_encoder_layers_0_self_attn_q_proj", sdxl, False)
    assert key == rec.name == "0_transformer_text_model_encoder_layers_0_self_attn_q_proj"
    # plain lora_te_ names do not exist on SDXL
    key, rec = ar.resolve_key("lora_te_text_model_encoder_layers_0_self_attn_q_proj", sdxl, False)
    assert rec is None


def test_resolve_te1_on_sd1(sd1):
    # "some SD1 LoRAs also have correct compvis keys": second te1 fallback
    key, rec = ar.resolve_key("lora_te1_text_model_encoder_layers_0_self_attn_k_proj", sd1, False)
    assert key == rec.name == "transformer_text_model_encoder_layers_0_self_attn_k_proj"


def test_resolve_sd2_mlp(sd2):
    key, rec = ar.resolve_key("lora_te_text_model_encoder_layers_0_mlp_fc1", sd2, True)
    assert key == rec.name == "model_transformer_resblocks_0_mlp_c_fc"
    key, rec = ar.resolve_key("lora_te_text_model_encoder_layers_0_self_attn_v_proj", sd2)
    assert key == "model_transformer_resblocks_0_attn_v_proj"
    assert rec.name == "model_transformer_resblocks_0_attn"


def test_resolve_unknown(sd1):
    key, rec = ar.resolve_key("lora_unet_nonexistent_block", sd1, False)
    assert rec is None and key == "diffusion_model_nonexistent_block"


# ---------------------------------------------------------------- whole files

def test_kohya_sd15_file_is_clean(sd1):
    t = {}
    t.update(lora("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q", 320, 320))
    t.update(lora("lora_te_text_model_encoder_layers_0_self_attn_q_proj", 768, 768))
    t.update(lora("lora_te_text_model_encoder_layers_0_mlp_fc1", 3072, 768))
    t.update(lora("lora_unet_input_blocks_1_1_proj_in", 320, 320, conv_kernel=(1, 1)))
    t.update(lora("lora_unet_down_blocks_0_resnets_0_conv1", 320, 320, conv_kernel=(3, 3)))
    rep = ar.check_lora_file(t, sd1, False)
    assert rep.clean, rep.as_dict()
    assert rep.modules["diffusion_model_input_blocks_1_0_in_layers_2"]["type"] == "lora"
    assert len(rep.modules) == 5


def test_ldm_style_2d_lora_on_1x1_conv(sd1):
    rep = ar.check_lora_file(lora("lora_unet_input_blocks_1_1_proj_in", 320, 320), sd1)
    assert rep.clean, rep.as_dict()


def test_sdxl_te2_mha(sdxl):
    base = "lora_te2_text_model_encoder_layers_0_self_attn_"
    full = {}
    for p in ("q_proj", "k_proj", "v_proj", "out_proj"):
        full.update(lora(base + p, 1280, 1280))
    rep = ar.check_lora_file(full, sdxl)
    assert rep.clean, rep.as_dict()
    assert rep.modules["1_model_transformer_resblocks_0_attn_q_proj"]["module"] == \
        "1_model_transformer_resblocks_0_attn"

    partial = {k: v for k, v in full.items() if "out_proj" not in k}
    rep = ar.check_lora_file(partial, sdxl)
    assert rep.loads
    assert rep.incomplete_mha == {"1_model_transformer_resblocks_0_attn": {
        "present": ["_q_proj", "_k_proj", "_v_proj"], "missing": ["_out_proj"]}}

    only_out = lora(base + "out_proj", 1280, 1280)
    rep = ar.check_lora_file(only_out, sdxl)
    assert rep.incomplete_mha["1_model_transformer_resblocks_0_attn"]["present"] == ["_out_proj"]


def test_mha_qkv_shape_is_a_chunk(sdxl):
    t = lora("lora_te2_text_model_encoder_layers_0_self_attn_q_proj", 3840, 1280)
    rep = ar.check_lora_file(t, sdxl)
    assert "1_model_transformer_resblocks_0_attn_q_proj" in rep.shape_errors


def test_mha_qkv_diff_b_ignored_out_proj_diff_b_used(sd2):
    base = "lora_te_text_model_encoder_layers_0_self_attn_"
    t = {}
    for p in ("q_proj", "k_proj", "v_proj", "out_proj"):
        t[f"{base}{p}.diff"] = (1024, 1024)
        t[f"{base}{p}.diff_b"] = (1024,)
    rep = ar.check_lora_file(t, sd2)
    assert rep.loads and not rep.incomplete_mha and not rep.shape_errors
    assert rep.ignored_parts == {f"model_transformer_resblocks_0_attn_{p}": ["diff_b"]
                                 for p in ("q_proj", "k_proj", "v_proj")}


def test_lone_diff_b_rejected(sd1):
    rep = ar.check_lora_file({"lora_unet_input_blocks_1_1_proj_in.diff_b": (320,)}, sd1)
    assert rep.rejected == {"diffusion_model_input_blocks_1_1_proj_in": ["diff_b"]}
    assert not rep.loads


def test_w_norm_without_b_norm_rejected(sd1):
    rep = ar.check_lora_file({"lora_unet_input_blocks_1_1_norm.w_norm": (320,)}, sd1)
    assert "diffusion_model_input_blocks_1_1_norm" in rep.rejected
    assert not rep.loads


def test_norm_module_applied_on_torch_norms(sd1):
    t = {}
    for m in ("lora_unet_input_blocks_1_1_norm", "lora_unet_input_blocks_1_0_in_layers_0",
              "lora_unet_input_blocks_1_1_transformer_blocks_0_norm1"):
        t[m + ".w_norm"] = (320,)
        t[m + ".b_norm"] = (320,)
    rep = ar.check_lora_file(t, sd1)
    assert rep.clean, rep.as_dict()
    assert {v["type"] for v in rep.modules.values()} == {"norm"}


def test_norm_module_on_open_clip_layernorm_not_applied(sd2):
    rep = ar.check_lora_file({"lora_te_text_model_encoder_layers_0_ln_1.w_norm": (1024,),
                              "lora_te_text_model_encoder_layers_0_ln_1.b_norm": (1024,)}, sd2)
    assert rep.loads
    assert "model_transformer_resblocks_0_ln_1" in rep.not_applied


def test_unknown_key_unmatched(sd1):
    t = lora("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q", 320, 320)
    t["lora_unet_totally_unknown.lora_up.weight"] = (8, 4)
    t["something_else"] = (3,)
    rep = ar.check_lora_file(t, sd1)
    assert set(rep.unmatched) == {"lora_unet_totally_unknown.lora_up.weight", "something_else"}
    assert rep.loads  # unmatched keys are only logged


def test_diff_b_beside_lora_ignored(sd1):
    t = lora("lora_unet_input_blocks_1_1_proj_in", 320, 320)
    t["lora_unet_input_blocks_1_1_proj_in.diff_b"] = (320,)
    rep = ar.check_lora_file(t, sd1)
    assert rep.loads
    assert rep.ignored_parts == {"diffusion_model_input_blocks_1_1_proj_in": ["diff_b"]}


def test_full_diff_with_diff_b(sd1):
    t = {"lora_unet_input_blocks_1_1_proj_in.diff": (320, 320, 1, 1),
         "lora_unet_input_blocks_1_1_proj_in.diff_b": (320,)}
    rep = ar.check_lora_file(t, sd1)
    assert rep.clean, rep.as_dict()
    # same numel, other layout: A1111 reshapes -> warning only
    rep = ar.check_lora_file({"lora_unet_input_blocks_1_1_proj_in.diff": (320, 320)}, sd1)
    assert rep.loads and not rep.shape_errors and rep.warnings


def test_alpha_beside_diff_has_no_effect(sd1):
    rep = ar.check_lora_file({"lora_unet_input_blocks_1_1_proj_in.diff": (320, 320, 1, 1),
                              "lora_unet_input_blocks_1_1_proj_in.alpha": ()}, sd1)
    assert rep.ignored_parts == {"diffusion_model_input_blocks_1_1_proj_in": ["alpha"]}


def test_shape_errors(sd1):
    t = lora("lora_te_text_model_encoder_layers_0_self_attn_q_proj", 320, 768)  # wrong out
    t.update({"lora_unet_input_blocks_1_1_proj_in.diff": (320, 640, 1, 1)})
    t.update({"lora_unet_input_blocks_1_1_norm.w_norm": (640,),
              "lora_unet_input_blocks_1_1_norm.b_norm": (320,)})
    t.update(lora("lora_te_text_model_encoder_layers_0_mlp_fc1", 3072, 768))
    t["lora_te_text_model_encoder_layers_0_mlp_fc1.alpha"] = (2,)  # not a scalar
    rep = ar.check_lora_file(t, sd1)
    assert set(rep.shape_errors) == {
        "transformer_text_model_encoder_layers_0_self_attn_q_proj",
        "diffusion_model_input_blocks_1_1_proj_in",
        "diffusion_model_input_blocks_1_1_norm",
        "transformer_text_model_encoder_layers_0_mlp_fc1",
    }
    assert "transformer_text_model_encoder_layers_0_mlp_fc1" in rep.load_errors  # .item() raises


def test_rank_mismatch(sd1):
    t = {"lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": (768, 8),
         "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": (4, 768)}
    rep = ar.check_lora_file(t, sd1)
    assert "transformer_text_model_encoder_layers_0_self_attn_q_proj" in rep.shape_errors


def test_conv_kernels(sd1):
    name = "lora_unet_input_blocks_1_0_in_layers_2"
    key = "diffusion_model_input_blocks_1_0_in_layers_2"
    # 1x1 LoRA on a 3x3 conv: A1111 broadcasts the delta
    rep = ar.check_lora_file(lora(name, 320, 320, conv_kernel=(1, 1)), sd1)
    assert rep.loads and key in rep.shape_errors
    # down with a wrong kernel cannot even be reshaped while loading
    rep = ar.check_lora_file(lora(name, 320, 320, conv_kernel=(5, 5)), sd1)
    assert key in rep.load_errors
    # up must be 1x1
    t = lora(name, 320, 320, conv_kernel=(3, 3))
    t[name + ".lora_up.weight"] = (320, 4, 3, 3)
    rep = ar.check_lora_file(t, sd1)
    assert key in rep.load_errors


def test_lora_on_norm_or_embedding_fails_to_load(sd1):
    rep = ar.check_lora_file(lora("lora_unet_input_blocks_1_1_norm", 320, 320), sd1)
    assert "diffusion_model_input_blocks_1_1_norm" in rep.load_errors and not rep.loads
    rep = ar.check_lora_file(
        lora("lora_te1_text_model_embeddings_token_embedding", 49408, 768), sd1)
    assert "transformer_text_model_embeddings_token_embedding" in rep.load_errors


def test_module_on_container_fails_to_load(sd1):
    rep = ar.check_lora_file({"lora_unet_input_blocks_1_1.diff": (320,)}, sd1)
    assert "diffusion_model_input_blocks_1_1" in rep.load_errors


def test_direct_mha_module_not_applied(sd2):
    rep = ar.check_lora_file({"lora_te_text_model_encoder_layers_0_self_attn.diff": (1024, 1024)},
                             sd2)
    # "..._self_attn" -> "model_transformer_resblocks_0_attn", the MHA itself
    assert "model_transformer_resblocks_0_attn" in rep.not_applied


def test_lora_a_b_accepted_alpha_dropped(sd1):
    n = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
    t = {f"{n}.lora_A.weight": (4, 768), f"{n}.lora_B.weight": (768, 4), f"{n}.alpha": ()}
    rep = ar.check_lora_file(t, sd1)
    key = "transformer_text_model_encoder_layers_0_self_attn_q_proj"
    assert rep.modules[key]["type"] == "lora" and not rep.shape_errors
    assert rep.ignored_parts == {key: ["alpha"]}


def test_other_types_by_required_keys():
    assert ar.accepting_type({"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"}) == "hada"
    assert ar.accepting_type({"weight", "on_input"}) == "ia3"
    assert ar.accepting_type({"lokr_w1", "lokr_w2_a", "lokr_w2_b"}) == "lokr"
    assert ar.accepting_type({"lokr_w1", "lokr_w2_a"}) is None
    assert ar.accepting_type({"a1.weight", "a2.weight", "b1.weight", "b2.weight", "alpha"}) == "glora"
    assert ar.accepting_type({"a1.weight", "a2.weight", "b1.weight", "b2.weight"}) is None
    assert ar.accepting_type({"oft_diag"}) == "oft"
    assert ar.accepting_type({"diff", "lora_up.weight", "lora_down.weight"}) == "lora"  # order
    assert ar.accepting_type({"w_norm", "b_norm"}) == "norm"
    assert ar.accepting_type({"alpha"}) is None


def test_bundle_emb_not_unmatched(sd1):
    t = lora("lora_te_text_model_encoder_layers_0_self_attn_q_proj", 768, 768)
    t["bundle_emb.mytoken.string_to_param.*"] = (2, 768)
    rep = ar.check_lora_file(t, sd1)
    assert rep.bundle_embeddings == ["mytoken"] and not rep.unmatched


def test_duplicate_names_merge(sd1):
    # diffusers-style and LDM-style names of the same module land in one A1111 module
    t = {"lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": (320, 4),
         "lora_unet_input_blocks_1_1_proj_in.lora_down.weight": (4, 320)}
    rep = ar.check_lora_file(t, sd1)
    assert rep.modules["diffusion_model_input_blocks_1_1_proj_in"]["type"] == "lora"
    assert rep.clean


def test_read_safetensors_shapes(tmp_path):
    import json
    import struct
    header = {"a.lora_up.weight": {"dtype": "F16", "shape": [4, 2], "data_offsets": [0, 16]},
              "__metadata__": {"x": "y"}}
    raw = json.dumps(header).encode()
    p = tmp_path / "x.safetensors"
    p.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * 16)
    assert ar.read_safetensors_shapes(p) == {"a.lora_up.weight": (4, 2)}
