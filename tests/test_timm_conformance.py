"""timm's model checks on leanvit's registered models, run from inside this repository.

The checks are those of timm's own ``tests/test_models.py`` (huggingface/pytorch-image-models), written here
against the public timm / torchvision functions that file calls (``create_model`` with ``features_only``,
``forward_intermediates``, ``reset_classifier``, ``set_scriptable``, timm's FX leaf registries with
torchvision's ``create_feature_extractor``), at the input sizes timm's tests use, on the smallest model of
each leanvit family. A new timm release that breaks one of them fails here.

Exclusions, each for the reason timm itself excludes models (see docs/robustness.md):
- EViT and timm's ``default_cfgs`` standard path: like timm's own ViTs (``deit*``, ``vit_*``), EViT's
  ``forward_features`` returns tokens, not a spatial map, so it has no ``pool_size`` and goes through the
  non-standard path (timm selects that path by name, which ``evit_*`` does not match; here it is listed).
- EViT and TorchScript (``torch.jit.script`` of the model, and of its FX graph): the public forward takes a
  per-call keep rate that is a float or one per location and returns logits or (logits, kept indices);
  TorchScript has no type for either. ``test_evit_torchscript_is_excluded`` keeps this claim honest.
"""
import fnmatch
import math

import pytest
import timm
import torch
from timm import create_model, list_models, set_scriptable
from timm.models import get_notrace_functions, get_notrace_modules
from torchvision.models.feature_extraction import NodePathTracer, create_feature_extractor, get_graph_node_names

import leanvit  # noqa: F401  (registers the models with timm)

#: the smallest registered model of each family
MODELS = ["evit_deit_tiny_patch16_224", "shunted_t"]
#: like timm's NON_STD_FILTERS ('vit_*', 'deit*', ...): token outputs, no pooled spatial map
NON_STD_FILTERS = ["evit_*"]
EXCLUDE_JIT_FILTERS = ["evit_*"]

# timm's test sizes
TARGET_FWD_SIZE = MAX_FWD_SIZE = 384
TARGET_BWD_SIZE, MAX_BWD_SIZE = 128, 320
MAX_FWD_OUT_SIZE = 448
TARGET_JIT_SIZE, MAX_JIT_SIZE = 128, 320
TARGET_FFEAT_SIZE, MAX_FFEAT_SIZE = 96, 256
TARGET_FWD_FX_SIZE, MAX_FWD_FX_SIZE = 128, 256
TARGET_BWD_FX_SIZE, MAX_BWD_FX_SIZE = 128, 224


def _matches(name, filters):
    return any(fnmatch.fnmatch(name, f) for f in filters)


def _input_size(model, target):
    """timm's rule: the default input size, capped at ``target`` unless the model's input size is fixed."""
    cfg = model.pretrained_cfg
    size = tuple(cfg["input_size"])
    if cfg.get("fixed_input_size"):
        return size
    if cfg.get("min_input_size") and max(size) > target:
        return tuple(cfg["min_input_size"])
    return tuple(min(s, target) for s in size) if max(size) > target else size


def _inputs(size, batch=1, seed=0):
    return torch.randn((batch, *size), generator=torch.Generator().manual_seed(seed))


def _fx_kwargs():
    return dict(leaf_modules=get_notrace_modules(), autowrap_functions=get_notrace_functions(),
                param_shapes_constant=True)


def _fx_model(model, train=False):
    """timm's ``_create_fx_model``: a torchvision feature extractor returning the model's output node(s)."""
    kw = _fx_kwargs()
    train_nodes, eval_nodes = get_graph_node_names(model, tracer_kwargs=kw)
    eval_return, train_return = [eval_nodes[-1]], [train_nodes[-1]]
    if train:
        graph = NodePathTracer(**kw).trace(model)
        nodes = list(reversed(graph.nodes))
        out_names = [n.name for n in nodes[0]._input_nodes.keys()]
        names = [n.name for n in nodes]
        train_return = [train_nodes[-names.index(n)] for n in out_names]
    return create_feature_extractor(model, train_return_nodes=train_return, eval_return_nodes=eval_return,
                                    tracer_kwargs=kw)


