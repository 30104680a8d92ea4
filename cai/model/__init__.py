"""The model side of CAI: AstroMAE, its weights, ONNX export and the inference engine.

Nothing here imports AWS libraries, and nothing imports torch at module level
except ``astromae`` itself, so the Lambda executor runs with ONNX Runtime alone.
"""
