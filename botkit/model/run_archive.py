"""A run as one file: `botkit export RUN run.tar.gz` on one machine, `botkit import run.tar.gz` on
another (gpt-2-simple's copy_checkpoint_to_gdrive / copy_checkpoint_from_gdrive, with checksums).

    botkit-archive.json     first member: {"format": 1, "run_name": ..., "files": {path: {"size", "sha256"}}}
    <run_name>/...          the run folder's regular files

An archive is hostile input. Import accepts only the regular (not sparse) files and folders the
manifest lists, each spelled one plain way, under the run's folder (tarfile's "data" filter also
refuses absolute paths, "..", links and device files). It refuses a manifest whose files would not
fit on the disk, then reads the whole archive once checking every size and SHA-256 while writing
nothing; only then does it extract (checking again, in case the file changed) into a temporary folder
that it moves into place: a refused archive leaves nothing behind and wrote nothing on the way.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import secrets
import shutil
import tarfile
import zlib
from pathlib import Path, PurePosixPath

from botkit.errors import InputError

MANIFEST = "botkit-archive.json"
FORMAT = 1
MAX_MANIFEST_BYTES = 16 * 1024**2
RUN_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]{0,127}$")


class Refused(Exception):
    """Why an archive is refused (reworded into one InputError sentence by `import_run`)."""


def export_run(run_dir: Path, archive: Path) -> int:
    """Write `run_dir` to `archive` (.tar.gz) with its manifest; returns the number of files."""
    if not run_dir.is_dir():
        raise InputError(f"There is no run folder {run_dir}: check the run name and --checkpoint-dir.")
    if not RUN_NAME.match(run_dir.name):
        raise InputError(f"The run folder name {run_dir.name!r} is not a plain name: rename the folder first.")
    if links := sorted(p for p in run_dir.rglob("*") if p.is_symlink() and ".saving" not in p.parts):
        # left out, the imported run would be broken; followed, a link could carry a file from anywhere
        raise InputError(
            f"{links[0]} is a link, which an archive does not carry: replace it with the file itself "
            f'(cp --remove-destination "$(readlink -f {links[0]})" {links[0]}), then export again.'
        )
    files = sorted(p for p in run_dir.rglob("*") if p.is_file() and ".saving" not in p.parts)
    manifest = {"format": FORMAT, "run_name": run_dir.name, "files": {}}
    for path in files:
        manifest["files"][(PurePosixPath(run_dir.name) / path.relative_to(run_dir).as_posix()).as_posix()] = {
            "size": path.stat().st_size,
            "sha256": _sha256(path),
        }
    body = json.dumps(manifest, indent=1).encode()
    tmp = archive.with_name(archive.name + ".partial")
    # compresslevel 1: weights barely compress, and level 6 costs several times the time for ~1% less
    with tarfile.open(tmp, "w:gz", compresslevel=1) as tar:
        info = tarfile.TarInfo(MANIFEST)
        info.size, info.mode = len(body), 0o644
        tar.addfile(info, io.BytesIO(body))
        for path in files:
            tar.add(path, arcname=f"{run_dir.name}/{path.relative_to(run_dir).as_posix()}", recursive=False)
    os.replace(tmp, archive)
    return len(files)


def import_run(archive: Path, checkpoint_dir: Path, run_name: str | None = None) -> Path:
    """Unpack `archive` into `checkpoint_dir/<run name>` after checking every file; returns that folder."""
    if not archive.is_file():
        raise InputError(f"There is no archive {archive}: check the path.")
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    tmp = checkpoint_dir / f".import-{secrets.token_hex(4)}"
    try:
        stored_name = _unpack(archive, tmp)
        name = run_name or stored_name
        if not RUN_NAME.match(name):
            raise InputError(f"{name!r} is not a plain run name: pass another with --run-name.")
        dest = checkpoint_dir / name
        if dest.exists():
            raise InputError(
                f"Run {name!r} already exists in {checkpoint_dir}: pass --run-name with a new name, or "
                "remove the old run first."
            )
        os.replace(tmp / stored_name, dest)
        return dest
    except Refused as exc:
        raise InputError(
            f"{archive.name} was refused and nothing was written, because {exc}: export the run again, or "
            "copy the archive again."
        ) from exc
    except (tarfile.TarError, EOFError, zlib.error, OSError, UnicodeDecodeError, ValueError) as exc:
        raise InputError(
            f"{archive.name} is damaged or not a botkit archive ({exc.__class__.__name__}), so nothing "
            "was written: copy it again from the machine that exported it."
        ) from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _unpack(archive: Path, dest: Path) -> str:
    """Check `archive` whole against its manifest, then extract it into `dest` (a new folder)."""
    with tarfile.open(archive, "r:*") as tar:
        manifest = _read_manifest(tar)
        needed = sum(entry["size"] for entry in manifest["files"].values())
        free = shutil.disk_usage(dest.parent).free
        if needed > free:
            raise Refused(f"its files need {_size(needed)} and {dest.parent} has {_size(free)} free")
        _walk(tar, manifest)
    dest.mkdir()
    with tarfile.open(archive, "r:*") as tar:
        _walk(tar, _read_manifest(tar), dest)
    (dest / manifest["run_name"]).mkdir(exist_ok=True)
    return manifest["run_name"]


def _read_manifest(tar: tarfile.TarFile) -> dict:
    first = tar.next()
    if first is None or first.name != MANIFEST or not first.isfile() or first.size > MAX_MANIFEST_BYTES:
        raise Refused(
            f"it does not start with {MANIFEST} (gpt-2-simple's checkpoint_run1.tar: extract it with tar and "
            "pass the folder to --model)"
        )
    try:
        return _manifest(json.loads(tar.extractfile(first).read()))
    except RecursionError:
        raise Refused(f"its {MANIFEST} nests too deeply to be one this botkit writes") from None


def _walk(tar: tarfile.TarFile, manifest: dict, dest: Path | None = None) -> None:
    """Check each member after the manifest against it (streamed, nothing written); with `dest`, also
    extract each one there and check it again on disk."""
    expected, seen = manifest["files"], set()
    while (member := tar.next()) is not None:
        name = PurePosixPath(member.name)
        if member.isdir() and name.parts and name.parts[0] == manifest["run_name"]:
            continue
        if not member.isreg() or member.issparse() or member.name not in expected or member.name in seen:
            raise Refused(f"it holds {member.name!r}, which its manifest does not list as a file")
        if member.size != expected[member.name]["size"]:
            raise Refused(
                f"{member.name} has {member.size} bytes, not the {expected[member.name]['size']} of its manifest"
            )
        if dest is None:
            digest = _sha256_of(tar.extractfile(member))
        else:
            tar.extract(member, dest, filter="data")
            with (dest / member.name).open("rb") as f:
                digest = _sha256_of(f)
        if digest != expected[member.name]["sha256"]:
            raise Refused(f"{member.name} does not match its checksum")
        seen.add(member.name)
    if missing := sorted(set(expected) - seen):
        raise Refused(f"{missing[0]} is missing ({len(missing)} files in all)")


def _size(num_bytes: int) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if num_bytes < 1024:
            return f"{num_bytes:,.1f} {unit}" if unit != "bytes" else f"{num_bytes:,} bytes"
        num_bytes /= 1024
    return f"{num_bytes:,.1f} TiB"


def _manifest(manifest) -> dict:
    if (
        not isinstance(manifest, dict)
        or manifest.get("format") != FORMAT
        or not isinstance(manifest.get("files"), dict)
    ):
        raise Refused(f"its {MANIFEST} is not one this botkit writes")
    run_name = manifest.get("run_name")
    if not isinstance(run_name, str) or not RUN_NAME.match(run_name):
        raise Refused(f"its run name {run_name!r} is not a plain folder name")
    for name, entry in manifest["files"].items():
        path = PurePosixPath(name)
        if path.is_absolute() or ".." in path.parts or len(path.parts) < 2 or path.parts[0] != run_name:
            raise Refused(f"its manifest lists {name!r}, outside the run's folder")
        if path.as_posix() != name:  # "run/./a" and "run//a" are "run/a": one file must not arrive twice
            raise Refused(f"its manifest lists {name!r}, a path not written plainly")
        if (
            not isinstance(entry, dict)
            or not isinstance(entry.get("size"), int)
            or isinstance(entry["size"], bool)
            or entry["size"] < 0
            or not isinstance(entry.get("sha256"), str)
        ):
            raise Refused(f"its manifest entry for {name!r} has no size and checksum")
    return manifest


def _sha256(path: Path) -> str:
    with path.open("rb") as f:
        return _sha256_of(f)


def _sha256_of(f) -> str:
    digest = hashlib.sha256()
    for chunk in iter(lambda: f.read(1 << 20), b""):
        digest.update(chunk)
    return digest.hexdigest()
