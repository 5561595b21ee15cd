"""Shunted Transformer (Ren et al., "Shunted Self-Attention via Multi-Scale Token Aggregation", CVPR 2022).

The models compute what the official ``SSA.py`` computes and use its module names, so that the
released checkpoints load with ``leanvit.load_checkpoint(model, "ckpt_s.pth")`` and ``strict=True``:

- stem ``patch_embed1``: conv 7x7/s2 (no bias) + BN + ReLU, ``num_conv`` x [conv 3x3 + BN + ReLU],
  conv 2x2/s2, LayerNorm (eps 1e-5); stages 2-4 embed with an overlapping conv 3x3/s2 + LayerNorm (eps 1e-5);
- shunted self-attention: in stages 1-3 the heads split in two halves; the first half attends to keys and
  values aggregated by a strided conv of rate ``r`` (then LayerNorm + GELU), the second half to those of
  rate ``r/2``; a depthwise 3x3 conv (local enhancement) is added to each half's V on its reduced grid.
  Stage 4 (``r = 1``) is plain multi-head attention with the local enhancement added to the output;
- detail-specific feed-forward: ``fc2(GELU(h + DWConv3x3(h)))`` with ``h = fc1(x)``;
- pre-norm blocks (LayerNorm eps 1e-6), a LayerNorm at the end of every stage, mean pooling, linear head.

What leanvit adds: attention through ``F.scaled_dot_product_attention`` (one call per head group; the
explicit softmax of the reference stays available: ``fused_attn=False`` or :func:`set_fused_attn`),
any input size whose stage grids are at least the aggregation rates (clear error otherwise), per-block
gradient checkpointing, and the timm backbone API: ``features_only=True``, ``forward_intermediates``,
``reset_classifier`` and friends. The official code's bugs (``reset_classifier`` using a missing
attribute, ``no_weight_decay`` naming parameters that do not exist) are not reproduced.
"""

import math
from functools import partial
from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import DropPath, calculate_drop_path_rates, register_notrace_function, trunc_normal_
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model, resolve_pretrained_cfg
from timm.models._builder import _resolve_pretrained_source
from timm.models._features import feature_take_indices
from torch.utils.checkpoint import checkpoint

from leanvit.errors import LeanvitError

__all__ = ["ShuntedTransformer", "ShuntedAttention", "set_fused_attn", "min_input_size", "stage_grids"]

_LAYER_NORM_EPS6 = partial(nn.LayerNorm, eps=1e-6)  # Block's default norm_layer

SizeLike = Union[int, Tuple[int, int], Sequence[int]]


def _pair(size: SizeLike) -> Tuple[int, int]:
    if isinstance(size, int):
        return size, size
    h, w = tuple(size)[-2:]
    return int(h), int(w)


# ---------------------------------------------------------------------------------------------
# Input sizes
def stage_grids(img_size: SizeLike, num_stages: int = 4) -> List[Tuple[int, int]]:
    """Token grid (H, W) of every stage for an input of ``img_size``.

    The stem halves the size twice (conv 7x7/s2/p3: ceil(n/2), conv 2x2/s2: floor(n/2)); each later
    patch embedding is a conv 3x3/s2/p1: ceil(n/2)."""
    h, w = _pair(img_size)
    return _grids(h, w, num_stages)


