"""Train the demo AstroMAE weights on SDSS_MGS.train (``cai train``).

No MAE-pretrained encoder is reachable, so the encoder is frozen exactly as
in the paper but at its random initialisation; everything else (10,398,057
parameters) is trained from scratch on rendered images of the real
catalogue galaxies. Because the encoder is frozen and each image is fixed,
its output is computed once per galaxy and cached, which is exact and makes
an epoch several times cheaper.

Only SDSS_MGS.train is read while fitting; a seeded 10 % of it is held out
for model selection. SDSS_MGS.test is scored once, afterwards, with a fresh
render and the float16 weights loaded back as float32: what users get.
"""

from __future__ import annotations

import copy
import json
import math
import os
import platform
import subprocess
import time
from pathlib import Path

import numpy as np
import safetensors
import torch
from torch.nn import functional as F

from cai import metrics, render
from cai.catalog import read_sdss_mgs, subset
from cai.model.astromae import AstroMAE
from cai.model.weights import file_sha256, load_model, read_metadata, save_weights
from cai.train_defaults import DEFAULTS

TRAINABLE = 10_398_057  # the paper's count with the encoder frozen
RENDER_SEED_OFFSET = {"train": 1000, "test": 2000}  # train and test renders never share noise

# Kernels are chosen by the CPU's instruction set, and each choice rounds differently: from the same
# seed an AVX-512 machine and an AVX2 one train different weights (seen here, and Adam amplifies the
# last bits into different epochs chosen). Every x86-64 server of the last decade has AVX2, so pin it.
KERNEL_PINS = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_CBWR": "AVX2,STRICT"}
X86_64 = platform.machine().lower() in ("x86_64", "amd64")


def pin_kernels() -> dict:
    """Pin torch's, oneDNN's and MKL's x86-64 kernels to AVX2 for this process (``cai train`` does).

    Takes effect only before the process runs its first torch kernel: torch and the libraries read
    these variables once. A variable already set is left as it is. Returns ``kernel_state()``.
    """
    if X86_64:
        for name, value in KERNEL_PINS.items():
            os.environ.setdefault(name, value)
    return kernel_state()


def kernel_state() -> dict:
    """Which kernels this process runs, and whether they are the pinned ones."""
    capability = torch.backends.cpu.get_cpu_capability()
    if not X86_64:
        return {"cpu_capability": capability, "pinned": False,
                "note": "not x86-64: the weights reproduce on the same CPU kind"}
    pinned = capability == "AVX2" and all(os.environ.get(k) == v for k, v in KERNEL_PINS.items())
    return {"cpu_capability": capability, "pinned": pinned, **{k: os.environ.get(k) for k in KERNEL_PINS}}


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).resolve().parent, timeout=10)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def seed_everything(seed: int, threads: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)


def freeze_encoder(model: AstroMAE) -> int:
    """Freeze the paper's encoder; returns the number of trainable parameters."""
    for parameter in model.encoder_parameters():
        parameter.requires_grad_(False)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@torch.no_grad()
