"""ReductionSpec: every way users write a token reduction ("evit:0.7", a recipe mapping, the older keep_rate /
locations keys, none) read into one method + strength + options, with errors that name the knob's range."""
import pytest
import torch

import leanvit
from leanvit.checkpoints import save_checkpoint
from leanvit.errors import LeanvitError
from leanvit.models.build import build_model
from leanvit.reduction import ReductionSpec, parse_strengths, reduction_spec
from leanvit.train.recipes import reduction_settings


def test_text_mapping_and_none_forms():
    assert ReductionSpec.parse("evit:0.7") == ReductionSpec("evit", 0.7)
    assert ReductionSpec.parse("tome:8").to_dict() == {"method": "tome", "r": 8}
    assert ReductionSpec.parse("evit") == ReductionSpec("evit")  # the method at its default strength
    for none in (None, "none", "off", "-", " ", {}):
        assert ReductionSpec.parse(none) is None
    spec = ReductionSpec.parse({"method": "evit", "keep_rate": 0.5, "locations": [1, 2]})
    assert (spec.method, spec.strength, dict(spec.options)) == ("evit", 0.5, {"locations": [1, 2]})
    assert spec.to_dict() == {"method": "evit", "keep_rate": 0.5, "locations": [1, 2]}
    assert ReductionSpec.parse(spec) is spec and ReductionSpec.parse(spec.to_dict()) == spec
    assert spec.label() == "evit:0.5" and str(spec) == "evit:0.5 (locations=[1, 2])"


def test_legacy_keys_are_translated_here():
    assert ReductionSpec.parse(None, keep_rate=0.6) == ReductionSpec("evit", 0.6)
    assert ReductionSpec.parse(None, keep_rate=0.6, locations=(3,)).to_dict() == {
        "method": "evit", "keep_rate": 0.6, "locations": [3]}
    # with an EViT method the older keys set its strength and layers (they win over the mapping's)
    assert ReductionSpec.parse("evit-drop:0.9", keep_rate=0.5) == ReductionSpec("evit-drop", 0.5)
    with pytest.raises(LeanvitError, match="EViT settings.*'tome'"):
        ReductionSpec.parse("tome:4", keep_rate=0.5)
    # the recipe keys keep_rate / evit_locations give the same spec, plus the schedule
    assert reduction_settings({"keep_rate": 0.7, "evit_locations": [1, 2]}) == {
        "method": "evit", "keep_rate": 0.7, "locations": [1, 2], "start_epoch": 0, "epochs": 0}
    # create_model's keep_rate alias and the reduction mapping build the same model
    a = leanvit.create_model("test_vit", keep_rate=0.5, locations=[1])
    b = leanvit.create_model("test_vit", reduction={"method": "evit", "keep_rate": 0.5, "locations": [1]})
    assert reduction_spec(a) == reduction_spec(b) == {"method": "evit", "keep_rate": 0.5, "locations": [1]}


def test_unknown_options_travel_untouched():
    spec = ReductionSpec.parse({"method": "tome", "r": 4, "restore": "nearest", "extra": {"a": [1]}})
    assert spec.strength == 4 and dict(spec.options) == {"restore": "nearest", "extra": {"a": [1]}}
    assert list(spec.to_dict()) == ["method", "r", "restore", "extra"]
    assert spec.with_options(restore="none").options["restore"] == "none"
    assert spec.options["restore"] == "nearest"  # specs are values: with_options makes a new one


@pytest.mark.parametrize("text, needles", [
    ("evit:", ["'evit:'", "keep_rate value is missing"]),
    ("evit:0.7,,0.5", ["keep_rate value is missing"]),
    ("evit:0", ["'evit:0'", "(0, 1]"]),
    ("evit-drop:1.5", ["(0, 1]"]),
    ("evit:nan", ["(0, 1]"]),
    ("tome:-1", ["integer >= 0"]),
    ("tome:2.5", ["integer >= 0"]),
    ("tome:x", ["cannot read 'x'"]),
])
def test_strength_errors_name_the_range(text, needles):
    with pytest.raises(LeanvitError) as e:
        parse_strengths(text)
    for n in needles:
        assert n in str(e.value)
    with pytest.raises(LeanvitError):
        ReductionSpec.parse(text)


def test_mapping_errors():
    with pytest.raises(LeanvitError, match=r"\(0, 1\]"):
        ReductionSpec.parse({"method": "evit", "keep_rate": 0})
    with pytest.raises(LeanvitError, match="needs a method"):
        ReductionSpec.parse({"keep_rate": 0.5})
    with pytest.raises(LeanvitError, match="one strength"):
        ReductionSpec.parse("evit:0.5,0.7")
    with pytest.raises(LeanvitError, match="unknown reduction method 'evt'"):
        ReductionSpec.parse("evt:0.5")
    with pytest.raises(LeanvitError, match="mapping"):
        ReductionSpec.parse(0.7)


def test_build_model_keeps_the_recorded_options_of_the_same_method(tmp_path):
    torch.manual_seed(0)
    model = leanvit.create_model("test_vit", img_size=32, num_classes=10, reduction="evit:0.5")
    leanvit.reduction.get_reduction("evit").remove(model)
    ckpt = tmp_path / "m.pth"
    save_checkpoint({"model": model.state_dict(),
                     "model_spec": {"name": "test_vit", "kwargs": {"img_size": 32, "num_classes": 10},
                                    "reduction": {"method": "evit", "keep_rate": 0.5, "locations": [2]}}}, ckpt)
    built = build_model(checkpoint=ckpt)
    assert reduction_spec(built.model) == {"method": "evit", "keep_rate": 0.5, "locations": [2]}
    # a new strength of the same method: the trained layers stay
    built = build_model(checkpoint=ckpt, reduction="evit:0.7")
    assert reduction_spec(built.model) == {"method": "evit", "keep_rate": 0.7, "locations": [2]}
    # another method replaces the recorded one with its own options
    built = build_model(checkpoint=ckpt, reduction=ReductionSpec("tome", 2))
    assert reduction_spec(built.model)["method"] == "tome"


def test_an_option_of_another_method_is_a_one_line_error():
    import timm

    from leanvit.reduction import apply_reduction

    model = timm.create_model("deit_tiny_patch16_224", depth=2)
    with pytest.raises(LeanvitError, match="reduction 'tome' takes no option 'keep_rate'.*its options: r"):
        apply_reduction(model, "tome", r=3, keep_rate=0.7)  # e.g. an EViT mapping merged into a ToMe one