def _grids(h: int, w: int, num_stages: int) -> List[Tuple[int, int]]:
    """:func:`stage_grids` on sizes that may be symbolic (torch.export): integer arithmetic only."""
    h, w = ((h + 1) // 2) // 2, ((w + 1) // 2) // 2
    grids = [(h, w)]
    for _ in range(num_stages - 1):
        h, w = (h + 1) // 2, (w + 1) // 2
        grids.append((h, w))
    return grids


def _min_side(sr_ratios: List[int]) -> int:
    n = 1
    ok = False
    while not ok:
        ok = True
        for g, r in zip(_grids(n, n, len(sr_ratios)), sr_ratios):
            if g[0] < r:
                ok = False
        if not ok:
            n += 1
    return n


def min_input_size(sr_ratios: Sequence[int] = (8, 4, 2, 1)) -> int:
    """The smallest side length (pixels) for which every stage grid is at least its aggregation rate."""
    return _min_side([int(r) for r in sr_ratios])


def _check_input(h: int, w: int, sr_ratios: List[int]) -> None:
    i = 0
    for g, r in zip(_grids(h, w, len(sr_ratios)), sr_ratios):
        i += 1
        if g[0] < r or g[1] < r:
            m = _min_side(sr_ratios)
            raise LeanvitError(
                f"input {h}x{w} is too small for the Shunted Transformer: stage {i} gets a {g[0]}x{g[1]} token "
                f"grid, smaller than its token-aggregation rate {r}; the smallest valid input is {m}x{m} "
                f"(each side >= {m} px)")


@torch.jit.unused
def _check_symbolic(x: torch.Tensor, sr_ratios: List[int]) -> None:
    """torch.export / torch.compile / ONNX: the sizes may be symbolic. torch._check records the condition (a
    runtime assertion, a range on a dynamic dim) instead of specializing the graph to the example's size,
    as reading int(x.shape[-2]) would."""
    h, w = x.shape[-2], x.shape[-1]
    m = _min_side(sr_ratios)
    for (gh, gw), r in zip(_grids(h, w, len(sr_ratios)), sr_ratios):
        torch._check(gh >= r, lambda: f"Shunted Transformer inputs need each side >= {m} px")
        torch._check(gw >= r, lambda: f"Shunted Transformer inputs need each side >= {m} px")


@register_notrace_function  # an FX leaf: torch.fx sizes are proxies, the check runs on the real input
def checked_image_batch(x: torch.Tensor, sr_ratios: List[int]) -> torch.Tensor:
    """``x`` itself, after checking that it is an image batch whose stage grids reach ``sr_ratios``
    (a clear error otherwise). Returning ``x`` keeps the check in FX graphs (a node with a user); an FX
    leaf (registered with timm) because torch.fx traces sizes as proxies, and public because torch.fx
    only wraps functions whose names do not start with an underscore."""
    if not torch.jit.is_scripting():
        if torch.compiler.is_compiling() or torch.jit.is_tracing():
            _check_symbolic(x, sr_ratios)
            return x
    if x.ndim != 4:
        raise LeanvitError(f"expected an image batch (B, C, H, W), got shape {list(x.shape)}")
    _check_input(int(x.shape[-2]), int(x.shape[-1]), sr_ratios)
    return x


# ---------------------------------------------------------------------------------------------
# Layers
class DWConv(nn.Module):
    """Depthwise 3x3 conv on a token sequence laid out as an H x W map (key ``mlp.dwconv.dwconv``)."""

    def __init__(self, dim: int):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 3, 1, 1, bias=True, groups=dim)

    def forward(self, x: torch.Tensor, H: int, W: int) -> torch.Tensor:
        B, N, C = x.shape
        x = self.dwconv(x.transpose(1, 2).reshape(B, C, H, W))
        return x.flatten(2).transpose(1, 2)


class Mlp(nn.Module):
    """Detail-specific feed-forward: fc1 -> GELU(h + DWConv(h)) -> fc2 (skip around the depthwise conv)."""

    def __init__(self, in_features: int, hidden_features: int, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.dwconv = DWConv(hidden_features)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_features, in_features)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor, H: int, W: int) -> torch.Tensor:
        x = self.fc1(x)
        x = self.act(x + self.dwconv(x, H, W))
        x = self.drop(x)
        x = self.fc2(x)
        return self.drop(x)


