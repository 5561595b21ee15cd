"""leanvit.dense: backbones, torchvision detectors and segmenters on tiny configs (CPU, 64-96 px)."""
import pytest
import timm
import torch

import leanvit  # noqa: F401  (registers shunted_* and evit_*)
from leanvit.checkpoints import save_checkpoint
from leanvit.dense import create_backbone, create_detector, create_segmenter
from leanvit.dense.backbones import FeatureBackbone, SimpleFeaturePyramid
from leanvit.errors import LeanvitError

SHUNTED = dict(depths=[1, 1, 1, 1], embed_dims=[64, 64, 128, 128], num_heads=[2, 2, 4, 4], mlp_ratios=[4, 4, 4, 4])
VIT = dict(depth=2, embed_dim=64, num_heads=2, img_size=64)
BACKBONES = {"shunted_t": SHUNTED, "vit_tiny_patch16_224": VIT}
DET_SMALL = dict(min_size=64, max_size=96, fpn_channels=32, detections_per_img=10, box_detections_per_img=10)


def _images_and_targets(masks=False):
    images = [torch.rand(3, 64, 64), torch.rand(3, 64, 80)]
    targets = [dict(boxes=torch.tensor([[4.0, 4.0, 30.0, 30.0]]), labels=torch.tensor([0])),
               dict(boxes=torch.tensor([[10.0, 12.0, 50.0, 40.0], [1.0, 1.0, 20.0, 20.0]]),
                    labels=torch.tensor([2, 1]))]
    if masks:
        for img, t in zip(images, targets):
            m = torch.zeros(len(t["boxes"]), *img.shape[-2:], dtype=torch.uint8)
            for j, (x0, y0, x1, y1) in enumerate(t["boxes"].long().tolist()):
                m[j, y0:y1, x0:x1] = 1
            t["masks"] = m
    return images, targets


def _det_kwargs(name):
    kw = dict(DET_SMALL)
    if name in ("retinanet", "fcos"):
        kw.pop("box_detections_per_img")
    else:  # fewer proposals and sampled RoIs than COCO's: the tiny tests stay fast
        kw.pop("detections_per_img")
        kw.update(rpn_pre_nms_top_n_train=200, rpn_post_nms_top_n_train=100, rpn_pre_nms_top_n_test=100,
                  rpn_post_nms_top_n_test=50, box_batch_size_per_image=32)
    return kw


@pytest.mark.parametrize("backbone", sorted(BACKBONES))
@pytest.mark.parametrize("name", ["retinanet", "fcos", "fasterrcnn", "maskrcnn"])
def test_detector_train_step_and_eval(name, backbone):
    model = create_detector(name, backbone, 3, **_det_kwargs(name), **BACKBONES[backbone])
    assert isinstance(model, torch.nn.Module) and model.num_object_classes == 3
    images, targets = _images_and_targets(masks=name == "maskrcnn")
    model.train()
    losses = model(images, targets)
    assert isinstance(losses, dict) and losses and all(torch.isfinite(v) for v in losses.values())
    if name == "maskrcnn":
        assert "loss_mask" in losses
    sum(losses.values()).backward()
    grads = [p.grad for p in model.backbone.body.parameters() if p.requires_grad]
    assert any(g is not None and g.abs().sum() > 0 for g in grads), "no gradient reached the backbone"
    model.eval()
    with torch.no_grad():
        out = model(images)
    assert len(out) == 2
    for o, img in zip(out, images):
        assert {"boxes", "labels", "scores"} <= set(o)
        assert o["boxes"].shape[-1] == 4 and len(o["boxes"]) <= 10
        if len(o["labels"]):
            assert 0 <= int(o["labels"].min()) and int(o["labels"].max()) < 3
        if name == "maskrcnn":
            assert o["masks"].shape[-2:] == img.shape[-2:]


