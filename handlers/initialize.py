"""Lambda ``initialize``: validate the run payload, list partitions, write the work list."""

from cai import pipeline
from cai.lambda_support import lambda_entry, with_default_bucket


@lambda_entry
def handler(event, context):
    return pipeline.initialize(with_default_bucket(event))
