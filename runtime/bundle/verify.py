"""``verify``: a bundle directory or a packed archive: schema, checksums, SHA256SUMS, and a dry load.

An archive is checked by streaming its members; nothing is extracted for that. For the dry load
only the files the manifest lists are copied to a temporary directory, and never a member with
an unsafe path (absolute, '..', outside the bundle folder, links or special files).
"""

from __future__ import annotations

import hashlib
import shutil
import tarfile
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import IO, Callable

import numpy as np

from ..errors import BundleError, InputError, PaliGemmaEdgeError, first_line
from .manifest import MANIFEST_NAME, Manifest, read_manifest, sha256_file
from .packing import (
    SUMS_NAME,
    Progress,
    is_safe_name,
    stepper,
    unlisted_references,
)

DRY_LOAD_PROMPT = "caption en"


@dataclass(frozen=True)
class VerifyReport:
    target: str
    kind: str  # "bundle directory" or "archive"
    checked: list[str] = field(default_factory=list)  # what was checked and passed
    problems: list[str] = field(default_factory=list)  # one line each

    @property
    def ok(self) -> bool:
        return not self.problems

    def text(self) -> str:
        lines = [f"verify {self.target} ({self.kind})"]
        lines += [f"  ok    {line}" for line in self.checked]
        lines += [f"  FAIL  {line}" for line in self.problems]
        count = len(self.problems)
        lines.append("result: OK" if self.ok else f"result: FAILED ({count} problem{'s' if count > 1 else ''})")
        return "\n".join(lines)


def _check_files(manifest: Manifest, digest_of: Callable[[str], str | None], report: VerifyReport) -> None:
    """Every listed file present with its sha256, and every file the manifest uses listed."""
    good = 0
    for name, expected in manifest.files.items():
        if not is_safe_name(name):
            report.problems.append(f"manifest lists a file outside the bundle: '{name}'")
            continue
        actual = digest_of(name)
        if actual is None:
            report.problems.append(f"{name}: missing")
        elif actual != expected:
            report.problems.append(f"{name}: sha256 does not match the manifest (changed or corrupt)")
        else:
            good += 1
    report.problems.extend(f"{name}: used by the manifest but has no sha256 in it" for name in unlisted_references(manifest))
    if good == len(manifest.files):
        report.checked.append(f"{good} files present with the sha256 the manifest records")


def _check_sums(text: bytes, digest_of: Callable[[str], str | None], required: list[str], report: VerifyReport) -> None:
    """A sha256sum-format list: well formed, agreeing with the files, listing every ``required`` one."""
    listed, before = set(), len(report.problems)
    for number, line in enumerate(text.decode("utf-8", "replace").splitlines(), 1):
        digest, sep, name = line.partition(" ")
        name = name[1:] if name[:1] in (" ", "*") else name
        if not sep or len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest.lower()) or not name:
            report.problems.append(f"{SUMS_NAME}: line {number} is not '<sha256>  <file>'")
            continue
        listed.add(name)
        if not is_safe_name(name):
            report.problems.append(f"{SUMS_NAME}: lists an unsafe path '{name}'")
            continue
        actual = digest_of(name)
        if actual is None:
            report.problems.append(f"{SUMS_NAME}: lists '{name}', which is missing")
        elif actual != digest.lower():
            report.problems.append(f"{name}: sha256 does not match {SUMS_NAME}")
    report.problems.extend(f"{SUMS_NAME}: does not list '{name}'" for name in required if name not in listed)
    if len(report.problems) == before:
        report.checked.append(f"{SUMS_NAME} agrees ({len(listed)} entries)")


def _read_manifest_into(report: VerifyReport, bundle_dir: Path, shown_as: str | None = None) -> Manifest | None:
    try:
        manifest = read_manifest(bundle_dir)
    except BundleError as exc:
        message = first_line(exc)
        report.problems.append(message.replace(str(bundle_dir), shown_as) if shown_as else message)
        return None
    report.checked.append(f"manifest: schema {manifest.schema_version}, PaliGemma {manifest.family}, "
                          f"{manifest.precision}, {len(manifest.files)} files listed")
    return manifest