def _cat(outputs):
    outputs = tuple(outputs.values()) if isinstance(outputs, dict) else outputs
    return torch.cat(outputs) if isinstance(outputs, tuple) else outputs


def test_every_family_is_covered():
    registered = list_models(["evit_*", "shunted_*"])
    assert registered, "leanvit registered no model with timm"
    families = {name.split("_")[0] for name in registered}
    assert families == {m.split("_")[0] for m in MODELS}


@pytest.mark.slow  # a 224 px model, several passes: ~20-60 s on a shared 2-core machine
@pytest.mark.parametrize("model_name", MODELS)
def test_model_forward(model_name):
    torch.manual_seed(0)
    model = create_model(model_name).eval()
    x = _inputs(_input_size(model, TARGET_FWD_SIZE))
    out = model(x)
    assert out.shape == (1, model.num_classes)
    assert not torch.isnan(out).any()
    model.set_grad_checkpointing()  # timm: grad checkpointing must not change the output
    torch.testing.assert_close(model(x), out, rtol=1e-4, atol=1e-5)


@pytest.mark.slow  # a 224 px model, several passes: ~20-60 s on a shared 2-core machine
@pytest.mark.parametrize("model_name", MODELS)
def test_model_backward(model_name):
    torch.manual_seed(0)
    model = create_model(model_name, num_classes=42).train()
    out = _cat(model(_inputs(_input_size(model, TARGET_BWD_SIZE), batch=2)))
    out.mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, f"no gradient for {missing}"
    assert out.shape[-1] == 42 and not torch.isnan(out).any()


@pytest.mark.slow  # a 224 px model, several passes: ~20-60 s on a shared 2-core machine
@pytest.mark.parametrize("model_name", MODELS)
def test_model_default_cfgs(model_name):
    """timm's ``test_model_default_cfgs`` (standard path) or ``test_model_default_cfgs_non_std``."""
    torch.manual_seed(0)
    model = create_model(model_name).eval()
    assert model.num_classes >= 0 and model.num_features > 0 and model.head_hidden_size > 0
    state = model.state_dict()
    cfg = model.pretrained_cfg
    x = _inputs(tuple(min(s, MAX_FWD_OUT_SIZE) for s in cfg["input_size"]))
    feats = model.forward_features(x)
    pre = model.forward_head(feats, pre_logits=True)
    assert pre.shape[1] == model.head_hidden_size
    if _matches(model_name, NON_STD_FILTERS):
        assert feats.shape[-1 if feats.ndim == 3 else 1] == model.num_features
        model.reset_classifier(0)
        assert model.num_classes == 0
        out = model(x)
        assert out.shape == pre.shape and out.shape[-1] == model.head_hidden_size
        out = create_model(model_name, num_classes=0).eval()(x)
        assert out.shape[-1] == model.num_features
    else:
        pool = cfg["pool_size"]
        assert tuple(feats.shape[-2:]) == tuple(pool) and feats.shape[1] == model.num_features
        model.reset_classifier(0)
        assert model.num_classes == 0
        out = model(x)
        assert out.ndim == 2 and out.shape == pre.shape
        model.reset_classifier(0, "")
        out = model(x)
        assert out.ndim == 4 and tuple(out.shape[-2:]) == tuple(pool)
        out = create_model(model_name, num_classes=0, global_pool="").eval()(x)
        assert out.ndim == 4 and tuple(out.shape[-2:]) == tuple(pool)
    for c in (cfg["classifier"],) if isinstance(cfg["classifier"], str) else cfg["classifier"]:
        assert c + ".weight" in state
    for c in (cfg["first_conv"],) if isinstance(cfg["first_conv"], str) else cfg["first_conv"]:
        assert c + ".weight" in state


@pytest.mark.parametrize("model_name", list_models(["evit_*", "shunted_*"], include_tags=True))
def test_every_registered_cfg_names_real_layers(model_name):
    """The cfg half of timm's cfg tests on every registered model and tag (built on the meta device:
    no memory, no time): classifier and first conv exist; pool_size exactly where the standard path
    applies."""
    with torch.device("meta"):
        model = create_model(model_name)
    state = model.state_dict()
    cfg = model.pretrained_cfg
    assert cfg["classifier"] + ".weight" in state
    assert cfg["first_conv"] + ".weight" in state
    if _matches(model_name, NON_STD_FILTERS):
        assert cfg.get("pool_size") is None  # token output: no spatial map to size
    else:
        h, w = cfg["input_size"][-2:]
        assert tuple(cfg["pool_size"]) == (math.ceil(h / 32), math.ceil(w / 32))


