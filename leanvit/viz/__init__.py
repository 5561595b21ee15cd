"""Pictures: which tokens EViT kept (:mod:`leanvit.viz.tokens`), which patches ToMe merged
(:mod:`leanvit.viz.merges`), and dense predictions, boxes and masks (:mod:`leanvit.viz.dense`). The drawing
helpers they share are in :mod:`leanvit.viz.common`.

    from leanvit.viz import render_kept_tokens, visualize
    png = render_kept_tokens(model, [Image.open("cat.jpg"), "dog.png"], "out/kept.png")
"""
from leanvit.viz.common import draw_rows, viz_transform, write_rows
from leanvit.viz.dense import (
                               detection_pictures,
                               draw_detections,
                               draw_segmentation,
                               predict_detections,
                               predict_label_maps,
                               save_pictures,
                               segmentation_pictures,
                               visualize_dense,
)
from leanvit.viz.merges import merge_groups, paint_groups, render_merged_tokens, shown_blocks, visualize_merges
from leanvit.viz.reduction import draw_reduction
from leanvit.viz.tokens import kept_masks, mask_patches, render_kept_tokens, token_counts, visualize

__all__ = ["draw_reduction", "draw_rows", "viz_transform", "write_rows", "draw_detections", "draw_segmentation",
           "predict_detections", "predict_label_maps", "detection_pictures", "segmentation_pictures",
           "save_pictures", "visualize_dense", "merge_groups", "paint_groups", "render_merged_tokens", "shown_blocks",
           "visualize_merges", "kept_masks", "mask_patches", "render_kept_tokens", "token_counts", "visualize"]