def _dry_load(bundle_dir: Path, manifest: Manifest, report: VerifyReport, step: Progress) -> None:
    """Load through the runtime (onnxruntime) and generate one token: proves the graphs run."""
    from ..model import load
    from ..generation.sampling import GenerationOptions

    step(f"dry load: onnxruntime, 1 new token for '{DRY_LOAD_PROMPT}'")
    ramp = np.linspace(0, 255, manifest.image.width, dtype=np.float32)
    image = np.broadcast_to(ramp[None, :, None], (manifest.image.height, manifest.image.width, 3)).astype(np.uint8)
    started = time.perf_counter()
    try:
        with load(bundle_dir, verify=False) as model:  # the checksums were just checked
            result = model.generate_batch([image], [DRY_LOAD_PROMPT], GenerationOptions(max_new_tokens=1))[0]
    except PaliGemmaEdgeError as exc:
        report.problems.append(f"dry load failed: {first_line(exc)}")
        return
    except Exception as exc:  # onnxruntime's own errors on a graph it cannot load or run: that is the finding
        report.problems.append(f"dry load failed: {type(exc).__name__}: {first_line(exc)}")
        return
    report.checked.append(f"dry load: onnxruntime loaded both graphs and generated 1 token ({result.finish_reason}) "
                          f"in {(time.perf_counter() - started) * 1e3:.0f} ms")


def _verify_directory(path: Path, dry_load: bool, step: Progress) -> VerifyReport:
    report = VerifyReport(str(path), "bundle directory")
    manifest = _read_manifest_into(report, path)
    if manifest is None:
        return report
    cache: dict[str, str | None] = {}

    def digest_of(name: str) -> str | None:
        if name not in cache:
            file = path / name
            try:
                cache[name] = sha256_file(file) if file.is_file() else None
            except OSError:
                cache[name] = None
        return cache[name]

    step(f"checking the sha256 of {len(manifest.files)} files")
    _check_files(manifest, digest_of, report)
    if (path / SUMS_NAME).is_file():  # an extracted archive carries one
        _check_sums((path / SUMS_NAME).read_bytes(), digest_of, [MANIFEST_NAME, *manifest.files], report)
    if dry_load:
        if report.ok:
            _dry_load(path, manifest, report, step)
        else:
            report.checked.append("dry load skipped (problems above)")
    return report


def _member_problem(member: tarfile.TarInfo, root: str) -> str | None:
    name = member.name
    if not is_safe_name(name) or not (name.startswith(f"{root}/") or name == root and member.isdir()):
        return f"unsafe member path '{name}' (outside the bundle folder '{root}/'; not extracted)"
    if not (member.isfile() or member.isdir()):
        return f"member '{name}' is a link or special file, not a regular file (not extracted)"
    return None


def _scan_members(members: list[tarfile.TarInfo], report: VerifyReport) -> tuple[str, dict[str, tarfile.TarInfo]]:
    """The bundle folder's name and its regular files by relative path; unsafe members become problems."""
    root = members[0].name.split("/")[0]
    files: dict[str, tarfile.TarInfo] = {}
    for member in members:
        problem = _member_problem(member, root)
        if problem:
            report.problems.append(problem)
        elif member.isfile():
            relative = member.name[len(root) + 1:]
            if relative in files:
                report.problems.append(f"member '{member.name}' appears twice")
            files[relative] = member
    first = next((m.name for m in members if not m.isdir()), None)  # tar puts a folder entry first
    if first is not None and first != f"{root}/{MANIFEST_NAME}":
        report.problems.append(f"first member is '{first}', not '{root}/{MANIFEST_NAME}'")
    if not report.problems:
        report.checked.append(f"{len(members)} members, all below '{root}/', no links or unsafe paths")
    return root, files


def _open_member(tar: tarfile.TarFile, member: tarfile.TarInfo) -> IO[bytes]:
    """A regular file member's bytes (``_scan_members`` lets only those through)."""
    handle = tar.extractfile(member)
    if handle is None:
        raise BundleError(f"archive member '{member.name}' is not a regular file")
    return handle


