"""A small Stable-Diffusion-like text-to-image model of the project's own, to see what
compressed deltas do to images (issue 14).

- `tokenizer`: a word-level vocabulary with reserved rows (the DreamBooth token is one);
- `scenes`: procedural training data, one shape per picture, compositional prompts;
- `text_encoder`, `unet`: the model (token embedding + transformer; ResBlocks, self- and
  cross-attention, 1x1 convs, time embedding);
- `diffusion`: the noise schedule, the v-prediction loss and the deterministic DDIM sampler;
- `weights`: the shipped base / fine-tune files in ComfyUI's all-in-one key layout;
- `train`, `dreambooth`: the seeded training loops; `png`: a picture grid without PIL.

Nothing is imported here, so `import deltasvd.t2i.scenes` costs only that module.
"""
