"""The ``paligemma-edge`` command: a thin layer over the library functions.

Known errors (bad input, broken bundles, failed validation) print one line on stderr and
exit with the error's code (2 for usage and input errors); anything else is a bug and
keeps its traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from pathlib import Path
from typing import Sequence

from . import extras
from .runtime.errors import InputError, PaliGemmaEdgeError
from .runtime.generation.tasks import TASKS

# Kept in sync with export.bundle.DEFAULT_TOLERANCE by a test; importing export here would need torch.
DEFAULT_TOLERANCE = 1e-3


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse's default prints usage; one line is enough
        raise InputError(f"{self.prog}: {message}")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got '{text}'") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


class _Progress:
    """Prints each stage line to stderr, and every ``interval`` seconds of a long stage a line that it
    is still going (a 3B export spends minutes in one stage)."""

    def __init__(self, interval: float = 30.0):
        self.interval = interval
        self._stage = ""
        self._started = 0.0
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    def __call__(self, message: str) -> None:
        print(message, file=sys.stderr, flush=True)
        self._stage, self._started = message, time.monotonic()
        if self._thread is None:
            self._thread = threading.Thread(target=self._tick, daemon=True)
            self._thread.start()

    def _tick(self) -> None:
        while not self._wake.wait(self.interval):
            elapsed = time.monotonic() - self._started
            if elapsed >= self.interval:
                print(f"    ... still working ({elapsed:.0f}s in this step)", file=sys.stderr, flush=True)

    def close(self) -> None:
        self._wake.set()


def _needed_extra(args) -> extras.Need | None:
    """The optional extra the parsed command needs (checked in main before the command imports it)."""
    if args.command == "bench" and args.bundles:
        return None  # existing bundles: runtime rows only, no torch
    if args.command == "eval" and args.dataset != "shapes":
        return extras.Need("eval", extras.EXTRA_MODULES["eval"], "eval --dataset shapes runs without it")
    if args.command == "compare" and args.dataset not in (None, "shapes"):
        return extras.Need("eval", extras.EXTRA_MODULES["eval"], "compare --images or --dataset shapes runs without it")
    return extras.COMMAND_NEEDS.get(args.command)


def _run_command(args) -> int:
    """The command's handler; a module of an optional extra missing anywhere under it is one line."""
    try:
        return args.handler(args)
    except ModuleNotFoundError as exc:
        error = extras.explain(args.command, exc)
        if error is None:  # one of our own modules, or of no extra: a bug, with its traceback
            raise
        raise error from exc


def _cmd_export(args) -> int:
    from .export import bundle as export

    options = export.ExportOptions(
        max_seq_len=args.max_seq_len, tolerance=args.tolerance, overwrite=args.force,
        mask_decoder=Path(args.mask_decoder) if args.mask_decoder else None, base=args.base,
        kv_cache=args.kv_cache, attention_chunk=args.attention_chunk,
    )
    export.export_bundle(args.model, args.output, options, progress=args.progress)
    return 0


def _cmd_finetune(args) -> int:
    from .finetune.options import FinetuneOptions
    from .finetune.run import finetune

    options = FinetuneOptions(
        lora_rank=args.lora_rank, lora_alpha=args.lora_alpha, target=args.target, full=args.full,
        freeze_vision=args.freeze_vision, epochs=args.epochs, steps=args.steps, batch_size=args.batch_size,
        grad_accum=args.grad_accum, lr=args.lr, warmup=args.warmup, weight_decay=args.weight_decay, seed=args.seed,
        log_every=args.log_every, eval_every=args.eval_every, eval_lines=args.eval_lines, save_every=args.save_every,
        resume=args.resume, merge=args.merge, overwrite=args.force, device=args.device, bf16=args.bf16)
    result = finetune(args.base, args.dataset, args.output, options, progress=args.progress)
    print(f"wrote {result.kind} to {result.output}: loss {result.first_loss:.4f} -> {result.final_loss:.4f} "
          f"in {result.steps} steps ({result.seconds:.0f} s)")
    return 0


def _cmd_quantize(args) -> int:
    from .quantize import bundle as quantize

    options = quantize.QuantizeOptions(
        precision=args.precision, target=args.target, int8_method=args.int8_method,
        calibration=Path(args.calibration) if args.calibration else None, block_size=args.block_size,
        int4_activations=args.int4_activations, keep_embeddings=args.keep_embeddings, fp16_io=args.fp16_io,
        overwrite=args.force,
    )
    quantize.quantize_bundle(args.bundle, args.output, options, progress=args.progress)
    return 0


def _cmd_compare(args) -> int:
    from .quantize.compare import compare_bundles, write_report

    comparison = compare_bundles(args.reference, args.candidate, args.images, args.prompts, args.max_new_tokens,
                                 dataset=args.dataset, dataset_n=args.n, agreement_lines=args.agreement_n)
    print(comparison.markdown(), end="", flush=True)
    if args.json:
        write_report(comparison, args.json)
        print(f"wrote {args.json} and {Path(args.json).with_suffix('.md')}", file=sys.stderr)
    return 0


