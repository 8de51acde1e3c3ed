"""The Python packages the GPU machine lacks, carried to it as wheels (issue 12).

The occasional GPU machine has no network and a fixed image: Python 3.12 with torch 2.11,
transformers 5.17, accelerate 1.15, pandas, pyarrow, huggingface_hub … but no trl or datasets. What the
check needs beyond the image travels with the code in ``.whl/`` (git-ignored), and everything that
travels must stay under 64 MiB. Two kinds of wheel:

* ``.whl/*.whl``: always installed there: trl and datasets at the project's pins, and the dependencies of
  theirs that the image does not have at all (dill, multiprocess).
* ``.whl/fallback/*.whl``: dependencies the image has, but maybe in a version too old for the carried
  wheels (datasets 5.2 wants pyarrow >= 24; the image's pyarrow version was never recorded). There,
  ``--install-fallbacks`` reads the carried wheels' requirements, compares them with what is installed,
  and installs a fallback only where the installed version does not satisfy them. torch, transformers and
  accelerate are never carried: trl 1.12 asks for transformers >= 4.56.2 and accelerate >= 1.4.0, which the
  image's 5.17 and 1.15 satisfy (``--check-image-pins`` re-reads that from the wheels' metadata).

Here (with PyPI):   python benchmarks/fetch_gpu_wheels.py            # fetches, prints the total size
There (no network): python3 benchmarks/fetch_gpu_wheels.py --install-fallbacks --target /tmp/site
"""
from __future__ import annotations

import argparse
import email.parser
import importlib.metadata
import re
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LIMIT = 64 * 2**20  # what may travel to the GPU machine: the working tree and every carried path
# The image's versions of the packages that are never carried (KINDS.md's pip list, 2026-11).
IMAGE = {"torch": "2.11.0", "transformers": "5.17.0", "accelerate": "1.15.0", "huggingface-hub": "1.33.0",
         "numpy": "2.5.2", "safetensors": "0.8.0", "tokenizers": "0.23.2"}
PINNED = ("trl", "datasets")  # versions from constraints.txt: the ones the test suite runs with
EXTRA = ("dill==0.4.1", "multiprocess==0.70.19")  # datasets needs them; the image has neither
FALLBACK = ("pyarrow==24.0.0", "fsspec==2026.9.0")  # the oldest/newest that datasets 5.2 accepts
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux1_x86_64")


def pins() -> list[str]:
    text = (ROOT / "constraints.txt").read_text()
    out = []
    for name in PINNED:
        m = re.search(rf"^{name}==(\S+)", text, re.M)
        if not m:
            sys.exit(f"constraints.txt: no '{name}==' pin")
        out.append(f"{name}=={m.group(1)}")
    return out


def download(specs, dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version", "3.12",
           "--implementation", "cp", "-d", str(dest), "-q", *[f"--platform={p}" for p in PLATFORMS], *specs]
    subprocess.run(cmd, check=True)


def requirements(wheel: Path) -> list[str]:
    """The wheel's Requires-Dist lines that apply without extras."""
    with zipfile.ZipFile(wheel) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        msg = email.parser.Parser().parsestr(z.read(meta).decode())
    return msg.get_all("Requires-Dist") or []


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def unmet(wheels, installed) -> list[tuple]:
    """(wheel file name, packaging Requirement, installed version or None) for each requirement of ``wheels`` that the
    ``installed`` versions (name -> version) do not satisfy; the carried wheels count as installed."""
    try:
        from packaging.requirements import Requirement
        from packaging.utils import parse_wheel_filename
    except ImportError:  # a bare Python: pip carries its own copy
        from pip._vendor.packaging.requirements import Requirement
        from pip._vendor.packaging.utils import parse_wheel_filename

    have = {_norm(k): v for k, v in installed.items()}
    for w in wheels:
        name, version, *_ = parse_wheel_filename(Path(w).name)
        have[_norm(name)] = str(version)
    out = []
    for w in wheels:
        for line in requirements(Path(w)):
            req = Requirement(line)
            if req.marker is not None and not req.marker.evaluate({"extra": ""}):
                continue
            got = have.get(_norm(req.name))
            if got is None or not req.specifier.contains(got, prereleases=True):
                out.append((Path(w).name, req, got))
    return out


