"""Lambda ``summarize``: merge every partition's partials into the run's summary."""

from cai import pipeline
from cai.lambda_support import lambda_entry


@lambda_entry
def handler(event, context):
    return pipeline.summarize(event)