@pytest.mark.parametrize("model_name", MODELS)
def test_model_forward_features(model_name):
    model = create_model(model_name, features_only=True).eval()
    channels, reductions = model.feature_info.channels(), model.feature_info.reduction()
    size = _input_size(model, TARGET_FFEAT_SIZE)
    if max(size) > MAX_FFEAT_SIZE:
        size = (3, 224, 224)  # a fixed 224 input (EViT): still small enough to run
    outs = model(_inputs(size))
    assert len(outs) == len(channels)
    for c, r, o in zip(channels, reductions, outs):
        assert o.shape[0] == 1 and o.shape[1] == c
        assert o.shape[2] <= math.ceil(size[1] / r) + 1 and o.shape[3] <= math.ceil(size[2] / r) + 1
        assert not torch.isnan(o).any()


@pytest.mark.slow  # a 224 px model, several passes: ~20-60 s on a shared 2-core machine
@pytest.mark.parametrize("model_name", MODELS)
def test_model_forward_intermediates(model_name):
    torch.manual_seed(0)
    model = create_model(model_name).eval()
    info = timm.models.FeatureInfo(model.feature_info, len(model.feature_info))
    assert len(info.channels()) >= 3
    size = _input_size(model, TARGET_FFEAT_SIZE)
    x = _inputs(size)
    out, inter = model.forward_intermediates(x, output_fmt="NCHW")
    assert len(inter) == len(info.channels())
    for c, r, o in zip(info.channels(), info.reduction(), inter):
        assert o.shape[1] == c and o.shape[2] <= math.ceil(size[1] / r) + 1
    torch.testing.assert_close(out, model.forward_features(x))
    model.set_grad_checkpointing()
    torch.testing.assert_close(model.forward_intermediates(x, output_fmt="NCHW")[0], out, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("model_name", MODELS)
def test_model_forward_fx(model_name):
    """A symbolic trace (timm's FX leaves) computes exactly what the model computes."""
    torch.manual_seed(0)
    model = create_model(model_name).eval()
    x = _inputs(_input_size(model, TARGET_FWD_FX_SIZE))
    with torch.inference_mode():
        ref = model(x)
        out = _cat(_fx_model(model)(x))
    assert torch.equal(out, ref)


@pytest.mark.slow  # a 224 px model, several passes: ~20-60 s on a shared 2-core machine
@pytest.mark.parametrize("model_name", MODELS)
def test_model_backward_fx(model_name):
    torch.manual_seed(0)
    model = create_model(model_name, num_classes=42).train()
    num_params = sum(p.numel() for p in model.parameters())
    fx = _fx_model(model, train=True)
    out = _cat(fx(_inputs(_input_size(model, TARGET_BWD_FX_SIZE), batch=2)))
    out.mean().backward()
    missing = [n for n, p in fx.named_parameters() if p.grad is None]
    assert not missing, f"no gradient for {missing}"
    assert sum(p.grad.numel() for p in fx.parameters()) == num_params
    assert out.shape[-1] == 42 and not torch.isnan(out).any()


@pytest.mark.slow  # a 224 px model, several passes: ~20-60 s on a shared 2-core machine
@pytest.mark.parametrize("model_name", [m for m in MODELS if not _matches(m, EXCLUDE_JIT_FILTERS)])
def test_model_forward_torchscript(model_name):
    torch.manual_seed(0)
    with set_scriptable(True):
        model = create_model(model_name).eval()
    x = _inputs(_input_size(model, TARGET_JIT_SIZE))
    scripted = torch.jit.script(model)
    out = scripted(x)
    assert out.shape[0] == 1 and not torch.isnan(out).any()
    torch.testing.assert_close(out, model(x))


@pytest.mark.slow  # a 224 px model, several passes: ~20-60 s on a shared 2-core machine
@pytest.mark.parametrize("model_name", [m for m in MODELS if not _matches(m, EXCLUDE_JIT_FILTERS)])
def test_model_forward_fx_torchscript(model_name):
    torch.manual_seed(0)
    with set_scriptable(True):
        model = create_model(model_name).eval()
    x = _inputs(_input_size(model, TARGET_JIT_SIZE))
    scripted = torch.jit.script(_fx_model(model))
    with torch.inference_mode():
        out = _cat(scripted(x))
        torch.testing.assert_close(out, model(x))


def test_scripted_shunted_still_refuses_small_inputs():
    """The input check survives scripting (as a TorchScript error carrying leanvit's message)."""
    with set_scriptable(True):
        scripted = torch.jit.script(create_model("shunted_t").eval())
    with pytest.raises(Exception, match="too small for the Shunted Transformer"):
        scripted(torch.randn(1, 3, 24, 24))


def test_evit_torchscript_is_excluded():
    """EViT is excluded from TorchScript (see the module docstring); if it ever scripts, lift the exclusion."""
    with set_scriptable(True):
        model = create_model(MODELS[0]).eval()
    # torch 2.14 raises ValueError ("Unknown type annotation"); TorchScript's own errors are RuntimeErrors
    with pytest.raises((RuntimeError, ValueError)):
        torch.jit.script(model)


def test_create_feature_extractor_shunted():
    """torchvision's create_feature_extractor (with timm's FX leaves) returns Shunted's stage outputs."""
    torch.manual_seed(0)
    model = create_model("shunted_t").eval()
    fx = create_feature_extractor(model, return_nodes={"norm2": "s2", "norm4": "s4", "head": "logits"},
                                  tracer_kwargs=_fx_kwargs())
    x = _inputs((3, 96, 128))
    with torch.inference_mode():
        out = fx(x)
        _, (s2, s4) = model.forward_intermediates(x, indices=[1, 3])
        logits = model(x)
    torch.testing.assert_close(out["s2"], s2.flatten(2).transpose(1, 2))
    torch.testing.assert_close(out["s4"], s4.flatten(2).transpose(1, 2))
    assert torch.equal(out["logits"], logits)


def test_create_feature_extractor_evit():
    """torchvision's create_feature_extractor on an EViT model: block outputs (fewer tokens after each
    reorganizing block) and the final norm, exactly as the model computes them."""
    torch.manual_seed(0)
    model = create_model("evit_deit_tiny_patch16_224", keep_rate=0.5).eval()
    fx = create_feature_extractor(model, return_nodes={"blocks.2": "b2", "blocks.3": "b3", "norm": "norm"},
                                  tracer_kwargs=_fx_kwargs())
    x = _inputs((3, 224, 224))
    with torch.inference_mode():
        out = fx(x)
        b2, b3 = model.forward_intermediates(x, indices=[2, 3], output_fmt="NLC", intermediates_only=True,
                                             return_prefix_tokens=True)
        feats = model.forward_features(x)
    assert out["b2"].shape == (1, 1 + 196, 192)
    assert out["b3"].shape == (1, 1 + 98 + 1, 192)  # block 3 keeps ceil(0.5 x 196) tokens plus a fused one
    torch.testing.assert_close(out["b2"], torch.cat([b2[1], b2[0]], dim=1))
    torch.testing.assert_close(out["b3"], torch.cat([b3[1], b3[0]], dim=1))
    assert torch.equal(out["norm"], feats)


def test_traced_evit_refuses_per_call_arguments():
    """An FX graph of an EViT model runs the keep rates it was traced with: per-call ones are an error,
    never silently ignored."""
    model = create_model("evit_deit_tiny_patch16_224", img_size=64, keep_rate=0.5).eval()
    fx = create_feature_extractor(model, return_nodes={"head": "logits"}, tracer_kwargs=_fx_kwargs())
    x = _inputs((3, 64, 64))
    with torch.inference_mode():
        assert torch.equal(fx(x)["logits"], model(x))
        with pytest.raises(leanvit.LeanvitError, match="traced with"):
            fx(x, keep_rate=0.7)
        with pytest.raises(leanvit.LeanvitError, match="traced with"):
            fx(x, return_kept_indices=True)