def test_rcnn_labels_are_zero_based_for_the_user():
    model = create_detector("fasterrcnn", "shunted_t", 3, **_det_kwargs("fasterrcnn"), **SHUNTED)
    assert model.roi_heads.box_predictor.cls_score.out_features == 4  # K + background
    seen = {}
    model.roi_heads.register_forward_pre_hook(
        lambda mod, args: seen.update(labels=[t["labels"] for t in args[3]]) if args[3] else None)
    images, targets = _images_and_targets()
    model.train()
    model(images, targets)
    assert [x.tolist() for x in seen["labels"]] == [[1], [3, 2]]  # class 0 is not R-CNN's background
    assert targets[1]["labels"].tolist() == [2, 1]  # the caller's targets are untouched
    model.eval()
    model.roi_heads.score_thresh = 0.0
    with torch.no_grad():
        out = model(images)
    labels = torch.cat([o["labels"] for o in out])
    assert len(labels) and labels.min() >= 0 and labels.max() <= 2


@pytest.mark.parametrize("backbone", sorted(BACKBONES))
@pytest.mark.parametrize("name", ["semantic_fpn", "upernet"])
def test_segmenter_logits_at_input_resolution(name, backbone):
    head = dict(channels=32, fpn_channels=32) if name == "semantic_fpn" else dict(channels=32)
    model = create_segmenter(name, backbone, 5, **head, **BACKBONES[backbone])
    x = torch.rand(2, 3, 64, 96)
    y = model(x)
    assert y.shape == (2, 5, 64, 96)
    loss = torch.nn.functional.cross_entropy(y, torch.randint(0, 5, (2, 64, 96)))
    loss.backward()
    assert model.backbone.model is not None and any(p.grad is not None for p in model.backbone.parameters())
    model.eval()
    with torch.no_grad():
        assert model(torch.rand(1, 3, 72, 88)).shape == (1, 5, 72, 88)  # not a multiple of 32


def test_backbone_strides_and_channels():
    bb = create_backbone("shunted_t", **SHUNTED)
    assert isinstance(bb, FeatureBackbone)
    assert bb.strides == [4, 8, 16, 32] and bb.out_channels == [64, 64, 128, 128]
    maps = bb(torch.rand(1, 3, 64, 96))
    assert [tuple(m.shape[-2:]) for m in maps] == [(16, 24), (8, 12), (4, 6), (2, 3)]
    assert [m.shape[1] for m in maps] == bb.out_channels
    bb = create_backbone("shunted_t", out_indices=(1, 2, 3), **SHUNTED)
    assert bb.strides == [8, 16, 32]
    vit = create_backbone("vit_tiny_patch16_224", **VIT)
    assert isinstance(vit, SimpleFeaturePyramid)
    assert vit.strides == [4, 8, 16, 32] and vit.out_channels == [16, 32, 64, 64]
    maps = vit(torch.rand(1, 3, 64, 96))  # another size than img_size: position embedding resampled
    assert [tuple(m.shape[1:]) for m in maps] == [(16, 16, 24), (32, 8, 12), (64, 4, 6), (64, 2, 3)]
    assert vit.no_weight_decay() == {"vit.pos_embed", "vit.cls_token"}  # for timm's optimizers
    pvt = create_backbone("pvt_v2_b0", depths=(1, 1, 1, 1))
    assert pvt.strides == [4, 8, 16, 32] and pvt.out_channels == [32, 64, 160, 256]


