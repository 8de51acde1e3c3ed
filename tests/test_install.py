"""`make setup` on any Linux machine: what the recipe runs (make -n, nothing installed), the torch check with
a CUDA build on a CPU machine, and the two pin sets (CUDA 13 and CUDA 12) kept in step."""
import re
import shlex
import shutil
import subprocess
import sys

import pytest
from packaging.requirements import Requirement

from autorule_lib.config import PROJECT_ROOT

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="needs make")


def recipe(*assignments: str) -> list[str]:
    """The commands `make setup` would run in a fresh checkout (the stamp named so that it is out of date)."""
    out = subprocess.run(["make", "-n", "-B", "setup", "VENV=/nonexistent-venv", *assignments], cwd=PROJECT_ROOT,
                         capture_output=True, text=True, check=True).stdout
    return [line for line in out.splitlines() if line.strip()]


def pip_installs(lines):
    return [line for line in lines if " -m pip install " in line and "--upgrade pip" not in line]


def test_setup_never_fails_on_the_torch_build(tmp_path):
    """The public index serves torch 2.13.0+cu130; a CPU machine used to stop with 'unexpected torch build'."""
    check = [line for line in recipe() if line.startswith("/nonexistent-venv/bin/python -c")]
    assert len(check) == 1
    fake = tmp_path / "torch"
    fake.mkdir()
    (fake / "__init__.py").write_text("__version__ = '2.13.0+cu130'\n"
                                      "class cuda:\n    is_available = staticmethod(lambda: False)\n")
    code = shlex.split(check[0])[1:]  # [-c, CODE]
    run = subprocess.run([sys.executable, *code], capture_output=True, text=True, env={"PYTHONPATH": str(tmp_path)})
    assert run.returncode == 0, run.stderr
    assert "torch 2.13.0+cu130" in run.stdout and "CUDA available: False" in run.stdout


def test_default_install_uses_the_constraints_and_no_private_index():
    torch_line, project_line = pip_installs(recipe())
    assert "-c constraints.txt" in torch_line and torch_line.rstrip().endswith(" torch")
    assert "--index-url" not in torch_line and "--find-links" not in torch_line
    assert "-c constraints.txt" in project_line and "'.[notebooks,eval,dev]'" in project_line


def test_opt_in_cpu_index_applies_to_torch_only():
    url = "https://download.pytorch.org/whl/cpu"
    torch_line, project_line = pip_installs(recipe(f"TORCH_INDEX_URL={url}"))
    assert f"--index-url {url}" in torch_line and url not in project_line


def test_gpu_node_with_a_cuda12_driver():
    torch_line, project_line = pip_installs(recipe("EXTRAS=notebooks,eval,dev,gpu", "CONSTRAINTS=constraints-cuda12.txt"))
    assert "-c constraints-cuda12.txt" in torch_line and "-c constraints-cuda12.txt" in project_line
    assert "'.[notebooks,eval,dev,gpu]'" in project_line


def pins(name: str) -> dict[str, str]:
    out = {}
    for line in (PROJECT_ROOT / name).read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            req = Requirement(line)
            out[req.name.lower()] = str(req.specifier)
    return out


CUDA_SPECIFIC = {"torch", "torchvision", "torchaudio", "vllm"}


def test_cuda12_set_differs_only_in_the_cuda_specific_pins():
    main, cu12 = pins("constraints.txt"), pins("constraints-cuda12.txt")
    assert {k: v for k, v in main.items() if k not in CUDA_SPECIFIC} == \
        {k: v for k, v in cu12.items() if k not in CUDA_SPECIFIC}
    assert (main["torch"], main["vllm"]) == ("==2.13.0", "==0.27.1")
    assert (cu12["torch"], cu12["vllm"]) == ("==2.10.0", "==0.19.1")


def test_both_vllm_pins_are_inside_the_gpu_extra_and_trl_range():
    import tomllib

    from packaging.version import Version

    project = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())["project"]
    (vllm_req,) = [Requirement(r) for r in project["optional-dependencies"]["gpu"] if r.startswith("vllm")]
    trl_range = Requirement("vllm<=0.27.1,>=0.19.0").specifier  # trl 1.12.0's own [vllm] extra
    for name in ("constraints.txt", "constraints-cuda12.txt"):
        v = Version(pins(name)["vllm"].lstrip("="))
        assert v in vllm_req.specifier and v in trl_range, (name, v)


def test_driver_requirement_is_stated():
    readme, env = (PROJECT_ROOT / "README.md").read_text(), (PROJECT_ROOT / "environment.yml").read_text()
    for text in (readme, env):
        assert "R580" in text and "constraints-cuda12.txt" in text
    assert "module load cuda/12.4" not in readme  # a CUDA module cannot make CUDA 13 wheels run on an old driver
    cluster = readme[readme.index("## Cluster (SLURM)"):]
    install_lines = [line for line in cluster.splitlines() if re.match(r"\s*pip install ", line)]
    assert install_lines and all("-c constraints" in line for line in install_lines)
