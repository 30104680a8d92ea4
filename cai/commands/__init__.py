"""CLI subcommands; each module defines ``register(subparsers)``."""

import argparse
import os

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


def add_stack_options(parser, note: str = ""):
    """--stack, --region, --profile, --bucket: how the commands that talk to a deployed stack find it."""
    parser.add_argument("--stack", default=os.environ.get("CAI_STACK", "cai-dev"),
                        help=f"{note}the deployed CloudFormation stack, cai-<stage> (default cai-dev, or $CAI_STACK)")
    parser.add_argument("--region", default=os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION"),
                        help=f"{note}the stack's region (default: $AWS_REGION, else your AWS config)")
    parser.add_argument("--profile", help=f"{note}the AWS profile to use")
    parser.add_argument("--bucket", help=f"{note}the stack's bucket (default: its BucketName output)")
