"""The installed package owns only its own names: kubeseg and kubeseg_platform. The repository's
top-level pipelines/ and components/ folders are installed as kubeseg_platform.pipelines and
kubeseg_platform.components, so a wheel installed beside another project's ``pipelines``
package breaks neither."""
import configparser
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SOURCES = ("setup.cfg", "pyproject.toml", "README.md", "kubeseg", "kubeseg_platform",
           "pipelines", "components")  # kubeseg_platform's links point into the last two
DUMMY = "OWNER = 'another project'\n"


def test_setup_finds_the_platform_code_inside_kubeseg_platform_only():
    from setuptools import find_packages

    config = configparser.ConfigParser()
    config.read(REPO / "setup.cfg")
    include = [name.strip() for name in config["options.packages.find"]["include"].split(",")]
    found = set(find_packages(str(REPO), include=include))
    assert {"kubeseg", "kubeseg.serving", "kubeseg_platform", "kubeseg_platform.pipelines",
            "kubeseg_platform.components"} <= found
    assert not {"pipelines", "components", "tests", "bench"} & found
    for folder in ("pipelines", "components"):
        assert (REPO / "kubeseg_platform" / folder).resolve() == REPO / folder


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    source = tmp_path_factory.mktemp("source")
    for name in SOURCES:
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, source / name, symlinks=True)
        else:
            shutil.copy(REPO / name, source / name)
    dist = tmp_path_factory.mktemp("dist")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "--quiet", "-w", str(dist), str(source)], check=True, timeout=300)
    (built,) = dist.glob("kubeseg-*.whl")
    return built


@pytest.mark.slow
def test_the_wheel_holds_only_kubesegs_own_top_level_names(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    assert {n.split("/")[0] for n in names if ".dist-info/" not in n} == {"kubeseg",
                                                                           "kubeseg_platform"}
    for packaged in ("kubeseg_platform/pipelines/segmentation.yaml",
                     "kubeseg_platform/pipelines/batch_predict.yaml",
                     "kubeseg_platform/components/train.py"):
        assert packaged in names


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_the_installed_wheel_works_beside_a_package_named_pipelines(wheel, tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    python = venv / "bin" / "python"
    subprocess.run([str(python), "-m", "pip", "install", "--quiet", "--no-deps", "--no-index",
                    str(wheel)], check=True, timeout=300)
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; "
                                "print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    for other in ("pipelines", "components"):  # another project's packages of those names
        (site / other).mkdir()
        (site / other / "__init__.py").write_text(DUMMY)
    # kubeseg's dependencies (torch, kfp, ...) from this environment, after kubeseg's own
    (site / "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "KUBESEG_IMAGE_REGISTRY", "KUBESEG_IMAGE_TAG")}

    def run(*command):
        result = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, env=env,
                                timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
        return result.stdout

    assert "usage: kubeseg" in run(str(venv / "bin" / "kubeseg"), "--help")
    out = tmp_path / "out"
    out.mkdir()
    run(str(venv / "bin" / "kubeseg"), "compile", "--output", str(out / "segmentation.yaml"))
    assert (out / "segmentation.yaml").read_text() == \
        (REPO / "pipelines" / "segmentation.yaml").read_text()
    assert (out / "batch_predict.yaml").is_file()
    where = run(str(python), "-c",
                "import pipelines, components, kubeseg, kubeseg_platform.pipelines as p; "
                "print(pipelines.OWNER, components.OWNER, p.__file__, kubeseg.__file__, "
                "sep='|')").strip().split("|")
    assert where[:2] == ["another project", "another project"]
    assert all(Path(path).is_relative_to(site) for path in where[2:]), where
