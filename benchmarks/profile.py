"""Where one decode step's time goes: ONNX Runtime's node profiler on a bundle's decoder.

    python -m paligemma_edge.benchmarks.profile BUNDLE [--new-tokens 8] [--threads N] [--top 8]

Generates a caption with the decoder session made with profiling on (the backend's SessionHooks:
the only decoder session in memory, a 3B fp32 decoder is 8 GB), then splits the profile by decoder
run: the first is the prefill, the rest are decode steps. Prints, for the median decode step, the
time per operator type and the slowest nodes with the bytes of the weights they read and the rate
at which they read them: for the LM head always (a float table is an input the profiler lists; an
int8 table's bytes are its files'), for other nodes where the profiler lists those inputs (weights pre-packed at load, such as the int8 and int4 layers', not).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

import numpy as np

from ..runtime.backends.embedding import LM_HEAD_NODE
from ..runtime.errors import PaliGemmaEdgeError

_ITEM_BYTES = {"float": 4, "float16": 2, "bfloat16": 2, "int8": 1, "uint8": 1, "int32": 4, "int64": 8, "bool": 1}


def _weight_shapes(graph_path: Path, table: np.ndarray) -> set[tuple[int, ...]]:
    """Shapes of the decoder's weight matrices (2-D or more initializers) and of the tied table."""
    import onnx

    graph = onnx.load(str(graph_path), load_external_data=False).graph
    return {tuple(t.dims) for t in graph.initializer if len(t.dims) >= 2} | {table.shape}


def _weight_bytes(event: dict, weight_shapes: set[tuple[int, ...]]) -> int:
    """Bytes of the node's inputs shaped like a weight (the tied table, unpacked initializers). Weights
    ONNX Runtime pre-packed at load are not among the inputs it lists, nor in its parameter_size."""
    total = 0
    for entry in event["args"].get("input_type_shape", []):
        for dtype, shape in entry.items():
            if len(shape) >= 2 and tuple(shape) in weight_shapes:  # scale vectors are not weights
                total += int(np.prod(shape)) * _ITEM_BYTES.get(dtype, 4)
    return total


def _runs(events: list[dict]) -> list[list[dict]]:
    """Node events grouped by the model run they fall in."""
    runs = sorted((e["ts"], e["ts"] + e["dur"]) for e in events if e.get("name") == "model_run")
    grouped: list[list[dict]] = [[] for _ in runs]
    for event in events:
        if event.get("cat") != "Node" or not event["name"].endswith("_kernel_time"):
            continue
        for index, (start, end) in enumerate(runs):
            if start <= event["ts"] <= end:
                grouped[index].append(event)
                break
    return grouped


def profile_decode(bundle: str, new_tokens: int = 8, threads: int | None = None) -> dict:
    """Per-op-type and per-node times of the median decode step (ms), from ONNX Runtime's profiler."""
    from ..fixtures.tiny import scene_image
    from ..runtime.backends.base import SessionHooks
    from ..runtime.backends.onnxruntime import OnnxRuntimeBackend
    from ..runtime.generation.sampling import GenerationOptions
    from ..runtime.model import load

    with tempfile.TemporaryDirectory() as scratch:
        hooks = SessionHooks(profile_prefix=Path(scratch) / "decoder")
        with load(bundle, verify=False, threads=threads, hooks=hooks) as model:
            backend = model.backend
            assert isinstance(backend, OnnxRuntimeBackend)  # load's default backend, the one that profiles
            # every run decodes exactly new_tokens tokens, as in the benchmark rows
            model.generate_batch([scene_image()], ["caption en"],
                                 GenerationOptions(max_new_tokens=new_tokens, ignore_eos=True))
            events = json.loads(backend.end_profiling().read_text())
            weight_shapes = _weight_shapes(Path(bundle) / model.manifest.decoder_graph.file, backend.host_embedding.table)
            head_bytes = backend.host_embedding.head_bytes()
    decode_runs = _runs(events)[1:]  # the first decoder run is the prefill
    if not decode_runs:
        raise PaliGemmaEdgeError("no decode step was profiled: raise --new-tokens")
    step_times = [sum(e["dur"] for e in run) for run in decode_runs]
    median_time = sorted(step_times)[len(step_times) // 2]  # a step that ran, so the shares add up to 100%
    median_run = decode_runs[step_times.index(median_time)]
    by_type: dict[str, float] = defaultdict(float)
    for event in median_run:
        by_type[event["args"]["op_name"]] += event["dur"] / 1000
    nodes = sorted(median_run, key=lambda e: -e["dur"])
    return {
        "bundle": str(bundle), "decode_steps": len(decode_runs), "step_ms": median_time / 1000,
        "op_types_ms": dict(sorted(by_type.items(), key=lambda kv: -kv[1])),
        "nodes": [
            {"node": e["name"].removesuffix("_kernel_time"), "op": e["args"]["op_name"], "ms": e["dur"] / 1000,
             "weight_bytes": head_bytes if e["name"] == f"{LM_HEAD_NODE}_kernel_time" else _weight_bytes(e, weight_shapes)}
            for e in nodes
        ],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle")
    parser.add_argument("--new-tokens", type=int, default=8, help="tokens to generate (>= 2)")
    parser.add_argument("--threads", type=int)
    parser.add_argument("--top", type=int, default=8, help="slowest nodes to list")
    args = parser.parse_args(argv)
    if args.new_tokens < 2 or args.top < 1 or (args.threads is not None and args.threads < 1):
        parser.error("--new-tokens must be >= 2, --top and --threads >= 1")
    try:
        report = profile_decode(args.bundle, args.new_tokens, args.threads)
    except PaliGemmaEdgeError as exc:
        print(f"{parser.prog}: {exc}", file=sys.stderr)
        return 2
    step = report["step_ms"]
    print(f"{report['bundle']}: median decode step {step:.1f} ms (kernel time, {report['decode_steps']} steps)")
    for op, ms in list(report["op_types_ms"].items())[:args.top]:
        print(f"  {op:28s} {ms:8.2f} ms  {100 * ms / step:5.1f}%")
    print("slowest nodes:")
    for node in report["nodes"][:args.top]:
        rate = f"{node['weight_bytes'] / node['ms'] / 1e6:6.1f} GB/s of weights" if node["weight_bytes"] else ""
        print(f"  {node['node'][:60]:60s} {node['op']:22s} {node['ms']:7.2f} ms  {rate}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
