"""The wheel carries everything the library and its commands read at run time, and works installed on its own."""

import configparser
import json
import os
import shutil
import site
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest


ROOT = Path(__file__).resolve().parents[1]
# What a wheel is built from; the checkout's own build/ and *.egg-info stay out of it.
BUILD_INPUTS = ("pyproject.toml", "README.md", "LICENSE", "src", "model_cards", "scripts")
# Each folder of the checkout and where the wheel puts it: model_cards/ and scripts/ are mapped onto packages.
PACKAGE_FOLDERS = {
    "hf_lossfree_moe": ROOT / "src" / "hf_lossfree_moe",
    "hf_lossfree_moe/model_cards": ROOT / "model_cards",
    "hf_lossfree_moe_scripts": ROOT / "scripts",
}
COMMANDS = {
    "hf-lossfree-moe-train": "hf_lossfree_moe_scripts.train:main",
    "hf-lossfree-moe-reproduce": "hf_lossfree_moe_scripts.reproduce_paper:main",
    "hf-lossfree-moe-plot": "hf_lossfree_moe_scripts.plot:main",
    "hf-lossfree-moe-benchmark": "hf_lossfree_moe_scripts.benchmark:main",
    "hf-lossfree-moe-export": "hf_lossfree_moe_scripts.export:main",
}
NOT_SHIPPED = ("__pycache__", ".pyc", ".egg-info")


@pytest.fixture(scope="module")
def build(tmp_path_factory) -> tuple[Path, str]:
    """The wheel pip builds from a copy of the sources (pip builds in the source folder and leaves build/ there), and
    the build's log."""
    source = tmp_path_factory.mktemp("source")
    for name in BUILD_INPUTS:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns(*(f"*{p}" for p in NOT_SHIPPED)))
        else:
            shutil.copy(ROOT / name, source / name)
    dist = tmp_path_factory.mktemp("dist")
    command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "--verbose"]
    result = subprocess.run([*command, "-w", str(dist), str(source)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return next(dist.glob("*.whl")), result.stdout + result.stderr


@pytest.fixture(scope="module")
def wheel(build) -> Path:
    return build[0]


def test_build_lists_every_folder_it_ships_as_a_package(build):
    """setuptools warns of data-only folders missing from `packages`, and will stop shipping them."""
    _, log = build
    assert "absent from the `packages` configuration" not in log


def package_files() -> set[str]:
    """Every file of the packages' folders, named as in the wheel."""
    return {
        f"{package}/{path.relative_to(folder).as_posix()}"
        for package, folder in PACKAGE_FOLDERS.items()
        for path in folder.rglob("*")
        if path.is_file() and not any(part.endswith(NOT_SHIPPED) for part in path.parts)
    }


def test_wheel_holds_every_package_file_the_license_and_the_commands(wheel):
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        dist_info = next(name.split("/")[0] for name in names if name.split("/")[0].endswith(".dist-info"))
        entry_points = configparser.ConfigParser()
        entry_points.read_string(archive.read(f"{dist_info}/entry_points.txt").decode())
        metadata = archive.read(f"{dist_info}/METADATA").decode()
    # Read at run time besides the modules: the card templates, the evaluate metric folder, the typing marker.
    assert {
        "hf_lossfree_moe/model_cards/lossfree_moe.md",
        "hf_lossfree_moe/model_cards/glm4_moe_export.md",
        "hf_lossfree_moe/metrics/maxvio/maxvio.py",
        "hf_lossfree_moe/metrics/maxvio/README.md",
        "hf_lossfree_moe/py.typed",
        "hf_lossfree_moe_scripts/train.py",
        "hf_lossfree_moe_scripts/reproduce/runs.py",
    } <= names
    assert sorted(package_files() - names) == []
    assert f"{dist_info}/licenses/LICENSE" in names
    assert dict(entry_points["console_scripts"]) == COMMANDS
    assert "License-Expression: Apache-2.0" in metadata


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory) -> tuple[Path, dict]:
    """A fresh virtual environment with the wheel installed and the test's own dependencies on its path, but not this
    checkout: the path entry points at the test's site-packages, whose .pth files (the editable install's finder
    among them) Python only runs for its own site folders. Returns the environment's bin folder and its process
    environment."""
    venv = tmp_path_factory.mktemp("venv")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    install = [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index", "--quiet"]
    subprocess.run([*install, str(wheel)], check=True, timeout=300)
    purelib = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    site_packages = Path(subprocess.check_output([str(python), "-c", purelib], text=True).strip())
    (site_packages / "test_dependencies.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    env = {name: value for name, value in os.environ.items() if name != "PYTHONPATH"}
    env.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    return venv / "bin", env


@pytest.mark.slow
def test_installed_wheel_trains_and_writes_a_card(installed, tmp_path):
    bin_dir, env = installed
    where = "import hf_lossfree_moe, hf_lossfree_moe_scripts as s; print(hf_lossfree_moe.__file__, s.__file__)"
    located = subprocess.check_output([str(bin_dir / "python"), "-c", where], text=True, env=env, cwd=tmp_path)
    assert all(path.startswith(str(bin_dir.parent)) for path in located.split())  # the wheel's copy, not the checkout

    tiny = {"vocab_size": 300, "hidden_size": 32, "intermediate_size": 64, "moe_intermediate_size": 16}
    tiny.update(num_hidden_layers=3, num_attention_heads=2, max_position_embeddings=32, n_routed_experts=8)
    command = [str(bin_dir / "hf-lossfree-moe-train"), "--output_dir", "model", "--max_steps", "2"]
    command += ["--config_overrides", json.dumps(tiny), "--per_device_train_batch_size", "2"]
    command += ["--max_eval_samples", "4", "--logging_steps", "1", "--save_steps", "2"]
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    card = (tmp_path / "model" / "README.md").read_text()
    assert "- 2 optimizer steps" in card
    assert "`hf-lossfree-moe-train --model_name_or_path model`" in card  # the command the card names exists
    for command in sorted(COMMANDS.keys() - {"hf-lossfree-moe-train"}):
        result = subprocess.run([str(bin_dir / command), "--help"], capture_output=True, text=True, env=env)
        assert result.returncode == 0 and result.stdout.startswith("usage:"), (command, result.stderr[-2000:])


def test_fine_tuning_extra_installs_what_the_fine_tuning_page_imports_with_the_tested_pins():
    import tomllib

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert sorted(extras["fine-tuning"]) == sorted(r for r in extras["dev"] if r.startswith(("peft", "trl")))
    page = (ROOT / "docs" / "fine_tuning.md").read_text()
    assert 'pip install "hf-lossfree-moe[fine-tuning]"' in page
    assert "from peft import" in page and "from trl import" in page