def _cmd_eval(args) -> int:
    if args.dataset == "shapes":
        return _eval_shapes(args)
    from .evaluation.evaluate import EvalOptions, evaluate_dataset, load_eval_dataset, write_outputs
    from .runtime.model import load

    if args.prefix_variants:
        return _eval_prefix_variants(args)
    dataset = load_eval_dataset(args.dataset)  # a bad line refuses the dataset here, before the bundle loads
    options = EvalOptions(max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, limit=args.n)
    shown = [0]

    def progress(done: int, total: int) -> None:
        if done == total or done - shown[0] >= 100:
            shown[0] = done
            args.progress(f"evaluated {done}/{total} lines")

    with load(args.bundle, backend=args.backend, threads=args.threads) as model:
        report = evaluate_dataset(model, dataset, options, progress=progress)
    print(report.table(), end="")
    for path in write_outputs(report, args.json, args.markdown, args.misses):
        print(f"wrote {path}", file=sys.stderr)
    return 0


def _eval_prefix_variants(args) -> int:
    from .evaluation.evaluate import EvalOptions, load_eval_dataset
    from .evaluation.prefix_variants import evaluate_prefix_variants, read_rules, write_outputs
    from .runtime.model import load

    if args.misses:
        raise InputError("--misses goes with eval without --prefix-variants (variants write --json and --markdown)")
    rules = read_rules(args.prefix_variants)  # a bad rule line stops here, before the dataset is read
    dataset = load_eval_dataset(args.dataset)
    options = EvalOptions(max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, limit=args.n)

    def progress(name: str, done: int, total: int) -> None:
        if done == total:
            args.progress(f"{name}: evaluated {done} lines")

    with load(args.bundle, backend=args.backend, threads=args.threads) as model:
        report = evaluate_prefix_variants(model, dataset, rules, options, progress=progress)
    print(report.table(), end="")
    for path in write_outputs(report, args.json, args.markdown):
        print(f"wrote {path}", file=sys.stderr)
    return 0


def _eval_shapes(args) -> int:
    from .runtime.model import load
    from .shapes.evaluate import evaluate_shapes, write_report

    if args.prefix_variants:
        raise InputError("--prefix-variants needs --dataset PATH[:split] (a PaliGemma JSONL dataset), not shapes")
    if args.markdown or args.misses:
        raise InputError("--markdown and --misses go with --dataset PATH; shapes writes everything to --json")
    n = args.n or 200

    def progress(done: int, total: int) -> None:
        if done == total or done % 25 == 0:
            args.progress(f"evaluated {done}/{total} scenes")

    with load(args.bundle, backend=args.backend, threads=args.threads) as model:
        report = evaluate_shapes(model, n=n, keep_examples=bool(args.json), progress=progress)
    print(f"{args.dataset}: {report.scenes} held-out scenes, {report.seconds:.1f} s")
    print(report.table())
    if args.json:
        write_report(report, args.json)
        print(f"wrote {args.json}", file=sys.stderr)
    return 0


def _cmd_dataset_check(args) -> int:
    from .evaluation.datasets import check_dataset

    summary = check_dataset(args.path)
    print(summary.text())
    if args.json:
        try:
            Path(args.json).write_text(json.dumps(summary.to_dict(), indent=2) + "\n")
        except OSError as exc:
            raise InputError(f"{args.json}: cannot write ({exc})") from None
        print(f"wrote {args.json}", file=sys.stderr)
    return 0 if summary.ok else 1


def _cmd_bench(args) -> int:
    from .benchmarks import harness

    bundles = tuple(Path(b.strip()) for b in (args.bundles or "").split(",") if b.strip())
    if bundles and args.precision:
        raise InputError("--precision applies to --model; a bundle's precision is read from its manifest")
    baseline = args.baseline or ("none" if bundles else "transformers")
    options = harness.BenchOptions(
        model=args.model, bundles=bundles,
        precisions=tuple(p.strip() for p in (args.precision or "fp32,int8,int4").split(",") if p.strip()),
        backends=tuple(b.strip() for b in args.backend.split(",") if b.strip()),
        baseline=None if baseline == "none" else baseline, runs=args.runs, new_tokens=args.new_tokens,
        threads=args.threads, workdir=Path(args.workdir), reuse=args.reuse,
    )
    report = harness.run_benchmark(options, progress=args.progress)
    for path in harness.write_reports(report, Path(args.out_dir), Path(args.json) if args.json else None):
        print(f"wrote {path}", file=sys.stderr)
    print(harness.markdown(report), end="")
    return 0