def _member_sha256(tar: tarfile.TarFile, member: tarfile.TarInfo) -> str:
    digest = hashlib.sha256()
    with _open_member(tar, member) as handle:
        while block := handle.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()


def _extract(tar: tarfile.TarFile, members: dict[str, tarfile.TarInfo], target: Path) -> None:
    """Write the given members (names already checked safe) below ``target``; nothing else is written."""
    for name, member in members.items():
        path = target / PurePosixPath(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        with _open_member(tar, member) as source, open(path, "wb") as sink:
            shutil.copyfileobj(source, sink, 1 << 22)


def _check_archive(tar: tarfile.TarFile, path: Path, scratch: Path, dry_load: bool, report: VerifyReport,
                   step: Progress) -> None:
    members = tar.getmembers()
    if not members:
        report.problems.append("the archive is empty")
        return
    root, files = _scan_members(members, report)
    if MANIFEST_NAME not in files:
        report.problems.append(f"no '{root}/{MANIFEST_NAME}' member: not a packed bundle")
        return
    _extract(tar, {MANIFEST_NAME: files[MANIFEST_NAME]}, scratch)
    manifest = _read_manifest_into(report, scratch, shown_as=f"{path}:{root}")
    if manifest is None:
        return
    expected = {MANIFEST_NAME, SUMS_NAME, *manifest.files}
    report.problems.extend(f"unexpected member '{root}/{name}'" for name in files if name not in expected)
    step(f"checking the sha256 of {len(manifest.files)} members")
    digests = {name: _member_sha256(tar, files[name]) for name in [MANIFEST_NAME, *manifest.files] if name in files}
    _check_files(manifest, digests.get, report)
    if SUMS_NAME in files:
        with _open_member(tar, files[SUMS_NAME]) as handle:
            _check_sums(handle.read(), digests.get, [MANIFEST_NAME, *manifest.files], report)
    else:
        report.problems.append(f"no '{root}/{SUMS_NAME}' member; re-pack the bundle")
    if dry_load and not report.ok:
        report.checked.append("dry load skipped (problems above)")
    elif dry_load:
        step("extracting to a temporary directory for the dry load")
        _extract(tar, {name: files[name] for name in manifest.files}, scratch)
        _dry_load(scratch, manifest, report, step)


def _verify_archive(path: Path, dry_load: bool, step: Progress) -> VerifyReport:
    report = VerifyReport(str(path), "archive")
    try:
        tar = tarfile.open(path, "r:*")
    except (tarfile.TarError, OSError, EOFError) as exc:
        report.problems.append(f"cannot read the archive: {first_line(exc).rstrip(':')}")
        return report
    with tar, tempfile.TemporaryDirectory(prefix="paligemma-edge-verify-") as scratch:
        try:
            _check_archive(tar, path, Path(scratch), dry_load, report, step)
        except (tarfile.TarError, OSError, EOFError) as exc:  # a truncated or corrupt archive
            report.problems.append(f"cannot read the archive: {first_line(exc)}")
    return report


def _looks_like_tar(path: Path) -> bool:
    if path.name.endswith((".tar", ".tar.gz", ".tgz", ".tar.xz", ".tar.bz2")):
        return True  # even if corrupt: report on it rather than call it something else
    try:
        return tarfile.is_tarfile(path)
    except OSError:
        return False


def verify_target(path: str | Path, dry_load: bool = True, progress: Progress | None = None) -> VerifyReport:
    """Check a bundle directory or a packed archive: manifest, checksums, member paths, and a dry load."""
    path = Path(path)
    if path.is_dir():
        if not (path / MANIFEST_NAME).is_file():
            raise BundleError(f"{path}: not a bundle (no {MANIFEST_NAME})")
        return _verify_directory(path, dry_load, stepper(progress))
    if path.is_file() and _looks_like_tar(path):
        return _verify_archive(path, dry_load, stepper(progress))
    if not path.exists():
        raise InputError(f"{path}: no such bundle directory or archive")
    raise InputError(f"{path}: neither a bundle directory nor a tar archive")
