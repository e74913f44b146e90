"""``triton-repo``: the repository it writes, served by a real Triton Inference Server.

The server is the tritonserver 2.51 that the nvidia-pytriton wheel ships, run from the venv that
deploy/triton-venv.sh builds (Debian's python3.11, a wheel of this tree); the client is tritonclient
in that venv (tests/triton_client.py). The venv is kept between sessions under
``$PALIGEMMA_EDGE_TRITON_VENV`` (default ~/.cache/paligemma-edge/triton-venv) and gets this tree's
wheel each session. The server tests skip, saying why, where the wheel cannot be installed.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from paligemma_edge.apps.triton_io import ServingLimits
from paligemma_edge.apps.triton_repo import TritonRepoOptions, write_triton_repository
from paligemma_edge.runtime.errors import InputError
from paligemma_edge.runtime.generation.sampling import GenerationOptions

from .conftest import MAX_SEQ_LEN, run_cli
from .test_install import PIP_OFFLINE, build_wheel, clean_env, copy_tree

ROOT = Path(__file__).resolve().parents[1]
SYSTEM_PYTHON = Path("/usr/bin/python3.11")  # the libpython the wheel's 3.11 stub links
VENV = Path(os.environ.get("PALIGEMMA_EDGE_TRITON_VENV", Path.home() / ".cache" / "paligemma-edge" / "triton-venv"))
TOKENS = 12


# -- the writer, without a server ------------------------------------------------------------------

@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    """One tiny PaliGemma 2 bundle, exported as a user does."""
    from paligemma_edge.fixtures.tiny import TinySpec, build_checkpoint

    work = tmp_path_factory.mktemp("triton-model")
    checkpoint = build_checkpoint(work / "checkpoint", TinySpec(family=2, image_size=28))
    run_cli("export", str(checkpoint), "--output", str(work / "bundle"), "--max-seq-len", str(MAX_SEQ_LEN), check=True)
    return work / "bundle"


def test_config_names_the_bundle_batching_instances_and_stream(bundle, tmp_path):
    options = TritonRepoOptions(backend="tensorrt", max_batch=6, instances=3, stream=True, bundle_path="/models/b")
    model_dir = write_triton_repository(bundle, tmp_path / "repo", options)
    config = (model_dir / "config.pbtxt").read_text()
    assert model_dir == tmp_path / "repo" / "paligemma"
    for line in ("max_batch_size: 6", "preferred_batch_size: [ 6 ]", "instance_group [ { count: 3 kind: KIND_GPU } ]",
                 "model_transaction_policy { decoupled: true }",
                 'parameters: { key: "bundle" value: { string_value: "/models/b" } }',
                 'parameters: { key: "backend" value: { string_value: "tensorrt" } }'):
        assert line in config
    assert "from paligemma_edge.apps.triton_model import TritonPythonModel" in (model_dir / "1" / "model.py").read_text()
    plain = (write_triton_repository(bundle, tmp_path / "cpu") / "config.pbtxt").read_text()
    assert "kind: KIND_CPU" in plain and "decoupled" not in plain
    assert f'string_value: "{bundle.resolve()}"' in plain


def test_an_existing_repository_is_kept_unless_forced(bundle, tmp_path):
    target = tmp_path / "repo"
    target.mkdir()
    (target / "mine.txt").write_text("keep")
    with pytest.raises(InputError, match="exists; pass --force"):
        write_triton_repository(bundle, target)
    assert (target / "mine.txt").read_text() == "keep"
    write_triton_repository(bundle, target, TritonRepoOptions(force=True))
    assert sorted(p.name for p in target.iterdir()) == ["paligemma"]
    assert [p.name for p in tmp_path.iterdir()] == ["repo"]  # no staging folder left behind


@pytest.mark.parametrize("options, message", [
    (dict(backend="nope"), "unknown backend 'nope'"),
    (dict(max_batch=0), "--max-batch must be at least 1"),
    (dict(instances=0), "--instances must be at least 1"),
    (dict(name="../x"), "model name"),
])
def test_bad_options_are_one_line(options, message):
    with pytest.raises(InputError, match=message):
        TritonRepoOptions(**options)


def test_a_missing_bundle_and_a_folder_that_is_not_one_are_refused(tmp_path):
    with pytest.raises(InputError, match="no such bundle directory"):
        write_triton_repository(tmp_path / "absent", tmp_path / "repo")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError):
        write_triton_repository(tmp_path / "empty", tmp_path / "repo")
    assert not (tmp_path / "repo").exists()


# -- rows of a batch, on the loaded bundle (no server) --------------------------------------------

def test_a_batch_of_mixed_options_runs_once_and_each_row_equals_it_alone(bundle, images):
    from paligemma_edge.apps.triton_requests import parse_item, run_items
    from paligemma_edge.runtime.model import load

    limits = ServingLimits()
    sampled = {"TEMPERATURE": 1.0, "SEED": 3}
    fields = [
        {"IMAGE": images[0].read_bytes(), "PROMPT": b"caption en", "MAX_NEW_TOKENS": 6},
        {"IMAGE": images[1].read_bytes(), "TASK": b"detect", "OBJECTS": b"cat", "MAX_NEW_TOKENS": 3},
        {"IMAGE": images[0].read_bytes(), "PROMPT": b"ocr", "MAX_NEW_TOKENS": 9},
        {"IMAGE": images[1].read_bytes(), "PROMPT": b"ocr", "MAX_NEW_TOKENS": 7, **sampled},
        {"IMAGE": images[1].read_bytes(), "PROMPT": b"ocr", "MAX_NEW_TOKENS": 7, "TEMPERATURE": 1.0, "SEED": 4},
        {"IMAGE": images[0].read_bytes(), "PROMPT": b"caption en", "MAX_NEW_TOKENS": 8, "TOP_K": 5, **sampled},
    ]
    with load(bundle) as model:
        items = [parse_item(model, f, limits) for f in fields]
        outcomes = run_items(model, [*items, None])
        assert outcomes[-1] is None
        got = []
        for outcome in outcomes[:-1]:
            assert outcome is not None and not isinstance(outcome, Exception), outcome
            got.append(outcome.to_dict())
        assert len({g["timings"]["vision_ms"] for g in got}) == 1  # one generation ran them all
        for one, item in zip(got, items):  # each row had its own budget
            assert len(one["token_ids"]) == item.options.max_new_tokens or one["finish_reason"] == "eos"
        assert got[3]["token_ids"] != got[4]["token_ids"]  # the seeds matter: each row has its own stream
        for item, one in zip(items, got):
            alone = model.structure(model.generate_batch([item.image], [item.prompt], item.options)[0],
                                    *item.image.size)
            assert _untimed(one) == _untimed(alone.to_dict())
        for bad, message in [({"PROMPT": b"caption en"}, "IMAGE is empty"),
                             ({"IMAGE": b"GIF89a", "PROMPT": b"x"}, "IMAGE"),
                             ({"IMAGE": images[0].read_bytes(), "PROMPT": b"\xff"}, "PROMPT is not UTF-8"),
                             ({"IMAGE": images[0].read_bytes(), "PROMPT": b"segment cat"}, "mask decoder"),
                             ({"IMAGE": images[0].read_bytes(), "PROMPT": b"ocr", "TOP_P": 0.0}, "top_p")]:
            with pytest.raises(InputError, match=message):
                parse_item(model, bad, limits)


def test_options_come_from_inputs_or_request_parameters_not_both():
    from paligemma_edge.apps.triton_requests import options_from, request_parameters

    limits = ServingLimits()
    parameters = request_parameters(json.dumps({"max_new_tokens": 9, "temperature": "0.5", "seed": 2**62 + 1,
                                                "triton_enable_empty_final_response": True}))
    assert options_from({"TOP_K": 4}, limits, parameters) == GenerationOptions(
        max_new_tokens=9, temperature=0.5, top_k=4, seed=2**62 + 1)
    assert options_from({}, limits, request_parameters("")) == GenerationOptions(max_new_tokens=128)
    for fields, params, message in [
        ({"SEED": 1}, '{"seed": 1}', "SEED is given both as an input and as the 'seed' parameter"),
        ({}, '{"temprature": 1.0}', "unknown request parameter 'temprature'"),
        ({}, '{"top_k": "many"}', "top_k must be an integer"),
        ({}, '{"max_new_tokens": 2.5}', "max_new_tokens must be an integer"),
        ({}, '{"temperature": true}', "temperature must be a number"),
        ({}, '{"max_new_tokens": 257}', "at most 256"),
        ({}, '{"top_p": 0}', "top_p must be in"),
        ({}, '[1]', "not a JSON object"),
    ]:
        with pytest.raises(InputError, match=message):
            options_from(fields, limits, request_parameters(params))


# -- a real Triton Inference Server ------------------------------------------------------------------

@pytest.fixture(scope="module")
def triton_venv(tmp_path_factory) -> Path:
    if not SYSTEM_PYTHON.exists():
        pytest.skip(f"{SYSTEM_PYTHON} (the libpython the Triton wheel's stub links) is not on this machine")
    if subprocess.run([str(SYSTEM_PYTHON), "-c", "import ensurepip, venv"], capture_output=True).returncode != 0:
        pytest.skip(f"{SYSTEM_PYTHON} cannot make a venv: apt-get install python3.11-venv")
    work = tmp_path_factory.mktemp("triton-wheel")
    wheel = build_wheel(copy_tree(work / "paligemma-edge"), work / "dist")
    started = time.monotonic()
    result = subprocess.run(["bash", str(ROOT / "deploy" / "triton-venv.sh"), str(VENV), str(wheel)],
                            capture_output=True, text=True, env=clean_env(), timeout=900)
    if result.returncode != 0 and any(text in result.stderr for text in PIP_OFFLINE):
        pytest.skip("nvidia-pytriton / tritonclient cannot be installed here: " + result.stderr.strip().splitlines()[-1])
    assert result.returncode == 0, result.stderr[-3000:]
    print(f"triton venv ready in {time.monotonic() - started:.1f} s")
    return VENV


def test_the_triton_model_imports_only_the_base_runtime(triton_venv):
    """What the Python-backend stub imports (model.py's one import) loads no serve/fastapi code, so
    the venv needs only the base install's packages."""
    probe = ("import sys; import paligemma_edge.apps.triton_model; "
             "print(sorted(m for m in ('fastapi', 'starlette', 'pydantic', 'paligemma_edge.apps.server') "
             "if m in sys.modules))")
    result = subprocess.run([str(triton_venv / "bin" / "python"), "-c", probe], capture_output=True, text=True,
                            env={**clean_env(), "PYTHONPATH": str(triton_venv / "triton-backends" / "python")},
                            cwd=triton_venv, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "[]"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def server(triton_venv, bundle, tmp_path_factory):
    """tritonserver on two repositories: the batched model and the streaming one, both of ``bundle``."""
    work = tmp_path_factory.mktemp("triton-repos")
    write_triton_repository(bundle, work / "batched", TritonRepoOptions(max_batch=8, max_queue_delay_us=50_000))
    write_triton_repository(bundle, work / "streamed", TritonRepoOptions(stream=True, name="paligemma_stream",
                                                                         max_batch=8, max_queue_delay_us=50_000))
    http, grpc = _free_port(), _free_port()
    log = (work / "server.log").open("w")
    process = subprocess.Popen(
        [str(triton_venv / "bin" / "triton-serve"), str(work / "batched"), "--model-repository", str(work / "streamed"),
         "--http-address", "127.0.0.1", "--http-port", str(http), "--grpc-address", "127.0.0.1",
         "--grpc-port", str(grpc), "--allow-metrics", "false", "--exit-timeout-secs", "10"],
        stdout=log, stderr=subprocess.STDOUT, env=clean_env(), cwd=work)  # the stub puts its cwd on sys.path
    try:
        deadline = time.monotonic() + 120
        while not _ready(http):
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail("tritonserver did not become ready:\n" + (work / "server.log").read_text()[-4000:])
            time.sleep(0.5)
        yield {"http": f"127.0.0.1:{http}", "grpc": f"127.0.0.1:{grpc}", "model": "paligemma",
               "stream_model": "paligemma_stream", "log": work / "server.log", "process": process}
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


def _ready(http: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{http}/v2/health/ready", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def client(server: dict, *steps: dict) -> list:
    """Run steps with tritonclient in the Triton venv (see tests/triton_client.py)."""
    plan = {key: server[key] for key in ("http", "grpc", "model", "stream_model")} | {"steps": list(steps)}
    result = subprocess.run([str(VENV / "bin" / "python"), str(ROOT / "tests" / "triton_client.py")],
                            input=json.dumps(plan), capture_output=True, text=True, timeout=300, env=clean_env())
    assert result.returncode == 0, result.stderr[-3000:] + "\n" + server["log"].read_text()[-3000:]
    return json.loads(result.stdout)


def expected(bundle: Path, image: Path, prompt: str, *options: str) -> dict:
    """What `run --json` prints for one image and prompt (``options``: more flags), without its timings."""
    out = run_cli("run", str(bundle), "--image", str(image), "--prompt", prompt, "--max-new-tokens", str(TOKENS),
                  *options, "--json", check=True)
    return _untimed(json.loads(out.stdout))


def _untimed(result: dict) -> dict:
    return {k: v for k, v in result.items() if k != "timings"}


def _request(image: Path, **fields) -> dict:
    return {"IMAGE": str(image), "MAX_NEW_TOKENS": TOKENS, **fields}


CASES = [  # (Triton fields, the prompt `run` is given)
    (dict(PROMPT="caption en"), "caption en"),
    (dict(TASK="answer", LANG="en", QUESTION="what is this"), "answer en what is this"),
    (dict(TASK="detect", OBJECTS="cat ; dog"), "detect cat ; dog"),
    (dict(PROMPT="ocr"), "ocr"),
]


@pytest.fixture(scope="module")
def answers(bundle, images) -> dict:
    return {(image, prompt): expected(bundle, image, prompt) for image in images[:2] for _, prompt in CASES}


def _assert_matches(got: dict, want: dict) -> None:
    assert "error" not in got, got
    assert _untimed(got["result"]) == want
    assert got["text"] == want["text"] and got["token_ids"] == want["token_ids"]


def test_answers_equal_run_json(server, images, answers):
    requests = [_request(image, **fields) for image in images[:2] for fields, _ in CASES]
    (got,) = client(server, {"kind": "infer", "requests": requests})
    want = [answers[image, prompt] for image in images[:2] for _, prompt in CASES]
    for one, reference in zip(got, want):
        _assert_matches(one, reference)
    assert any("detections" in one["result"] for one in got)


PROMPTS = ["caption en", "answer en what is this", "detect cat ; dog", "ocr"]


def test_concurrent_clients_are_batched_and_bad_rows_fail_alone(server, images, answers, tmp_path):
    """Triton batches requests that send the same set of inputs: 16 clients send IMAGE, PROMPT and
    MAX_NEW_TOKENS (a junk image among them, so a bad row shares a batch with good ones); one more
    sends a task, which Triton runs in a batch of its own kind."""
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"this is not a picture")
    good = [(images[i % 2], PROMPTS[i % len(PROMPTS)]) for i in range(15)]
    requests = [_request(image, PROMPT=prompt) for image, prompt in good]
    requests += [_request(junk, PROMPT="caption en"), _request(images[0], TASK="dance")]
    (before, got, after) = client(server, {"kind": "stats"}, {"kind": "concurrent", "requests": requests},
                                  {"kind": "stats", "grown_by": len(requests)})
    for one, key in zip(got, good):
        _assert_matches(one, answers[key])
    assert got[15]["status"] == "400" and "IMAGE" in got[15]["error"], got[15]
    assert got[16]["status"] == "400" and "unknown task 'dance'" in got[16]["error"], got[16]
    inferences = after["inference_count"] - before["inference_count"]
    executions = after["execution_count"] - before["execution_count"]
    print(f"{inferences} inferences in {executions} executions")
    assert inferences == len(requests) and executions <= len(requests) // 2  # Triton batched them


def test_a_request_of_several_rows_gets_one_answer_per_row(server, images, answers):
    (got, refused) = client(server, {"kind": "rows", "request": {
        "IMAGE": [str(images[0]), str(images[1])], "PROMPT": ["caption en", "detect cat ; dog"],
        "MAX_NEW_TOKENS": [TOKENS, TOKENS]}}, {"kind": "rows", "request": {
        "IMAGE": [str(images[0]), str(images[1])], "PROMPT": ["caption en", "segment cat"]}})
    _assert_matches(got[0], answers[images[0], "caption en"])
    _assert_matches(got[1], answers[images[1], "detect cat ; dog"])
    assert refused["status"] == "400" and "mask decoder" in refused["error"], refused


def test_bad_inputs_get_errors_and_the_server_keeps_serving(server, images, answers, tmp_path):
    junk = tmp_path / "junk.jpg"
    junk.write_bytes(b"\xff\xd8\xff garbage")
    long_prompt = "answer en " + " ".join(["why"] * (2 * MAX_SEQ_LEN))
    (got,) = client(server, {"kind": "infer", "requests": [
        _request(junk, PROMPT="caption en"),
        _request(images[0], TASK="dance"),
        _request(images[0], PROMPT="caption en", TASK="caption"),
        _request(images[0], PROMPT=long_prompt),
        _request(images[0], PROMPT="caption en", TEMPERATURE=-1.0),
        _request(images[0], PROMPT="caption en", MAX_NEW_TOKENS=100_000),
        _request(images[0], PROMPT="caption en"),
    ]})
    for refused in got[:-1]:
        assert refused.get("status") == "400", refused
        assert "\n" not in refused["error"] and "Traceback" not in refused["error"]
    assert "either 'prompt' or 'task'" in got[2]["error"]
    assert "temperature" in got[4]["error"] and "at most 256" in got[5]["error"]
    _assert_matches(got[-1], answers[images[0], "caption en"])
    assert server["process"].poll() is None


def test_streaming_sends_each_token_then_the_result(server, images, answers):
    (chunks,) = client(server, {"kind": "stream", "request": _request(images[0], PROMPT="caption en")})
    want = answers[images[0], "caption en"]
    *tokens, final = chunks
    assert [t["token_ids"][0] for t in tokens] == want["token_ids"]
    assert all(t["result"] is None for t in tokens)
    assert "".join(t["text"] for t in tokens) == want["text"]
    _assert_matches(final, want)
    (refused,) = client(server, {"kind": "stream", "request": _request(images[0], TASK="dance")})
    assert len(refused) == 1 and "unknown task 'dance'" in refused[0]["error"]


def _greedy_or_sampled(index: int, images: list[Path], as_parameters: bool) -> dict:
    """Even: a greedy caption of image 0; odd: a sampled ocr of image 1 (temperature 1, seed 5)."""
    image, prompt, options = ((images[0], "caption en", {}) if index % 2 == 0 else
                              (images[1], "ocr", {"temperature": 1.0, "seed": 5}))
    options = {"max_new_tokens": TOKENS, **options}
    if as_parameters:
        return {"IMAGE": str(image), "PROMPT": prompt, "parameters": options}
    return {"IMAGE": str(image), "PROMPT": prompt, **{name.upper(): value for name, value in options.items()}}


def test_options_as_request_parameters_let_mixed_clients_batch(server, bundle, images, answers):
    """16 concurrent clients, half greedy and half sampling: with the options as inputs they send two
    sets of inputs (Triton batches each set apart); as request parameters, one set. Both answer the
    same, and each answer equals `run --json` with the same options."""
    sampled = expected(bundle, images[1], "ocr", "--temperature", "1.0", "--seed", "5")
    executions = {}
    for as_parameters in (False, True):
        requests = [_greedy_or_sampled(i, images, as_parameters) for i in range(16)]
        (before, got, after) = client(server, {"kind": "stats"}, {"kind": "concurrent", "requests": requests},
                                      {"kind": "stats", "grown_by": len(requests)})
        for index, one in enumerate(got):
            _assert_matches(one, answers[images[0], "caption en"] if index % 2 == 0 else sampled)
        assert after["inference_count"] - before["inference_count"] == len(requests)
        executions[as_parameters] = after["execution_count"] - before["execution_count"]
    print(f"16 mixed requests: {executions[False]} executions with options as inputs, "
          f"{executions[True]} as request parameters")
    assert executions[True] <= 16 // 2  # one set of inputs: Triton batched them
    (refused,) = client(server, {"kind": "infer", "requests": [
        {"IMAGE": str(images[0]), "PROMPT": "ocr", "MAX_NEW_TOKENS": TOKENS, "parameters": {"max_new_tokens": 3}},
        {"IMAGE": str(images[0]), "PROMPT": "ocr", "parameters": {"temprature": 1.0}}]})
    assert refused[0]["status"] == "400" and "both as an input and as the 'max_new_tokens'" in refused[0]["error"]
    assert refused[1]["status"] == "400" and "unknown request parameter 'temprature'" in refused[1]["error"]


def test_concurrent_streams_run_batched_and_each_equals_run_json(server, bundle, images, answers):
    """9 gRPC streams at once, with their own token budgets and one sending its options as
    parameters; one more cancels after two responses and the others still get their whole answers."""
    short = expected(bundle, images[1], "ocr", "--max-new-tokens", "5")
    pairs = [(images[i % 2], PROMPTS[i % len(PROMPTS)]) for i in range(7)]
    cases = [(_request(image, PROMPT=prompt), answers[image, prompt]) for image, prompt in pairs]
    cases.append((_request(images[1], PROMPT="ocr", MAX_NEW_TOKENS=5), short))
    cases.append(({"IMAGE": str(images[0]), "PROMPT": "caption en", "parameters": {"max_new_tokens": TOKENS}},
                  answers[images[0], "caption en"]))
    requests = [request for request, _ in cases] + [_request(images[0], PROMPT="caption en")]
    stats = {"kind": "stats", "model": "stream_model"}
    (before, got, after) = client(server, stats, {"kind": "concurrent_stream", "requests": requests,
                                                  "cancel_after": {str(len(cases)): 2}},
                                  stats | {"grown_by": len(requests)})
    for chunks, (_, want) in zip(got, cases):
        *tokens, final = chunks
        assert [t["token_ids"][0] for t in tokens] == want["token_ids"]
        assert "".join(t["text"] for t in tokens) == want["text"]
        _assert_matches(final, want)
    assert len(got[-1]) == 2 and all(t["result"] is None for t in got[-1])
    executions = after["execution_count"] - before["execution_count"]
    print(f"{len(requests)} streams in {executions} executions")
    assert after["inference_count"] - before["inference_count"] == len(requests)
    assert executions <= 4  # two sets of inputs, up to 8 streams a batch: Triton batched them
    assert server["process"].poll() is None


def test_the_command_writes_the_repository_and_refuses_bad_input_in_one_line(bundle, tmp_path):
    result = run_cli("triton-repo", str(bundle), "-o", str(tmp_path / "repo"), "--backend", "tensorrt",
                     "--max-batch", "4", "--instances", "2", "--stream", "--bundle-path", "/bundle", check=True)
    assert "wrote" in result.stdout
    config = (tmp_path / "repo" / "paligemma" / "config.pbtxt").read_text()
    assert "max_batch_size: 4" in config and "count: 2 kind: KIND_GPU" in config and "decoupled: true" in config
    for args, message in [(["-o", str(tmp_path / "repo")], "exists; pass --force"),
                          (["-o", str(tmp_path / "other"), "--backend", "nope"], "unknown backend 'nope'")]:
        refused = run_cli("triton-repo", str(bundle), *args)
        lines = refused.stderr.strip().splitlines()
        assert refused.returncode == 2 and len(lines) == 1 and message in lines[0], refused.stderr
