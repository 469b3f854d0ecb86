"""The UNet, SD's in miniature: ResBlocks (GroupNorm, SiLU, 3x3 convs, the time embedding
added in between, a 1x1 skip conv when the width changes), spatial transformers (1x1 conv in,
self-attention, cross-attention to the text, feed-forward, 1x1 conv out), strided-conv
downsampling, nearest + conv upsampling, and skip connections by concatenation."""

import math

import torch
from torch import nn

from .text_encoder import Attention, FeedForward


def timestep_embedding(t, dim):
    """Sinusoidal embedding of timesteps t (B,) in [0, 1000), as in DDPM / SD."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1)


def norm(ch):
    return nn.GroupNorm(8, ch)


class ResBlock(nn.Module):
    def __init__(self, cin, cout, tdim):
        super().__init__()
        self.norm1 = norm(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.time_proj = nn.Linear(tdim, cout)
        self.norm2 = norm(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x, temb):
        h = self.conv1(nn.functional.silu(self.norm1(x)))
        h = h + self.time_proj(temb)[:, :, None, None]
        h = self.conv2(nn.functional.silu(self.norm2(h)))
        return self.skip(x) + h


class SpatialTransformer(nn.Module):
    def __init__(self, ch, context_dim, heads=4):
        super().__init__()
        self.norm = norm(ch)
        self.proj_in = nn.Conv2d(ch, ch, 1)
        self.norm1 = nn.LayerNorm(ch)
        self.attn1 = Attention(ch, heads)
        self.norm2 = nn.LayerNorm(ch)
        self.attn2 = Attention(ch, heads, context_dim)
        self.norm3 = nn.LayerNorm(ch)
        self.ff = FeedForward(ch)
        self.proj_out = nn.Conv2d(ch, ch, 1)

    def forward(self, x, context):
        b, c, hgt, wid = x.shape
        h = self.proj_in(self.norm(x)).flatten(2).transpose(1, 2)
        h = h + self.attn1(self.norm1(h))
        h = h + self.attn2(self.norm2(h), context)
        h = h + self.ff(self.norm3(h))
        return x + self.proj_out(h.transpose(1, 2).reshape(b, c, hgt, wid))


class Level(nn.Module):
    """One resolution of one side of the UNet: a ResBlock and, if asked, a transformer."""

    def __init__(self, cin, cout, tdim, context_dim, attention):
        super().__init__()
        self.res = ResBlock(cin, cout, tdim)
        self.attn = SpatialTransformer(cout, context_dim) if attention else None

    def forward(self, x, temb, context):
        x = self.res(x, temb)
        return self.attn(x, context) if self.attn is not None else x


class UNet(nn.Module):
    def __init__(self, widths=(32, 64, 96), attention=(False, True, True), context_dim=64):
        super().__init__()
        self.tdim = widths[0] * 4
        self.time_embed = nn.Sequential(nn.Linear(widths[0], self.tdim), nn.SiLU(),
                                        nn.Linear(self.tdim, self.tdim))
        self.conv_in = nn.Conv2d(3, widths[0], 3, padding=1)
        args = (self.tdim, context_dim)
        ins = (widths[0],) + widths[:-1]
        self.down = nn.ModuleList(Level(i, o, *args, a) for i, o, a in zip(ins, widths, attention))
        self.downsample = nn.ModuleList(nn.Conv2d(w, w, 3, stride=2, padding=1)
                                        for w in widths[:-1])
        top = widths[-1]
        self.mid1 = Level(top, top, *args, True)
        self.mid2 = ResBlock(top, top, self.tdim)
        outs = widths[::-1]
        prev = (top,) + outs[:-1]
        self.up = nn.ModuleList(Level(p + o, o, *args, a)
                                for p, o, a in zip(prev, outs, attention[::-1]))
        self.upsample = nn.ModuleList(nn.Conv2d(w, w, 3, padding=1) for w in outs[:-1])
        self.norm_out = norm(widths[0])
        self.conv_out = nn.Conv2d(widths[0], 3, 3, padding=1)

    def forward(self, x, t, context):
        temb = self.time_embed(timestep_embedding(t, self.time_embed[0].in_features))
        h, skips = self.conv_in(x), []
        for i, level in enumerate(self.down):
            h = level(h, temb, context)
            skips.append(h)
            if i < len(self.downsample):
                h = self.downsample[i](h)
        h = self.mid2(self.mid1(h, temb, context), temb)
        for i, level in enumerate(self.up):
            h = level(torch.cat([h, skips.pop()], dim=1), temb, context)
            if i < len(self.upsample):
                h = self.upsample[i](nn.functional.interpolate(h, scale_factor=2.0))
        return self.conv_out(nn.functional.silu(self.norm_out(h)))
