"""Shared fixtures: tiny random PaliGemma checkpoints and the bundles the CLI exports from them.

Checkpoints are built from configs with a locally built tokenizer and saved with
save_pretrained, then exported through ``python -m paligemma_edge export`` exactly as a
user runs it. Everything is session-scoped: each model is built and exported once.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

# A test run started in the background (`cmd &` in a script) inherits SIGINT ignored, and so would
# every command the tests start; the Ctrl-C tests need them to see SIGINT as a user's would.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

# (family, image size): both families at two image sizes (4 and 9 image tokens).
MODELS = [(1, 28), (2, 28), (1, 42), (2, 42)]
MAX_SEQ_LEN = 64


def run_cli(*args: str, env: dict | None = None, check: bool = False) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, "-m", "paligemma_edge", *args], capture_output=True, text=True, env=env, timeout=600
    )
    if check and result.returncode != 0:
        raise AssertionError(f"paligemma-edge {' '.join(args)} failed ({result.returncode}):\n{result.stderr}")
    return result


def model_id(model: tuple[int, int]) -> str:
    return f"pg{model[0]}-{model[1]}px"


@pytest.fixture(scope="session")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def checkpoints(workdir) -> dict[tuple[int, int], Path]:
    from paligemma_edge.fixtures.tiny import TinySpec, build_checkpoint

    return {
        model: build_checkpoint(workdir / f"{model_id(model)}-checkpoint", TinySpec(family=model[0], image_size=model[1]))
        for model in MODELS
    }


@pytest.fixture(scope="session")
def bundles(checkpoints, workdir) -> dict[tuple[int, int], Path]:
    out = {}
    for model, checkpoint in checkpoints.items():
        bundle = workdir / f"{model_id(model)}-bundle"
        run_cli("export", str(checkpoint), "--output", str(bundle), "--max-seq-len", str(MAX_SEQ_LEN), check=True)
        out[model] = bundle
    return out


@pytest.fixture(scope="session")
def kv_bundle(bundles, checkpoints, workdir):
    """(model, KV cache kind) -> an fp32 bundle with that cache (``export --kv-cache``): ``bundles``' where
    export's default made it, else the same checkpoint exported with that kind, once per session."""
    from paligemma_edge.runtime.bundle.manifest import read_manifest

    made: dict[tuple[tuple[int, int], str], Path] = {}

    def get(model: tuple[int, int], kind: str) -> Path:
        if read_manifest(bundles[model]).decoder.kv_cache == kind:
            return bundles[model]
        if (model, kind) not in made:
            bundle = workdir / f"{model_id(model)}-{kind}-bundle"
            run_cli("export", str(checkpoints[model]), "--output", str(bundle), "--max-seq-len", str(MAX_SEQ_LEN),
                    "--kv-cache", kind, check=True)
            made[model, kind] = bundle
        return made[model, kind]

    return get


@pytest.fixture(scope="session")
def images(workdir) -> list[Path]:
    """Three test pictures of different sizes and modes."""
    rng = np.random.default_rng(7)
    paths = []
    for index, (shape, mode) in enumerate([((40, 50, 3), "RGB"), ((64, 31, 3), "RGB"), ((33, 33, 4), "RGBA")]):
        path = workdir / f"image{index}.png"
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(path)
        paths.append(path)
    return paths


