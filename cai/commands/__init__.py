"""CLI subcommands; each module defines ``register(subparsers)``."""

import argparse

MODULES = ("model_tools", "demo_model", "pipeline", "deploy")


def bench_subparsers(subparsers):
    """The subcommands of ``cai bench``, shared by the modules that add a benchmark."""
    bench = subparsers.choices.get("bench")
    if bench is None:
        bench = subparsers.add_parser("bench", help="benchmarks (figures for the README)")
    for action in bench._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action
    return bench.add_subparsers(dest="bench_target", required=True, metavar="TARGET")
