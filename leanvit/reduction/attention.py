"""The one copy of timm's ``Attention.forward`` that reducing blocks run, plus what each method reads off it.

EViT needs the head-averaged class-token attention of the image tokens (its token scores); ToMe needs
proportional attention (``+ log size`` on the keys' logits) and the keys averaged over heads (its
similarity metric). Both go through :meth:`ReducingBlockMixin._reducing_attention`, which otherwise
computes exactly what timm's ``Attention.forward`` computes (fused qkv, q/k norms, the optional gate and
scale norm, dropouts): ``F.scaled_dot_product_attention`` when the timm module has ``fused_attn`` (the
class-token row is then computed beside it in O(N), without the attention matrix), the explicit softmax
otherwise.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from leanvit.reduction.reorg import class_token_attention
from leanvit.reduction.swap import SwappedClass

__all__ = ["ReducingBlockMixin"]


class ReducingBlockMixin(SwappedClass):
    """Base of the block mixins of token-reduction methods (mixed into a timm ``Block``)."""

    num_prefix_tokens: int = 1

    def _reducing_attention(self, x: torch.Tensor, size: Optional[torch.Tensor] = None,
                            class_scores: bool = False, keys: bool = False
                            ) -> Tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
        """timm ``Attention.forward`` on ``x`` (already normed), returning ``(out, scores, metric)``.

        size: (B, N, 1) token sizes: adds ``log size`` to the attention logits of each key (proportional
        attention), or None. class_scores: also return the class token's attention to the non-prefix
        tokens, averaged over heads, (B, N - P) (else None). keys: also return the keys averaged over heads,
        (B, N, head_dim) (else None).
        """
        attn = self.attn
        B, N, _ = x.shape
        gate = attn.gate(x).sigmoid() if getattr(attn, "gate", None) is not None else None
        qkv = attn.qkv(x).reshape(B, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = attn.q_norm(q), attn.k_norm(k)
        bias = None if size is None else size.log().to(q.dtype).view(B, 1, 1, N)
        scores = None
        if attn.fused_attn:
            if class_scores:
                scores = class_token_attention(q, k, attn.scale, self.num_prefix_tokens)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias,
                                                 dropout_p=attn.attn_drop.p if self.training else 0.0)
        else:  # timm's fused_attn=False: the softmax written out
            a = (q * attn.scale) @ k.transpose(-2, -1)
            if bias is not None:
                a = a + bias
            a = a.softmax(dim=-1)
            if class_scores:
                scores = a[:, :, 0, self.num_prefix_tokens:].mean(dim=1)
            out = attn.attn_drop(a) @ v
        out = out.transpose(1, 2).reshape(B, N, attn.num_heads * attn.head_dim)
        out = attn.norm(out)
        if gate is not None:
            out = out * gate
        return attn.proj_drop(attn.proj(out)), scores, (k.mean(dim=1) if keys else None)
