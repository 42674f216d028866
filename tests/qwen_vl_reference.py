"""Test-only PyTorch reference of Qwen-VL's visual tower (no transformers class exists), written from
docs/architectures.md 4.2 and checked step by step against the released visual.py (docs/provenance.md): conv1
without bias, a 16x16 position table resized bicubically (fp32, align_corners=False) to the patch grid, ln_pre,
pre-LN blocks with a per-head interleaved in_proj (`view(..., heads, 3 * head_dim).split(head_dim)`), then the
resampler (nn.MultiheadAttention; queries ln_q(query) + the unresized sin-cos table, keys ln_kv(kv_proj(x)) + the
table resized to x's grid, values ln_kv(kv_proj(x))), ln_post, x @ proj. Parameter names are the checkpoint's
(under `transformer.visual.`)."""

import math

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F


def get_abs_pos(table: torch.Tensor, tokens: int) -> torch.Tensor:
    src, tgt = math.isqrt(table.shape[0]), math.isqrt(tokens)
    if src == tgt:
        return table
    grid = table.float().reshape(1, src, src, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(tgt, tgt), mode="bicubic", align_corners=False)
    return grid.permute(0, 2, 3, 1).flatten(0, 2).to(table.dtype)


def sincos_2d(width: int, grid: int) -> np.ndarray:
    """MAE's get_2d_sincos_pos_embed as Qwen-VL copies it."""
    def one_d(dim: int, pos: np.ndarray) -> np.ndarray:
        omega = np.arange(dim // 2, dtype=np.float32) / (dim / 2.0)
        out = np.einsum("m,d->md", pos.reshape(-1), 1.0 / 10000 ** omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    grid_h, grid_w = np.arange(grid, dtype=np.float32), np.arange(grid, dtype=np.float32)
    g = np.stack(np.meshgrid(grid_w, grid_h), axis=0).reshape(2, 1, grid, grid)
    return np.concatenate([one_d(width // 2, g[0]), one_d(width // 2, g[1])], axis=1)


class VisualAttention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads, self.head_dim = heads, width // heads
        self.in_proj = nn.Linear(width, 3 * width)
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        mixed = self.in_proj(x).view(b, n, self.heads, 3 * self.head_dim)
        q, k, v = (t.transpose(1, 2) for t in mixed.split(self.head_dim, dim=-1))
        probs = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(self.head_dim), dim=-1)
        return self.out_proj((probs @ v).transpose(1, 2).reshape(b, n, -1))


class Block(nn.Module):
    def __init__(self, width: int, heads: int, mlp_width: int):
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(width, eps=1e-6), nn.LayerNorm(width, eps=1e-6)
        self.attn = VisualAttention(width, heads)
        self.mlp = nn.Sequential()
        self.mlp.add_module("c_fc", nn.Linear(width, mlp_width))
        self.mlp.add_module("gelu", nn.GELU())
        self.mlp.add_module("c_proj", nn.Linear(mlp_width, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class Resampler(nn.Module):
    def __init__(self, grid: int, width: int, heads: int, kv_dim: int):
        super().__init__()
        self.pos_embed = nn.Parameter(torch.from_numpy(sincos_2d(width, grid)).float(), requires_grad=False)
        self.query = nn.Parameter(torch.zeros(grid * grid, width))
        self.kv_proj = nn.Linear(kv_dim, width, bias=False)
        self.attn = nn.MultiheadAttention(width, heads)
        self.ln_q, self.ln_kv = nn.LayerNorm(width, eps=1e-6), nn.LayerNorm(width, eps=1e-6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pos = get_abs_pos(self.pos_embed, x.shape[1])
        x = self.ln_kv(self.kv_proj(x)).permute(1, 0, 2)
        q = self.ln_q(self.query)[:, None].expand(-1, x.shape[1], -1)
        out = self.attn(q + self.pos_embed[:, None], x + pos[:, None], x)[0]
        return out.permute(1, 0, 2)


class VisionTransformer(nn.Module):
    def __init__(self, patch_size: int, width: int, layers: int, heads: int, mlp_ratio: float, output_dim: int,
                 n_queries: int):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, patch_size, patch_size, bias=False)
        self.positional_embedding = nn.Parameter(torch.randn(256, width) * width ** -0.5)
        self.ln_pre = nn.LayerNorm(width, eps=1e-6)
        self.transformer = nn.Module()
        self.transformer.resblocks = nn.ModuleList(Block(width, heads, int(width * mlp_ratio)) for _ in range(layers))
        self.attn_pool = Resampler(math.isqrt(n_queries), output_dim, output_dim // 128, width)
        self.ln_post = nn.LayerNorm(output_dim, eps=1e-6)
        self.proj = nn.Parameter(torch.randn(output_dim, output_dim) * output_dim ** -0.5)

    def features(self, pixels: torch.Tensor) -> torch.Tensor:
        """The tower's tokens (before attn_pool)."""
        x = self.conv1(pixels).flatten(2).transpose(1, 2)
        x = self.ln_pre(x + get_abs_pos(self.positional_embedding, x.shape[1]))
        for block in self.transformer.resblocks:
            x = block(x)
        return x

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.ln_post(self.attn_pool(self.features(pixels))) @ self.proj