class ShuntedAttention(nn.Module):
    """Shunted self-attention (module names and computation as the official ``Attention``).

    ``fused_attn`` (attribute, default True): attention through ``F.scaled_dot_product_attention``, one call
    per head group; False: the explicit ``softmax(q k^T * scale) @ v`` of the reference."""

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = True, attn_drop: float = 0.0,
                 proj_drop: float = 0.0, sr_ratio: int = 1, fused_attn: bool = True):
        super().__init__()
        if dim % num_heads:
            raise LeanvitError(f"dim {dim} is not divisible by num_heads {num_heads}")
        if sr_ratio > 1 and (num_heads % 2 or sr_ratio % 2):
            raise LeanvitError(f"shunted attention with sr_ratio {sr_ratio} needs an even number of heads "
                               f"and an even rate (got {num_heads} heads, rate {sr_ratio})")
        self.dim = dim
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.sr_ratio = sr_ratio
        self.fused_attn = fused_attn

        # registration order = the official state-dict order
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        if sr_ratio > 1:
            self.act = nn.GELU()
            self.sr1 = nn.Conv2d(dim, dim, kernel_size=sr_ratio, stride=sr_ratio)
            self.norm1 = nn.LayerNorm(dim)
            self.sr2 = nn.Conv2d(dim, dim, kernel_size=sr_ratio // 2, stride=sr_ratio // 2)
            self.norm2 = nn.LayerNorm(dim)
            self.kv1 = nn.Linear(dim, dim, bias=qkv_bias)
            self.kv2 = nn.Linear(dim, dim, bias=qkv_bias)
            self.local_conv1 = nn.Conv2d(dim // 2, dim // 2, kernel_size=3, padding=1, stride=1, groups=dim // 2)
            self.local_conv2 = nn.Conv2d(dim // 2, dim // 2, kernel_size=3, padding=1, stride=1, groups=dim // 2)
        else:
            self.kv = nn.Linear(dim, dim * 2, bias=qkv_bias)
            self.local_conv = nn.Conv2d(dim, dim, kernel_size=3, padding=1, stride=1, groups=dim)

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, sr_ratio={self.sr_ratio}, fused_attn={self.fused_attn}"

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """(B, h, N, d) x (B, h, M, d) x (B, h, M, d) -> (B, h, N, d)."""
        if self.fused_attn:
            p = self.attn_drop.p if self.training else 0.0
            return F.scaled_dot_product_attention(q, k, v, dropout_p=p)
        attn = (q @ k.transpose(-2, -1)) * self.scale
        attn = self.attn_drop(attn.softmax(dim=-1))
        return attn @ v

    def _group_kv(self, kv: torch.Tensor, v_local: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """K, V of one head group, (B, heads/2, M, head_dim): ``kv`` (B, M, C) holds [K | V] of the aggregated
        tokens, ``v_local`` (B, M, C/2) the local enhancement added to V. Tensors only (TorchScript)."""
        B, M = kv.shape[0], kv.shape[1]
        heads = self.num_heads // 2
        half = self.dim // 2
        k, v = kv[..., :half], kv[..., half:] + v_local
        k = k.reshape(B, M, heads, self.head_dim).transpose(1, 2)  # explicit sizes: an empty batch works
        v = v.reshape(B, M, heads, self.head_dim).transpose(1, 2)
        return k, v

    @staticmethod
    def _map(t: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) map -> (B, h*w, C) tokens."""
        return t.flatten(2).transpose(1, 2)

    @staticmethod
    def _grid(t: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """(B, h*w, C) tokens -> (B, C, h, w) map."""
        return t.transpose(1, 2).reshape(t.shape[0], t.shape[2], h, w)

    def forward(self, x: torch.Tensor, H: int, W: int) -> torch.Tensor:
        B, N, C = x.shape
        q = self.q(x).reshape(B, N, self.num_heads, self.head_dim).transpose(1, 2)
        if hasattr(self, "sr1"):  # sr_ratio > 1 (hasattr, not the rate: TorchScript resolves it when scripting)
            # each head group: aggregate the map with its strided conv (+ LN + GELU), project to [K | V] and
            # add the local enhancement to V on the aggregated grid
            x_map = x.transpose(1, 2).reshape(B, C, H, W)
            half = self.dim // 2
            t1 = self.sr1(x_map)
            h1, w1 = t1.shape[-2], t1.shape[-1]
            kv1 = self.kv1(self.act(self.norm1(self._map(t1))))
            k1, v1 = self._group_kv(kv1, self._map(self.local_conv1(self._grid(kv1[..., half:], h1, w1))))
            t2 = self.sr2(x_map)
            h2, w2 = t2.shape[-2], t2.shape[-1]
            kv2 = self.kv2(self.act(self.norm2(self._map(t2))))
            k2, v2 = self._group_kv(kv2, self._map(self.local_conv2(self._grid(kv2[..., half:], h2, w2))))
            g = self.num_heads // 2
            out = torch.cat([self._attend(q[:, :g], k1, v1), self._attend(q[:, g:], k2, v2)], dim=1)
            out = out.transpose(1, 2).reshape(B, N, C)
        else:
            kv = self.kv(x)                                        # (B, N, 2C): [K | V]
            k = kv[..., :C].reshape(B, N, self.num_heads, self.head_dim).transpose(1, 2)
            v_tokens = kv[..., C:]
            v = v_tokens.reshape(B, N, self.num_heads, self.head_dim).transpose(1, 2)
            out = self._attend(q, k, v).transpose(1, 2).reshape(B, N, C)
            out = out + self.local_conv(v_tokens.transpose(1, 2).reshape(B, C, H, W)).flatten(2).transpose(1, 2)
        return self.proj_drop(self.proj(out))


class Block(nn.Module):
    """Pre-norm block: x + DropPath(attn(norm1(x))), x + DropPath(mlp(norm2(x))) (one shared DropPath)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True, drop: float = 0.0,
                 attn_drop: float = 0.0, drop_path: float = 0.0, norm_layer=_LAYER_NORM_EPS6,
                 sr_ratio: int = 1, fused_attn: bool = True):
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = ShuntedAttention(dim, num_heads=num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop,
                                     proj_drop=drop, sr_ratio=sr_ratio, fused_attn=fused_attn)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=drop)

    def forward(self, x: torch.Tensor, H: int, W: int) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x), H, W))
        x = x + self.drop_path(self.mlp(self.norm2(x), H, W))
        return x


