"""The text encoder: token embedding + learned positions + a few pre-norm transformer
layers, like CLIP's text tower in miniature. Its output (one vector per token) is what the
UNet's cross-attention reads, so every token keeps its own vector (no pooling)."""

import torch
from torch import nn

from .tokenizer import CONTEXT, VOCAB


class Attention(nn.Module):
    """Multi-head attention with separate q/k/v/out Linear layers (SD's key names), so each
    projection is its own LoRA target."""

    def __init__(self, dim, heads, context_dim=None):
        super().__init__()
        context_dim = context_dim or dim
        self.heads = heads
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(context_dim, dim, bias=False)
        self.to_v = nn.Linear(context_dim, dim, bias=False)
        self.to_out = nn.Linear(dim, dim)

    def forward(self, x, context=None):
        context = x if context is None else context
        b, n, d = x.shape
        split = lambda t: t.view(b, -1, self.heads, d // self.heads).transpose(1, 2)
        q, k, v = split(self.to_q(x)), split(self.to_k(context)), split(self.to_v(context))
        out = nn.functional.scaled_dot_product_attention(q, k, v)
        return self.to_out(out.transpose(1, 2).reshape(b, n, d))


class FeedForward(nn.Module):
    def __init__(self, dim, mult=4):
        super().__init__()
        self.fc1 = nn.Linear(dim, dim * mult)
        self.fc2 = nn.Linear(dim * mult, dim)

    def forward(self, x):
        return self.fc2(nn.functional.gelu(self.fc1(x)))


class EncoderLayer(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.ff(self.norm2(x))


class TextEncoder(nn.Module):
    def __init__(self, dim=64, layers=2, heads=4):
        super().__init__()
        self.token_embedding = nn.Embedding(len(VOCAB), dim)
        self.position_embedding = nn.Parameter(torch.zeros(CONTEXT, dim))
        self.layers = nn.ModuleList(EncoderLayer(dim, heads) for _ in range(layers))
        self.final_norm = nn.LayerNorm(dim)
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.position_embedding, std=0.01)

    def forward(self, ids):
        x = self.token_embedding(ids) + self.position_embedding
        for layer in self.layers:
            x = layer(x)
        return self.final_norm(x)
