"""The ``paligemma-edge`` command: a thin layer over the library functions.

Known errors (bad input, broken bundles, failed validation) print one line on stderr and
exit with the error's code (2 for usage and input errors); anything else is a bug and
keeps its traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence

from .runtime.errors import InputError, PaliGemmaEdgeError


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


def _progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _cmd_export(args) -> int:
    try:
        from .export.bundle import ExportOptions, export_bundle
    except ImportError as exc:
        raise InputError(
            f"export needs the 'export' extra ({exc.name} is missing): pip install 'paligemma-edge[export]'"
        ) from None
    options = ExportOptions(max_seq_len=args.max_seq_len, tolerance=args.tolerance, overwrite=args.force)
    export_bundle(args.model, args.output, options, progress=_progress)
    return 0


def _cmd_run(args) -> int:
    from .runtime.model import load
    from .runtime.sampling import GenerationOptions

    options = GenerationOptions(
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
        top_p=args.top_p, seed=args.seed,
    )
    prompts = args.prompt
    if args.stream and (args.json or len(prompts) > 1 or len(args.image) > 1):
        raise InputError("--stream prints one prompt's tokens as they come: use it with one --image and one --prompt, without --json")
    with load(args.bundle, backend=args.backend, verify=not args.no_verify, threads=args.threads) as model:
        if args.stream:
            for chunk in model.stream(args.image[0], prompts[0], options):
                print(chunk.text, end="", flush=True)
            print()
            return 0
        for result in model.generate_batch(args.image, prompts, options):
            if args.json:
                print(json.dumps(result.to_dict()), flush=True)
            else:
                print(result.text if len(prompts) == 1 else f"{result.prompt}: {result.text}", flush=True)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="paligemma-edge", description="PaliGemma from a Hugging Face checkpoint to an offline program.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    export = commands.add_parser("export", help="export a checkpoint to a bundle (ONNX graphs + manifest)")
    export.add_argument("model", help="local Hugging Face checkpoint directory (or a hub id, where the network allows)")
    export.add_argument("--output", "-o", required=True, help="bundle directory to create")
    export.add_argument("--max-seq-len", type=_positive_int, help="longest prompt + answer, in tokens "
                        "(default: image tokens + 512)")
    export.add_argument("--tolerance", type=float, default=1e-3,
                        help="max |delta logit| between ONNX Runtime and PyTorch (default 1e-3)")
    export.add_argument("--force", action="store_true", help="replace an existing bundle at --output")
    export.set_defaults(handler=_cmd_export)

    run = commands.add_parser("run", help="generate text for an image and prompt(s) from a bundle")
    run.add_argument("bundle", help="bundle directory")
    run.add_argument("--image", action="append", required=True,
                     help="image file; repeat to pair images one-to-one with prompts")
    run.add_argument("--prompt", action="append", required=True,
                     help="prompt text, e.g. 'caption en'; repeat to run a batch")
    run.add_argument("--max-new-tokens", type=_positive_int, default=32)
    run.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    run.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0 = off)")
    run.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1 = off)")
    run.add_argument("--seed", type=int, help="random seed for sampling")
    run.add_argument("--backend", default="onnxruntime", help="runtime backend (default onnxruntime)")
    run.add_argument("--threads", type=_positive_int, help="CPU threads for the backend")
    run.add_argument("--json", action="store_true", help="one JSON object per prompt, one per line")
    run.add_argument("--stream", action="store_true", help="print tokens as they come (single prompt)")
    run.add_argument("--no-verify", action="store_true", help="skip the sha256 check of the bundle's files")
    run.set_defaults(handler=_cmd_run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        return args.handler(args)
    except PaliGemmaEdgeError as exc:
        print(f"paligemma-edge: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("paligemma-edge: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
