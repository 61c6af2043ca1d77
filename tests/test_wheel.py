"""hf-cage as a user installs it without ``make``: build the wheel, install it elsewhere, export from elsewhere.

Offline: ``pip wheel --no-deps --no-build-isolation --no-index`` with the setuptools already installed,
``pip install --no-deps --no-index --target``; the export runs from another folder with only that target on
``PYTHONPATH`` (ahead of the editable checkout), through the installed ``hf-cage`` console script.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from test_export import INT_W4A4_GROUP, qat_model, save_checkpoint

from hf_cage.version import __version__

REPO_ROOT = Path(__file__).resolve().parents[1]


def _run(argv, **kwargs) -> subprocess.CompletedProcess:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=600, **kwargs)
    assert done.returncode == 0, (argv, done.stdout[-2000:], done.stderr[-3000:])
    return done


def test_wheel_holds_the_package_data_and_exports_from_another_folder(tmp_path):
    source = tmp_path / "source"  # a clean copy: the build writes build/ and *.egg-info next to the sources
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO_ROOT / name, source / name)
    shutil.copytree(REPO_ROOT / "hf_cage", source / "hf_cage", ignore=shutil.ignore_patterns("__pycache__"))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PIP_", "PYTHONPATH"))}
    env.update(PIP_DISABLE_PIP_VERSION_CHECK="1")
    pip = [sys.executable, "-m", "pip", "-q"]
    _run([*pip, "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", tmp_path / "dist", source], env=env)
    (wheel,) = (tmp_path / "dist").glob("hf_cage-*.whl")
    assert wheel.name.startswith(f"hf_cage-{__version__}-")  # pyproject.toml reads the one version string
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"hf_cage/export/templates/model_card.md", "hf_cage/py.typed", "hf_cage/export/api.py"} <= names
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    assert "hf-cage = hf_cage.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()

    site = tmp_path / "site"
    _run([*pip, "install", "--no-deps", "--no-index", "--target", site, wheel], env=env)
    ckpt = save_checkpoint(tmp_path / "run", qat_model(**INT_W4A4_GROUP), trainer_checkpoint=False)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env.update(PYTHONPATH=str(site), HF_HUB_OFFLINE="1")
    where = _run([sys.executable, "-c", "import hf_cage; print(hf_cage.__file__)"], cwd=elsewhere, env=env)
    assert Path(where.stdout.strip()).is_relative_to(site), where.stdout
    command = [site / "bin" / "hf-cage", "export", ckpt, "-o", "exports/w4a4", "--no-progress"]
    done = _run(command, cwd=elsewhere, env=env)
    assert "exported 14 quantized layers" in done.stdout and "train/serve parity: exact" in done.stdout
    card = (elsewhere / "exports" / "w4a4" / "README.md").read_text()
    assert card.startswith("---\n") and "**Train/serve parity: exact.**" in card