def tree_bytes() -> int:
    """Bytes of what travels besides carried paths: tracked files and untracked ones git does not ignore."""
    ls = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                        capture_output=True, check=True).stdout.split(b"\0")
    return sum((ROOT / p.decode()).stat().st_size for p in ls if p and (ROOT / p.decode()).is_file())


def fetch(dest: Path) -> int:
    for old in list(dest.glob("*.whl")) + list(dest.glob("fallback/*.whl")):
        old.unlink()  # one version of each: two of a package stop the whole install there
    download([*pins(), *EXTRA], dest)
    download(FALLBACK, dest / "fallback")
    wheels = sorted(dest.glob("*.whl"))
    fallbacks = sorted((dest / "fallback").glob("*.whl"))
    for w in wheels + fallbacks:
        print(f"  {w.relative_to(dest.parent)}  {w.stat().st_size / 2**20:.2f} MiB")
    # Check against the image's versions; the fallbacks stand in for pyarrow/fsspec, whose versions there are
    # unknown, and packages the image has without a recorded version are taken as suitable.
    known = {"filelock", "pandas", "tqdm", "xxhash", "packaging", "pyyaml", "jinja2", "requests", "httpx"}
    problems = [u for u in unmet(wheels + fallbacks, IMAGE) if _norm(u[1].name) not in known]
    for wheel, req, got in problems:
        print(f"  UNMET on the image: {wheel} needs {req} (image: {got})")
    carried = sum(w.stat().st_size for w in wheels + fallbacks)
    tree = tree_bytes()
    total = carried + tree
    print(f"carried wheels: {carried / 2**20:.2f} MiB ({len(wheels)} always installed, {len(fallbacks)} fallbacks); "
          f"working tree {tree / 2**20:.2f} MiB; total {total / 2**20:.2f} MiB of the {LIMIT / 2**20:.0f} MiB limit")
    if total > LIMIT:
        print("OVER THE LIMIT: this would not travel")
        return 1
    return 1 if problems else 0


def install_fallbacks(dest: Path, target: str) -> int:
    """There: install the fallback wheels whose package the image lacks or has in an unsuitable version."""
    installed = {d.metadata["Name"]: d.version for d in importlib.metadata.distributions() if d.metadata["Name"]}
    wheels = sorted(dest.glob("*.whl"))
    fallbacks = {_norm(w.name.split("-")[0]): w for w in (dest / "fallback").glob("*.whl")}
    need = {}
    for wheel, req, got in unmet(wheels, installed):
        name = _norm(req.name)
        if name in fallbacks:
            need[name] = fallbacks[name]
            print(f"fallback: {wheel} needs {req}, image has {got}: installing {fallbacks[name].name}")
        else:
            print(f"WARNING: {wheel} needs {req}, installed {got}, and no fallback is carried")
    if need:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                        "--no-cache-dir", "--upgrade", "--target", target, *map(str, need.values())], check=True)
    else:
        print("fallbacks: none needed, the image satisfies every carried wheel")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dest", default=str(ROOT / ".whl"), help="wheel folder (git-ignored)")
    ap.add_argument("--install-fallbacks", action="store_true", help="on the GPU machine: install needed fallbacks")
    ap.add_argument("--target", default="/tmp/site", help="with --install-fallbacks: pip's --target")
    a = ap.parse_args(argv)
    if a.install_fallbacks:
        return install_fallbacks(Path(a.dest), a.target)
    return fetch(Path(a.dest))


if __name__ == "__main__":
    sys.exit(main())
