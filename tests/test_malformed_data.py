"""Malformed user data: every parser of user files answers with a one-line ``LeanvitError`` naming the file
and the bad value (the CLI prints it, exit 2), or a counted skip; never a traceback, never a wrong number."""
import json

import numpy as np
import pytest
from PIL import Image

from leanvit.data import create_dataset, dataset_classes
from leanvit.errors import LeanvitError
from leanvit.train.recipes import load_recipe


def _one_line(err, *needles):
    msg = str(err.value)
    assert "\n" not in msg, msg
    for n in needles:
        assert n in msg, msg


# ------------------------------------------------------------------------------------------ COCO

def _coco(root, images=None, anns=None, cats=None, split="val2017", raw=None):
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    (root / split).mkdir(exist_ok=True)
    for i in range(2):
        Image.fromarray(np.full((40, 60, 3), 40 * i, np.uint8)).save(root / split / f"{i}.png")
    images = images if images is not None else [
        {"id": i + 1, "file_name": f"{i}.png", "height": 40, "width": 60} for i in range(2)]
    anns = anns if anns is not None else [
        {"id": 1, "image_id": 1, "category_id": 1, "bbox": [5, 5, 10, 20], "area": 200, "iscrowd": 0}]
    cats = cats if cats is not None else [{"id": 1, "name": "thing"}]
    path = root / "annotations" / f"instances_{split}.json"
    if raw is not None:
        path.write_bytes(raw)
    else:
        path.write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    return root


def _ann(**kw):
    return dict({"id": 1, "image_id": 1, "category_id": 1, "bbox": [5, 5, 10, 20], "area": 200, "iscrowd": 0}, **kw)


@pytest.mark.parametrize("anns,needles", [
    ([_ann(bbox=["5", "5", "10", "20"])], ["annotation 1", "malformed bbox", "'5'"]),
    ([_ann(bbox=[5, None, 10, 20])], ["annotation 1", "malformed bbox", "None"]),
    ([_ann(bbox=[5, 5, float("nan"), 20])], ["annotation 1", "malformed bbox", "nan"]),
    ([_ann(bbox=[5, 5, float("inf"), 20])], ["annotation 1", "malformed bbox", "inf"]),
    ([_ann(image_id="1")], ["annotation 1", "image_id '1'", "integers"]),
    ([_ann(category_id=None)], ["annotation 1", "category_id None"]),
    ([_ann(area="big")], ["annotation 1", "area 'big'"]),
    ([_ann(iscrowd=2)], ["annotation 1", "iscrowd 2"]),
    ([_ann(id=None)], ["annotations[0]", "id None"]),
    (["not an object"], ["annotations[0] is not an object"]),
])
def test_coco_malformed_annotations(tmp_path, anns, needles):
    root = _coco(tmp_path / "c", anns=anns)
    with pytest.raises(LeanvitError) as e:
        create_dataset(root, "val")
    _one_line(e, "instances_val2017.json", *needles)


@pytest.mark.parametrize("images,needles", [
    ([{"id": 1, "file_name": "0.png", "width": 60}], ["image 1", "height None"]),
    ([{"id": 1, "file_name": "0.png", "height": "40", "width": 60}], ["image 1", "height '40'"]),
    ([{"id": 1, "file_name": "0.png", "height": -4, "width": 60}], ["image 1", "height -4"]),
    ([{"id": "1", "file_name": "0.png", "height": 40, "width": 60}], ["image images[0]", "id '1'", "integers"]),
    ([{"id": 1, "height": 40, "width": 60}], ["image 1", "file_name None"]),
])
def test_coco_malformed_images(tmp_path, images, needles):
    root = _coco(tmp_path / "c", images=images)
    with pytest.raises(LeanvitError) as e:
        create_dataset(root, "val")
    _one_line(e, "instances_val2017.json", *needles)


def test_coco_id_types_mismatch(tmp_path):
    """String image ids with integer image_id references (or the reverse): an error, not a KeyError."""
    images = [{"id": str(i + 1), "file_name": f"{i}.png", "height": 40, "width": 60} for i in range(2)]
    root = _coco(tmp_path / "c", images=images)
    with pytest.raises(LeanvitError) as e:
        create_dataset(root, "val")
    _one_line(e, "instances_val2017.json", "id '1'")


