"""Export project weights to one self-contained ONNX file for ONNX Runtime.

Graph: inputs ``image`` ``[B, 5, 32, 32]`` and ``magnitude`` ``[B, 5]``
(float32), output ``redshift`` ``[B, 1]``, B dynamic. The weights'
metadata (``model_version`` and the rest) goes into the ONNX
``metadata_props``, so an engine reading only the ``.onnx`` still knows
which model it runs.

NOTE: the dynamo exporter (torch.export + onnxscript) is used. The
TorchScript exporter cannot trace AstroMAE (``round()`` on a traced size
in ``NormalCell.forward``), and the dynamo graph with its default
optimisation runs ~1.4-2.5x faster in ONNX Runtime than the unoptimised one.
Its lowest native opset is 18; asking for 17 makes it try a down-conversion
that fails on this graph (ReduceMean axes) and keeps 18, so 18 is the default
and ``metadata_props["opset"]`` records the opset actually written.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import time
import warnings
from pathlib import Path

from cai.errors import WeightsError

log = logging.getLogger(__name__)

INPUT_NAMES = ("image", "magnitude")
OUTPUT_NAME = "redshift"


def export_onnx(weights_path, out_path, opset: int = 18, extra_metadata: dict | None = None) -> Path:
    """Export a ``.safetensors`` weights file to ``out_path`` (ONNX, checked with ``onnx.checker``).

    Returns the path written. Takes ~10-20 s on 2 cores (torch.export plus
    graph optimisation). The file is written atomically.
    """
    import onnx
    import torch

    from cai.model.weights import file_sha256, load_model

    model = load_model(weights_path)
    metadata = dict(model.weights_metadata)
    metadata.update({str(k): str(v) for k, v in (extra_metadata or {}).items()})
    metadata["weights_sha256"] = file_sha256(weights_path)

    image = torch.zeros(2, 5, 32, 32)
    magnitude = torch.zeros(2, 5)
    batch = torch.export.Dim("batch", min=1)
    started = time.perf_counter()
    chatter = io.StringIO()
    # the exporter prints progress and warns about internals; keep that out of the CLI output
    with warnings.catch_warnings(), contextlib.redirect_stdout(chatter), _quiet_loggers():
        warnings.simplefilter("ignore")
        try:
            program = torch.onnx.export(
                model, (image, magnitude), dynamo=True, opset_version=opset,
                input_names=list(INPUT_NAMES), output_names=[OUTPUT_NAME],
                dynamic_shapes={"image": {0: batch}, "magnitude": {0: batch}},
                external_data=False)
        except Exception as exc:  # the exporter's failures have many types
            raise WeightsError(f"ONNX export of {weights_path} failed: {exc}",
                               f"check torch and onnxscript versions (torch {torch.__version__})") from exc
    log.debug("exporter output: %s", chatter.getvalue())
    log.info("exported %s in %.1f s", weights_path, time.perf_counter() - started)

    proto = program.model_proto
    written = max((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), default=opset)
    if written != opset:
        log.warning("asked for ONNX opset %d, the exporter wrote opset %d", opset, written)
    metadata["opset"] = str(written)
    del proto.metadata_props[:]
    for key, value in sorted(metadata.items()):
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    proto.doc_string = "pcm-AstroMAE galaxy redshift (CAI)"
    onnx.checker.check_model(proto)

    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(out_path.name + f".{os.getpid()}.tmp")
    onnx.save_model(proto, str(tmp))
    os.replace(tmp, out_path)  # a concurrent reader sees the old file or the whole new one
    return out_path


@contextlib.contextmanager
def _quiet_loggers():
    # the exporter and its graph passes log internals (skipped torchvision ops, every deduplicated
    # initializer) at INFO and WARNING; the CLI logs at INFO
    loggers = [logging.getLogger(name) for name in (
        "torch.onnx", "torch.export", "torch._dynamo", "onnxscript", "onnx_ir")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def onnx_metadata(path) -> dict[str, str]:
    """The ``metadata_props`` of an ONNX file, read without loading the weights into a runtime."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return {p.key: p.value for p in model.metadata_props}
