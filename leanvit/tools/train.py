"""``leanvit train``: train or fine-tune a model from a recipe; any recipe value can be overridden.

    leanvit train --recipe deit3_demo
    leanvit train --recipe deit3_s_in1k --data /data/imagenet --output runs/deit3_s
    leanvit train --recipe evit_demo --keep-rate 0.5 --set digits.canvas_size=40
    torchrun --nproc_per_node 4 -m leanvit.cli train --recipe deit3_b_in1k --data /data/imagenet
"""
from __future__ import annotations

import argparse
import re
from typing import Any, Dict, List

from leanvit.errors import LeanvitError
from leanvit.tasks import get_task
from leanvit.train.engine import train
from leanvit.train.recipes import DEFAULTS, NULL, RECIPE_DIR, list_recipes, parse_value

# flags shown in --help; every other recipe key is accepted as --key value (dashes or underscores)
_COMMON = {
    "data": ("DIR|digits", "an ImageFolder tree (train/, val/) or 'digits' (the embedded data)"),
    "model": ("M", "model name (e.g. deit3_small_patch16_224, evit_deit_small_patch16_224, shunted_t)"),
    "epochs": ("N", "training epochs"),
    "batch_size": ("B", "batch size per process"),
    "img_size": ("S", "input size"),
    "output": ("DIR", "run folder (last.pth, best.pth, metrics.csv/.jsonl, config.yaml)"),
    "finetune": ("CKPT", "start from these weights (classifier re-initialized if it differs; "
                         "position embedding resampled to --img-size)"),
    "lr": ("LR", "peak learning rate for the global batch"),
    "keep_rate": ("R", "EViT target keep rate (applies EViT to a plain ViT); alias of reduction.keep_rate"),
    "reduction": ("SPEC", "token reduction, e.g. evit:0.7 or a mapping {method: evit, keep_rate: 0.7}"),
    "seed": ("N", "random seed"),
    "device": ("D", "cpu or cuda (default: cuda when available)"),
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--recipe", default=None, metavar="NAME|FILE.yaml",
                   help="a shipped recipe (see --list-recipes) or a YAML file")
    p.add_argument("--list-recipes", action="store_true", help="print the shipped recipes and exit")
    # ---- run folder ownership and preemption
    p.add_argument("--resume", action="store_true",
                   help="continue from OUTPUT/last.pth (an epoch-end or mid-epoch recovery checkpoint)")
    p.add_argument("--auto-resume", action="store_true",
                   help="resume if OUTPUT/last.pth exists, else start fresh (one command line for elastic "
                        "restarts and requeued jobs)")
    p.add_argument("--overwrite", action="store_true",
                   help="start fresh in an OUTPUT that holds a run (its checkpoints and metrics are removed)")
    p.add_argument("--finetune-partial", action="store_true",
                   help="accept a --finetune checkpoint that fills less than half of the model's tensors")
    p.add_argument("--save-every-steps", default=None, metavar="N",
                   help="also write a recovery checkpoint every N optimizer steps (SIGTERM/SIGUSR1 always "
                        "write one before stopping with exit status 75)")
    p.add_argument("--keep-last", default=None, metavar="K",
                   help="keep the K newest checkpoints as OUTPUT/checkpoint-<step>.pth")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any recipe value (YAML syntax; dotted keys for nested mappings)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    for key, (metavar, help_) in _COMMON.items():
        p.add_argument("--" + key.replace("_", "-"), dest=key, default=None, metavar=metavar, help=help_)
    p.set_defaults(_accepts_extra=True)


def _set(cfg: Dict[str, Any], key: str, value: Any) -> None:
    head, _, rest = key.partition(".")
    head = head.replace("-", "_")
    if rest:  # merged into the recipe's mapping by resolve_config
        if head in DEFAULTS and not isinstance(DEFAULTS[head], dict):
            raise LeanvitError(f"'{head}' is not a mapping; cannot set {key}")
        base = dict(cfg.get(head) or {})
        base[rest] = value
        cfg[head] = base
    else:
        cfg[head] = value


def _value(key: str, text: str) -> Any:
    """A command-line value as YAML, except a reduction written as text (``evit:0.7``, ``evit:``): YAML would
    read ``evit:`` as the mapping ``{evit: null}``, whose error would not say what is missing."""
    if key.replace("-", "_") == "reduction" and re.fullmatch(r"[A-Za-z][\w-]*:[^\s{}\[\],]*(,[^\s{}\[\],]*)*", text):
        return text
    return parse_value(text)


def parse_overrides(args, extra: List[str]) -> Dict[str, Any]:
    over: Dict[str, Any] = {}
    for key in ("save_every_steps", "keep_last"):
        v = getattr(args, key, None)
        if v is not None:
            over[key] = parse_value(v)
    if getattr(args, "finetune_partial", False):
        over["finetune_partial"] = True
    for key in _COMMON:
        if key == "device":
            continue
        v = getattr(args, key, None)
        if v is not None:
            over[key] = _value(key, v) if key != "data" and key != "output" and key != "finetune" else v
    i = 0
    while i < len(extra):
        tok = extra[i]
        if not tok.startswith("--"):
            raise LeanvitError(f"unexpected argument '{tok}'")
        key, eq, val = tok[2:].partition("=")
        if not eq:
            if i + 1 >= len(extra) or extra[i + 1].startswith("--"):
                raise LeanvitError(f"--{key} needs a value")
            val = extra[i + 1]
            i += 1
        _set(over, key, _value(key, val))
        i += 1
    for item in args.set:
        key, eq, val = item.partition("=")
        if not eq:
            raise LeanvitError(f"--set takes KEY=VALUE, got '{item}'")
        value = _value(key, val)
        _set(over, key, NULL if value is None else value)  # --set reduction=null removes an inherited one
    return over


def run(args, extra: List[str] = ()) -> int:
    if args.list_recipes:
        for name in list_recipes():
            print(name)
        print(f"(in {RECIPE_DIR})")
        return 0
    over = parse_overrides(args, list(extra))
    if args.recipe is None and "model" not in over:
        raise LeanvitError("give --recipe NAME (see --list-recipes) or at least --model")
    if args.resume and args.auto_resume:
        raise LeanvitError("give --resume or --auto-resume, not both")
    resume = "auto" if args.auto_resume else bool(args.resume)
    res = train(args.recipe, device=args.device, progress=not args.no_progress, resume=resume,
                overwrite=args.overwrite, **over)
    if not res.get("is_main", True):  # under torchrun: one summary, from rank 0
        return 0
    done = get_task(res["task"]).done_message(res)
    if done:
        print(done)
    for note in res.get("data_notes") or []:
        print(f"note: {note}")
    return 0