class Head(nn.Module):
    """Conv stem (official ``Head``): stride 4, 64 channels, LayerNorm (eps 1e-5) on the tokens."""

    def __init__(self, num_conv: int, in_chans: int = 3, dim: int = 64):
        super().__init__()
        layers = [nn.Conv2d(in_chans, dim, 7, 2, padding=3, bias=False), nn.BatchNorm2d(dim), nn.ReLU(True)]
        for _ in range(num_conv):
            layers += [nn.Conv2d(dim, dim, 3, 1, padding=1, bias=False), nn.BatchNorm2d(dim), nn.ReLU(True)]
        layers.append(nn.Conv2d(dim, dim, kernel_size=2, stride=2))
        self.conv = nn.Sequential(*layers)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, int, int]:
        x = self.conv(x)
        H, W = x.shape[-2:]
        return self.norm(x.flatten(2).transpose(1, 2)), H, W


class OverlapPatchEmbed(nn.Module):
    """Conv 3x3/s2/p1 + LayerNorm (eps 1e-5): the patch embedding of stages 2-4."""

    def __init__(self, in_chans: int, embed_dim: int, patch_size: int = 3, stride: int = 2):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=stride, padding=patch_size // 2)
        self.norm = nn.LayerNorm(embed_dim)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, int, int]:
        x = self.proj(x)
        H, W = x.shape[-2:]
        return self.norm(x.flatten(2).transpose(1, 2)), H, W


