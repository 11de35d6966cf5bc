"""The packages the GPU test machine lacks (DALI, PyAV, ffmpeg-python, ...), carried to it in parts.

That machine has Python 3.12, torch and Triton but no DALI or PyAV, no network, and takes at most 64 MiB per call
(bench/gpu/README.md). So, here:

    python bench/gpu_kit.py prepare          # -> .gpu-part1/ ... .gpu-partN/ (git-ignored), N printed

downloads the wheels of bench/gpu/carry.txt for CPython 3.12, installs each group into a staging folder (no pip
runs there), drops what Python 3.12 never loads (DALI's extension modules for the other Python versions), packs
each group as one .tar.xz and cuts the archives into parts of at most `--part-mib`. Each part also holds the
manifest (every chunk's size and sha256). There, each call carries one part and runs

    python bench/gpu_kit.py receive K        # part K -> /tmp/kcv-gpu/chunks; a group whose chunks are all in
                                             # is checked and unpacked into /tmp/kcv-gpu/site (PYTHONPATH)

which says what is installed and what is still to come, and fails naming the lost parts when the machine was
restarted between calls (everything under /tmp is gone then: start again from part 1).
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CARRY = REPO / "bench" / "gpu" / "carry.txt"
HOME = Path(os.environ.get("KCV_GPU_HOME", "/tmp/kcv-gpu"))
PYTHON_TAG = "312"  # the GPU machine's CPython
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64"]
# extension modules built for another CPython than 3.12: DALI ships one per version (~40 MB it never loads there)
OTHER_ABI = re.compile(r"\.cpython-(?!" + PYTHON_TAG + r"-)3\d+t?-[^/]*\.so$")


def read_carry(path: Path = CARRY) -> dict[str, list[str]]:
    """{group: [requirement, ...]} in file order."""
    groups: dict[str, list[str]] = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        fields = line.split()
        if len(fields) != 2 or "==" not in fields[1]:
            raise ValueError(f"{path}:{number}: expected 'group name==version', got {line!r}")
        groups.setdefault(fields[0], []).append(fields[1])
    return groups


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def pip(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", "--disable-pip-version-check", *args], check=True)


def stage_group(requirements: list[str], wheels: Path, site: Path) -> None:
    """The wheels of a group, installed for CPython 3.12 into `site` as pip would there, minus dead weight."""
    target = ["--python-version", "3.12", "--implementation", "cp", "--only-binary=:all:", "--no-deps"]
    target += [arg for platform in PLATFORMS for arg in ("--platform", platform)]
    pip("download", "-q", *target, "-d", str(wheels), *requirements)
    files = [str(wheels / name) for name in sorted(os.listdir(wheels)) if name.endswith(".whl")
             and any(name.lower().startswith(re.split("==", r)[0].replace("-", "_").lower() + "-") for r in requirements)]
    if len(files) != len(requirements):
        raise RuntimeError(f"expected {len(requirements)} wheels for {requirements}, found {files}")
    shutil.rmtree(site, ignore_errors=True)
    pip("install", "-q", "--no-index", "--no-compile", "--ignore-requires-python", "--target", str(site), *target, *files)
    for path in list(site.rglob("*")):
        if path.is_file() and OTHER_ABI.search(path.name):
            path.unlink()
    shutil.rmtree(site / "bin", ignore_errors=True)  # console scripts with this machine's interpreter
    # nvimgcodec ships nvidia/__init__.py: on PYTHONPATH it would hide the other nvidia.* packages (torch's CUDA
    # libraries) behind a regular package; without it `nvidia` stays a namespace package spanning both places
    (site / "nvidia" / "__init__.py").unlink(missing_ok=True)


def pack(site: Path, archive: Path) -> None:
    """site/ -> archive (.tar.xz, sorted names); xz on every core when the binary is there."""
    names = sorted(str(p.relative_to(site)) for p in site.iterdir())
    tmp = archive.with_name(archive.name + ".tmp")
    if shutil.which("xz"):
        with open(tmp, "wb") as out:
            tar = subprocess.Popen(["tar", "-C", str(site), "--sort=name", "-cf", "-", *names], stdout=subprocess.PIPE)
            subprocess.run(["xz", "-6", "-T0", "-c"], stdin=tar.stdout, stdout=out, check=True)
            if tar.wait():
                raise RuntimeError(f"tar of {site} failed")
    else:
        with tarfile.open(tmp, "w:xz", preset=6) as tar:
            for name in names:
                tar.add(site / name, arcname=name)
    os.replace(tmp, archive)


def plan_chunks(sizes: dict[str, int], part_bytes: int) -> list[list[tuple[str, int, int]]]:
    """Archives in order, cut so that each part holds at most `part_bytes`: parts of (archive, offset, length)."""
    parts, current, free = [], [], part_bytes
    for name, size in sizes.items():
        offset = 0
        while offset < size:
            length = min(size - offset, free)
            current.append((name, offset, length))
            offset, free = offset + length, free - length
            if free == 0:
                parts.append(current)
                current, free = [], part_bytes
    if current:
        parts.append(current)
    return parts


def prepare(out: Path, part_mib: float, wheels: Path) -> int:
    groups = read_carry()
    build = wheels / "build"
    build.mkdir(parents=True, exist_ok=True)
    sizes = {}
    for group, requirements in groups.items():
        print(f"[{group}] {' '.join(requirements)}", flush=True)
        site = build / f"site-{group}"
        stage_group(requirements, wheels, site)
        archive = build / f"{group}.tar.xz"
        pack(site, archive)
        sizes[archive.name] = archive.stat().st_size
        print(f"[{group}] {archive.name}: {sizes[archive.name] / 2 ** 20:.1f} MiB", flush=True)
    write_parts({build / name: size for name, size in sizes.items()}, groups, out, int(part_mib * 2 ** 20))
    return 0


def write_parts(archives: dict[Path, int], groups: dict, out: Path, part_bytes: int) -> int:
    """The archives cut into out/.gpu-part1 ... (each with the manifest); returns the number of parts."""
    plan = plan_chunks({path.name: size for path, size in archives.items()}, part_bytes)
    sources = {path.name: path for path in archives}
    for old in out.glob(".gpu-part*"):
        shutil.rmtree(old)
    chunks = []
    for k, part in enumerate(plan, 1):
        folder = out / f".gpu-part{k}"
        folder.mkdir(parents=True)
        for name, offset, length in part:
            chunk = folder / f"{name}.{offset:012d}"
            with open(sources[name], "rb") as src, open(chunk, "wb") as dst:
                src.seek(offset)
                dst.write(src.read(length))
            chunks.append({"part": k, "archive": name, "offset": offset, "length": length, "file": chunk.name,
                           "sha256": sha256(chunk)})
    manifest = {"parts": len(plan), "python": f"3.{PYTHON_TAG[1:]}", "groups": groups,
                "archives": {path.name: {"size": size, "sha256": sha256(path)} for path, size in archives.items()},
                "chunks": chunks}
    for k in range(1, len(plan) + 1):
        (out / f".gpu-part{k}" / "manifest.json").write_text(json.dumps(manifest, indent=1))
        size = sum(f.stat().st_size for f in (out / f".gpu-part{k}").iterdir())
        print(f".gpu-part{k}: {size / 2 ** 20:.1f} MiB")
    print(f"{len(plan)} parts; carry one per call: run(carry=['.gpu-partK'], ...) (bench/gpu/README.md)")
    return len(plan)


class _Joined(io.RawIOBase):
    """The chunks of one archive read as one file, without writing the joined copy."""

    def __init__(self, paths: list[Path]):
        self._files = [open(p, "rb") for p in paths]

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while self._files:
            n = self._files[0].readinto(buffer)
            if n:
                return n
            self._files.pop(0).close()
        return 0


def receive(part: int, source: Path, home: Path = HOME) -> int:
    """Part `part` (a folder .gpu-partK under `source`) joins the chunks under `home`; complete archives unpack."""
    folder = source / f".gpu-part{part}"
    if not (folder / "manifest.json").exists():
        print(f"gpu_kit: {folder} is missing or has no manifest.json: carry it with this call "
              f"(run(carry=['.gpu-part{part}']))", file=sys.stderr)
        return 2
    manifest = json.loads((folder / "manifest.json").read_text())
    chunks_dir, site = home / "chunks", home / "site"
    chunks_dir.mkdir(parents=True, exist_ok=True)
    site.mkdir(parents=True, exist_ok=True)
    for chunk in manifest["chunks"]:
        if chunk["part"] != part:
            continue
        src = folder / chunk["file"]
        if sha256(src) != chunk["sha256"]:
            print(f"gpu_kit: {src} does not match the manifest (size {src.stat().st_size}, expected "
                  f"{chunk['length']}): prepare the parts again", file=sys.stderr)
            return 2
        tmp = chunks_dir / (chunk["file"] + ".tmp")
        shutil.copyfile(src, tmp)
        os.replace(tmp, chunks_dir / chunk["file"])
    lost = sorted({c["part"] for c in manifest["chunks"] if c["part"] < part
                   and not (chunks_dir / c["file"]).exists() and not (site / f".{c['archive']}.done").exists()})
    for name, info in manifest["archives"].items():
        done = site / f".{name}.done"
        chunks = sorted((c for c in manifest["chunks"] if c["archive"] == name), key=lambda c: c["offset"])
        if done.exists() or not all((chunks_dir / c["file"]).exists() for c in chunks):
            continue
        with tarfile.open(fileobj=io.BufferedReader(_Joined([chunks_dir / c["file"] for c in chunks]), 1 << 20),
                          mode="r|xz") as tar:
            tar.extractall(site, filter="data")
        done.write_text(json.dumps(manifest["groups"][name.split(".")[0]]))
        for c in chunks:
            (chunks_dir / c["file"]).unlink()
    installed = [n for n in manifest["archives"] if (site / f".{n}.done").exists()]
    waiting = [n for n in manifest["archives"] if n not in installed]
    print(f"gpu_kit: part {part}/{manifest['parts']} received; installed in {site}: {', '.join(installed) or 'none'}"
          + (f"; waiting for the rest of {', '.join(waiting)}" if waiting else ""))
    if lost:
        print(f"gpu_kit: parts {lost} are not here (the machine was restarted since they came): carry them again, "
              f"from part 1", file=sys.stderr)
        return 3
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help="download, stage, pack and cut the carried packages into .gpu-partK/")
    p.add_argument("--part-mib", type=float, default=60.0, help="largest part (a call carries 64 MiB in all, the "
                   "working tree included)")
    p.add_argument("--wheels", type=Path, default=REPO / ".gpu-wheels", help="download and staging folder")
    p.add_argument("--out", type=Path, default=REPO, help="where the .gpu-partK folders go")
    r = sub.add_parser("receive", help="take part K in (on the GPU machine)")
    r.add_argument("part", type=int)
    r.add_argument("--source", type=Path, default=REPO, help="folder holding .gpu-partK")
    r.add_argument("--home", type=Path, default=HOME, help="where chunks and the unpacked site are kept")
    args = parser.parse_args(argv)
    if args.command == "prepare":
        return prepare(args.out, args.part_mib, args.wheels)
    return receive(args.part, args.source, args.home)


if __name__ == "__main__":
    sys.exit(main())
