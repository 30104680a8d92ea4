"""The layer builder's steps (prune, strip, pack, unpack) on a small fake torch tree, in seconds.

The same steps on this machine's real CPU torch wheel are measured by layers/measure_cold_start.py
(figures in docs/deploy.md); the last test checks those real layers' sizes when they are built.
"""

import importlib.util
import json
import os
import shutil
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ROOT / "layers"
LIMIT = 250 * 1024 * 1024


def load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


build = load("cai_layer_build", LAYERS / "build.py")
torch_layer = load("cai_torch_layer", LAYERS / "torch" / "cai_torch_layer.py")


def a_shared_library() -> Path:
    """A real ELF .so (one of the interpreter's own extension modules), for strip to work on."""
    for name in ("_ctypes", "_json", "_struct", "select", "numpy._core._multiarray_tests"):
        module = importlib.import_module(name)
        if getattr(module, "__file__", "").endswith(".so"):
            return Path(module.__file__)
    pytest.skip("no extension module built as a shared library here")


@pytest.fixture
def fake_torch(tmp_path):
    """A torch-like tree with what prune.txt drops and what `import torch` needs."""
    tree = tmp_path / "tree"
    files = {
        "torch/__init__.py": "VERSION = 'fake'\n",
        "torch/testing/__init__.py": "",  # imported by `import torch`: kept
        "torch/bin/torch_shm_manager": "#!/bin/sh\n",  # needed at import: kept
        "torch/include/ATen/ATen.h": "// header\n" * 100,
        "torch/share/cmake/Torch/TorchConfig.cmake": "cmake\n",
        "torch/lib/libtorch_cpu.a": "static\n",
        "torch/test/test_ops.py": "",
        "torch/bin/test_api": "binary\n",
        "torch/lib/libjitbackend_test.so": "test lib\n",
        "torch/utils/data/tests/test_x.py": "",
        "torch/__pycache__/x.cpython-311.pyc": "",
        "torch/_C.pyi": "",
        "bin/torchrun": "#!/bin/sh\n",
        "typing_extensions.py": "",
    }
    for name, text in files.items():
        (tree / name).parent.mkdir(parents=True, exist_ok=True)
        (tree / name).write_text(text)
    (tree / "torch/bin/torch_shm_manager").chmod(0o755)
    shutil.copy(a_shared_library(), tree / "torch/lib/libtorch_cpu.so")
    return tree


def listing(root: Path) -> dict:
    return {p.relative_to(root).as_posix(): (p.read_bytes(), os.access(p, os.X_OK))
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != torch_layer._STAMP}


def test_prune_drops_what_inference_never_touches(fake_torch):
    removed = build.prune(fake_torch, build.read_patterns(LAYERS / "torch" / "prune.txt"))

    left = set(listing(fake_torch))
    assert left == {"torch/__init__.py", "torch/testing/__init__.py", "torch/bin/torch_shm_manager",
                    "torch/lib/libtorch_cpu.so", "typing_extensions.py"}
    assert removed > 1000


@pytest.mark.skipif(build.strip_tool("x86_64" if os.uname().machine == "x86_64" else "arm64") is None,
                    reason="no strip for this machine's ELF files")
def test_strip_keeps_a_library_loadable(fake_torch):
    arch = "x86_64" if os.uname().machine == "x86_64" else "arm64"
    build.prune(fake_torch, build.read_patterns(LAYERS / "torch" / "prune.txt"))  # leaves ELF files only
    lib = fake_torch / "torch/lib/libtorch_cpu.so"
    before = lib.stat().st_size
    saved = build.strip_libraries(fake_torch, build.strip_tool(arch))
    assert 0 <= saved == before - lib.stat().st_size
    import ctypes
    ctypes.CDLL(str(lib))  # --strip-unneeded keeps the dynamic symbols a loader needs


def test_pack_then_unpack_restores_the_tree_once_per_container(fake_torch, tmp_path, monkeypatch):
    build.prune(fake_torch, build.read_patterns(LAYERS / "torch" / "prune.txt"))
    archive = tmp_path / "layer" / "torch" / "torch.tar.zst"
    sizes = build.write_tar_zst(fake_torch, archive, level=3)
    assert sizes["files"] == 5 and sizes["compressed_bytes"] == archive.stat().st_size

    # packing is reproducible: same tree, same bytes (so osls sees an unchanged layer)
    again = tmp_path / "again.tar.zst"
    build.write_tar_zst(fake_torch, again, level=3)
    assert again.read_bytes() == archive.read_bytes()

    monkeypatch.setattr(sys, "path", list(sys.path))
    target = tmp_path / "tmp" / "cai-torch"
    monkeypatch.setenv(torch_layer.ARCHIVE_ENV, str(archive))
    monkeypatch.setenv(torch_layer.TARGET_ENV, str(target))
    assert torch_layer.ensure_torch() == target
    assert listing(target) == listing(fake_torch)  # contents and executable bits
    assert sys.path[0] == str(target)

    # a warm container finds the tree and does not unpack again
    (target / "marker").write_text("still here")
    torch_layer.ensure_torch()
    assert (target / "marker").exists()
    assert not list(target.parent.glob("*.partial-*"))


