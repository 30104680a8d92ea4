"""One inference engine, two runtimes: ONNX Runtime (default) and PyTorch.

The model is loaded once per :class:`Engine` and reused for every call.
``predict`` validates inputs, runs in batches of any size, and never
predicts a galaxy with a non-finite pixel or magnitude: such a galaxy gets
a NaN redshift and a reason in ``Prediction.rejected``. Nothing is dropped
or imputed.

Importing this module needs neither torch nor onnxruntime; each runtime is
imported when an engine for it is loaded, so a Lambda with ONNX Runtime
alone can serve an exported ``.onnx``.
"""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cai.errors import InputError, WeightsError

log = logging.getLogger(__name__)

RUNTIMES = ("onnxruntime", "torch")
IMAGE_SHAPE = (5, 32, 32)
BANDS = 5
CACHE_ENV = "CAI_CACHE_DIR"
REASON_PIXELS = "non-finite pixels"
REASON_MAGNITUDE = "non-finite magnitude"


@dataclass
class Prediction:
    """``redshift``: float32 ``[N]``, NaN where rejected; ``rejected``: index -> reason."""

    redshift: np.ndarray
    rejected: dict[int, str] = field(default_factory=dict)

    @property
    def predicted(self) -> np.ndarray:
        """Boolean mask of the galaxies that were predicted."""
        mask = np.ones(self.redshift.shape[0], dtype=bool)
        mask[list(self.rejected)] = False
        return mask


def cache_dir() -> Path:
    """Where exported ONNX files are cached: ``$CAI_CACHE_DIR``, else the user cache dir.

    Falls back to the temp dir when home is read-only (as on Lambda).
    """
    if os.environ.get(CACHE_ENV):
        candidates = [Path(os.environ[CACHE_ENV])]
    else:
        base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
        candidates = [Path(base) / "cai"]
    candidates.append(Path(tempfile.gettempdir()) / "cai-cache")
    for candidate in candidates:
        try:
            candidate.mkdir(parents=True, exist_ok=True)
            if os.access(candidate, os.W_OK):
                return candidate
        except OSError:
            continue
    raise WeightsError("no writable cache directory for the exported model",
                       f"set {CACHE_ENV} to a writable folder, or pass an exported .onnx")


def cached_onnx(weights_path) -> Path:
    """The ONNX export of a weights file, made once and cached under its sha256."""
    from cai.model.weights import file_sha256

    digest = file_sha256(weights_path)
    target = cache_dir() / f"astromae-{digest[:20]}.onnx"
    if target.is_file():
        return target
    try:
        import torch  # noqa: F401  (exporting needs it; serving an .onnx does not)
    except ImportError:
        raise WeightsError(f"{weights_path} must be exported to ONNX first, and torch is not installed here",
                           "run `cai export --weights W --out model.onnx` where torch is installed, "
                           "then pass the .onnx file") from None
    from cai.model.export import export_onnx

    log.info("exporting %s to %s (once; cached by sha256)", weights_path, target)
    return export_onnx(weights_path, target)


def _check_array(name, value, tail):
    try:
        array = np.asarray(value)
    except (ValueError, TypeError) as exc:  # ragged nested lists
        raise InputError(f"{name} are not a rectangular array: {exc}", f"pass {name} as one numpy array") from exc
    if array.dtype.kind not in "fiu":
        raise InputError(f"{name} have dtype {array.dtype}, expected real numbers (float or integer)",
                         f"pass {name} as a numeric array, e.g. float32")
    if array.ndim != 1 + len(tail) or tuple(array.shape[1:]) != tail:
        expected = "[N, " + ", ".join(map(str, tail)) + "]"
        raise InputError(f"{name} have shape {list(array.shape)}, expected {expected}",
                         "images are u, g, r, i, z 32x32 cutouts; magnitudes the five band magnitudes")
    return array


def validate_inputs(images, magnitudes) -> tuple[np.ndarray, np.ndarray]:
    """Shape and dtype checks; returns the arrays (not yet cast) or raises :class:`InputError`."""
    images = _check_array("images", images, IMAGE_SHAPE)
    magnitudes = _check_array("magnitudes", magnitudes, (BANDS,))
    if images.shape[0] != magnitudes.shape[0]:
        raise InputError(f"{images.shape[0]} images but {magnitudes.shape[0]} magnitude rows",
                         "pass one row of magnitudes per image, in the same order")
    return images, magnitudes