def test_evit_backbone_fills_the_grid():
    kw = dict(depth=4, embed_dim=64, num_heads=2, img_size=64)
    full = create_backbone("evit_deit_tiny_patch16_224", keep_rate=1.0, out_indices=(2,), **kw)
    plain = create_backbone("deit_tiny_patch16_224", out_indices=(2,), **kw)
    plain.model.load_state_dict(full.model.state_dict())
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(full(x)[0], plain(x)[0], atol=1e-5)  # keep rate 1 = the plain ViT
    reduced = create_backbone("evit_deit_tiny_patch16_224", keep_rate=0.5, out_indices=(0, 1, 2, 3), **kw)
    with torch.no_grad():
        maps = reduced(x)
    assert [tuple(m.shape[-2:]) for m in maps] == [(16, 16), (8, 8), (4, 4), (2, 2)]
    # by default (restore="keep") a removed patch keeps its own last features: all columns differ
    cols = maps[2][0].flatten(1).T
    assert reduced.restoration().name == "keep" and len(torch.unique(cols, dim=0)) == cols.shape[0]
    # restore="fused" (the former behaviour): removed patches carry the fused token, many equal columns
    fused = create_backbone("evit_deit_tiny_patch16_224", keep_rate=0.5, restore="fused", out_indices=(2,), **kw)
    fused.load_state_dict(reduced.state_dict(), strict=False)
    with torch.no_grad():
        cols = fused(x)[0][0].flatten(1).T
    assert len(torch.unique(cols, dim=0)) < cols.shape[0]


def _classifier_checkpoint(tmp_path, name, **kw):
    model = timm.create_model(name, num_classes=7, **kw)
    path = save_checkpoint({"model": model.state_dict()}, tmp_path / f"{name}.pth")
    return model, path


def test_pretrained_classification_weights_load_into_backbone(tmp_path):
    cls_model, path = _classifier_checkpoint(tmp_path, "shunted_t", **SHUNTED)
    det = create_detector("retinanet", "shunted_t", 3, pretrained_backbone=path, **_det_kwargs("retinanet"), **SHUNTED)
    body = det.backbone.body
    assert body.load_report["loaded"] > 0 and body.load_report["missing"] == 0
    assert body.load_report["skipped"] >= 2  # head.weight, head.bias dropped
    own = body.model.state_dict()
    for k, v in cls_model.state_dict().items():
        if k in own:
            assert torch.equal(own[k], v), k

    vit_model, vit_path = _classifier_checkpoint(tmp_path, "vit_tiny_patch16_224", **VIT)
    seg = create_segmenter("upernet", "vit_tiny_patch16_224", 4, pretrained_backbone=vit_path, channels=16, **VIT)
    assert torch.equal(seg.backbone.model.blocks[1].mlp.fc2.weight, vit_model.blocks[1].mlp.fc2.weight)
    assert seg.backbone.load_report["missing"] == 0


def test_wrong_checkpoint_is_a_clear_error(tmp_path):
    _, shunted_path = _classifier_checkpoint(tmp_path, "shunted_t", **SHUNTED)
    with pytest.raises(LeanvitError, match="vit_tiny_patch16_224"):  # another architecture: nothing fits
        create_backbone("vit_tiny_patch16_224", pretrained=shunted_path, **VIT)
    wide = dict(SHUNTED, embed_dims=[64, 128, 128, 256])
    with pytest.raises(LeanvitError, match="shape mismatch"):  # same architecture, other widths
        create_backbone("shunted_t", pretrained=shunted_path, **wide)
    sd = torch.load(shunted_path, weights_only=True)["model"]
    sd.pop("block2.0.attn.q.weight")
    partial = save_checkpoint(sd, tmp_path / "partial.pth")
    with pytest.raises(LeanvitError, match="missing keys: block2.0.attn.q.weight"):
        create_backbone("shunted_t", pretrained=partial, **SHUNTED)
    assert create_backbone("shunted_t", pretrained=partial, allow_missing=True, **SHUNTED).load_report["missing"] == 1
    with pytest.raises(FileNotFoundError):
        create_backbone("shunted_t", pretrained=tmp_path / "nope.pth", **SHUNTED)


