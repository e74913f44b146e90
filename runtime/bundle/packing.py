"""``pack``: one checksummed archive of a bundle, for copying or flashing to a device.

The archive is a plain tar holding one folder named after the bundle::

    NAME/manifest.json   first, so a reader streaming the archive knows what follows
    NAME/SHA256SUMS      sha256sum format: `cd NAME && sha256sum -c SHA256SUMS` checks an extracted copy
    NAME/...             every file the manifest lists, checked against its sha256 while packing

TensorRT engines only run on the device that built them: they are left out unless asked for,
and then the packed manifest is a copy without the engines section (and without their files).
"""

from __future__ import annotations

import glob
import hashlib
import io
import os
import tarfile
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Iterator

from ..errors import BundleError, InputError, first_line
from .manifest import MANIFEST_NAME, Manifest, read_manifest

SUMS_NAME = "SHA256SUMS"

Progress = Callable[[str], None]


def stepper(progress: Progress | None) -> Progress:
    started = time.perf_counter()

    def step(message: str) -> None:
        if progress is not None:
            progress(f"[{time.perf_counter() - started:6.1f}s] {message}")

    return step


def human_size(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def is_safe_name(name: str) -> bool:
    """A relative POSIX path with no '..', no empty or '.' parts and no backslashes: safe to join below a folder."""
    if not name or "\\" in name or "\x00" in name or name.startswith("/"):
        return False
    return all(part not in ("", ".", "..") for part in name.split("/"))


def engine_files(manifest: Manifest) -> set[str]:
    return {spec.file for engines in manifest.engines.values() for spec in (engines.vision, engines.decoder)}


def unlisted_references(manifest: Manifest) -> list[str]:
    """Files the manifest uses (graphs, embedding, tokenizer, mask decoder, engines) but has no sha256 for."""
    used = [*manifest.weight_files(), manifest.tokenizer, *(m.file for m in [manifest.mask_decoder] if m),
            *sorted(engine_files(manifest))]
    return [name for name in dict.fromkeys(used) if name not in manifest.files]


def _sums_text(digests: dict[str, str]) -> bytes:
    return "".join(f"{digest}  {name}\n" for name, digest in digests.items()).encode()


# ---------------------------------------------------------------------------------------------- pack


@dataclass(frozen=True)
class PackResult:
    path: Path
    files: int  # archive members: the manifest, SHA256SUMS and the bundle's files
    bytes: int  # size of the archive


class _HashingReader:
    """A file object that hashes what tarfile reads from it, so each file is read once."""

    def __init__(self, handle):
        self.handle = handle
        self.digest = hashlib.sha256()

    def read(self, size: int = -1) -> bytes:
        data = self.handle.read(size)
        self.digest.update(data)
        return data


@contextmanager
def _staged_file(output: Path) -> Iterator[Path]:
    """Yield a hidden temporary file beside ``output``; it becomes ``output`` on normal exit, else is removed."""
    for stale in output.parent.glob(f".{glob.escape(output.name)}.partial-*"):  # left by a killed pack
        if stale.is_file():
            stale.unlink(missing_ok=True)
    try:
        handle, name = tempfile.mkstemp(prefix=f".{output.name}.partial-", dir=output.parent)
    except OSError as exc:
        raise InputError(f"{output.parent}: cannot write the archive here ({exc.strerror})") from None
    os.close(handle)
    temporary = Path(name)
    try:
        yield temporary
        temporary.chmod(0o644)  # mkstemp makes it private; an archive is an ordinary file
        os.replace(temporary, output)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def _check_archive_output(output: Path, force: bool) -> None:
    if output.is_dir():
        raise InputError(f"{output}: is a directory; give the archive's file name (e.g. {output.name}.tar)")
    if output.exists() and not force:
        raise InputError(f"{output}: already exists (use --force to replace it)")
    if not output.parent.is_dir():
        raise InputError(f"{output.parent}: no such directory")


def _manifest_to_pack(manifest: Manifest, with_engines: bool) -> Manifest:
    if with_engines or not manifest.engines:
        return manifest
    dropped = engine_files(manifest)
    return replace(manifest, engines={}, files={k: v for k, v in manifest.files.items() if k not in dropped})


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes, mtime: int) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), mtime, 0o644
    tar.addfile(info, io.BytesIO(data))


