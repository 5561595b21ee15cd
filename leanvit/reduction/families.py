"""Backbone families: what a token-reduction method needs from a ViT, behind one small adapter per family.

A reduction method works between a block's attention and its MLP, and needs from the block: the pre-norm
attention with an additive bias (ToMe's ``log size``), the class token's attention row (EViT's scores), the
keys (ToMe's similarity), the residual branches with their LayerScale and stochastic depth, and the MLP; from
the model: the embedding prologue (patch embedding, positions, prefix tokens). Families:

- ``vit``: timm ``VisionTransformer`` with timm ``Block`` (ViT, DeiT, DeiT III, register ViTs): absolute
  position embeddings, so positions are already in the tokens.
- ``eva``: timm ``Eva`` with ``EvaBlock`` (EVA-02, DINOv3 in every size timm has, other RoPE ViTs built on
  ``Eva``): rotary position embeddings applied in every attention to the non-prefix tokens, SwiGLU or plain
  MLPs, LayerScale as ``gamma_1`` / ``gamma_2``, register tokens. Positions travel with the tokens
  (:mod:`leanvit.reduction.positions`).

``family_of(model)`` finds the family; a model no family takes is a :class:`LeanvitError` naming it and the
families there are. A new family is one :class:`BackboneFamily` subclass and :func:`register_family`.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from leanvit.errors import LeanvitError
from leanvit.reduction.positions import RotaryPositions, rope_angles
from leanvit.reduction.reorg import class_token_attention

__all__ = ["BackboneFamily", "register_family", "family_of", "family_named", "list_families", "AttentionOut"]

#: (attention output, class-token attention of the non-prefix tokens or None, head-averaged keys or None)
AttentionOut = Tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]

_FAMILIES: List["BackboneFamily"] = []


class BackboneFamily:
    """The adapter of one family of timm ViTs. ``name``; ``models``: what it covers, for messages."""

    name: str = ""
    models: str = ""

    def matches(self, model: nn.Module) -> bool:
        raise NotImplementedError

    def check(self, model: nn.Module, method: str, block_indices) -> None:
        """A clear error unless the blocks at ``block_indices`` can be reduced."""

    # -- the model -----------------------------------------------------------------------------
    def embed(self, model: nn.Module, images: torch.Tensor, angles: bool = False
              ) -> Tuple[torch.Tensor, Optional[RotaryPositions]]:
        """The token sequence entering the first block, prefix tokens first, and its positions (None when
        they are in the tokens); ``angles``: also the angles of merged positions (RoPE only)."""
        raise NotImplementedError

    # -- a block ---------------------------------------------------------------------------------
    def block(self, blk: nn.Module, x: torch.Tensor, pos: Optional[RotaryPositions]) -> torch.Tensor:
        """The block's own forward (through ``__call__``: hooks and tracers see it)."""
        raise NotImplementedError

    def unmodified(self, blk: nn.Module, x: torch.Tensor, pos: Optional[RotaryPositions]) -> torch.Tensor:
        """The forward of the block's timm class, for a reducing block with nothing to reduce."""
        raise NotImplementedError

    def call_positions(self, args, kwargs):
        """The positions of a call ``blk(x, *args, **kwargs)`` of a reducing block; attention masks are an
        error (reducing blocks change the sequence a mask would be written for)."""
        raise NotImplementedError

    def attention(self, blk: nn.Module, x: torch.Tensor, pos: Optional[RotaryPositions], num_prefix_tokens: int,
                  size: Optional[torch.Tensor] = None, class_scores: bool = False, keys: bool = False
                  ) -> AttentionOut:
        """The block's attention on ``x`` (already normed). ``size`` (B, N, 1): adds ``log size`` to the
        logits of each key (proportional attention); ``class_scores``: also the class token's attention to the
        non-prefix tokens averaged over heads (B, N - P); ``keys``: also the keys averaged over heads."""
        raise NotImplementedError

    def attn_residual(self, blk: nn.Module, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def mlp_residual(self, blk: nn.Module, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


def register_family(family: BackboneFamily) -> BackboneFamily:
    _FAMILIES.append(family)
    return family


def family_named(name: str) -> BackboneFamily:
    for family in _FAMILIES:
        if family.name == name:
            return family
    raise LeanvitError(f"no backbone family {name!r} (known: {', '.join(f.name for f in _FAMILIES)})")


def list_families() -> List[str]:
    return [f"{f.name} ({f.models})" for f in _FAMILIES]


def family_of(model: nn.Module, method: str = "token reduction", block_indices=()) -> BackboneFamily:
    """The family of ``model``, checked for the blocks ``block_indices``; a clear error when none takes it."""
    for family in _FAMILIES:
        if family.matches(model):
            family.check(model, method, block_indices)
            return family
    raise LeanvitError(f"{method} has no adapter for {type(model).__name__} (it needs a timm ViT); the model "
                       f"families it reduces: {'; '.join(list_families())}")


def _attend(attn: nn.Module, q, k, v, bias, class_scores: bool, P: int, training: bool):
    """Attention of (B, H, N, d) queries, keys and values with an optional additive ``bias``: SDPA when the
    timm module fuses attention (the class-token row then computed beside it in O(N)), else the softmax
    written out. Returns (out (B, H, N, d), class scores or None)."""
    scores = None
    if attn.fused_attn:
        if class_scores:
            scores = class_token_attention(q, k, attn.scale, P)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias,
                                             dropout_p=attn.attn_drop.p if training else 0.0)
    else:
        a = (q * attn.scale) @ k.transpose(-2, -1)
        if bias is not None:
            a = a + bias
        a = a.softmax(dim=-1)
        if class_scores:
            scores = a[:, :, 0, P:].mean(dim=1)
        out = attn.attn_drop(a) @ v
    return out, scores


def _log_size_bias(size: Optional[torch.Tensor], dtype) -> Optional[torch.Tensor]:
    if size is None:
        return None
    B, N, _ = size.shape
    return size.log().to(dtype).view(B, 1, 1, N)


def _no_masks(args, kwargs, names) -> dict:
    bound = dict(zip(names, args))
    bound.update(kwargs)
    unknown = set(bound) - set(names)
    if unknown:
        raise TypeError(f"unexpected block arguments {sorted(unknown)}")
    if bound.get("attn_mask") is not None or bound.get("is_causal"):
        raise LeanvitError("token-reducing blocks do not take attention masks (they change the sequence a mask "
                           "would be written for)")
    return bound


# ---------------------------------------------------------------------------------------------
class VitFamily(BackboneFamily):
    """timm ``VisionTransformer`` + ``Block``: absolute positions, so no position bookkeeping."""

    name = "vit"
    models = "timm VisionTransformer with Block: ViT, DeiT, DeiT III, register ViTs"
    _BLOCK_PARTS = ("norm1", "attn", "ls1", "drop_path1", "norm2", "mlp", "ls2", "drop_path2")
    _ATTENTION_PARTS = ("qkv", "num_heads", "head_dim", "scale", "proj")

    def matches(self, model):
        from timm.models.vision_transformer import VisionTransformer
        return isinstance(model, VisionTransformer) or (
            hasattr(model, "blocks") and hasattr(model, "patch_embed") and hasattr(model, "_pos_embed")
            and not hasattr(model, "rope"))

    def check(self, model, method, block_indices):
        for i in block_indices:
            blk = model.blocks[i]
            attn = getattr(blk, "attn", None)
            if not all(hasattr(blk, a) for a in self._BLOCK_PARTS) or \
                    not all(hasattr(attn, a) for a in self._ATTENTION_PARTS):
                raise LeanvitError(
                    f"block {i} ({type(blk).__name__}) is not a pre-norm timm Block with a fused-qkv Attention; "
                    f"{method} supports timm VisionTransformer blocks (DeiT, DeiT III, ViT) and timm EvaBlock "
                    "(EVA-02, DINOv3)")

    def embed(self, model, images, angles=False):
        x = model.patch_embed(images)
        x = model._pos_embed(x)
        x = model.patch_drop(x)
        return model.norm_pre(x), None

    def block(self, blk, x, pos):
        return blk(x)

    def unmodified(self, blk, x, pos):
        return blk._swap_base.forward(blk, x)

    def call_positions(self, args, kwargs):
        _no_masks(args, kwargs, ("attn_mask", "is_causal"))
        return None

    def attention(self, blk, x, pos, num_prefix_tokens, size=None, class_scores=False, keys=False):
        attn = blk.attn
        B, N, _ = x.shape
        gate = attn.gate(x).sigmoid() if getattr(attn, "gate", None) is not None else None
        q, k, v = attn.qkv(x).reshape(B, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = attn.q_norm(q), attn.k_norm(k)
        out, scores = _attend(attn, q, k, v, _log_size_bias(size, q.dtype), class_scores, num_prefix_tokens,
                              blk.training)
        out = attn.norm(out.transpose(1, 2).reshape(B, N, attn.num_heads * attn.head_dim))
        if gate is not None:
            out = out * gate
        return attn.proj_drop(attn.proj(out)), scores, (k.mean(dim=1) if keys else None)

    def attn_residual(self, blk, x, out):
        return x + blk.drop_path1(blk.ls1(out))

    def mlp_residual(self, blk, x):
        return x + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(x))))