def test_coco_not_utf8(tmp_path):
    body = json.dumps({"images": [], "annotations": [], "categories": [{"id": 1, "name": "caf\u00e9"}]})
    root = _coco(tmp_path / "c", raw=body.replace("\\u00e9", "\u00e9").encode("latin-1"))
    for call in (lambda: create_dataset(root, "val"), lambda: dataset_classes(root)):
        with pytest.raises(LeanvitError) as e:
            call()
        _one_line(e, "instances_val2017.json", "not UTF-8")


def test_coco_validation_without_annotations_is_undefined_not_a_score(tmp_path):
    root = _coco(tmp_path / "c", anns=[])
    with pytest.raises(LeanvitError) as e:
        create_dataset(root, "val")
    _one_line(e, "instances_val2017.json", "no (non-crowd) annotations", "undefined")
    crowd_only = _coco(tmp_path / "d", anns=[_ann(iscrowd=1)])
    with pytest.raises(LeanvitError):
        create_dataset(crowd_only, "val")
    train = _coco(tmp_path / "e", anns=[], split="train2017")  # training on negatives only is allowed
    assert len(create_dataset(train, "train")) == 2


def test_coco_unknown_option(tmp_path):
    root = _coco(tmp_path / "c")
    with pytest.raises(LeanvitError) as e:
        create_dataset(root, "val", options={"maks": True})
    _one_line(e, "unknown setting 'coco.maks'", "did you mean: masks")


def test_coco_good_file_still_loads(tmp_path):
    ds = create_dataset(_coco(tmp_path / "c"), "val")
    assert len(ds) == 2 and ds[0][1]["boxes"].tolist() == [[5.0, 5.0, 15.0, 25.0]]


# ------------------------------------------------------------------------------------------ mask folders

def _masks(root, classes_txt=None):
    for split in ("train", "val"):
        (root / "images" / split).mkdir(parents=True)
        (root / "masks" / split).mkdir(parents=True)
        for name in ("a", "b"):
            Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(root / "images" / split / f"{name}.jpg")
            Image.fromarray(np.full((20, 20), 1, np.uint8)).save(root / "masks" / split / f"{name}.png")
    if classes_txt is not None:
        (root / "classes.txt").write_bytes(classes_txt)
    return root


