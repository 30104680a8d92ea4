"""What the three Lambda handlers share: logging, environment defaults, error reporting.

Environment (set by serverless.yml): ``CAI_BUCKET`` fills a payload without
``bucket``; ``LOG_LEVEL`` (INFO); ``CAI_MODEL_CACHE_DIR`` (/tmp/cai-model);
``CAI_ARCHITECTURE`` prices the bill.
"""

from __future__ import annotations

import functools
import json
import logging
import os

from cai.errors import CaiError

log = logging.getLogger("cai")


def configure_logging() -> None:
    # the Lambda runtime installs a root handler; only the level is ours to set
    level = os.environ.get("LOG_LEVEL", "INFO").upper()
    logging.getLogger().setLevel(level)
    log.setLevel(level)


def with_default_bucket(payload):
    """An explicit ``bucket`` wins; else the stack's bucket from CAI_BUCKET."""
    if isinstance(payload, dict) and not payload.get("bucket") and os.environ.get("CAI_BUCKET"):
        return {**payload, "bucket": os.environ["CAI_BUCKET"]}
    return payload


def lambda_entry(function):
    """Log a CaiError as one JSON line and re-raise it, so Step Functions sees the failure by its class."""

    @functools.wraps(function)
    def handler(event, context=None):
        configure_logging()
        try:
            return function(event, context)
        except CaiError as exc:
            log.error(json.dumps({"event": "error", "handler": function.__module__,
                                  "error": type(exc).__name__, "message": str(exc)}))
            raise

    return handler
