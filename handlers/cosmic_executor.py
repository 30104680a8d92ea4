"""Lambda ``cosmicExecutor``: predict the partitions of one Distributed Map item."""

from cai import pipeline
from cai.lambda_support import lambda_entry


@lambda_entry
def handler(event, context):
    return pipeline.execute(event, context=context)