def test_unpack_without_the_layer_says_how_to_attach_it(tmp_path, monkeypatch):
    monkeypatch.delenv(torch_layer.ARCHIVE_ENV, raising=False)
    with pytest.raises(FileNotFoundError, match="--param torch=true"):
        torch_layer.ensure_torch(target=tmp_path / "t")


def test_engine_reports_a_missing_torch_layer_as_a_weights_error(random_weights, tmp_path, monkeypatch):
    from cai.errors import WeightsError
    from cai.model.engine import Engine

    monkeypatch.setenv("CAI_TORCH_LAYER_ARCHIVE", str(tmp_path / "missing.tar.zst"))
    monkeypatch.syspath_prepend(str(LAYERS / "torch"))
    with pytest.raises(WeightsError, match="cannot unpack the torch layer"):
        Engine.load(random_weights, runtime="torch")


def test_zips_are_reproducible_and_keep_modes(fake_torch, tmp_path):
    first, second = tmp_path / "a.zip", tmp_path / "b.zip"
    sizes = build.write_zip(fake_torch, first, stored_suffixes=(".so",))
    build.write_zip(fake_torch, second, stored_suffixes=(".so",))
    assert first.read_bytes() == second.read_bytes()
    with zipfile.ZipFile(first) as zf:
        info = {i.filename: i for i in zf.infolist()}
    assert sizes["unzipped_bytes"] == sum(i.file_size for i in info.values())
    assert info["torch/bin/torch_shm_manager"].external_attr >> 16 & 0o111
    assert info["torch/lib/libtorch_cpu.so"].compress_type == zipfile.ZIP_STORED


def test_bytecode_does_not_depend_on_the_build_folder(tmp_path):
    here = f"{sys.version_info.major}.{sys.version_info.minor}"
    built = []
    for folder in ("one", "two"):
        (tmp_path / folder / "pkg").mkdir(parents=True)
        (tmp_path / folder / "pkg" / "mod.py").write_text("def f():\n    return 1\n")
        assert build.compile_bytecode(tmp_path / folder, here, "/opt/python")
        (pyc,) = (tmp_path / folder / "pkg" / "__pycache__").glob("mod.*.pyc")
        built.append(pyc.read_bytes())
    assert built[0] == built[1] and b"/opt/python/pkg/mod.py" in built[0]


def test_wheels_are_chosen_for_the_lambda_platform_never_this_machine():
    args = build.platform_args("arm64", "3.12")
    assert args[:5] == ["--only-binary=:all:", "--implementation", "cp", "--python-version", "3.12"]
    platforms = [args[i + 1] for i, a in enumerate(args) if a == "--platform"]
    assert platforms[0] == "manylinux_2_34_aarch64" and "manylinux2014_aarch64" in platforms
    assert all("aarch64" in p for p in platforms)


def test_a_torch_wheel_for_another_python_or_machine_is_refused(tmp_path):
    wheel = tmp_path / "torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl"
    wheel.write_bytes(b"")
    assert build.fetch_torch_wheel(str(wheel), tmp_path / "d", "x86_64", "3.11", None) == wheel
    with pytest.raises(SystemExit, match="not a cp312 x86_64 wheel"):
        build.fetch_torch_wheel(str(wheel), tmp_path / "d", "x86_64", "3.12", None)
    with pytest.raises(SystemExit, match="not a cp311 aarch64 wheel"):
        build.fetch_torch_wheel(str(wheel), tmp_path / "d", "arm64", "3.11", None)


def test_bytecode_is_compiled_only_by_a_python_of_the_target_version():
    here = f"{sys.version_info.major}.{sys.version_info.minor}"
    assert build.target_interpreter(here) is not None
    assert build.target_interpreter("2.9") is None


def test_layer_pins_match_the_local_environment():
    """What the Lambda runs is what the tests ran: same numpy, onnxruntime, safetensors."""
    def pins(path):
        return dict(line.split("==") for line in build.read_requirements(path) if "==" in line)

    layer, local = pins(LAYERS / "inference" / "requirements.txt"), pins(ROOT / "requirements.txt")
    for package in ("numpy", "onnxruntime", "safetensors"):
        assert layer[package] == local[package], package


@pytest.mark.parametrize("python_version", ["3.11", "3.12"])
def test_built_layers_fit_lambdas_unzipped_limit(python_version):
    """The real layers, where built (make package builds the 3.12 inference layer; docs/deploy.md the rest)."""
    manifests = {name: ROOT / "build" / "layers" / f"{name}-py{python_version}-x86_64.json"
                 for name in ("inference", "torch")}
    built = {name: json.loads(path.read_text()) for name, path in manifests.items() if path.is_file()}
    if not built:
        pytest.skip(f"no layers built for Python {python_version}")
    for manifest in built.values():
        assert manifest["zip"]["unzipped_bytes"] < LIMIT
    if len(built) == 2:  # the executor with runtime torch carries both
        assert sum(m["zip"]["unzipped_bytes"] for m in built.values()) < LIMIT
        assert built["torch"]["archive"]["unpacked_bytes"] > LIMIT  # why it ships compressed at all