class Engine:
    """Load once with :meth:`load`, then call :meth:`predict` as often as needed."""

    def __init__(self, runner, runtime: str, model_version: str, model_path: Path, threads: int | None):
        self._run = runner  # float32 images [B,5,32,32], magnitudes [B,5] -> [B]
        self.runtime = runtime
        self.model_version = model_version
        self.model_path = model_path
        self.threads = threads

    @classmethod
    def load(cls, model_path, runtime: str = "onnxruntime", threads: int | None = None) -> "Engine":
        """An engine over ``model_path`` (``.onnx`` or ``.safetensors``) on ``runtime``.

        ``threads``: intra-op threads (ONNX Runtime) or ``torch.set_num_threads``
        (process-wide); None keeps the runtime's default.
        """
        if runtime not in RUNTIMES:
            raise InputError(f"unknown runtime {runtime!r}", f"use one of {', '.join(RUNTIMES)}")
        if threads is not None and (not isinstance(threads, int) or threads < 1):
            raise InputError(f"threads must be a positive integer, got {threads!r}", "or leave it unset")
        path = Path(model_path)
        if not path.is_file():
            raise WeightsError(f"no such model file: {path}",
                               "pass a .safetensors weights file or an exported .onnx")
        suffix = path.suffix.lower()
        if suffix not in (".onnx", ".safetensors"):
            raise WeightsError(f"{path} is neither .onnx nor .safetensors",
                               "convert official .pt checkpoints first with `cai convert`")
        if runtime == "torch":
            if suffix == ".onnx":
                raise WeightsError(f"the torch runtime cannot run {path.name}, an ONNX file",
                                   "pass the .safetensors weights, or use runtime onnxruntime")
            return cls._load_torch(path, threads)
        onnx_path = path if suffix == ".onnx" else cached_onnx(path)
        return cls._load_onnxruntime(onnx_path, path, threads)

    @classmethod
    def _load_onnxruntime(cls, onnx_path: Path, model_path: Path, threads):
        try:
            import onnxruntime as ort
        except ImportError:
            raise WeightsError("onnxruntime is not installed",
                               "pip install onnxruntime, or use runtime torch") from None
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.log_severity_level = 3  # constant-folding notices are not the user's concern
        if threads is not None:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        try:
            session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own untyped failures
            raise WeightsError(f"ONNX Runtime cannot load {onnx_path}: {exc}",
                               "the file is truncated or corrupt; export it again with `cai export`") from exc
        names = sorted(i.name for i in session.get_inputs())
        if names != ["image", "magnitude"]:
            raise WeightsError(f"{onnx_path} has inputs {names}, expected ['image', 'magnitude']",
                               "export the model with `cai export`")
        version = session.get_modelmeta().custom_metadata_map.get("model_version", "unknown")

        def run(images, magnitudes):
            out = session.run(None, {"image": images, "magnitude": magnitudes})[0]
            return out.reshape(-1)

        return cls(run, "onnxruntime", version, model_path, threads)

    @classmethod
    def _load_torch(cls, path: Path, threads):
        try:
            if os.environ.get("CAI_TORCH_LAYER_ARCHIVE"):
                # on Lambda PyTorch ships compressed in the torch layer: unpack it once per container
                import cai_torch_layer

                cai_torch_layer.ensure_torch()
            import torch
        except ImportError:
            raise WeightsError("torch is not installed", "use runtime onnxruntime with an exported .onnx") from None
        except OSError as exc:  # the torch layer's archive is missing, or /tmp is too small for it
            raise WeightsError(f"cannot unpack the torch layer: {exc}",
                               "redeploy with --param torch=true (it sizes /tmp for it)") from exc
        from cai.model.weights import load_model

        if threads is not None:
            torch.set_num_threads(threads)
        model = load_model(path)

        def run(images, magnitudes):
            with torch.inference_mode():
                out = model(torch.from_numpy(images), torch.from_numpy(magnitudes))
            return out.numpy().reshape(-1)

        return cls(run, "torch", model.model_version, path, threads)

    def predict(self, images, magnitudes, batch_size: int = 256) -> Prediction:
        """Redshifts of ``images`` ``[N, 5, 32, 32]`` with ``magnitudes`` ``[N, 5]``.

        Any N (0 included) and any ``batch_size`` >= 1. Galaxies with a
        non-finite pixel or magnitude are not predicted: NaN redshift and a
        reason in ``rejected``. Casting to float32 happens per batch, so
        float64 input never doubles in memory.
        """
        if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
            raise InputError(f"batch_size must be a positive integer, got {batch_size!r}", "e.g. 256")
        images, magnitudes = validate_inputs(images, magnitudes)
        count = images.shape[0]
        redshift = np.full(count, np.nan, dtype=np.float32)
        rejected: dict[int, str] = {}

        for start in range(0, count, int(batch_size)):
            stop = min(start + int(batch_size), count)
            batch_images = np.ascontiguousarray(images[start:stop], dtype=np.float32)
            batch_mags = np.ascontiguousarray(magnitudes[start:stop], dtype=np.float32)

            # checked after the cast: a float64 value beyond float32's range is as unusable as inf
            pixels_ok = np.isfinite(batch_images).reshape(stop - start, -1).all(axis=1)
            mags_ok = np.isfinite(batch_mags).all(axis=1)
            good = pixels_ok & mags_ok
            for offset in np.flatnonzero(~good):
                reasons = [r for r, ok in ((REASON_PIXELS, pixels_ok[offset]), (REASON_MAGNITUDE, mags_ok[offset]))
                           if not ok]
                rejected[start + int(offset)] = "; ".join(reasons)
            if not good.any():
                continue
            if not good.all():
                batch_images, batch_mags = batch_images[good], batch_mags[good]
            redshift[start + np.flatnonzero(good)] = self._run(batch_images, batch_mags)

        if rejected:
            log.debug("rejected %d of %d galaxies", len(rejected), count)
        return Prediction(redshift=redshift, rejected=rejected)
