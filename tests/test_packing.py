"""pack / verify / inspect: one checksummed archive of a bundle, checked before it runs on a device."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import tarfile
from dataclasses import replace
from pathlib import Path

import pytest

from paligemma_edge.runtime.bundle.writer import write_manifest
from paligemma_edge.runtime.bundle.manifest import MANIFEST_NAME, EngineSet, EngineSpec, read_manifest
from paligemma_edge.runtime.bundle.summary import inspect_bundle
from paligemma_edge.runtime.bundle.packing import SUMS_NAME
from paligemma_edge.runtime.bundle.verify import verify_target

from .conftest import run_cli

MODEL = (2, 28)
ENGINE_TAG = "tensorrt-10.3.0-orin-sm87"


def assert_error_line(result, *fragments: str) -> str:
    """Exit 2, no traceback, and the last stderr line is the one-line error holding ``fragments``."""
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("paligemma-edge: error: "), result.stderr
    for fragment in fragments:
        assert fragment in last, last
    return last


def flip_byte(path: Path, offset: int) -> None:
    with open(path, "r+b") as handle:
        handle.seek(offset)
        byte = handle.read(1)
        handle.seek(offset)
        handle.write(bytes([byte[0] ^ 0xFF]))


def fail_lines(result) -> list[str]:
    return [line for line in result.stdout.splitlines() if line.strip().startswith("FAIL")]


@pytest.fixture(scope="module")
def archive(bundles, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("packed") / "pg2.tar"
    run_cli("pack", str(bundles[MODEL]), "--output", str(out), check=True)
    return out


@pytest.fixture()
def engine_bundle(bundles, tmp_path) -> Path:
    """A bundle whose manifest records (fabricated) TensorRT engines for a device, checksums included."""
    bundle = tmp_path / "with-engines"
    shutil.copytree(bundles[MODEL], bundle)
    manifest = read_manifest(bundle)
    specs = {}
    for name, graph in (("vision", manifest.vision_graph), ("decoder", manifest.decoder_graph)):
        file = f"{name}.{ENGINE_TAG}.engine"
        (bundle / file).write_bytes(f"not a real {name} engine".encode())
        specs[name] = EngineSpec(file=file, graph=name, inputs=graph.inputs, outputs=graph.outputs, profiles={})
    engines = EngineSet(flavour="tensorrt", tensorrt_version="10.3.0", device=ENGINE_TAG, max_batch=1, max_seq_len=64,
                        vision=specs["vision"], decoder=specs["decoder"], build_seconds=1.0)
    write_manifest(bundle, replace(manifest, engines={ENGINE_TAG: engines}))
    return bundle


def test_archive_has_the_manifest_first_and_extracts_to_a_bundle_that_runs(bundles, archive, images, tmp_path):
    bundle = bundles[MODEL]
    manifest = read_manifest(bundle)
    with tarfile.open(archive) as tar:
        names = tar.getnames()
    root = bundle.name
    assert names[:2] == [f"{root}/{MANIFEST_NAME}", f"{root}/{SUMS_NAME}"]
    assert sorted(names[2:]) == sorted(f"{root}/{name}" for name in manifest.files)

    subprocess.run(["tar", "xf", str(archive), "-C", str(tmp_path)], check=True)
    extracted = tmp_path / root
    assert (extracted / MANIFEST_NAME).read_bytes() == (bundle / MANIFEST_NAME).read_bytes()
    if shutil.which("sha256sum"):  # the checksum list works with the standard tool
        check = subprocess.run(["sha256sum", "-c", SUMS_NAME], cwd=extracted, capture_output=True, text=True)
        assert check.returncode == 0 and check.stdout.count(": OK") == len(manifest.files) + 1, check.stdout
    args = ("--image", str(images[0]), "--prompt", "caption en", "--max-new-tokens", "4", "--json")
    ran = json.loads(run_cli("run", str(extracted), *args, check=True).stdout)
    original = json.loads(run_cli("run", str(bundle), *args, check=True).stdout)
    assert (ran["token_ids"], ran["text"]) == (original["token_ids"], original["text"])


def test_verify_passes_a_bundle_and_its_archive_with_a_dry_load(bundles, archive):
    for target in (bundles[MODEL], archive):
        result = run_cli("verify", str(target))
        assert result.returncode == 0, result.stdout + result.stderr
        assert "dry load: onnxruntime loaded both graphs and generated 1 token" in result.stdout
        assert result.stdout.strip().endswith("result: OK") and not fail_lines(result)
    report = verify_target(archive, dry_load=False)
    assert report.ok and report.problems == []
    assert f"{SUMS_NAME} agrees" in report.text() and "dry load" not in report.text()


def test_verify_finds_a_flipped_byte_in_an_archive(archive, tmp_path):
    corrupt = tmp_path / "corrupt.tar"
    shutil.copyfile(archive, corrupt)
    with tarfile.open(corrupt) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith("/decoder.onnx"))
    flip_byte(corrupt, member.offset_data + member.size // 2)
    result = run_cli("verify", str(corrupt))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    failures = fail_lines(result)
    assert failures and all("decoder.onnx" in line for line in failures), result.stdout
    assert "dry load skipped" in result.stdout and "FAILED" in result.stdout
    report = verify_target(corrupt, dry_load=False)
    assert not report.ok and any("decoder.onnx: sha256 does not match the manifest" in p for p in report.problems)


def test_a_flipped_byte_in_a_directory_fails_verify_and_pack(bundles, tmp_path):
    bundle = tmp_path / "bundle"
    shutil.copytree(bundles[MODEL], bundle)
    flip_byte(bundle / "embedding.npy", (bundle / "embedding.npy").stat().st_size - 100)
    result = run_cli("verify", str(bundle))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert fail_lines(result) == ["  FAIL  embedding.npy: sha256 does not match the manifest (changed or corrupt)"]

    out = tmp_path / "out" / "bundle.tar"
    out.parent.mkdir()
    assert_error_line(run_cli("pack", str(bundle), "-o", str(out)), "embedding.npy", "sha256")
    assert list(out.parent.iterdir()) == []  # no archive, no partial file


def test_unsafe_members_are_reported_and_never_written(bundles, tmp_path):
    bundle = bundles[MODEL]
    evil = tmp_path / "in" / "evil.tar"
    evil.parent.mkdir()
    escapes = ["pg/../escaped-1", "../escaped-2", "pg/../../../../escaped-3", str(tmp_path / "escaped-4")]
    with tarfile.open(evil, "w") as tar:
        tar.add(bundle / MANIFEST_NAME, f"pg/{MANIFEST_NAME}")
        for name in read_manifest(bundle).files:
            tar.add(bundle / name, f"pg/{name}")
        for name in escapes:
            info = tarfile.TarInfo(name)
            info.size = 6
            tar.addfile(info, io.BytesIO(b"owned\n"))
        link = tarfile.TarInfo("pg/link")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(link)
    scratch = tmp_path / "scratch"  # verify's temporary directory goes here
    scratch.mkdir()
    result = run_cli("verify", str(evil), env=os.environ | {"TMPDIR": str(scratch)})
    assert result.returncode == 1 and "Traceback" not in result.stderr
    for name in escapes:
        assert f"unsafe member path '{name}'" in result.stdout, result.stdout
    assert "member 'pg/link' is a link or special file" in result.stdout
    assert not list(tmp_path.rglob("escaped-*")) and list(scratch.iterdir()) == []
    assert not verify_target(evil).ok


def test_verify_checks_member_order_and_the_checksum_list(bundles, archive, tmp_path):
    root = bundles[MODEL].name
    shuffled = tmp_path / "shuffled.tar"
    with tarfile.open(archive) as source, tarfile.open(shuffled, "w") as target:
        members = source.getmembers()
        for member in members[2:] + members[:1]:  # manifest last
            target.addfile(member, source.extractfile(member))
        sums_file = source.extractfile(members[1])
        assert sums_file is not None, members[1].name
        sums = sums_file.read().decode()
        line = next(line for line in sums.splitlines() if line.endswith("  vision.onnx"))
        tampered = sums.replace(line, "0" * 64 + "  vision.onnx").encode()
        info = tarfile.TarInfo(f"{root}/{SUMS_NAME}")
        info.size = len(tampered)
        target.addfile(info, io.BytesIO(tampered))
    problems = verify_target(shuffled, dry_load=False).problems
    assert problems == [f"first member is '{root}/decoder.onnx', not '{root}/{MANIFEST_NAME}'",
                        f"vision.onnx: sha256 does not match {SUMS_NAME}"]


def test_paths_that_are_not_bundles_are_one_line_errors(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    notes = tmp_path / "notes.txt"
    notes.write_text("not an archive\n")
    assert_error_line(run_cli("verify", str(tmp_path / "nope")), "no such bundle directory or archive")
    assert_error_line(run_cli("verify", str(notes)), "neither a bundle directory nor a tar archive")
    assert_error_line(run_cli("verify", str(empty)), "not a bundle")
    assert_error_line(run_cli("inspect", str(empty)), "not a bundle")
    assert_error_line(run_cli("pack", str(empty), "-o", str(tmp_path / "x.tar")), "not a bundle")
    for result in (run_cli("verify", str(notes)), run_cli("inspect", str(tmp_path / "nope"))):
        assert len(result.stderr.strip().splitlines()) == 1


def test_pack_replaces_an_existing_archive_only_with_force(bundles, tmp_path):
    out = tmp_path / "bundle.tar"
    out.write_text("keep me")
    result = run_cli("pack", str(bundles[MODEL]), "-o", str(out))
    assert_error_line(result, "already exists", "--force")
    assert len(result.stderr.strip().splitlines()) == 1 and out.read_text() == "keep me"
    result = run_cli("pack", str(bundles[MODEL]), "-o", str(out), "--force")
    assert result.returncode == 0 and f"into {out}" in result.stdout
    assert tarfile.is_tarfile(out) and [p.name for p in tmp_path.iterdir()] == ["bundle.tar"]


def test_engines_are_left_out_by_default_and_kept_on_request(engine_bundle, tmp_path):
    original = (engine_bundle / MANIFEST_NAME).read_bytes()
    engine_files = {f"vision.{ENGINE_TAG}.engine", f"decoder.{ENGINE_TAG}.engine"}
    for flag, out in (((), tmp_path / "default.tar"), (("--with-engines",), tmp_path / "engines.tar")):
        result = run_cli("pack", str(engine_bundle), "-o", str(out), *flag, check=True)
        with tarfile.open(out) as tar:
            names = {Path(n).name for n in tar.getnames()}
            manifest_file = tar.extractfile(f"{engine_bundle.name}/{MANIFEST_NAME}")
            assert manifest_file is not None
            packed_bytes = manifest_file.read()
        packed = json.loads(packed_bytes)
        if flag:
            assert engine_files <= names and list(packed["engines"]) == [ENGINE_TAG] and packed_bytes == original
        else:
            assert "leaving out engines for " + ENGINE_TAG in result.stderr
            assert not engine_files & names and packed["engines"] == {}
            assert not engine_files & set(packed["files"]) and len(packed["files"]) == len(names) - 2
        verified = run_cli("verify", str(out), *(("--no-load",) if flag else ()))
        assert verified.returncode == 0, verified.stdout
    assert (engine_bundle / MANIFEST_NAME).read_bytes() == original  # the bundle is left as it was
    summary = run_cli("inspect", str(engine_bundle), check=True).stdout
    assert f"  {ENGINE_TAG}: flavour tensorrt, tensorrt 10.3.0" in summary


@pytest.mark.parametrize("model", [(1, 28), (2, 42)], ids=["pg1-28px", "pg2-42px"])
def test_inspect_summarizes_the_manifest(bundles, model):
    family, size = model
    bundle = bundles[model]
    text = run_cli("inspect", str(bundle), check=True).stdout
    assert f"PaliGemma {family}" in text and f"{size}x{size} px" in text and "precision     fp32" in text
    assert "validation    passed, max |delta logit|" in text and "engines       none" in text
    data = json.loads(run_cli("inspect", str(bundle), "--json", check=True).stdout)
    assert (data["family"], data["image"]["height"], data["precision"]) == (family, size, "fp32")
    assert data["total_bytes"] == sum(p.stat().st_size for p in bundle.iterdir())
    assert data["graphs"][0]["bytes"] == (bundle / "vision.onnx").stat().st_size
    assert data["mask_decoder"] is None and data["engines"] == {}
    assert data == json.loads(json.dumps(inspect_bundle(bundle).to_dict()))
