#!/usr/bin/env python3
"""Fetch the pinned llama-cpp-python sdist through pip and extract its llama.cpp tree.

The sdist is downloaded by package name (pip's ordinary index), checked against the sha256 in
vendor/PIN, and its ``vendor/llama.cpp`` folder is extracted into ``vendor/llama.cpp``; then every
``vendor/patches/*.patch`` is applied in name order (vendor/patches/README.md says why each exists).
Nothing here is ever committed; the build calls this script when the tree is missing.

Usage: python vendor/fetch_llama_cpp.py [--dest DIR] [--sdist FILE]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
STAMP = ".ggml_lora_pin"


def read_pin(path: Path = HERE / "PIN") -> dict[str, str]:
    pin = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            pin[key.strip()] = value.strip()
    return pin


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def python_with_pip() -> str:
    """An interpreter that has pip: ours, or (inside pip's isolated build environment, which has
    none) the python3 first on PATH, e.g. the virtual environment pip was started from."""
    candidates = [sys.executable] + [p for p in (shutil.which("python3"), shutil.which("python")) if p]
    for exe in candidates:
        probe = subprocess.run([exe, "-m", "pip", "--version"], capture_output=True)
        if probe.returncode == 0:
            return exe
    raise SystemExit("no pip found to download the pinned llama-cpp-python sdist; run "
                     "`python vendor/fetch_llama_cpp.py` with a python that has pip, or set GGML_LORA_LLAMA_CPP")


def download_sdist(pin: dict[str, str], into: Path) -> Path:
    cmd = [python_with_pip(), "-m", "pip", "download", "--no-deps", "--no-binary", pin["package"],
           "--disable-pip-version-check", "-d", str(into), f"{pin['package']}=={pin['version']}"]
    subprocess.run(cmd, check=True, stdout=sys.stderr)
    path = into / pin["sdist"]
    if not path.exists():
        raise SystemExit(f"pip did not produce {pin['sdist']} in {into}")
    return path


PATCHES = HERE / "patches"


def patch_files() -> list[Path]:
    return sorted(PATCHES.glob("*.patch"))


def tree_stamp(pin: dict[str, str]) -> str:
    """What the extracted tree is: the sdist's sha256 and the sha256 of each patch applied to it, so a
    tree extracted before a patch was added (or changed) is extracted again."""
    lines = [pin["sha256"]] + [f"{sha256_of(p)} {p.name}" for p in patch_files()]
    return "\n".join(lines) + "\n"


def apply_patches(tree: Path) -> None:
    # git apply outside any repository behaves like patch(1); the ceiling keeps git from finding the
    # repository that vendor/ sits in (it would then apply paths relative to that repository's root)
    env = dict(os.environ, GIT_CEILING_DIRECTORIES=str(tree.parent))
    gitfile = tree / ".git"     # the sdist keeps llama.cpp's submodule link, which points nowhere here
    if gitfile.is_file():
        gitfile.unlink()
    for p in patch_files():
        done = subprocess.run(["git", "apply", "-p1", "--whitespace=nowarn", str(p)], cwd=tree, env=env,
                              capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"{p.name} does not apply to the pinned tree: {done.stderr.strip()}")
        print(f"applied {p.name}", file=sys.stderr)


def extract_tree(sdist: Path, pin: dict[str, str], dest: Path) -> None:
    prefix = f"{pin['sdist'].removesuffix('.tar.gz')}/vendor/llama.cpp/"
    tmp = Path(tempfile.mkdtemp(prefix="llama.cpp.", dir=dest.parent))
    try:
        with tarfile.open(sdist) as tar:
            members = []
            for m in tar.getmembers():
                if m.name.startswith(prefix) and len(m.name) > len(prefix):
                    m.name = m.name[len(prefix):]
                    members.append(m)
            if not members:
                raise SystemExit(f"{sdist} has no {prefix} folder")
            tar.extractall(tmp, members=members, filter="data")
        apply_patches(tmp)
        (tmp / STAMP).write_text(tree_stamp(pin))
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dest", type=Path, default=HERE / "llama.cpp")
    ap.add_argument("--sdist", type=Path, help="use this sdist file instead of downloading")
    args = ap.parse_args()
    pin = read_pin()
    stamp = args.dest / STAMP
    if stamp.exists() and stamp.read_text() == tree_stamp(pin):
        print(f"{args.dest} already holds llama.cpp from {pin['sdist']}", file=sys.stderr)
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        sdist = args.sdist or download_sdist(pin, Path(tmp))
        got = sha256_of(sdist)
        if got != pin["sha256"]:
            raise SystemExit(f"sha256 mismatch for {sdist}: got {got}, pinned {pin['sha256']}")
        extract_tree(sdist, pin, args.dest.resolve())
    print(f"extracted llama.cpp from {pin['sdist']} into {args.dest}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