def _add_file(tar: tarfile.TarFile, name: str, path: Path) -> str:
    """Append one file to the archive; returns the sha256 of the bytes written."""
    try:
        handle = open(path, "rb")
        stat = os.fstat(handle.fileno())
    except OSError as exc:
        raise BundleError(f"{path}: cannot read ({exc.strerror}); re-export the bundle") from None
    with handle:
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode = stat.st_size, int(stat.st_mtime), 0o644
        reader = _HashingReader(handle)
        tar.addfile(info, reader)
    return reader.digest.hexdigest()


def pack_bundle(bundle: str | Path, output: str | Path, with_engines: bool = False, force: bool = False,
                progress: Progress | None = None) -> PackResult:
    """Write BUNDLE as one tar archive at OUTPUT: manifest first, SHA256SUMS, then every listed file."""
    bundle, output = Path(bundle), Path(output)
    if not bundle.is_dir():
        raise BundleError(f"{bundle}: no such bundle directory")
    manifest = read_manifest(bundle)
    _check_archive_output(output, force)
    packed = _manifest_to_pack(manifest, with_engines)
    unsafe = [name for name in packed.files if not is_safe_name(name)]
    if unsafe:
        raise BundleError(f"{bundle}: manifest lists a file outside the bundle ('{unsafe[0]}'); refusing to pack it")
    unlisted = unlisted_references(packed)
    if unlisted:
        raise BundleError(f"{bundle}: manifest uses '{unlisted[0]}' but records no sha256 for it; re-export the bundle")
    for name in packed.files:
        if not (bundle / name).is_file():
            raise BundleError(f"{bundle}: bundle is missing '{name}'; re-export it")

    step = stepper(progress)
    manifest_path = bundle / MANIFEST_NAME
    if packed is manifest:
        manifest_bytes = manifest_path.read_bytes()  # the original, byte for byte
    else:
        step(f"leaving out engines for {', '.join(manifest.engines)} (they run only where they were built; "
             "--with-engines keeps them)")
        manifest_bytes = packed.to_json().encode()
    sums = _sums_text({MANIFEST_NAME: hashlib.sha256(manifest_bytes).hexdigest(), **packed.files})
    root = bundle.resolve().name
    mtime = int(manifest_path.stat().st_mtime)
    total = sum((bundle / name).stat().st_size for name in packed.files)
    step(f"packing {len(packed.files)} files ({human_size(total)}) from {bundle} as {root}/")
    with _staged_file(output) as temporary:
        try:
            with tarfile.open(temporary, "w", format=tarfile.PAX_FORMAT) as tar:
                _add_bytes(tar, f"{root}/{MANIFEST_NAME}", manifest_bytes, mtime)
                _add_bytes(tar, f"{root}/{SUMS_NAME}", sums, mtime)
                for name, expected in packed.files.items():
                    step(f"adding {name} ({human_size((bundle / name).stat().st_size)})")
                    if _add_file(tar, f"{root}/{name}", bundle / name) != expected:
                        raise BundleError(f"{bundle / name}: sha256 does not match the manifest (file changed or "
                                          "corrupt); re-export the bundle")
        except OSError as exc:  # disk full, a file shrinking under us, ...
            raise InputError(f"{output}: packing failed ({first_line(exc)})") from None
    result = PackResult(path=output, files=len(packed.files) + 2, bytes=output.stat().st_size)
    step(f"wrote {output} ({human_size(result.bytes)})")
    return result
