"""``cai render`` and ``cai train``: the demo weights from SDSS_MGS (see model/MODEL_CARD.md)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

TRAIN_CATALOG = "data/sdss_mgs/SDSS_MGS.train"
TEST_CATALOG = "data/sdss_mgs/SDSS_MGS.test"
WEIGHTS = "model/astromae-demo.safetensors"


def register(subparsers) -> None:
    render = subparsers.add_parser(
        "render", help="render SDSS-like 5-band 32x32 cutouts for a catalogue's galaxies",
        description="Synthetic cutouts whose band fluxes match each galaxy's magnitudes "
                    "(see cai/render.py); writes images, magnitudes, redshifts, object_id.")
    render.add_argument("catalog", help="an SDSS_MGS file, e.g. data/sdss_mgs/SDSS_MGS.test")
    render.add_argument("--out", required=True, help="the .npz to write")
    render.add_argument("--seed", type=int, default=0, help="render seed (default 0)")
    render.set_defaults(func=run_render)

    from cai.train_defaults import DEFAULTS  # not cai.train: every cai command would import torch

    train = subparsers.add_parser(
        "train", help="train the demo weights on SDSS_MGS.train and score them on SDSS_MGS.test",
        description="Seeded, single-process CPU training; writes the float16 weights, "
                    "train-settings.json and metrics.json side by side.")
    train.add_argument("--catalog", default=TRAIN_CATALOG, help=f"training catalogue (default {TRAIN_CATALOG})")
    train.add_argument("--test-catalog", default=TEST_CATALOG,
                       help=f"scored once after training (default {TEST_CATALOG}); 'none' skips it")
    train.add_argument("--out", default=WEIGHTS, help=f"weights to write (default {WEIGHTS})")
    train.add_argument("--seed", type=int, default=0, help="seed for split, render, init and batches (default 0)")
    train.add_argument("--limit", type=int, default=None, help="use only the first N galaxies (quick checks)")
    for name, value in DEFAULTS.items():
        flag = "--" + name.replace("_", "-")
        train.add_argument(flag, type=type(value), default=value, help=f"default {value}")
    train.set_defaults(func=run_train)


def run_render(args) -> int:
    from cai import render
    from cai.catalog import read_sdss_mgs

    rendered = render.render_catalog(read_sdss_mgs(args.catalog), seed=args.seed)
    path = render.save_rendered(args.out, rendered)
    print(f"rendered {len(rendered['redshifts'])} galaxies to {path} (seed {args.seed})")
    return 0


def run_train(args) -> int:
    from cai import train
    from cai.train_defaults import DEFAULTS

    train.pin_kernels()  # before torch runs a kernel, so any x86-64 machine trains the same weights

    options = {name: getattr(args, name) for name in DEFAULTS}
    record = train.train(args.catalog, args.out, seed=args.seed, limit=args.limit,
                         log=lambda line: print(line, file=sys.stderr), **options)
    out_dir = Path(args.out).parent
    record["command"] = "cai " + " ".join(sys.argv[1:]) if sys.argv[1:2] == ["train"] else "cai train"
    (out_dir / "train-settings.json").write_text(json.dumps(record, indent=2) + "\n")

    if args.test_catalog.lower() != "none":
        result = train.score(args.out, args.test_catalog, train_catalog_path=args.catalog,
                             seed=args.seed, limit=args.limit)
        (out_dir / "metrics.json").write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps(result, indent=2))
    return 0
