"""deltasvd: data-free compression of fine-tuned Stable Diffusion checkpoints into
LoRA-compatible delta files (Delta-SVD, arXiv 2508.16863). Imports only torch, safetensors
and numpy; never a host (ComfyUI, A1111)."""

__version__ = "0.1.0"