class Reference:
    """transformers' processor and PaliGemmaForConditionalGeneration for one checkpoint."""

    def __init__(self, checkpoint: Path):
        import torch
        from transformers import AutoProcessor, PaliGemmaForConditionalGeneration

        self.torch = torch
        self.processor = AutoProcessor.from_pretrained(checkpoint, backend="pil")
        self.model = PaliGemmaForConditionalGeneration.from_pretrained(checkpoint, dtype=torch.float32).eval()

    def inputs(self, images: list, prompts: list[str]):
        pil = [Image.open(p) if isinstance(p, Path) else p for p in images]
        inputs = self.processor(
            images=pil, text=[f"<image>{p}" for p in prompts], return_tensors="pt", padding="longest"
        )
        inputs.pop("labels", None)
        return inputs

    @property
    def eos_ids(self) -> list[int]:
        """The ids generate stops at unless told others (the checkpoint's generation config)."""
        configured = self.model.generation_config.eos_token_id
        return configured if isinstance(configured, list) else [configured]

    def generate(self, images: list, prompts: list[str], max_new_tokens: int, eos: list[int] | None = None):
        """Greedy generated ids per prompt, cut after the first eos (which is kept)."""
        inputs = self.inputs(images, prompts)
        kwargs = {"eos_token_id": eos} if eos is not None else {}
        with self.torch.no_grad():
            out = self.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, **kwargs)
        eos_ids = set(eos if eos is not None else self.eos_ids)
        rows = []
        for row in out[:, inputs["input_ids"].shape[1]:].tolist():
            cut = next((i for i, t in enumerate(row) if t in eos_ids), None)
            rows.append(row if cut is None else row[: cut + 1])
        return rows


@pytest.fixture(scope="session")
def references(checkpoints) -> dict[tuple[int, int], Reference]:
    return {model: Reference(path) for model, path in checkpoints.items()}


@pytest.fixture(scope="session")
def segment_bundle(checkpoints, workdir) -> Path:
    """A bundle that carries a (random) vae-oid.npz mask decoder."""
    from paligemma_edge.fixtures.tiny import build_mask_decoder_npz

    npz = build_mask_decoder_npz(workdir / "vae-oid.npz")
    bundle = workdir / "pg1-28px-segment-bundle"
    run_cli("export", str(checkpoints[(1, 28)]), "--output", str(bundle), "--max-seq-len", str(MAX_SEQ_LEN),
            "--mask-decoder", str(npz), check=True)
    return bundle


SHAPES_CHECKPOINT = Path(__file__).resolve().parents[1] / "models" / "paligemma-shapes"


@pytest.fixture(scope="session")
def shapes_bundle(workdir) -> Path:
    """The committed paligemma-shapes model (trained on the shapes scenes), exported with its mask decoder."""
    bundle = workdir / "shapes-bundle"
    run_cli("export", str(SHAPES_CHECKPOINT), "--output", str(bundle), "--max-seq-len", "160",
            "--mask-decoder", str(SHAPES_CHECKPOINT / "vae-oid.npz"), check=True)
    return bundle


# Quantized variants of the tiny bundles: name -> extra arguments of `quantize`.
VARIANTS = {
    "fp16": ["--precision", "fp16"],
    "int8": ["--precision", "int8"],
    "int4": ["--precision", "int4"],
    "int8-static": ["--precision", "int8", "--int8-method", "static"],  # + --calibration (fixture)
    "int4-fp16": ["--precision", "int4", "--int4-activations", "fp16"],
    "fp16-io": ["--precision", "fp16", "--fp16-io"],
    "int8-keep": ["--precision", "int8", "--keep-embeddings"],
    "int8-trt": ["--precision", "int8", "--target", "tensorrt"],
    "int4-trt": ["--precision", "int4", "--target", "tensorrt"],
}
QUANTIZED_MODELS = [(1, 28), (2, 28)]


@pytest.fixture(scope="session")
def calibration_dir(images, workdir):
    directory = workdir / "calibration"
    directory.mkdir()
    for image in images:
        (directory / image.name).write_bytes(image.read_bytes())
    (directory / "prompts.txt").write_text("caption en\nanswer en what is this\n")
    return directory


@pytest.fixture(scope="session")
def quantized(bundles, workdir, calibration_dir):
    out = {}
    for model in QUANTIZED_MODELS:
        for name, args in VARIANTS.items():
            target = workdir / f"{model_id(model)}-{name}"
            extra = ["--calibration", str(calibration_dir)] if name == "int8-static" else []
            run_cli("quantize", str(bundles[model]), "--output", str(target), *args, *extra, check=True)
            out[model, name] = target
    return out
