"""CAI: Cloud-based Astronomy Inference.

AstroMAE galaxy redshifts on a laptop, or fanned out over AWS Lambda by a
Step Functions Distributed Map (Initialize -> one executor per partition ->
Summarize). Every entry point (CLI, Lambda handlers, tests) calls this package.
"""

__version__ = "0.1.0"
