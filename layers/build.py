"""Build CAI's Lambda layers reproducibly, for the Lambda platform, from pinned wheels.

Two layers (see docs/deploy.md):

- ``inference``: ONNX Runtime, NumPy and safetensors under ``python/``; every function gets it.
- ``torch``: CPU PyTorch, stripped and packed into ``torch/torch.tar.zst`` (PyTorch does not fit
  the 250 MB unzipped limit), plus the decompressor and ``cai_torch_layer.py`` under ``python/``,
  which unpack it into /tmp once per container.

Wheels come only as binaries for the target (``--platform``, ``--python-version``,
``--implementation cp``, ``--only-binary=:all:``), from exact pins installed with ``--no-deps``.
Zips and tars list files in sorted order with fixed timestamps and modes, so the same inputs give
byte-identical artifacts: osls then sees an unchanged layer hash and skips re-uploading it.

Usage::

    python layers/build.py inference [--arch x86_64|arm64] [--python-version 3.12]
    python layers/build.py torch --torch-wheel SOURCE [--torch-index-url URL] [--arch ...]

``SOURCE`` is a local wheel path, an http(s) URL of a wheel, or a pip requirement such as
``torch==2.13.0`` resolved for the target platform (with ``--torch-index-url``, e.g. PyTorch's
CPU index, for the Lambda Python). Each build writes ``NAME-pyX.Y-ARCH.zip`` and a ``.json``
manifest (sizes, wheels and their sha256) under ``--out`` (default build/layers); pip's HTTP
cache makes a rebuild download nothing.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import stat
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
DEFAULT_OUT = ROOT / "build" / "layers"
TOOLS = ROOT / "build" / "tools"

# Amazon Linux 2023 (python3.12 and newer runtimes) has glibc 2.34: every manylinux tag up to it fits.
GLIBC_MINOR = 34
MACHINE = {"x86_64": "x86_64", "arm64": "aarch64"}
LAMBDA_UNZIPPED_LIMIT_BYTES = 250 * 1024 * 1024
# where cai_torch_layer unpacks the archive on Lambda (its DEFAULT_TARGET; serverless.yml's CAI_TORCH_DIR)
UNPACKED_TORCH_DIR = "/tmp/cai-torch"

# zip and tar timestamps: the earliest a zip can hold, so builds do not depend on the clock.
FIXED_DATE = (1980, 1, 1, 0, 0, 0)
FIXED_MTIME = 315532800

ZSTD_VERSION = "0.25.0"
# Level 9 with a 128 MB window: libtorch_cpu.so (345 MB stripped) packs to 85 MB in 14 s on two
# cores; level 19 saves another 11 MB but takes 9 minutes. Decompression is ~1 s either way.
ZSTD_LEVEL = 9
ZSTD_WINDOW_LOG = 27


# --- wheels ---------------------------------------------------------------------------------

def platform_args(arch: str, python_version: str) -> list[str]:
    """pip options that select binary wheels for the Lambda platform, never the build machine's."""
    machine = MACHINE[arch]
    # pip before 24 does not expand manylinux_2_34 to older tags, so list them all.
    tags = [f"manylinux_2_{minor}_{machine}" for minor in range(GLIBC_MINOR, 16, -1)]
    tags += [f"manylinux2014_{machine}"]
    args = ["--only-binary=:all:", "--implementation", "cp", "--python-version", python_version]
    for tag in tags:
        args += ["--platform", tag]
    return args


def pip(*args: str) -> None:
    cmd = [sys.executable, "-m", "pip", "--disable-pip-version-check", *args]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)


def download_wheels(requirements: list[str], dest: Path, arch: str, python_version: str,
                    index_url: str | None = None) -> list[Path]:
    """Fetch exactly the pinned wheels for the target into the empty folder ``dest``.

    pip's own HTTP cache makes a repeated build download nothing.
    """
    dest.mkdir(parents=True)
    extra = ["--index-url", index_url] if index_url else []
    pip("download", "--no-deps", "--dest", str(dest), *platform_args(arch, python_version),
        *extra, *requirements)
    return sorted(dest.glob("*.whl"))


def install_wheels(wheels: list[Path], target: Path, arch: str, python_version: str) -> None:
    """Unpack wheels into ``target`` as the Lambda's pip would, without compiling .pyc for this host."""
    pip("install", "--no-deps", "--no-compile", "--no-index", "--target", str(target),
        *platform_args(arch, python_version), *map(str, wheels))
    # both name the temporary folder the wheels came from, so two builds would never be byte-identical
    for record in [*target.glob("*.dist-info/direct_url.json"), *target.glob("*.dist-info/RECORD")]:
        record.unlink()