def _cmd_build_engines(args) -> int:
    from .runtime.engines.build import EngineOptions, build_engines

    options = EngineOptions(
        flavour=args.backend, max_batch=args.max_batch, max_seq_len=args.max_seq_len,
        timing_cache=Path(args.timing_cache) if args.timing_cache else None, decoder_profiles=args.decoder_profiles,
    )
    record = build_engines(args.bundle, options, progress=args.progress)
    print(f"{record.device}: {record.vision.file}, {record.decoder.file} ({record.build_seconds:.1f}s)")
    return 0


def _prompts(args) -> list[str]:
    from .runtime.generation.tasks import build_prompt

    prompts = list(args.prompt or [])
    if args.task:
        prompts.insert(0, build_prompt(args.task, lang=args.lang, question=args.question, objects=args.objects))
    elif args.question or args.objects or args.lang:
        raise InputError("--lang, --question and --objects go with --task")
    if not prompts:
        raise InputError("give a --task or at least one --prompt")
    return prompts


def _objects_of(result) -> list:
    """The detections or segmentations of a task result; none for a text answer."""
    from .runtime.generation.results import DetectionResult, SegmentationResult

    return list(result.objects) if isinstance(result, (DetectionResult, SegmentationResult)) else []


def _describe_objects(objects) -> list[str]:
    from .runtime.generation.parsing import Segmentation

    lines = []
    for item in objects:
        box = ", ".join(f"{v:.1f}" for v in item.box)
        extra = f"  mask: {int(item.mask.sum())} px" if isinstance(item, Segmentation) else ""
        lines.append(f"  {item.label}: [{box}]{extra}")
    return lines


def _cmd_run(args) -> int:
    from .runtime.model import load
    from .runtime.images import load_image
    from .runtime.generation.sampling import GenerationOptions

    options = GenerationOptions(
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
        top_p=args.top_p, seed=args.seed,
    )
    prompts = _prompts(args)
    if args.draw:
        _check_drawing_target(args.draw, len(args.image))
    pictures = [load_image(path) for path in args.image]
    found = []
    with load(args.bundle, backend=args.backend, verify=not args.no_verify, threads=args.threads) as model:
        model.check_can_parse(prompts)  # a segment prompt without a mask decoder fails before any work
        if not args.json and len(prompts) == 1 and len(pictures) == 1:
            # One answer in a terminal: print it as it is generated, then the objects of its result.
            with model.stream(pictures[0], prompts[0], options) as stream:
                for chunk in stream:
                    print(chunk.text, end="", flush=True)
            print()
            objects = _objects_of(stream.result)
            print("\n".join(_describe_objects(objects)), end="\n" if objects else "")
            found += objects
        else:
            for index, result in enumerate(model.generate_batch(pictures, prompts, options)):
                picture = pictures[0 if len(pictures) == 1 else index]
                structured = model.structure(result, *picture.size)
                objects = _objects_of(structured)
                found += objects
                if args.json:
                    print(json.dumps(structured.to_dict()), flush=True)
                else:
                    print(f"{result.prompt}: {result.text}", flush=True)
                    for line in _describe_objects(objects):
                        print(line)
    if args.draw:
        _draw(pictures[0], found, args.draw)
    return 0


def _cmd_pack(args) -> int:
    from .runtime.bundle.packing import pack_bundle

    result = pack_bundle(args.bundle, args.output, with_engines=args.with_engines, force=args.force,
                         progress=args.progress)
    print(f"packed {result.files} files ({result.bytes / 1e6:.1f} MB) into {result.path}")
    return 0


def _cmd_verify(args) -> int:
    from .runtime.bundle.verify import verify_target

    report = verify_target(args.target, dry_load=not args.no_load, progress=args.progress)
    print(report.text())
    return 0 if report.ok else 1


def _cmd_inspect(args) -> int:
    from .runtime.bundle.summary import inspect_bundle

    summary = inspect_bundle(args.bundle)
    print(json.dumps(summary.to_dict(), indent=2) if args.json else summary.text())
    return 0


def _cmd_camera(args) -> int:
    from .apps.camera import CameraOptions, run_on_sources
    from .apps.video_sources import open_sources
    from .runtime.model import load
    from .runtime.generation.sampling import GenerationOptions

    prompts = _prompts(args)
    if len(prompts) != 1:
        raise InputError("camera runs one prompt: give --task or one --prompt")
    if args.every is not None and args.fps is not None:
        raise InputError("give --every or --fps, not both")
    options = CameraOptions(
        sources=tuple(args.source), prompt=prompts[0], every=args.every, fps=args.fps, out=args.out,
        annotate=args.annotate, max_frames=args.max_frames, max_batch=args.max_batch,
        generation=GenerationOptions(max_new_tokens=args.max_new_tokens),
    )
    sources = open_sources(options.sources)  # a bad source fails before a large model loads
    with load(args.bundle, backend=args.backend, verify=not args.no_verify, threads=args.threads) as model:
        run = run_on_sources(model, sources, options, progress=args.progress)
    print(run.text())
    return 0


