"""The wheel: built from this checkout, installed into a fresh venv outside it, run from there.

Only an installed copy can show what a wheel forgot (a config, the sbatch template, a subpackage
mapped from a top-level folder). The venv sees the system site-packages for the frameworks
(offline), so every command also checks it ran the venv's copy of ``scaling``, not this checkout
(an editable install's finder in the system site-packages maps ``scaling`` to a clone).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import scaling

try:
    import tomllib
except ImportError:  # Python 3.10: pytest's own TOML reader
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
SETUPTOOLS = PYPROJECT["tool"]["setuptools"]
QUICK = ["data=synthetic", "train.epochs=1", "train.max_steps_per_epoch=30", "protocol.warmup_steps=5",
         "progress=false", "logger=none"]


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> dict:
    """Build the wheel from a copy of what it is made of, install it into a fresh venv."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"  # a copy: an in-tree build would leave build/ and *.egg-info in the checkout
    src.mkdir()
    for name in ["pyproject.toml", PYPROJECT["project"]["readme"]]:
        shutil.copy2(ROOT / name, src / name)
    for folder in ["scaling", *SETUPTOOLS["package-dir"].values()]:
        shutil.copytree(ROOT / folder, src / folder, ignore=shutil.ignore_patterns("__pycache__"))
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                            "--no-index", "-w", str(tmp / "dist"), str(src)], capture_output=True, text=True,
                           timeout=300)
    assert build.returncode == 0, build.stdout + build.stderr
    wheel = next((tmp / "dist").glob("scaling-*.whl"))

    venv = tmp / "venv"  # frameworks from the system site-packages; pip too (no ensurepip: offline, faster)
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)], check=True,
                   timeout=120)
    python = venv / "bin" / "python"
    install = subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)],
                             capture_output=True, text=True, timeout=300)
    assert install.returncode == 0, install.stdout + install.stderr
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                               capture_output=True, text=True, check=True).stdout.strip())
    assert site.is_relative_to(venv)
    cwd = tmp / "elsewhere"
    cwd.mkdir()
    # no PYTHONPATH (it would put this checkout first) and no user site
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env.update(PYTHONNOUSERSITE="1", COLUMNS="120")
    return {"wheel": wheel, "venv": venv, "site": site, "cwd": cwd, "env": env}


def run(installed: dict, *argv: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """A command from the venv's bin/, run outside the checkout."""
    argv = (str(installed["venv"] / "bin" / argv[0]), *argv[1:])
    return subprocess.run(argv, cwd=installed["cwd"], env=installed["env"], capture_output=True, text=True,
                          timeout=timeout)


def test_the_wheel_holds_one_top_level_package_with_its_configs_template_and_subpackages(installed):
    names = zipfile.ZipFile(installed["wheel"]).namelist()
    # one top-level package: no `launch` beside it in site-packages
    assert {n.split("/")[0] for n in names} == {"scaling", f"scaling-{scaling.__version__}.dist-info"}
    # every subpackage of the checkout, with every config and the template
    packages = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "scaling").rglob("__init__.py")}
    packages |= set(scaling.SOURCE_FOLDERS)
    assert set(SETUPTOOLS["packages"]) == packages
    wanted = {f"scaling/{p.relative_to(ROOT / 'scaling').as_posix()}" for p in (ROOT / "scaling").rglob("*.py")}
    for package, folder in scaling.SOURCE_FOLDERS.items():
        base = package.replace(".", "/")
        wanted |= {f"{base}/{p.relative_to(ROOT / folder).as_posix()}" for p in (ROOT / folder).rglob("*")
                   if p.suffix in (".py", ".yaml", ".sbatch") and "__pycache__" not in p.parts}
    assert wanted and wanted <= set(names), sorted(wanted - set(names))
    # the checkout maps the same folders as the wheel does
    assert SETUPTOOLS["package-dir"] == scaling.SOURCE_FOLDERS


def test_the_venv_imports_its_own_copy(installed):
    proc = run(installed, "python", "-c", "import json, scaling, scaling.config, scaling.launch.local, scaling.slurm; "
               "print(json.dumps([scaling.__file__, scaling.launch.local.__file__, str(scaling.config.CONF_DIR), "
               "str(scaling.slurm.TEMPLATE), scaling.CHECKOUT]))")
    assert proc.returncode == 0, proc.stderr
    *files, checkout = json.loads(proc.stdout)
    assert checkout is None
    assert all(Path(f).is_relative_to(installed["site"] / "scaling") for f in files), files


def test_run_help_lists_the_config_groups(installed):
    proc = run(installed, "scaling", "run", "--help")
    assert proc.returncode == 0, proc.stderr
    assert "backend: horovod_reference, horovod_tf, horovod_tf_reference, horovod_torch" in proc.stdout
    assert "experiment: comm, local_cpu" in proc.stdout


def test_one_cell_runs_through_the_launch_layer_and_records(installed, tmp_path):
    pytest.importorskip("torch")
    proc = run(installed, "scaling", "sweep", f"results_dir={tmp_path}", "backend=torch", *QUICK)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(p.read_text()) for p in (tmp_path / "adhoc").glob("*.json")]
    assert len(records) == 1 and records[0]["status"] == "ok"
    env = records[0]["environment"]
    # the worker process (python -m scaling.worker, started by scaling.launch.local) ran the venv's copy
    assert Path(env["argv"][0]) == installed["site"] / "scaling" / "worker.py"
    assert env["code"] == {"package": scaling.__version__, "git_commit": None, "git_dirty": None}


def test_slurm_render_writes_a_script_that_runs_the_venvs_python(installed, tmp_path):
    out = tmp_path / "jobs"
    proc = run(installed, "scaling", "slurm", "render", "cluster=slurm", f"results_dir={tmp_path / 'results'}",
               "data=synthetic", "backend=horovod_torch", "devices=2", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    [script] = out.glob("*.sbatch")
    text = script.read_text()
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    python = installed["venv"] / "bin" / "python"
    assert f"{python} -m scaling.launch.horovod_slurm serve" in text
    assert f"srun --kill-on-bad-exit=1 {python} -m scaling.worker --config" in text
    assert f"cd {installed['cwd']}\n" in text  # where it was rendered, not a site-packages folder
