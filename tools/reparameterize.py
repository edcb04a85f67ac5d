"""Convert a training-form checkpoint into a deploy (re-parameterized) checkpoint.

    python tools/reparameterize.py --model unireplknet_b \
        --src unireplknet_b_in22k_to_in1k_384_acc87.40.pth --dst unireplknet_b_deploy.pth

The model flags are main.py's: a SLaK checkpoint trained with ``--Decom true --kernel_size 31 29 27
13 5`` converts with the same flags (``main.py --deploy true`` then takes them too).

The source may be one of our checkpoints, an upstream release ({'model': ...}, {'model_ema': ...},
{'state_dict': ...} or a raw state dict; 'module.' prefixes are stripped). The weights must fit
the training form of ``--model`` exactly. The result is ``{'model': deploy_state_dict}``, which
``main.py --model NAME --deploy true --resume deploy.pth`` (or ``create_model(NAME, deploy=True)``)
loads strictly. The file is written atomically.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Any, List, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import models  # noqa: E402
import utils  # noqa: E402
from utils import UserError  # noqa: E402


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="registered model name, e.g. RepLKNet-31B")
    parser.add_argument("--src", required=True, help="training-form checkpoint to read")
    parser.add_argument("--dst", required=True, help="deploy checkpoint to write")
    parser.add_argument("--nb_classes", type=int, default=None,
                        help="head size; default: taken from the checkpoint's head.weight")
    parser.add_argument("--model_key", default="model|model_ema|state_dict|module",
                        help="'|'-separated keys to look for the weights under, first found wins")
    parser.add_argument("--trust_checkpoint", type=utils.str2bool, default=False,
                        help="unpickle --src without the weights-only guard (it can run code: "
                             "only for files you trust)")
    models.add_family_args(parser)
    return parser


def reparameterize_checkpoint(model_name: str, src: str, dst: str,
                              nb_classes: Optional[int] = None,
                              model_key: str = "model|model_ema|state_dict|module",
                              trust: bool = False, **model_kwargs: Any) -> None:
    """Load ``src`` into the training form of ``model_name`` (built with ``model_kwargs``, e.g.
    SLaK's kernel_size/Decom), re-parameterize, save ``dst``."""
    try:
        models.get_family(model_name)
    except ValueError as err:
        raise UserError(str(err)) from err
    state = utils.extract_state_dict(utils.load_checkpoint_file(src, trust), model_key)
    if nb_classes is None:
        head = state.get("head.weight")
        nb_classes = head.shape[0] if head is not None else 1000
    try:
        model = models.create_model(model_name, num_classes=nb_classes, **model_kwargs)
    except (TypeError, ValueError) as err:
        raise UserError(str(err)) from err
    utils.load_state_dict_strict(model, state, src, model_name)
    model.eval()
    models.reparameterize_model(model)
    utils.atomic_save({"model": model.state_dict()}, dst)


def main(argv: Optional[List[str]] = None) -> int:
    args = get_args_parser().parse_args(argv)

    def reparameterize() -> None:
        try:
            model_kwargs = models.family_kwargs(args.model, args)
        except ValueError as err:
            raise UserError(str(err)) from err
        reparameterize_checkpoint(args.model, args.src, args.dst, args.nb_classes, args.model_key,
                                  args.trust_checkpoint, **model_kwargs)
        print(f"wrote the deploy form of {args.model} to {args.dst}")

    return utils.exit_status(reparameterize)


if __name__ == "__main__":
    sys.exit(main())
