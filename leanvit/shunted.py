"""Shunted Transformer (Ren et al., CVPR 2022). Being written: see issue 3."""