def _cmd_serve(args) -> int:
    from .apps.server import ServerOptions, serve

    return serve(ServerOptions(
        bundle=args.bundle, host=args.host, port=args.port, backend=args.backend, threads=args.threads,
        token=args.token, verify=not args.no_verify, max_upload_mb=args.max_upload_mb,
        max_image_pixels=args.max_image_pixels, max_new_tokens=args.max_new_tokens,
        request_timeout_s=args.request_timeout, allow_remote_images=args.allow_remote_images,
        max_batch=args.max_batch, batch_wait_ms=args.batch_wait_ms,
    ), progress=args.progress)


def _cmd_triton_repo(args) -> int:
    from .apps.triton_io import ServingLimits
    from .apps.triton_repo import TritonRepoOptions, write_triton_repository

    options = TritonRepoOptions(
        backend=args.backend, max_batch=args.max_batch, instances=args.instances, stream=args.stream, name=args.name,
        bundle_path=args.bundle_path, max_queue_delay_us=round(args.queue_delay_ms * 1000), threads=args.threads,
        verify=args.verify, force=args.force,
        limits=ServingLimits(max_new_tokens=args.max_new_tokens,
                             default_max_new_tokens=min(ServingLimits.default_max_new_tokens, args.max_new_tokens)),
    )
    model_dir = write_triton_repository(args.bundle, args.output, options)
    print(f"wrote {model_dir} ({options.kind}, max batch {options.max_batch}, {options.instances} instance(s)"
          f"{', streaming' if options.stream else ''}); serve it with: "
          f"tritonserver --model-repository {model_dir.parent}")
    return 0


def _check_drawing_target(path: str, images: int) -> None:
    """Fail before generating, not after, when the drawing could not be written."""
    from PIL import Image

    if images != 1:
        raise InputError("--draw needs exactly one --image")
    target = Path(path)
    if not target.parent.is_dir():
        raise InputError(f"{path}: cannot write the drawing (no such directory {target.parent})")
    if target.suffix.lower() not in Image.registered_extensions():
        raise InputError(f"{path}: cannot write the drawing (unknown image extension '{target.suffix}')")


def _draw(picture, objects, path: str) -> None:
    from .runtime.drawing import draw_results

    try:
        draw_results(picture, objects).save(path)
    except (OSError, ValueError) as exc:
        raise InputError(f"{path}: cannot write the drawing ({exc})") from None
    print(f"drew {len(objects)} object(s) on {path}", file=sys.stderr)


def _add_prompt_arguments(parser: argparse.ArgumentParser, prompt_help: str) -> None:
    """--task with its --lang/--question/--objects, and free --prompt: what _prompts reads."""
    parser.add_argument("--task", choices=sorted(TASKS), help="a PaliGemma task prefix (see --lang, --question, --objects)")
    parser.add_argument("--lang", help="answer language for caption, describe and answer (default en)")
    parser.add_argument("--question", help="the question, for --task answer")
    parser.add_argument("--objects", help="object names for detect/segment, separated by ';' (e.g. 'cat ; dog')")
    parser.add_argument("--prompt", action="append", help=prompt_help)