class EvaFamily(BackboneFamily):
    """timm ``Eva`` + pre-norm ``EvaBlock`` with ``EvaAttention``: rotary positions travel with the tokens."""

    name = "eva"
    models = "timm Eva with EvaBlock: EVA-02, DINOv3 and other RoPE ViTs"
    _ROPES = ("RotaryEmbeddingCat", "RotaryEmbeddingDinoV3")

    def matches(self, model):
        from timm.models.eva import Eva
        return isinstance(model, Eva)

    def check(self, model, method, block_indices):
        from timm.models.eva import EvaAttention, EvaBlock
        if getattr(model, "rope_mixed", False):
            raise LeanvitError(f"{method}: {type(model).__name__} uses mixed (per-block, learned) rotary "
                               "embeddings, which no adapter covers; supported: EVA-02 and DINOv3 RoPE")
        rope = getattr(model, "rope", None)
        if rope is not None and type(rope).__name__ not in self._ROPES:
            raise LeanvitError(f"{method}: rotary embedding {type(rope).__name__} is not supported "
                               f"(supported: {', '.join(self._ROPES)})")
        for i in block_indices:
            blk = model.blocks[i]
            if not isinstance(blk, EvaBlock) or not isinstance(blk.attn, EvaAttention):
                raise LeanvitError(f"block {i} ({type(blk).__name__} with {type(blk.attn).__name__}) is not a "
                                   f"pre-norm EvaBlock with EvaAttention; {method} supports those and timm Block")

    def embed(self, model, images, angles=False):
        B, _, H, W = images.shape
        x = model.patch_embed(images)
        grid = tuple(model.patch_embed.dynamic_feat_size((H, W)) if model.dynamic_img_size else
                     model.patch_embed.grid_size)
        n = x.shape[1] * x.shape[2] if x.ndim == 4 else x.shape[1]
        if n != grid[0] * grid[1]:
            raise LeanvitError(f"{type(model).__name__}: the rotary table has {grid[0] * grid[1]} positions (grid "
                               f"{grid}) but the {H}x{W} input gives {n} patch tokens; build the model with this "
                               "img_size or with dynamic_img_size=True")
        x, rope = model._pos_embed(x)
        x = model.norm_pre(x)
        if rope is None:
            return x, None
        P = model.num_prefix_tokens
        if rope.shape[-2] != n:
            raise LeanvitError(f"{type(model).__name__}: the rotary table has {rope.shape[-2]} positions but the "
                               f"{H}x{W} input gives {n} patch tokens (grid {grid}); build the model with this "
                               "img_size or with dynamic_img_size=True")
        angle_rows = None
        if angles:
            if rope.ndim != 2 or (model.rope.training and getattr(model.rope, "aug_active", False)):
                raise LeanvitError("mean merged positions need the model's plain rotary grid: not with patch "
                                   "dropout nor rotary coordinate augmentation in training (use position='dst')")
            angle_rows = rope_angles(model.rope, grid, device=x.device)
        return x, RotaryPositions.from_timm(rope, B, P, model.blocks[0].attn.rotate_half, angle_rows)

    def block(self, blk, x, pos):
        return blk(x, rope=None if pos is None else pos.rope())

    def unmodified(self, blk, x, pos):
        return blk._swap_base.forward(blk, x, rope=None if pos is None else pos.rope())

    def call_positions(self, args, kwargs):
        return _no_masks(args, kwargs, ("rope", "attn_mask", "is_causal")).get("rope")

    def attention(self, blk, x, pos, num_prefix_tokens, size=None, class_scores=False, keys=False):
        from timm.layers import apply_rot_embed_cat
        attn = blk.attn
        B, N, _ = x.shape
        gate = attn.gate(x).sigmoid() if attn.gate is not None else None
        if attn.qkv is not None:
            if attn.q_bias is None:
                qkv = attn.qkv(x)
            else:
                qkv_bias = torch.cat((attn.q_bias, attn.k_bias, attn.v_bias))
                if attn.qkv_bias_separate:
                    qkv = attn.qkv(x)
                    qkv += qkv_bias
                else:
                    qkv = F.linear(x, weight=attn.qkv.weight, bias=qkv_bias)
            q, k, v = qkv.reshape(B, N, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        else:
            q = attn.q_proj(x).reshape(B, N, attn.num_heads, -1).transpose(1, 2)
            k = attn.k_proj(x).reshape(B, N, attn.num_heads, -1).transpose(1, 2)
            v = attn.v_proj(x).reshape(B, N, attn.num_heads, -1).transpose(1, 2)
        q, k = attn.q_norm(q), attn.k_norm(k)
        if pos is not None:
            rope, P, half = pos.rope(), attn.num_prefix_tokens, attn.rotate_half
            q = torch.cat([q[:, :, :P], apply_rot_embed_cat(q[:, :, P:], rope, half=half)], dim=2).type_as(v)
            k = torch.cat([k[:, :, :P], apply_rot_embed_cat(k[:, :, P:], rope, half=half)], dim=2).type_as(v)
        out, scores = _attend(attn, q, k, v, _log_size_bias(size, q.dtype), class_scores, num_prefix_tokens,
                              blk.training)
        out = attn.norm(out.transpose(1, 2).reshape(B, N, -1))
        if gate is not None:
            out = out * gate
        return attn.proj_drop(attn.proj(out)), scores, (k.mean(dim=1) if keys else None)

    def attn_residual(self, blk, x, out):
        if blk.gamma_1 is not None:
            out = blk.gamma_1 * out
        return x + blk.drop_path1(out)

    def mlp_residual(self, blk, x):
        out = blk.mlp(blk.norm2(x))
        if blk.gamma_2 is not None:
            out = blk.gamma_2 * out
        return x + blk.drop_path2(out)


register_family(EvaFamily())
register_family(VitFamily())