def test_truncated_mask_without_classes_txt(tmp_path):
    root = _masks(tmp_path / "s")
    mask = root / "masks" / "val" / "b.png"
    noise = np.random.default_rng(0).integers(0, 3, (64, 64), dtype=np.uint8)
    Image.fromarray(noise).save(mask)
    mask.write_bytes(mask.read_bytes()[:len(mask.read_bytes()) // 2])
    with pytest.raises(LeanvitError) as e:
        dataset_classes(root)
    _one_line(e, "b.png", "cannot read mask")


def test_truncated_mask_with_classes_txt_is_found_before_training(tmp_path):
    """With classes.txt the masks are not scanned for labels; each is still verified when the split loads."""
    root = _masks(tmp_path / "s", classes_txt=b"bg\nfg\nother\n")
    mask = root / "masks" / "train" / "b.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 3, (20, 20), dtype=np.uint8)).save(mask)
    mask.write_bytes(mask.read_bytes()[:len(mask.read_bytes()) // 2])
    assert len(create_dataset(root, "val")) == 2
    with pytest.raises(LeanvitError) as e:
        create_dataset(root, "train")
    _one_line(e, "b.png", "cannot read mask")


def test_image_pil_cannot_identify(tmp_path):
    root = _masks(tmp_path / "s", classes_txt=b"bg\nfg\n")
    (root / "images" / "val" / "b.jpg").write_bytes(b"this is not a picture")
    with pytest.raises(LeanvitError) as e:
        create_dataset(root, "val")
    _one_line(e, "b.jpg", "cannot read image")


def test_classes_txt_not_utf8(tmp_path):
    root = _masks(tmp_path / "s", classes_txt="fond\nb\u00e2timent\n".encode("latin-1"))
    with pytest.raises(LeanvitError) as e:
        create_dataset(root, "val")
    _one_line(e, "classes.txt", "not UTF-8")


def test_mask_that_is_not_an_image(tmp_path):
    root = _masks(tmp_path / "s", classes_txt=b"bg\nfg\n")
    (root / "masks" / "val" / "a.png").write_bytes(b"\x89PNG garbage")
    with pytest.raises(LeanvitError) as e:
        create_dataset(root, "val")
    _one_line(e, "a.png", "cannot read mask")


# ------------------------------------------------------------------------------------------ recipes

@pytest.mark.parametrize("body,needles", [
    ("epochs: 3\nopt: caf\u00e9\n".encode("latin-1"), ["not UTF-8"]),
    (b"- a\n- b\n", ["must be a mapping", "list"]),
    (b"1: 2\n", ["setting names are words", "1"]),
    (b"base: [evit_demo, tome_demo]\n", ["base must name one recipe"]),
    (b"epochs: [1\n", ["not valid YAML"]),
])
def test_malformed_recipe_files(tmp_path, body, needles):
    path = tmp_path / "r.yaml"
    path.write_bytes(body)
    with pytest.raises(LeanvitError) as e:
        load_recipe(str(path))
    _one_line(e, "r.yaml", *needles)


# ------------------------------------------------------------------------------------------ detection demo report

@pytest.mark.parametrize("maps,expected", [
    ((0.0, 0.0), "No winner: both models score 0.000"),
    ((0.0004, 0.0001), "No winner: both models score 0.000"),
    ((0.5123, 0.5121), "No winner: both models score 0.512"),
    ((-1.0, 0.3), "No comparison: the val mAP is undefined"),
    ((0.2, 0.3), "Higher val mAP here: B."),
    ((0.31, 0.3), "Higher val mAP here: A."),
])
def test_detection_demo_verdict(maps, expected):
    from leanvit.tools.demo_dense import verdict

    assert verdict([{"label": "A", "val_map": maps[0]}, {"label": "B", "val_map": maps[1]}]).startswith(expected)


def test_detection_demo_report_states_the_load():
    from leanvit.measure.load import LoadWatch
    from leanvit.tools.demo_dense import _report

    row = {"val_map": 0.0, "val_map50": 0.0, "val_map_small": -1.0, "val_map_medium": 0.0, "steps": 10,
           "train_s": 5.0, "steps_per_s": 2.0, "backbone_params_m": 1.0, "backbone_gmacs": 0.1, "evals": {},
           "dataset": [0] * 4, "config": {"batch_size": 8, "time_limit": 30}}
    rows = [dict(row, label="A"), dict(row, label="B")]
    load = LoadWatch().stop()
    text = _report(rows, [], "cpu", True, 12.0, load)
    assert load.line in text and "Higher val mAP" not in text and "No winner" in text


# ------------------------------------------------------------------------------------------ checkpoints

def _tiny_vit():
    import timm

    import leanvit  # noqa: F401

    return timm.create_model("evit_deit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=32, depth=2,
                             num_heads=2, num_classes=3).eval()


@pytest.mark.parametrize("make,needles", [
    (lambda sd, p: p.write_bytes(_saved(sd)[: len(_saved(sd)) // 2]), ["cannot read checkpoint"]),
    (lambda sd, p: __import__("torch").save([1, 2, 3], p), ["does not contain a state dict"]),
    (lambda sd, p: __import__("torch").save({"model": {"w": 1.0}}, p), ["no model state dict"]),
    (lambda sd, p: __import__("torch").save(__import__("torch").ones(3), p), ["does not contain a state dict"]),
    (lambda sd, p: __import__("torch").save({"model": {**sd, "head.bias": sd["head.bias"] * float("nan")}}, p),
     ["NaN or infinite weights", "head.bias"]),
])
def test_broken_checkpoints(tmp_path, make, needles):
    from leanvit import load_checkpoint

    model = _tiny_vit()
    path = tmp_path / "ckpt.pth"
    make(model.state_dict(), path)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(LeanvitError) as e:
        load_checkpoint(model, path)
    _one_line(e, "ckpt.pth", *needles)
    assert all((before[k] == v).all() for k, v in model.state_dict().items())  # the model is left as it was


def test_truncated_safetensors(tmp_path):
    from safetensors.torch import save_file

    from leanvit import load_checkpoint

    model = _tiny_vit()
    path = tmp_path / "w.safetensors"
    save_file(model.state_dict(), str(path))
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(LeanvitError) as e:
        load_checkpoint(model, path)
    _one_line(e, "w.safetensors")


def _saved(sd):
    import io

    import torch

    buf = io.BytesIO()
    torch.save(sd, buf)
    return buf.getvalue()


# ------------------------------------------------------------------------------------------ embedded data options

@pytest.mark.parametrize("data,options,needles", [
    ("digits", {"canvas_size": "abc"}, ["digits.canvas_size", "'abc'"]),
    ("digits", {"canvas_size": None}, ["digits.canvas_size", "None"]),
    ("digits", {"seed": 1.5}, ["digits.seed", "1.5"]),
    ("digits", {"seed": -3}, ["digits.seed", "-3"]),
    ("digits", {"canvas_size": True}, ["digits.canvas_size", "True"]),
    ("digits", {"cavnas_size": 40}, ["unknown setting 'digits.cavnas_size'", "canvas_size"]),
    ("digits-det", {"bogus": 1}, ["unknown setting 'digits_dense.bogus'"]),
    ("digits-det", {"canvas_size": "x"}, ["digits_dense.canvas_size", "'x'"]),
    ("digits-seg", {"noise": float("nan")}, ["digits_dense.noise", "nan"]),
    ("digits-det", {"masks": "yes"}, ["digits_dense.masks", "true or false"]),
    ("digits-det", [1, 2], ["must be a mapping"]),
])
def test_embedded_data_options(data, options, needles):
    with pytest.raises(LeanvitError) as e:
        create_dataset(data, "val", options=options)
    _one_line(e, *needles)


# ------------------------------------------------------------------------------------------ run folders

def _old_run(out):
    import torch

    out.mkdir(parents=True)
    torch.save({"model": {"w": torch.ones(2)}, "epoch": 3}, out / "last.pth")
    (out / "metrics.csv").write_text("epoch,val_map\n1,0.5\n")
    (out / "config.yaml").write_text("epochs: 3\n")
    return {p.name: p.read_bytes() for p in out.iterdir()}


@pytest.mark.parametrize("task", ["classification", "detection"])
def test_overwrite_keeps_the_old_run_when_the_new_data_is_bad(tmp_path, task):
    """``--overwrite`` removes the previous run only once the new run could be built: malformed data (or any
    other error while building) leaves the folder as it was."""
    from leanvit.train import train

    out = tmp_path / "run"
    before = _old_run(out)
    if task == "detection":
        data = _coco(tmp_path / "coco", anns=[_ann(bbox=[1, 2, None, 4])], split="train2017")
        _coco(tmp_path / "coco", split="val2017")
        recipe = "shunted_t_fcos_demo"
    else:
        data = tmp_path / "tree"
        (data / "train" / "a").mkdir(parents=True)  # a class folder without images
        (data / "val" / "a").mkdir(parents=True)
        recipe = "deit3_demo"
    with pytest.raises(LeanvitError) as e:
        train(recipe, device="cpu", progress=False, output=str(out), overwrite=True, data=str(data))
    assert "\n" not in str(e.value)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


# ------------------------------------------------------------------------------------------ errors from workers

class _BadImages:
    def __len__(self):
        return 2

    def __getitem__(self, i):
        raise LeanvitError(f"cannot read image /data/x{i}.png: not an image format PIL recognizes")


def test_worker_errors_print_as_one_line():
    """A LeanvitError raised inside a DataLoader worker (a corrupt image met mid-epoch) reaches the user as
    its own one line, not as the worker's traceback."""
    import torch

    from leanvit.cli import error_line

    loader = torch.utils.data.DataLoader(_BadImages(), batch_size=1, num_workers=1)
    with pytest.raises(LeanvitError) as e:
        next(iter(loader))
    assert "\n" in str(e.value)  # how torch hands it back
    assert error_line(e.value) == "cannot read image /data/x0.png: not an image format PIL recognizes"
    assert error_line(LeanvitError("plain")) == "plain"


def test_ade20k_unreadable_class_names_are_reported(tmp_path):
    """A broken objectInfo150.csv falls back to class_1 ... class_150, and says so (naming the file)."""
    import logging

    for split in ("training", "validation"):
        (tmp_path / "images" / split).mkdir(parents=True)
        (tmp_path / "annotations" / split).mkdir(parents=True)
    (tmp_path / "objectInfo150.csv").write_bytes(
        "Idx,Ratio,Train,Val,Name\n1,0.1,1,1,b\u00e2timent\n".encode("latin-1"))
    records = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append  # on leanvit's logger itself: the CLI may have stopped its propagation
    logging.getLogger("leanvit").addHandler(handler)
    try:
        names = dataset_classes(tmp_path)
    finally:
        logging.getLogger("leanvit").removeHandler(handler)
    assert names[0] == "class_1" and len(names) == 150
    assert any("objectInfo150.csv" in r.getMessage() for r in records)
