"""Writing bundles safely: assemble in a hidden directory beside the target, rename into place at the end.

Used by export and quantize. A failed or interrupted write leaves no bundle at the target; a
killed one leaves a hidden ``.NAME.partial-*`` directory that the next write to NAME removes.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import shutil
import tempfile
import time
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Iterator

from ..errors import InputError
from .manifest import MANIFEST_NAME, Manifest, sha256_file

# ONNX protobufs cannot exceed 2 GiB: graphs whose weights reach this go to external data.
EXTERNAL_DATA_THRESHOLD = 1_800_000_000


def package_versions(packages: tuple[str, ...]) -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for package in packages:
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            pass
    return versions


def check_output(output: Path, overwrite: bool) -> None:
    """Refuse targets that are files, existing bundles without ``overwrite``, or non-bundle directories."""
    if output.exists() and not output.is_dir():
        raise InputError(f"{output}: exists and is not a directory")
    if output.exists() and not overwrite:
        raise InputError(f"{output}: already exists (use --force to replace it)")
    if output.exists() and not (output / MANIFEST_NAME).is_file() and any(output.iterdir()):
        raise InputError(f"{output}: exists and is not a bundle; refusing to replace it")
    if not output.parent.is_dir():
        raise InputError(f"{output.parent}: no such directory")


def _staging_dir(output: Path) -> Path:
    for stale in output.parent.glob(f".{output.name}.partial-*"):
        shutil.rmtree(stale, ignore_errors=True)
    try:
        staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.partial-", dir=output.parent))
    except OSError as exc:
        raise InputError(f"{output.parent}: cannot create the bundle here ({exc.strerror})") from None
    staging.chmod(0o755)  # mkdtemp makes it private; a bundle is an ordinary directory
    return staging


def _move_into_place(staging: Path, output: Path) -> None:
    if not output.exists():
        staging.rename(output)
        return
    trash = output.with_name(f".{output.name}.old-{int(time.time())}")
    output.rename(trash)
    try:
        staging.rename(output)
    except BaseException:
        trash.rename(output)  # put the previous bundle back
        raise
    shutil.rmtree(trash, ignore_errors=True)


def _make_files_readable(directory: Path) -> None:
    """Ordinary file modes (0644 less the umask): onnx writes external data files owner-only (0600),
    which a bundle copied to a device and read by another user could not be loaded from."""
    umask = os.umask(0)
    os.umask(umask)
    for path in directory.iterdir():
        if path.is_file():
            path.chmod(0o644 & ~umask)


@contextmanager
def staged_bundle(output: Path, overwrite: bool) -> Iterator[Path]:
    """Yield a staging directory; on normal exit it becomes ``output``, on any error it is removed."""
    check_output(output, overwrite)
    staging = _staging_dir(output)
    try:
        yield staging
        _make_files_readable(staging)
        _move_into_place(staging, output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def write_manifest(directory: Path, manifest: Manifest) -> Manifest:
    """Record the sha256 of every file in ``directory`` and write manifest.json there."""
    files = {
        p.name: sha256_file(p) for p in sorted(directory.iterdir()) if p.is_file() and p.name != MANIFEST_NAME
    }
    manifest = replace(manifest, files=files)
    temporary = directory / f".{MANIFEST_NAME}.partial"
    temporary.write_text(manifest.to_json())
    os.replace(temporary, directory / MANIFEST_NAME)  # readers never see half a manifest
    return manifest
