"""CLI subcommands; each module defines ``register(subparsers)``."""

MODULES = ("model_tools", "demo_model", "pipeline", "deploy")