def _add_backend_arguments(parser: argparse.ArgumentParser, verify: bool = True) -> None:
    """--backend and --threads for a loaded bundle (and --no-verify where the load checks sha256s)."""
    parser.add_argument("--backend", default="onnxruntime",
                        help="onnxruntime (default, CPU), tensorrt or tensorrt-rtx (the bundle's engines, see "
                             "build-engines), onnxruntime-cuda, onnxruntime-tensorrt (onnxruntime-gpu)")
    parser.add_argument("--threads", type=_positive_int, help="CPU threads for the backend")
    if verify:
        parser.add_argument("--no-verify", action="store_true", help="skip the sha256 check of the bundle's files")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="paligemma-edge", description="PaliGemma from a Hugging Face checkpoint to an offline program.")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks for errors")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    export = commands.add_parser("export", help="export a checkpoint to a bundle (ONNX graphs + manifest)")
    export.add_argument("model", help="local Hugging Face checkpoint directory or PEFT (LoRA) adapter directory "
                        "(or a hub id, where the network allows)")
    export.add_argument("--output", "-o", required=True, help="bundle directory to create")
    export.add_argument("--max-seq-len", type=_positive_int, help="longest prompt + answer, in tokens "
                        "(default: image tokens + 512)")
    export.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE,
                        help="allowed max |delta logit| between ONNX Runtime and PyTorch, relative to the "
                             f"largest logit (default {DEFAULT_TOLERANCE:g})")
    export.add_argument("--force", action="store_true", help="replace an existing bundle at --output")
    export.add_argument("--mask-decoder", metavar="vae-oid.npz",
                        help="big_vision's VQ-VAE mask decoder weights, carried into the bundle for segment")
    export.add_argument("--base", metavar="DIR", help="base checkpoint of a PEFT adapter directory (default: the "
                        "base_model_name_or_path in its adapter_config.json)")
    export.add_argument("--kv-cache", choices=("growing", "inplace"), default="growing",
                        help="growing (default): each step appends to the cache by copying (opset 18, every "
                             "backend); inplace: one cache buffer written in place (opset 24: ONNX Runtime, "
                             "TensorRT 10.15+, TensorRT for RTX 1.7+)")
    export.add_argument("--attention-chunk", type=int, metavar="N",
                        help="query rows per attention chunk in the vision and decoder graphs, so a layer holds "
                             "one chunk's scores at a time (default 512, halved while a chunk would hold "
                             "over 2M scores per head: 256 at 896 px; 0: no chunks, every score of a "
                             "layer at once)")
    export.set_defaults(handler=_cmd_export)

    ft = commands.add_parser("finetune", help="fine-tune a checkpoint on a PaliGemma JSONL dataset (LoRA via peft, or --full)")
    ft.add_argument("base", help="checkpoint folder (or hub id where the network allows)")
    ft.add_argument("--dataset", required=True, metavar="PATH[:split]",
                    help="trains on train, evaluates on valid; PATH:split trains on that split")
    ft.add_argument("-o", "--output", required=True, help="adapter folder (or checkpoint with --merge / --full) to write")
    ft.add_argument("--lora-rank", type=_positive_int, default=16)
    ft.add_argument("--lora-alpha", type=float, default=32.0)
    ft.add_argument("--target", choices=("attention", "attention+mlp", "all"), default="attention",
                    help="LoRA on the language model's attention (default), + its MLP, or all linears (vision too)")
    ft.add_argument("--full", action="store_true", help="train every weight, no adapters")
    ft.add_argument("--freeze-vision", action=argparse.BooleanOptionalAction, default=True,
                    help="keep the vision tower and projector frozen (default on)")
    ft.add_argument("--merge", action="store_true", help="write a full checkpoint with the adapters merged in")
    ft.add_argument("--epochs", type=float, default=1.0)
    ft.add_argument("--steps", type=_positive_int, help="optimizer steps (wins over --epochs)")
    ft.add_argument("--batch-size", type=_positive_int, default=4)
    ft.add_argument("--grad-accum", type=_positive_int, default=1)
    ft.add_argument("--lr", type=float, default=2e-4)
    ft.add_argument("--warmup", type=int, help="warmup steps (default 5%% of the steps)")
    ft.add_argument("--weight-decay", type=float, default=0.0)
    ft.add_argument("--seed", type=int, default=0)
    ft.add_argument("--log-every", type=_positive_int, default=10)
    ft.add_argument("--eval-every", type=int, default=0, help="steps between valid evals (0: at the end only)")
    ft.add_argument("--eval-lines", type=_positive_int, default=16)
    ft.add_argument("--save-every", type=int, default=0,
                    help="steps between resumable checkpoints in OUTPUT.checkpoints/")
    ft.add_argument("--resume", action="store_true", help="continue from OUTPUT.checkpoints/last.pt")
    ft.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    ft.add_argument("--bf16", choices=("auto", "on", "off"), default="auto")
    ft.add_argument("--force", action="store_true", help="replace OUTPUT")
    ft.set_defaults(handler=_cmd_finetune)

    quantize = commands.add_parser("quantize", help="write an fp16, int8 or int4 bundle from an fp32 bundle")
    quantize.add_argument("bundle", help="fp32 bundle directory (left untouched)")
    quantize.add_argument("--precision", required=True, choices=("fp16", "int8", "int4"))
    quantize.add_argument("--output", "-o", required=True, help="bundle directory to create")
    quantize.add_argument("--target", choices=("onnxruntime", "tensorrt"), default="onnxruntime",
                          help="the runtime the formats are chosen for (default onnxruntime); tensorrt: weight-only Q/DQ "
                               "int8 and int4 on fp16 activations, fp16 table (build-engines takes these)")
    quantize.add_argument("--int8-method", choices=("dynamic", "static", "weight-only"),
                          help="dynamic: integer kernels for ONNX Runtime on CPU (default for onnxruntime); static: "
                               "Q/DQ weights and activations calibrated on --calibration; weight-only: Q/DQ weights, "
                               "fp16 activations (default for tensorrt)")
    quantize.add_argument("--calibration", metavar="DIR|PATH[:split]",
                          help="for static int8 and fp16 ranges: a directory of real images (+ optional prompts.txt, "
                               "one prompt a line, each run on every image), or a PaliGemma JSONL dataset (Roboflow "
                               "export, maestro split folders, a .jsonl file): each line's prefix on its own image, "
                               "up to 32 lines spread over its pictures, from its train split unless PATH:split names one")
    quantize.add_argument("--block-size", type=_positive_int, default=32, help="int4 block size (default 32)")
    quantize.add_argument("--int4-activations", choices=("fp32", "fp16"),
                          help="int4 activations (default fp32 for onnxruntime, fp16 for tensorrt)")
    quantize.add_argument("--keep-embeddings", action="store_true",
                          help="int8/int4: keep the tied embedding / LM head at fp32 (instead of int8, or fp16 "
                               "for tensorrt)")
    quantize.add_argument("--fp16-io", action="store_true",
                          help="fp16: graph inputs/outputs and the KV cache in fp16 as well")
    quantize.add_argument("--force", action="store_true", help="replace an existing bundle at --output")
    quantize.set_defaults(handler=_cmd_quantize)

    compare = commands.add_parser("compare", help="measure a candidate bundle against a reference on the same inputs")
    compare.add_argument("reference", help="reference bundle, e.g. the fp32 export")
    compare.add_argument("candidate", help="candidate bundle, e.g. its int4 quantization")
    compare.add_argument("--images", metavar="DIR", help="directory of images to run (or --dataset)")
    compare.add_argument("--dataset", metavar="shapes|PATH[:split]",
                         help="add each bundle's task metrics side by side: shapes, the held-out scenes (for "
                              "paligemma-shapes bundles; without --images its first 8 pictures are the token-agreement "
                              "inputs); or a PaliGemma JSONL dataset, scored as eval scores it (its test split, else "
                              "valid, unless PATH:split names one; without --images its own lines are the "
                              "token-agreement inputs)")
    compare.add_argument("--n", type=_positive_int,
                         help="--dataset shapes: held-out scenes (default 100); PATH: the first N lines (default all)")
    compare.add_argument("--agreement-n", type=_positive_int, default=32, metavar="N",
                         help="--dataset PATH without --images: token agreement on the first N of those lines "
                              "(default 32)")
    compare.add_argument("--prompts", metavar="FILE",
                         help="one prompt a line, optionally 'prompt<TAB>expected answer' (default: task prefixes)")
    compare.add_argument("--max-new-tokens", type=_positive_int, default=32)
    compare.add_argument("--json", metavar="OUT.json", help="write the results as JSON (and a .md table beside it)")
    compare.set_defaults(handler=_cmd_compare)

    evaluate = commands.add_parser("eval", help="task accuracy of a bundle on a held-out dataset")
    evaluate.add_argument("bundle", help="bundle directory (any precision)")
    evaluate.add_argument("--dataset", default="shapes", metavar="shapes|PATH[:split]",
                          help="shapes (default): the generated scenes paligemma-shapes was trained on (held-out "
                               "split); or a PaliGemma JSONL dataset (Roboflow export, maestro split folders, a "
                               ".jsonl file): its test split (else valid) unless PATH:split names one")
    evaluate.add_argument("--n", type=_positive_int,
                          help="shapes: scenes to evaluate (default 200); PATH: the first N lines (default all)")
    evaluate.add_argument("--max-new-tokens", type=_positive_int, default=256, help="PATH: longest answer (default 256)")
    evaluate.add_argument("--batch-size", type=_positive_int, default=8,
                          help="PATH: prompts on one picture run as one batch (default 8)")
    _add_backend_arguments(evaluate, verify=False)
    evaluate.add_argument("--json", metavar="OUT.json", help="write the metrics (shapes: and every answer) as JSON")
    evaluate.add_argument("--markdown", metavar="OUT.md", help="PATH: write the metrics table as markdown")
    evaluate.add_argument("--misses", metavar="OUT.jsonl", help="PATH: write every missed line, one JSON object a line")
    evaluate.add_argument("--prefix-variants", metavar="FILE",
                          help="PATH: run each rewrite rule in FILE ('PATTERN -> REWRITE' a line, {x} the rest of "
                               "the prefix, e.g. 'detect {x} -> detect {x}s'; # comments) over the lines it matches "
                               "and rank the phrasings, the original included, per task kind; --json and --markdown "
                               "write the ranking")
    evaluate.set_defaults(handler=_cmd_eval)

    dataset = commands.add_parser("dataset", help="PaliGemma JSONL datasets: Roboflow exports, maestro split folders")
    dataset_actions = dataset.add_subparsers(dest="action", required=True, metavar="ACTION", parser_class=_Parser)
    check = dataset_actions.add_parser("check", help="lines per split and task kind, and every problem as file:line")
    check.add_argument("path", metavar="PATH[:split]", help="dataset folder or .jsonl file; PATH:split checks one split")
    check.add_argument("--json", metavar="OUT.json", help="also write the counts and problems as JSON")
    check.set_defaults(handler=_cmd_dataset_check)

    bench = commands.add_parser("bench", help="latency, throughput, memory and size against transformers")
    source = bench.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="tiny, mid, paligemma-3b-224, paligemma2-3b-224 (built with random weights) "
                                        "or a checkpoint path: exported and quantized here, with the baseline")
    source.add_argument("--bundles", help="comma-separated existing bundle directories (e.g. on a device without "
                                          "torch): runtime rows only")
    bench.add_argument("--precision", help="with --model, comma-separated: fp32,fp16,int8,int4 (default fp32,int8,int4)")
    bench.add_argument("--backend", default="onnxruntime", help="comma-separated runtime backends")
    bench.add_argument("--baseline", choices=("transformers", "none"),
                       help="default: transformers with --model, none with --bundles")
    bench.add_argument("--runs", type=_positive_int, default=3, help="measured runs after a warm-up (median)")
    bench.add_argument("--new-tokens", type=_positive_int, default=32)
    bench.add_argument("--threads", type=_positive_int, help="threads for every row (default: all cores)")
    bench.add_argument("--workdir", default="build/bench", help="where models and bundles are built and kept")
    bench.add_argument("--reuse", action="store_true",
                       help="keep quantized bundles already in --workdir instead of re-quantizing (no quantize times)")
    bench.add_argument("--out-dir", default="benchmarks/results", help="JSON, markdown table and PNG chart go here")
    bench.add_argument("--json", metavar="OUT.json", help="write the JSON here instead of OUT-DIR/MODEL.json")
    bench.set_defaults(handler=_cmd_bench)

    engines = commands.add_parser("build-engines", help="build TensorRT engines for this machine into a bundle")
    engines.add_argument("bundle", help="bundle directory (engines and the manifest entry are added to it)")
    engines.add_argument("--backend", choices=("tensorrt", "tensorrt-rtx"), default="tensorrt",
                         help="TensorRT flavour: tensorrt (Jetson, x86) or tensorrt-rtx (TensorRT for RTX)")
    engines.add_argument("--max-batch", type=_positive_int, default=1)
    engines.add_argument("--max-seq-len", type=_positive_int, help="default: the bundle's max sequence")
    engines.add_argument("--timing-cache", metavar="FILE", help="reuse and update this TensorRT timing cache")
    engines.add_argument("--decoder-profiles", type=int, choices=(1, 2),
                         help="decoder optimization profiles: 2 (prefill and decode, each tuned; the default for "
                              "tensorrt) or 1 spanning both (the default for tensorrt-rtx, which stores the "
                              "float weights once per profile)")
    engines.set_defaults(handler=_cmd_build_engines)

    run = commands.add_parser("run", help="generate text for an image and prompt(s) from a bundle")
    run.add_argument("bundle", help="bundle directory")
    run.add_argument("--image", action="append", required=True,
                     help="image file; repeat to pair images one-to-one with prompts")
    _add_prompt_arguments(run, "free prompt text, e.g. 'caption en'; repeat to run a batch")
    run.add_argument("--max-new-tokens", type=_positive_int, default=32)
    run.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    run.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0 = off)")
    run.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1 = off)")
    run.add_argument("--seed", type=int, help="random seed for sampling")
    run.add_argument("--json", action="store_true", help="one JSON object per prompt, one per line")
    run.add_argument("--draw", metavar="OUT.png", help="write the image with boxes, labels and masks drawn on it")
    _add_backend_arguments(run)
    run.set_defaults(handler=_cmd_run)

    serve = commands.add_parser("serve", help="HTTP API and kiosk page for a bundle (binds to localhost by default)")
    serve.add_argument("bundle", help="bundle directory")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    serve.add_argument("--port", type=int, default=8080)
    _add_backend_arguments(serve)
    serve.add_argument("--token", help="require 'Authorization: Bearer TOKEN' on every API route "
                       "(or set PALIGEMMA_EDGE_TOKEN)")
    serve.add_argument("--max-upload-mb", type=float, default=10.0, help="largest accepted upload (default 10 MB)")
    serve.add_argument("--max-image-pixels", type=_positive_int, default=40_000_000,
                       help="largest accepted image, width x height (default 40 Mpx)")
    serve.add_argument("--max-new-tokens", type=_positive_int, default=256,
                       help="cap on a request's max_new_tokens (default 256)")
    serve.add_argument("--request-timeout", type=float, default=120.0,
                       help="seconds a request may wait and run before it fails with 503/504 (default 120)")
    serve.add_argument("--max-batch", type=_positive_int, default=8,
                       help="run up to N waiting requests as one batch (default 8; 1: one at a time)")
    serve.add_argument("--batch-wait-ms", type=float, default=0.0,
                       help="when a batch has room, wait up to this long for more requests (default 0: "
                            "batch only what is already waiting)")
    serve.add_argument("--allow-remote-images", action="store_true",
                       help="let /v1/chat/completions fetch http(s) image_url pictures (default: data: URLs only)")
    serve.set_defaults(handler=_cmd_serve)

    triton = commands.add_parser("triton-repo", help="a Triton Inference Server model repository that serves a bundle")
    triton.add_argument("bundle", help="bundle directory")
    triton.add_argument("--output", "-o", required=True, metavar="REPO", help="model repository folder to write")
    triton.add_argument("--backend", default="onnxruntime",
                        help="runtime backend the server loads the bundle on: onnxruntime (default, KIND_CPU), "
                             "tensorrt, tensorrt-rtx, onnxruntime-cuda, onnxruntime-tensorrt (KIND_GPU)")
    triton.add_argument("--max-batch", type=_positive_int, default=8,
                        help="Triton's max_batch_size and preferred batch size (default 8)")
    triton.add_argument("--instances", type=_positive_int, default=1, help="model instances (per GPU for GPU backends)")
    triton.add_argument("--stream", action="store_true",
                        help="decoupled model: one response per token, then the result (gRPC streaming)")
    triton.add_argument("--name", default="paligemma", help="model name in the repository (default paligemma)")
    triton.add_argument("--bundle-path", help="the bundle's path on the server, e.g. inside a container "
                                              "(default: BUNDLE's absolute path)")
    triton.add_argument("--threads", type=_positive_int, help="CPU threads per instance for the backend")
    triton.add_argument("--max-new-tokens", type=_positive_int, default=256,
                        help="cap on a request's MAX_NEW_TOKENS (default 256; 128 when a request gives none)")
    triton.add_argument("--queue-delay-ms", type=float, default=10.0,
                        help="how long Triton may hold a request to fill a batch (default 10)")
    triton.add_argument("--verify", action="store_true",
                        help="check the bundle's sha256s each time an instance loads it (default: off)")
    triton.add_argument("--force", action="store_true", help="replace an existing REPO")
    triton.set_defaults(handler=_cmd_triton_repo)

    camera = commands.add_parser("camera", help="run a task on frames from a camera, video file, RTSP URL or GStreamer pipeline")
    camera.add_argument("bundle", help="bundle directory")
    camera.add_argument("--source", required=True, action="append",
                        help="camera index (0), /dev/videoN, a video file, an rtsp:// URL or a GStreamer pipeline; "
                             "repeat for several sources, run batched (then --out and --annotate need {index} or {name})")
    _add_prompt_arguments(camera, "free prompt text instead of --task")
    camera.add_argument("--every", type=_positive_int, help="run on every Nth frame")
    camera.add_argument("--fps", type=float, help="run at most this many times a second, dropping frames in between")
    camera.add_argument("--out", metavar="results.jsonl", help="write one JSON line per processed frame")
    camera.add_argument("--annotate", metavar="out.mp4", help="write the processed frames with results drawn on them")
    camera.add_argument("--max-frames", type=_positive_int, help="stop a source after this many processed frames")
    camera.add_argument("--max-batch", type=_positive_int,
                        help="at most this many sources' frames in one model call (default: all due frames, "
                             "up to the TensorRT engines' max batch)")
    camera.add_argument("--max-new-tokens", type=_positive_int, default=32)
    _add_backend_arguments(camera)
    camera.set_defaults(handler=_cmd_camera)

    pack = commands.add_parser("pack", help="one archive of a bundle for copying or flashing (manifest first, checksummed)")
    pack.add_argument("bundle", help="bundle directory")
    pack.add_argument("--output", "-o", required=True, metavar="FILE.tar", help="archive to write")
    pack.add_argument("--with-engines", action="store_true",
                      help="keep TensorRT engines (left out by default: they only run on the device that built them)")
    pack.add_argument("--force", action="store_true", help="replace an existing archive")
    pack.set_defaults(handler=_cmd_pack)

    verify = commands.add_parser("verify", help="check a bundle or packed archive: checksums, schema, a dry load")
    verify.add_argument("target", help="bundle directory or .tar archive")
    verify.add_argument("--no-load", action="store_true", help="skip the dry load by the runtime")
    verify.set_defaults(handler=_cmd_verify)

    inspect = commands.add_parser("inspect", help="a readable summary of a bundle")
    inspect.add_argument("bundle", help="bundle directory")
    inspect.add_argument("--json", action="store_true", help="the summary as JSON")
    inspect.set_defaults(handler=_cmd_inspect)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = None
    try:
        args = build_parser().parse_args(argv)
        extras.require(args.command, _needed_extra(args))
        args.progress = _Progress()
        try:
            return _run_command(args)
        finally:
            args.progress.close()
    except PaliGemmaEdgeError as exc:
        if args is not None and args.debug:
            raise
        print(f"paligemma-edge: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except BrokenPipeError:  # e.g. `run --json | head -1`: the reader left, nothing more to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        return 0
    except KeyboardInterrupt:
        print("paligemma-edge: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