@pytest.mark.parametrize("backbone", sorted(BACKBONES))
def test_grad_checkpointing_gives_the_same_loss_and_gradients(backbone):
    images, targets = _images_and_targets()
    results = []
    for ckpt in (False, True):
        torch.manual_seed(0)
        model = create_detector("retinanet", backbone, 3, grad_checkpointing=ckpt, **_det_kwargs("retinanet"),
                                **BACKBONES[backbone])
        if results:
            model.load_state_dict(results[0][2])
        model.train()
        body = model.backbone.body.model
        block = body.blocks[0] if hasattr(body, "blocks") else body.block1[0]
        calls = []
        block.register_forward_pre_hook(lambda *a, calls=calls: calls.append(1))
        loss = sum(model(images, targets).values())
        loss.backward()
        assert len(calls) == (2 if ckpt else 1)  # checkpointing recomputes the block in the backward pass
        grads = {n: p.grad.clone() for n, p in model.backbone.body.named_parameters() if p.grad is not None}
        results.append((loss.detach(), grads, model.state_dict()))
    assert torch.allclose(results[0][0], results[1][0], atol=1e-6)
    assert results[0][1].keys() == results[1][1].keys()
    for n, g in results[0][1].items():
        assert torch.allclose(g, results[1][1][n], atol=1e-5, rtol=1e-4), n
    assert model.backbone.body.model.grad_checkpointing


def test_bad_options_are_clear_errors():
    with pytest.raises(LeanvitError, match="unknown detector 'yolo'"):
        create_detector("yolo", "shunted_t", 3, **SHUNTED)
    with pytest.raises(LeanvitError, match="num_classes"):
        create_detector("fcos", "shunted_t", 0, **SHUNTED)
    with pytest.raises(LeanvitError, match="unknown segmenter"):
        create_segmenter("deeplab", "shunted_t", 3, **SHUNTED)
    with pytest.raises(LeanvitError, match="unknown model 'shunted_x'"):
        create_backbone("shunted_x")
    with pytest.raises(LeanvitError, match="out_indices"):
        create_backbone("vit_tiny_patch16_224", out_indices=(4,), **VIT)
    with pytest.raises(LeanvitError, match="anchor_sizes has 2 levels"):
        create_detector("retinanet", "shunted_t", 3, anchor_sizes=((16,), (32,)), **SHUNTED)


def _dense_recipes():
    from leanvit.train.recipes import RECIPE_DIR
    return sorted(p.stem for p in RECIPE_DIR.glob("*.yaml") if p.stem.endswith(("_coco", "_ade20k")))


def test_real_data_recipes_build_their_models():
    """Every COCO/ADE20K recipe names a detector/segmenter and options that create_detector/create_segmenter
    accept (meta device: no memory; Shunted builds on CPU, only its tiny variant to stay fast)."""
    from leanvit.train.recipes import resolve_config

    names = _dense_recipes()
    assert {"shunted_s_retinanet_coco", "shunted_s_maskrcnn_coco", "shunted_s_semfpn_ade20k",
            "deit3_b_upernet_ade20k", "pvt_v2_b2_retinanet_coco"} <= set(names)
    for name in names:
        c = resolve_config(name)
        assert c["task"] in ("detection", "segmentation") and c["data"] is None
        if c["model"].startswith("shunted") and c["model"] != "shunted_t":
            continue
        opts = dict(c["head_kwargs"], drop_path_rate=c["drop_path"], img_size=c["img_size"])
        with torch.device("cpu" if c["model"].startswith("shunted") else "meta"):
            if c["task"] == "detection":
                assert c["min_size"] == 800 and c["max_size"] == 1333 and c["epochs"] == 12
                m = create_detector(c["detector"], c["model"], 80, min_size=c["min_size"], max_size=c["max_size"],
                                    **opts)
                assert m.transform.min_size == (800,) and m.transform.max_size == 1333
            else:
                assert c["crop_size"] == 512 and c["schedule"] == "poly" and c["iterations"] in (40000, 160000)
                m = create_segmenter(c["segmenter"], c["model"], 150, **opts)
        assert sum(p.numel() for p in m.parameters()) > 1e6, name