def read_requirements(path: Path) -> list[str]:
    lines = (line.split("#", 1)[0].strip() for line in path.read_text().splitlines())
    return [line for line in lines if line]


def _is_path(text: str) -> bool:
    return text.endswith(".whl") or "/" in text


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# --- trimming -------------------------------------------------------------------------------

def read_patterns(path: Path) -> list[str]:
    return read_requirements(path)


def prune(root: Path, patterns: list[str]) -> int:
    """Delete everything under ``root`` matching the glob ``patterns``; returns bytes removed."""
    removed = 0
    for pattern in patterns:
        for path in sorted(root.glob(pattern), reverse=True):
            if not path.exists():
                continue  # inside a folder an earlier match removed
            removed += tree_bytes(path)
            shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
    return removed


def strip_tool(arch: str) -> str | None:
    """A ``strip`` that understands the target's ELF files, or None (then libraries ship unstripped)."""
    host = MACHINE.get(platform.machine(), platform.machine())
    candidates = ["strip"] if host == MACHINE[arch] else []
    candidates.append(f"{MACHINE[arch]}-linux-gnu-strip")
    return next((shutil.which(c) for c in candidates if shutil.which(c)), None)


def strip_libraries(root: Path, tool: str) -> int:
    """Drop symbols and debug sections from every shared library; returns bytes saved."""
    before = tree_bytes(root)
    libs = sorted(p for p in root.rglob("*.so*") if p.is_file() and not p.is_symlink())
    for lib in libs:
        # --strip-unneeded keeps the dynamic symbols other libraries link against.
        subprocess.run([tool, "--strip-unneeded", str(lib)], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return before - tree_bytes(root)


def target_interpreter(python_version: str) -> str | None:
    """A Python of the target's version on this machine that really runs, or None.

    A pyenv shim for a version that is installed but not selected is on PATH yet exits 127,
    so each candidate is asked for its version before it is trusted.
    """
    candidates = [sys.executable, shutil.which(f"python{python_version}")]
    pyenv_root = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv"))
    candidates += sorted(map(str, pyenv_root.glob(f"versions/{python_version}*/bin/python{python_version}")))
    for candidate in filter(None, candidates):
        probe = subprocess.run([candidate, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
                               capture_output=True, text=True)
        if probe.returncode == 0 and probe.stdout.strip() == python_version:
            return candidate
    return None


def compile_bytecode(root: Path, python_version: str, dest: str) -> bool:
    """Precompile .pyc (hash-checked, so reproducible) with an interpreter of the target's version.

    Lambda's /opt is read-only, so without them every cold start compiles the layer's Python
    (measured: +0.75 s for numpy and onnxruntime, +2 s for torch). Returns False, and ships
    sources only, when no such interpreter is on this machine.
    """
    interpreter = target_interpreter(python_version)
    if interpreter is None:
        print(f"warning: no python{python_version} here, so no .pyc in the layer; cold starts "
              "compile the sources (build on a machine with that Python to include them)", file=sys.stderr)
        return False
    # a few test fixtures in the wheels do not compile on purpose; compileall then exits 1
    # -s/-p: .pyc name their source where it will be (dest), not this build's temporary folder
    subprocess.run([interpreter, "-m", "compileall", "-q", "-q", "-j", "0", "-s", str(root), "-p", dest,
                    "--invalidation-mode", "unchecked-hash", str(root)], stdout=subprocess.DEVNULL)
    return True


def tree_bytes(path: Path) -> int:
    if path.is_file() or path.is_symlink():
        return path.lstat().st_size
    return sum(p.lstat().st_size for p in path.rglob("*") if p.is_file() or p.is_symlink())


# --- deterministic archives -----------------------------------------------------------------

def _files(root: Path) -> list[Path]:
    return sorted((p for p in root.rglob("*") if p.is_file()), key=lambda p: p.relative_to(root).as_posix())


def _mode(path: Path) -> int:
    return 0o755 if path.stat().st_mode & stat.S_IXUSR else 0o644


def write_zip(root: Path, zip_path: Path, stored_suffixes: tuple[str, ...] = ()) -> dict:
    """Zip ``root``'s files (names relative to it) byte-reproducibly; returns sizes."""
    zip_path.parent.mkdir(parents=True, exist_ok=True)
    unzipped = 0
    files = _files(root)
    with zipfile.ZipFile(zip_path, "w") as zf:
        for path in files:
            info = zipfile.ZipInfo(path.relative_to(root).as_posix(), FIXED_DATE)
            info.external_attr = (stat.S_IFREG | _mode(path)) << 16
            info.create_system = 3  # unix, so the modes above are honoured
            stored = path.name.endswith(stored_suffixes)
            info.compress_type = zipfile.ZIP_STORED if stored else zipfile.ZIP_DEFLATED
            with open(path, "rb") as src, zf.open(info, "w", force_zip64=True) as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
            unzipped += path.stat().st_size
    return {"files": len(files), "unzipped_bytes": unzipped, "zipped_bytes": zip_path.stat().st_size}


def _zstandard():
    """The zstandard module for this build machine, installed into build/tools on first use."""
    try:
        import zstandard
        return zstandard
    except ImportError:
        pass
    target = TOOLS / f"zstandard-{ZSTD_VERSION}-py{sys.version_info.major}.{sys.version_info.minor}"
    if not (target / "zstandard").is_dir():
        pip("install", "--no-deps", "--only-binary=:all:", "--target", str(target),
            f"zstandard=={ZSTD_VERSION}")
    sys.path.insert(0, str(target))
    import zstandard
    return zstandard


def write_tar_zst(root: Path, out_path: Path, level: int = ZSTD_LEVEL) -> dict:
    """Tar ``root``'s files (sorted, owner 0, fixed mtime) through zstd; returns sizes."""
    zstd = _zstandard()
    params = zstd.ZstdCompressionParameters.from_level(
        level, window_log=ZSTD_WINDOW_LOG, enable_ldm=True, threads=-1)
    compressor = zstd.ZstdCompressor(compression_params=params)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    files = _files(root)
    unpacked = 0
    with open(out_path, "wb") as raw, compressor.stream_writer(raw, closefd=False) as sink:
        with tarfile.open(fileobj=sink, mode="w|", format=tarfile.PAX_FORMAT) as tar:
            for path in files:
                info = tarfile.TarInfo(path.relative_to(root).as_posix())
                info.size = path.stat().st_size
                info.mtime = FIXED_MTIME
                info.mode = _mode(path)
                with open(path, "rb") as src:
                    tar.addfile(info, src)
                unpacked += info.size
    return {"files": len(files), "unpacked_bytes": unpacked, "compressed_bytes": out_path.stat().st_size,
            "zstd_level": level, "zstd_window_log": ZSTD_WINDOW_LOG}


# --- the two layers -------------------------------------------------------------------------

def layer_stem(name: str, python_version: str, arch: str) -> str:
    return f"{name}-py{python_version}-{arch}"


def _wheel_records(wheels: list[Path]) -> list[dict]:
    return [{"file": w.name, "sha256": sha256(w)} for w in wheels]


def _finish(manifest: dict, out: Path, stem: str) -> dict:
    sizes = manifest["zip"]
    if sizes["unzipped_bytes"] >= LAMBDA_UNZIPPED_LIMIT_BYTES:
        raise SystemExit(f"{stem}: {sizes['unzipped_bytes'] / 2**20:.0f} MB unzipped, over Lambda's "
                         "250 MB limit for a function and all its layers")
    (out / f"{stem}.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def build_inference(arch: str, python_version: str, out: Path) -> dict:
    stem = layer_stem("inference", python_version, arch)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="cai-layer-") as tmp:
        tmp = Path(tmp)
        requirements = read_requirements(HERE / "inference" / "requirements.txt")
        wheels = download_wheels(requirements, tmp / "wheels", arch, python_version)
        install_wheels(wheels, tmp / "layer" / "python", arch, python_version)
        pruned = prune(tmp / "layer" / "python", read_patterns(HERE / "inference" / "prune.txt"))
        compiled = compile_bytecode(tmp / "layer" / "python", python_version, "/opt/python")
        sizes = write_zip(tmp / "layer", out / f"{stem}.zip")
        records = _wheel_records(wheels)
    return _finish({
        "layer": "inference", "arch": arch, "python_version": python_version,
        "zip": sizes, "pruned_bytes": pruned, "bytecode": compiled, "wheels": records,
        "build_s": round(time.monotonic() - started, 1),
    }, out, stem)


def build_torch(arch: str, python_version: str, out: Path, torch_wheel: str,
                index_url: str | None, level: int) -> dict:
    stem = layer_stem("torch", python_version, arch)
    started = time.monotonic()
    tool = strip_tool(arch)
    if tool is None:
        print(f"warning: no strip for {arch}; libraries ship unstripped (install binutils-"
              f"{MACHINE[arch].replace('_', '-')}-linux-gnu)", file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="cai-layer-") as tmp:
        tmp = Path(tmp)
        torch_whl = fetch_torch_wheel(torch_wheel, tmp / "torch-wheel", arch, python_version, index_url)
        archive_reqs = read_requirements(HERE / "torch" / "requirements-archive.txt")
        layer_reqs = read_requirements(HERE / "torch" / "requirements.txt")
        archive_wheels = [torch_whl] + download_wheels(archive_reqs, tmp / "archive-wheels", arch, python_version)
        layer_wheels = download_wheels(layer_reqs, tmp / "layer-wheels", arch, python_version)
        records = _wheel_records(archive_wheels + layer_wheels)

        # the tree that ends up in /tmp at cold start
        tree = tmp / "tree"
        install_wheels(archive_wheels, tree, arch, python_version)
        pruned = prune(tree, read_patterns(HERE / "torch" / "prune.txt"))
        stripped = strip_libraries(tree, tool) if tool else 0
        compiled = compile_bytecode(tree, python_version, UNPACKED_TORCH_DIR)

        # the layer itself: the archive stored as is, and the code that unpacks it
        stage = tmp / "layer"
        archive = write_tar_zst(tree, stage / "torch" / "torch.tar.zst", level)
        shutil.rmtree(tree)
        install_wheels(layer_wheels, stage / "python", arch, python_version)
        pruned += prune(stage / "python", read_patterns(HERE / "torch" / "prune-layer.txt"))
        stripped += strip_libraries(stage / "python", tool) if tool else 0
        shutil.copy2(HERE / "torch" / "cai_torch_layer.py", stage / "python" / "cai_torch_layer.py")
        sizes = write_zip(stage, out / f"{stem}.zip", stored_suffixes=(".zst",))
    return _finish({
        "layer": "torch", "arch": arch, "python_version": python_version,
        "zip": sizes, "archive": archive, "archive_path": "/opt/torch/torch.tar.zst",
        "pruned_bytes": pruned, "stripped_bytes": stripped, "strip_tool": tool, "bytecode": compiled,
        "wheels": records, "build_s": round(time.monotonic() - started, 1),
    }, out, stem)


def fetch_torch_wheel(source: str, dest: Path, arch: str, python_version: str,
                      index_url: str | None) -> Path:
    """The torch wheel from a path, or a URL or requirement pip fetches, checked against the target."""
    if _is_path(source) and not source.startswith(("http://", "https://")):
        wheel = Path(source).resolve()
        if not wheel.is_file():
            raise SystemExit(f"--torch-wheel {source}: no such file")
    else:
        wheels = [w for w in download_wheels([source], dest, arch, python_version, index_url)
                  if w.name.startswith("torch-")]
        if not wheels:
            raise SystemExit(f"--torch-wheel {source}: pip found no torch wheel")
        wheel = wheels[0]
    tag = f"cp{python_version.replace('.', '')}"
    if f"-{tag}-" not in wheel.name or MACHINE[arch] not in wheel.name:
        raise SystemExit(f"{wheel.name} is not a {tag} {MACHINE[arch]} wheel; "
                         "pass the --python-version and --arch it was built for")
    return wheel


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("layer", choices=("inference", "torch"))
    parser.add_argument("--arch", choices=sorted(MACHINE), default="x86_64",
                        help="Lambda architecture (default x86_64)")
    parser.add_argument("--python-version", default="3.12",
                        help="the Lambda runtime's Python, e.g. 3.12 (default)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="where zips go (build/layers)")
    parser.add_argument("--torch-wheel", help="torch layer: wheel path, URL, or requirement (torch==2.13.0)")
    parser.add_argument("--torch-index-url", help="torch layer: index for a requirement, e.g. PyTorch's CPU index")
    parser.add_argument("--zstd-level", type=int, default=ZSTD_LEVEL,
                        help=f"torch layer: zstd level (default {ZSTD_LEVEL}; 3 builds in seconds for tests)")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)

    if args.layer == "inference":
        manifest = build_inference(args.arch, args.python_version, args.out)
    else:
        if not args.torch_wheel:
            parser.error("the torch layer needs --torch-wheel (a path, URL or torch==VERSION)")
        manifest = build_torch(args.arch, args.python_version, args.out,
                               args.torch_wheel, args.torch_index_url, args.zstd_level)
    zipped = manifest["zip"]
    print(f"{layer_stem(args.layer, args.python_version, args.arch)}.zip: "
          f"{zipped['unzipped_bytes'] / 2**20:.1f} MB unzipped, {zipped['zipped_bytes'] / 2**20:.1f} MB zipped, "
          f"built in {manifest['build_s']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