def encode_all(model: AstroMAE, images: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
    """The frozen encoder's output for every image, ``[N, 192]`` (eval mode: its BatchNorms use running stats)."""
    model.eval()
    return torch.cat([model.encode(images[i:i + batch_size]) for i in range(0, len(images), batch_size)])


@torch.no_grad()
def data_dependent_init(model: AstroMAE, images: torch.Tensor, magnitudes: torch.Tensor, z_mean: float) -> dict:
    """Fold the training set's standardisation into the first layers.

    The model takes raw magnitudes (~12-21) and raw nanomaggy pixels with no
    normalisation layer, and the architecture is fixed, so the first
    magnitude Linear and the first 1x1 conv get ``W' = W / std`` and
    ``b' = b - W' @ mean``: at init they see standardised inputs. The final
    Linear starts at the mean redshift with a small weight, so training
    begins near the constant predictor instead of far from it.
    """
    magnitudes = magnitudes.float()  # the model casts magnitudes to float32 too
    mag_mean, mag_std = magnitudes.mean(0), magnitudes.std(0)
    first = model.inception_model.magnitude_block[0]
    first.weight /= mag_std[None, :]
    first.bias -= first.weight @ mag_mean

    pix_mean = images.mean(dim=(0, 2, 3))
    pix_std = images.std(dim=(0, 2, 3))
    conv = model.inception_model.conv2d_init
    conv.weight /= pix_std[None, :, None, None]
    conv.bias -= conv.weight[:, :, 0, 0] @ pix_mean

    last = model.concat_block[2]
    last.weight *= 0.1
    last.bias.fill_(z_mean)
    return {"magnitude_mean": mag_mean.tolist(), "magnitude_std": mag_std.tolist(),
            "pixel_mean": pix_mean.tolist(), "pixel_std": pix_std.tolist(), "redshift_mean": z_mean}


def dz_loss(z_pred: torch.Tensor, z_true: torch.Tensor, delta: float) -> torch.Tensor:
    """Huber loss of dz = (z_pred - z) / (1 + z), in units of ``delta``."""
    dz = (z_pred - z_true) / (1.0 + z_true)
    return F.huber_loss(dz / delta, torch.zeros_like(dz), delta=1.0)


@torch.no_grad()
def predict(model: AstroMAE, images, magnitudes, encodings=None, batch_size: int = 500) -> np.ndarray:
    """Redshifts in eval mode, ``[N]`` float64; ``encodings`` skips the frozen encoder."""
    model.eval()
    images = torch.as_tensor(images, dtype=torch.float32)
    magnitudes = torch.as_tensor(magnitudes, dtype=torch.float64)
    out = []
    for i in range(0, len(images), batch_size):
        part = slice(i, i + batch_size)
        if encodings is None:
            out.append(model(images[part], magnitudes[part]))
        else:
            out.append(model.forward_from_encoding(encodings[part], images[part], magnitudes[part]))
    return torch.cat(out).squeeze(1).double().numpy()


def _lr_at(step: int, total: int, warmup: int, peak: float) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * 0.5 * (1 + math.cos(math.pi * progress))


def _is_inception_conv(name: str) -> bool:
    """The convolutional part of the Inception branch (everything before its Flatten)."""
    if name.startswith("inception_model.conv2d_init."):
        return True
    prefix = "inception_model.vis_inception."
    return name.startswith(prefix) and int(name[len(prefix):].split(".")[0]) < _FLATTEN


_FLATTEN = 9  # index of nn.Flatten in vis_inception


@torch.no_grad()
def calibrate_batchnorm(module: torch.nn.Module, images: torch.Tensor, batch_size: int = 500) -> None:
    """Set the branch's BatchNorm running statistics to the training images' (a cumulative average).

    At init they are mean 0, var 1, unrelated to the data; with them the
    cached eval-mode features would differ from what train mode sees later.
    """
    norms = [m for m in module.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None
    module.train()
    for i in range(0, len(images), batch_size):
        module(images[i:i + batch_size])
    for norm in norms:
        norm.momentum = 0.1
    module.eval()


@torch.no_grad()
def conv_features_all(model: AstroMAE, images: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
    """Eval-mode output of the Inception branch up to its Flatten, ``[N, 192]``."""
    convs = model.inception_model.vis_inception[:_FLATTEN + 1].eval()
    return torch.cat([convs(images[i:i + batch_size]) for i in range(0, len(images), batch_size)])


def forward_from_features(model: AstroMAE, encoding, conv_features, magnitude):
    """``forward_from_encoding`` with the Inception convs' output given; stage 1 of training."""
    vit = model.vit_block(model.head(model.fc_norm(encoding)))
    inception = model.inception_model.vis_inception[_FLATTEN + 1:](conv_features)
    mags = model.inception_model.magnitude_block(magnitude.to(torch.float32))
    return model.concat_block(torch.cat((vit, inception, mags), dim=1))


def _run_stage(model, stage, params, epochs, lr, settings, cached, images, mags, z,
               fit_idx, val_idx, generator, history, best, log, warm=True):
    """Epochs of AdamW with cosine decay; appends one record per epoch to ``history``.

    ``best`` holds the record and a copy of the weights of the epoch with the
    lowest validation loss so far: model selection on the held-out 10 % only.
    """
    # no weight decay on biases and norm scales, the usual AdamW practice
    optimizer = torch.optim.AdamW(
        [{"params": [p for p in params if p.ndim > 1], "weight_decay": settings["weight_decay"]},
         {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0}], lr=lr)
    steps_per_epoch = math.ceil(len(fit_idx) / settings["batch_size"])
    total = steps_per_epoch * epochs
    warmup = steps_per_epoch * settings["warmup_epochs"] if warm else 0
    fit_t = torch.from_numpy(fit_idx)
    enc, conv = cached["encodings"], cached["conv"]
    step = 0
    for _ in range(epochs):
        t0 = time.time()
        model.train()
        model.blocks.eval()  # the frozen encoder's BatchNorms keep their statistics
        if stage == "head":
            model.inception_model.vis_inception[:_FLATTEN].eval()  # frozen and cached this stage
        running = 0.0
        for batch in fit_t[torch.randperm(len(fit_t), generator=generator)].split(settings["batch_size"]):
            for group in optimizer.param_groups:
                group["lr"] = _lr_at(step, total, warmup, lr)
            if stage == "head":
                pred = forward_from_features(model, enc[batch], conv[batch], mags[batch])
            else:
                pred = model.forward_from_encoding(enc[batch], images[batch], mags[batch])
            loss = dz_loss(pred.squeeze(1), z[batch], settings["huber_dz"])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            running += loss.item() * len(batch)
            step += 1

        if stage == "all":  # the convs changed: refresh their cache for validation and later epochs
            conv[:] = conv_features_all(model, images)
        model.eval()
        with torch.no_grad():
            val_pred = forward_from_features(model, enc[val_idx], conv[val_idx], mags[val_idx]).squeeze(1)
        val_loss = float(dz_loss(val_pred, z[val_idx], settings["huber_dz"]))
        scores = metrics.evaluate(val_pred.double().numpy(), z[val_idx].numpy())
        record = {"stage": stage, "epoch": len(history) + 1, "train_loss": running / len(fit_idx),
                  "val_loss": val_loss, "val_nmad": scores["nmad"],
                  "val_outlier_fraction": scores["outlier_fraction"], "val_bias": scores["bias"],
                  "epoch_s": round(time.time() - t0, 1), "val_metrics": scores}
        history.append(record)
        log(json.dumps({k: v for k, v in record.items() if k != "val_metrics"}))
        if "record" not in best or val_loss < best["record"]["val_loss"]:
            best["record"], best["state"] = record, copy.deepcopy(model.state_dict())


def train(train_catalog_path, out_path, seed: int = 0, limit: int | None = None, log=print, **options) -> dict:
    """Render SDSS_MGS.train, fit AstroMAE with its encoder frozen, save float16 weights and settings.

    Args:
        train_catalog_path: an SDSS_MGS file; only it is read.
        out_path: the .safetensors to write; ``train-settings.json`` goes beside it.
        seed: seeds the split, the render (``seed + 1000``), the init and the batches.
        limit: fit on the first ``limit`` galaxies only (tests).
        options: overrides of ``DEFAULTS``.

    Returns the settings dict (also written to disk) with validation metrics.
    """
    settings = {**DEFAULTS, **options}
    unknown = set(options) - set(DEFAULTS)
    if unknown:
        raise TypeError(f"unknown training options {sorted(unknown)}; known: {sorted(DEFAULTS)}")
    started = time.time()
    kernels = kernel_state()
    if not kernels["pinned"]:
        log(f"warning: kernels not pinned to AVX2 (this process runs {kernels['cpu_capability']}): the "
            "weights reproduce on this CPU kind only; `cai train` pins them, or call pin_kernels() first")
    seed_everything(seed, settings["threads"])

    # data: render the whole training file, then split off validation
    catalog = read_sdss_mgs(train_catalog_path)
    if limit:
        catalog = subset(catalog, slice(0, limit))
    render_seed = seed + RENDER_SEED_OFFSET["train"]
    rendered = render.render_catalog(catalog, seed=render_seed)
    n = len(catalog["redshift"])
    order = np.random.default_rng(seed).permutation(n)
    n_val = max(1, int(round(settings["val_fraction"] * n)))
    val_idx, fit_idx = np.sort(order[:n_val]), np.sort(order[n_val:])
    images = torch.from_numpy(rendered["images"])
    mags = torch.from_numpy(rendered["magnitudes"])
    z = torch.from_numpy(rendered["redshifts"]).float()
    render_s = time.time() - started
    log(f"rendered {n} galaxies in {render_s:.1f} s; fit {len(fit_idx)}, validate {len(val_idx)}")

    # model: encoder frozen at random init, its outputs cached once
    model = AstroMAE()
    trainable = freeze_encoder(model)
    if trainable != TRAINABLE:
        raise RuntimeError(f"{trainable} trainable parameters, expected {TRAINABLE}")
    init_stats = data_dependent_init(model, images[fit_idx], mags[fit_idx], float(z[fit_idx].mean()))
    t0 = time.time()
    encodings = encode_all(model, images)
    encode_s = time.time() - t0
    log(f"cached encoder outputs in {encode_s:.1f} s")

    # stage 1: the convolutional part of the Inception branch stays at its
    # (BatchNorm-recalibrated) init and is cached too; every layer after it trains
    t0 = time.time()
    calibrate_batchnorm(model.inception_model.vis_inception, images[fit_idx])
    conv_features = conv_features_all(model, images)
    log(f"cached Inception conv features in {time.time() - t0:.1f} s")
    cached = {"encodings": encodings, "conv": conv_features}
    generator = torch.Generator().manual_seed(seed)
    history, best = [], {}
    head_params = [p for name, p in model.named_parameters()
                   if p.requires_grad and not _is_inception_conv(name)]
    _run_stage(model, "head", head_params, settings["epochs"], settings["lr"], settings, cached,
               images, mags, z, fit_idx, val_idx, generator, history, best, log)

    # stage 2: fine-tune all 10,398,057 trainable parameters, BatchNorms in train mode
    if settings["finetune_epochs"]:
        all_params = [p for p in model.parameters() if p.requires_grad]
        _run_stage(model, "all", all_params, settings["finetune_epochs"], settings["finetune_lr"], settings,
                   cached, images, mags, z, fit_idx, val_idx, generator, history, best, log, warm=False)
    model.load_state_dict(best["state"])
    best = best["record"]
    wall_s = time.time() - started
    # the version hashes the saved tensors only: a rerun that reproduces the weights reproduces the file
    out_path = save_weights(model.state_dict(), out_path, dtype="float16", version_prefix="astromae-demo")
    model_version = read_metadata(out_path)["model_version"]

    record = {
        "model_version": model_version,
        "command": None,  # filled in by the CLI
        "seed": seed,
        "render_seed_train": render_seed,
        "limit": limit,
        **settings,
        "optimizer": "AdamW (betas 0.9, 0.999; no decay on biases and norms)",
        "schedule": "linear warm-up then cosine to 0, per step",
        "loss": "Huber of dz=(z_pred-z)/(1+z) with delta huber_dz",
        "model_selection": "epoch with the lowest validation loss, over both stages",
        "stages": "1: Inception convs frozen at BatchNorm-recalibrated init and cached, the rest trained "
                  "for `epochs`; 2: all trainable parameters fine-tuned for `finetune_epochs` at `finetune_lr`",
        "encoder": "frozen at random initialisation (no MAE-pretrained encoder reachable); outputs cached",
        "trainable_parameters": trainable,
        "galaxies_fit": int(len(fit_idx)),
        "galaxies_validation": int(len(val_idx)),
        "validation_object_ids": catalog["object_id"][val_idx].tolist(),
        "init": init_stats,
        "best_epoch": best["epoch"],
        "best_stage": best["stage"],
        "validation_metrics": best["val_metrics"],
        "history": history,
        "render": {"calibration": render.CALIBRATION, "seeing_ratio": render.SEEING_RATIO.tolist(),
                   "size_mag_slope": render.SIZE_MAG_SLOPE, "devauc_fraction": render.DEVAUC_FRACTION},
        "data": {"train_catalog": str(train_catalog_path), "train_catalog_sha256": file_sha256(train_catalog_path),
                 "calibration_cutouts_sha256": file_sha256(render.CALIBRATION_NPZ)
                 if render.CALIBRATION_NPZ.exists() else None},
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "numpy": np.__version__, "safetensors": safetensors.__version__,
                     "git_commit": _git_commit(), "kernels": kernels},
        "timing_s": {"render": round(render_s, 1), "encode": round(encode_s, 1), "total": round(wall_s, 1)},
        "weights": {"path": str(out_path), "dtype": "float16", "sha256": file_sha256(out_path),
                    "size_mb": round(out_path.stat().st_size / 1e6, 2)},
    }
    settings_path = out_path.parent / "train-settings.json"
    settings_path.write_text(json.dumps(record, indent=2) + "\n")
    log(f"trained in {wall_s:.0f} s; best epoch {best['epoch']} ({best['stage']}); weights {out_path} ({record['weights']['size_mb']} MB)")
    return record


def knn_baseline(train_catalog: dict, test_catalog: dict, k: int = 20) -> np.ndarray:
    """Mean redshift of the k nearest training galaxies in (r, u-g, g-r, r-i, i-z); the README's floor."""
    def features(c):
        m = c["magnitudes"]
        return np.column_stack([m[:, 2], -np.diff(m, axis=1)])

    train_x, test_x = features(train_catalog), features(test_catalog)
    out = np.empty(len(test_x))
    for i in range(0, len(test_x), 500):
        dist = ((test_x[i:i + 500, None, :] - train_x[None]) ** 2).sum(-1)
        nearest = np.argpartition(dist, k, axis=1)[:, :k]
        out[i:i + 500] = train_catalog["redshift"][nearest].mean(1)
    return out


def score(weights_path, test_catalog_path, train_catalog_path=None, seed: int = 0, limit: int | None = None) -> dict:
    """Metrics of the saved (float16) weights on a fresh render of the test catalogue."""
    torch.set_num_threads(DEFAULTS["threads"])
    model = load_model(weights_path)
    catalog = read_sdss_mgs(test_catalog_path)
    if limit:
        catalog = subset(catalog, slice(0, limit))
    render_seed = seed + RENDER_SEED_OFFSET["test"]
    rendered = render.render_catalog(catalog, seed=render_seed)
    z_pred = predict(model, rendered["images"], rendered["magnitudes"])
    result = {
        "model_version": model.model_version,
        "test_catalog": str(test_catalog_path),
        "test_catalog_sha256": file_sha256(test_catalog_path),
        "render_seed_test": render_seed,
        "weights_dtype": "float16, evaluated as float32 in eval mode",
        "test": metrics.evaluate(z_pred, catalog["redshift"]),
    }
    if train_catalog_path is not None:
        knn = knn_baseline(read_sdss_mgs(train_catalog_path), catalog)
        result["knn20_same_magnitudes"] = metrics.evaluate(knn, catalog["redshift"])
    return result