# ---------------------------------------------------------------------------------------------
# Model
class ShuntedTransformer(nn.Module):
    """Shunted Transformer with the official module names (``patch_embed{i}``, ``block{i}``, ``norm{i}``, ``head``).

    Args:
        img_size: nominal input size (int or (H, W)); any size whose stage grids reach the aggregation rates
            works (see :func:`min_input_size`), nothing depends on it but ``model.img_size``.
        in_chans: input channels of the stem (3 in the official models).
        num_classes: classifier outputs (0: no classifier, the pooled features come out).
        global_pool: ``"avg"`` (mean over tokens, as the official model) or ``""`` (no pooling).
        fused_attn: attention through ``F.scaled_dot_product_attention`` (default) or the explicit softmax.
    """

    def __init__(self, img_size: SizeLike = 224, in_chans: int = 3, num_classes: int = 1000,
                 global_pool: str = "avg", embed_dims: Sequence[int] = (64, 128, 256, 512),
                 num_heads: Sequence[int] = (2, 4, 8, 16), mlp_ratios: Sequence[float] = (8, 8, 4, 4),
                 qkv_bias: bool = True, drop_rate: float = 0.0, attn_drop_rate: float = 0.0,
                 drop_path_rate: float = 0.0, depths: Sequence[int] = (1, 2, 4, 1),
                 sr_ratios: Sequence[int] = (8, 4, 2, 1), num_conv: int = 0, norm_eps: float = 1e-6,
                 fused_attn: bool = True, num_stages: int = 4):
        super().__init__()
        if global_pool not in ("avg", ""):
            raise LeanvitError(f"global_pool must be 'avg' or '', got {global_pool!r}")
        if embed_dims[0] != 64:
            raise LeanvitError("the Shunted stem produces 64 channels: embed_dims[0] must be 64")
        self.img_size = _pair(img_size)
        _check_input(self.img_size[0], self.img_size[1], [int(r) for r in sr_ratios][:num_stages])
        self.in_chans = in_chans
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.depths = tuple(depths)
        self.embed_dims = tuple(embed_dims)
        self.sr_ratios = tuple(sr_ratios)
        self.num_stages = num_stages
        self.num_features = self.head_hidden_size = embed_dims[num_stages - 1]
        self.grad_checkpointing = False
        self.drop_rate = drop_rate
        norm_layer = partial(nn.LayerNorm, eps=norm_eps)

        dpr = calculate_drop_path_rates(drop_path_rate, sum(depths))  # plain floats: also on the meta device
        cur = 0
        self.feature_info = []
        for i in range(num_stages):
            if i == 0:
                patch_embed = Head(num_conv, in_chans, embed_dims[0])
            else:
                patch_embed = OverlapPatchEmbed(embed_dims[i - 1], embed_dims[i])
            block = nn.ModuleList([
                Block(embed_dims[i], num_heads[i], mlp_ratios[i], qkv_bias=qkv_bias, drop=drop_rate,
                      attn_drop=attn_drop_rate, drop_path=dpr[cur + j], norm_layer=norm_layer,
                      sr_ratio=sr_ratios[i], fused_attn=fused_attn)
                for j in range(depths[i])])
            cur += depths[i]
            setattr(self, f"patch_embed{i + 1}", patch_embed)
            setattr(self, f"block{i + 1}", block)
            setattr(self, f"norm{i + 1}", norm_layer(embed_dims[i]))
            self.feature_info.append(dict(num_chs=embed_dims[i], reduction=2 ** (i + 2), module=f"norm{i + 1}"))
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Conv2d):
            fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
            m.weight.data.normal_(0, math.sqrt(2.0 / fan_out))
            if m.bias is not None:
                m.bias.data.zero_()

    # ---- timm model API ------------------------------------------------------------------
    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        """No parameter needs an exception beyond timm's default (biases and norms, ndim <= 1, are exempt).

        The official list (``pos_embed1..4``, ``cls_token``) names parameters this model does not have."""
        return set()

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        return dict(
            stem=r"^patch_embed1",
            blocks=r"^(?:patch_embed|block|norm)(\d+)" if coarse else [
                (r"^block(\d+)\.(\d+)", None),
                (r"^(?:patch_embed|norm)(\d+)", (99999,)),
            ],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute every block in the backward pass instead of storing its activations."""
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def set_fused_attn(self, enable: bool = True) -> "ShuntedTransformer":
        return set_fused_attn(self, enable)

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        if global_pool is not None:
            if global_pool not in ("avg", ""):
                raise LeanvitError(f"global_pool must be 'avg' or '', got {global_pool!r}")
            self.global_pool = global_pool
        self.num_classes = num_classes
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def filter_checkpoint(self, state_dict: dict) -> dict:
        """Used by :func:`leanvit.load_checkpoint`: the official checkpoints need no mapping (same names);
        only a towhee-style ``mlp.dwconv.<w>`` is mapped back to ``mlp.dwconv.dwconv.<w>``."""
        out = {}
        for k, v in state_dict.items():
            if ".mlp.dwconv." in k and ".mlp.dwconv.dwconv." not in k:
                k = k.replace(".mlp.dwconv.", ".mlp.dwconv.dwconv.")
            out[k] = v
        return out

    # ---- forward -------------------------------------------------------------------------
    @torch.jit.unused
    def _run_stage(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """Stage ``i`` (0-based) on an NCHW map (or the image for i = 0); returns its NCHW output map."""
        B = x.shape[0]
        x, H, W = getattr(self, f"patch_embed{i + 1}")(x)
        ckpt = self.grad_checkpointing and torch.is_grad_enabled() and not torch.jit.is_scripting()
        for blk in getattr(self, f"block{i + 1}"):
            x = checkpoint(blk, x, H, W, use_reentrant=False) if ckpt else blk(x, H, W)
        x = getattr(self, f"norm{i + 1}")(x)
        return x.transpose(1, 2).reshape(B, x.shape[-1], H, W)

    def _check(self, x: torch.Tensor) -> torch.Tensor:
        rates: List[int] = []
        for r in self.sr_ratios:  # the rates of the stages the model has (a loop: TorchScript slices no tuple)
            if len(rates) < self.num_stages:
                rates.append(int(r))
        return checked_image_batch(x, rates)

    def _forward_scripted(self, x: torch.Tensor) -> torch.Tensor:
        """:meth:`forward_features` for TorchScript, which cannot look stages up by name: the same stages
        unrolled (``hasattr`` is resolved when scripting, so a pruned model scripts too)."""
        B = x.shape[0]
        if hasattr(self, "patch_embed1"):
            x, H, W = self.patch_embed1(x)
            for blk in self.block1:
                x = blk(x, H, W)
            x = self.norm1(x).transpose(1, 2).reshape(B, -1, H, W)
        if hasattr(self, "patch_embed2"):
            x, H, W = self.patch_embed2(x)
            for blk in self.block2:
                x = blk(x, H, W)
            x = self.norm2(x).transpose(1, 2).reshape(B, -1, H, W)
        if hasattr(self, "patch_embed3"):
            x, H, W = self.patch_embed3(x)
            for blk in self.block3:
                x = blk(x, H, W)
            x = self.norm3(x).transpose(1, 2).reshape(B, -1, H, W)
        if hasattr(self, "patch_embed4"):
            x, H, W = self.patch_embed4(x)
            for blk in self.block4:
                x = blk(x, H, W)
            x = self.norm4(x).transpose(1, 2).reshape(B, -1, H, W)
        return x

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The last stage's normalized map, (B, C, H/32, W/32)."""
        x = self._check(x)
        if torch.jit.is_scripting():
            return self._forward_scripted(x)
        for i in range(self.num_stages):
            x = self._run_stage(i, x)
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.global_pool == "avg":
            x = x.mean(dim=(-2, -1))  # = the official mean over the stage-4 tokens
        x = F.dropout(x, p=self.drop_rate, training=self.training) if self.drop_rate > 0 else x
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(self, x: torch.Tensor, indices: Optional[Union[int, List[int]]] = None,
                              norm: bool = False, stop_early: bool = False, output_fmt: str = "NCHW",
                              intermediates_only: bool = False):
        """timm's ``forward_intermediates``: the normalized output map of the chosen stages, NCHW
        (B, C_i, H_i, W_i) with strides 4/8/16/32. Every stage ends with its own LayerNorm, so the
        maps are always normalized and ``norm`` changes nothing."""
        if output_fmt not in ("NCHW", "NHWC"):
            raise LeanvitError(f"output_fmt must be 'NCHW' or 'NHWC', got {output_fmt!r}")
        x = self._check(x)
        take_indices, max_index = feature_take_indices(self.num_stages, indices)
        last = max_index if (stop_early or intermediates_only) else self.num_stages - 1
        intermediates = []
        for i in range(last + 1):
            x = self._run_stage(i, x)
            if i in take_indices:
                intermediates.append(x if output_fmt == "NCHW" else x.permute(0, 2, 3, 1))
        if intermediates_only:
            return intermediates
        return x, intermediates

    def prune_intermediate_layers(self, indices: Union[int, List[int]] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> List[int]:
        """Drop the stages after the last index wanted (and the classifier); returns the absolute indices."""
        take_indices, max_index = feature_take_indices(self.num_stages, indices)
        for i in range(max_index + 1, self.num_stages):
            for name in (f"patch_embed{i + 1}", f"block{i + 1}", f"norm{i + 1}"):
                delattr(self, name)
        if max_index + 1 < self.num_stages:
            self.num_stages = max_index + 1
            self.num_features = self.head_hidden_size = self.embed_dims[max_index]
            self.feature_info = self.feature_info[:max_index + 1]
        if prune_head:
            self.reset_classifier(0, "")
        return take_indices


def set_fused_attn(model: nn.Module, enable: bool = True) -> nn.Module:
    """Switch every shunted attention in ``model`` between SDPA (True) and the explicit softmax (False)."""
    n = 0
    for m in model.modules():
        if isinstance(m, ShuntedAttention):
            m.fused_attn = bool(enable)
            n += 1
    if n == 0:
        raise LeanvitError(f"{type(model).__name__} has no Shunted attention layers")
    return model


# ---------------------------------------------------------------------------------------------
# Registered models
def _cfg(**kwargs) -> dict:
    return {
        "url": "", "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": (7, 7),
        "crop_pct": 0.875, "interpolation": "bicubic", "fixed_input_size": False,
        "mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD,
        "first_conv": "patch_embed1.conv.0", "classifier": "head",
        "license": "see OliverRensu/Shunted-Transformer", **kwargs,
    }


default_cfgs = generate_default_cfgs({
    "shunted_t": _cfg(),
    "shunted_s": _cfg(),
    "shunted_b": _cfg(),
})

_ARCHS = {
    "shunted_t": dict(depths=(1, 2, 4, 1), num_conv=0),
    "shunted_s": dict(depths=(2, 4, 12, 1), num_conv=1),
    "shunted_b": dict(depths=(3, 4, 24, 2), num_conv=2),
}


#: where the official checkpoints are (OliverRensu/Shunted-Transformer README and issue #1)
OFFICIAL_WEIGHTS = ("the official ckpt_T.pth / ckpt_S.pth / ckpt_B.pth from the Google Drive folder "
                    "https://drive.google.com/drive/folders/15iZKXFT7apjUSoN2WUMAbb0tvJgyh3YP or Baidu Pan "
                    "(code hazr), linked from https://github.com/OliverRensu/Shunted-Transformer")


def checkpoint_filter_fn(state_dict: dict, model: Optional[nn.Module] = None) -> dict:
    """timm ``pretrained_filter_fn`` for the official Shunted checkpoints: unwraps ``{"model": ...}``,
    strips DDP/compile prefixes and maps towhee-style ``mlp.dwconv.<w>`` back to ``mlp.dwconv.dwconv.<w>``."""
    if "model" in state_dict and isinstance(state_dict["model"], dict):
        state_dict = state_dict["model"]
    out = {}
    for k, v in state_dict.items():
        for prefix in ("module.", "_orig_mod."):
            if k.startswith(prefix):
                k = k[len(prefix):]
        if ".mlp.dwconv." in k and ".mlp.dwconv.dwconv." not in k:
            k = k.replace(".mlp.dwconv.", ".mlp.dwconv.dwconv.")
        out[k] = v
    return out


def _check_weights_source(variant: str, pretrained_cfg, overlay) -> None:
    """``pretrained=True`` needs a file (or another source) given by the user: the official weights are
    on Google Drive / Baidu Pan, which timm cannot download."""

    cfg = resolve_pretrained_cfg(variant, pretrained_cfg=pretrained_cfg, pretrained_cfg_overlay=overlay)
    load_from, _ = _resolve_pretrained_source(cfg.to_dict())
    if not load_from:
        raise LeanvitError(
            f"{variant}: pretrained=True needs the weights file; download {OFFICIAL_WEIGHTS}, then "
            f"timm.create_model('{variant}', pretrained=True, pretrained_cfg_overlay=dict(file='ckpt.pth')) "
            "or leanvit.load_checkpoint(model, 'ckpt.pth')")


def _create(variant: str, pretrained: bool = False, **kwargs) -> ShuntedTransformer:
    img_size = kwargs.get("img_size")
    overlay = kwargs.pop("pretrained_cfg_overlay", None)
    if img_size is not None:
        h, w = _pair(img_size)
        overlay = dict(overlay or {})
        overlay.setdefault("input_size", (kwargs.get("in_chans", 3), h, w))
    if pretrained:
        _check_weights_source(variant, kwargs.get("pretrained_cfg"), overlay)
    arch = dict(_ARCHS[variant])
    arch.update(kwargs)
    return build_model_with_cfg(
        ShuntedTransformer, variant, pretrained,
        pretrained_cfg_overlay=overlay,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=(0, 1, 2, 3), feature_cls="getter"),
        **arch,
    )


@register_model
def shunted_t(pretrained: bool = False, **kwargs) -> ShuntedTransformer:
    """Shunted-T: depths 1/2/4/1, no extra stem conv; 11.55 M params, 2.15 GMACs at 224 (drop_path 0.1 to train)."""
    return _create("shunted_t", pretrained, **kwargs)


@register_model
def shunted_s(pretrained: bool = False, **kwargs) -> ShuntedTransformer:
    """Shunted-S: depths 2/4/12/1, one extra stem conv; 22.40 M params, 4.99 GMACs (drop_path 0.2 to train)."""
    return _create("shunted_s", pretrained, **kwargs)


@register_model
def shunted_b(pretrained: bool = False, **kwargs) -> ShuntedTransformer:
    """Shunted-B: depths 3/4/24/2, two extra stem convs; 39.61 M params, 8.15 GMACs (drop_path 0.3 to train)."""
    return _create("shunted_b", pretrained, **kwargs)
