# paligemma-edge: `make demo` installs everything and runs the whole pipeline on the small
# paligemma-shapes model trained in this repo; `make test` runs the test suite (what CI runs).
PYTHON ?= python3
export PIP_ROOT_USER_ACTION := ignore
PIP := $(PYTHON) -m pip
DEMO := build/demo
WALK := build/walkthrough
SHAPES := models/paligemma-shapes
# torch is pinned to the CPU wheel this project is tested with (an open range pulls a CUDA build).
TORCH := torch==2.13.0

.PHONY: install install-runtime demo walkthrough lint test bench gpu-check clean

install:
	$(PIP) install -q $(TORCH)
	$(PIP) install -q -e ".[export,finetune,apps,eval,test,lint,bench,tensorrt-rtx,gpu]"
	$(PYTHON) tools/link_tree.py  # build/typecheck: the package as mypy, pyright and editors can follow it

install-runtime:  # what a device needs: numpy, pillow, tokenizers, onnxruntime
	$(PIP) install -q -e .

demo: install  # paligemma-shapes (trained here): export, int8, every task on held-out scenes, overlays
	mkdir -p $(DEMO)
	$(PYTHON) -m paligemma_edge export $(SHAPES) --output $(DEMO)/shapes-fp32 --force \
		--mask-decoder $(SHAPES)/vae-oid.npz
	$(PYTHON) -m paligemma_edge quantize $(DEMO)/shapes-fp32 --precision int8 --output $(DEMO)/shapes-int8 --force
	$(PYTHON) -m paligemma_edge.shapes.demo $(DEMO)/shapes-int8 --out $(DEMO)/overlays --scenes 4
	$(PYTHON) -m paligemma_edge run $(DEMO)/shapes-int8 --image $(SHAPES)/sample.png --task detect \
		--objects circle --draw $(DEMO)/detections.png

# README "Walkthrough: teach paligemma-shapes a new shape": dataset, fine-tune (about 35 min on 2 CPU
# cores), export, quantize, engines, and eval of every bundle; the table is $(WALK)/results.md.
WALK_BUNDLES := base-fp32 star-fp32 star-int8 star-int4 star-int8-trt star-int4-trt
walkthrough: install
	$(PYTHON) -m paligemma_edge.shapes.dataset $(WALK)/shapes-star --add-shape star --force
	$(PYTHON) -m paligemma_edge dataset check $(WALK)/shapes-star
	$(PYTHON) -m paligemma_edge export $(SHAPES) -o $(WALK)/base-fp32 --mask-decoder $(SHAPES)/vae-oid.npz --force
	$(PYTHON) -m paligemma_edge finetune $(SHAPES) --dataset $(WALK)/shapes-star -o $(WALK)/star-lora \
		--target all --no-freeze-vision --lora-rank 32 --lora-alpha 64 --lr 1e-3 --batch-size 16 --steps 3000 \
		--log-every 50 --eval-every 500 --eval-lines 32 --save-every 250 --force
	$(PYTHON) -m paligemma_edge export $(WALK)/star-lora -o $(WALK)/star-fp32 --mask-decoder $(SHAPES)/vae-oid.npz --force
	$(PYTHON) -m paligemma_edge quantize $(WALK)/star-fp32 --precision int8 -o $(WALK)/star-int8 --force
	$(PYTHON) -m paligemma_edge quantize $(WALK)/star-fp32 --precision int4 -o $(WALK)/star-int4 --force
	$(PYTHON) -m paligemma_edge quantize $(WALK)/star-fp32 --precision int8 --target tensorrt \
		--calibration $(WALK)/shapes-star -o $(WALK)/star-int8-trt --force
	$(PYTHON) -m paligemma_edge quantize $(WALK)/star-fp32 --precision int4 --target tensorrt \
		--calibration $(WALK)/shapes-star -o $(WALK)/star-int4-trt --force
	$(PYTHON) -m paligemma_edge build-engines $(WALK)/star-int4-trt --backend tensorrt-rtx
	for b in $(WALK_BUNDLES); do \
		$(PYTHON) -m paligemma_edge eval $(WALK)/$$b --dataset $(WALK)/shapes-star:test --json $(WALK)/eval-$$b-star.json \
			--misses $(WALK)/misses-$$b-star.jsonl && \
		$(PYTHON) -m paligemma_edge eval $(WALK)/$$b --dataset shapes --json $(WALK)/eval-$$b-shapes.json || exit 1; \
	done
	$(PYTHON) -m paligemma_edge eval $(WALK)/star-fp32 --dataset $(WALK)/shapes-star:test \
		--prefix-variants shapes/walkthrough-variants.txt --json $(WALK)/variants.json --markdown $(WALK)/variants.md
	$(PYTHON) -m paligemma_edge.shapes.walkthrough $(WALK) | tee $(WALK)/results.md

lint: install  # ruff and mypy (pyproject.toml [tool.ruff], [tool.mypy]); CI runs it before the tests
	$(PYTHON) -m ruff check --no-cache .
	$(PYTHON) -m mypy

test: install
	$(PYTHON) -m pytest -q --durations=25

bench: install  # the standard set: mid (minutes); the 3B architectures take far longer on a CPU
	$(PYTHON) -m paligemma_edge bench --model mid --precision fp32,int8,int4

gpu-check:  # NVIDIA GPU machine: engines, GPU tests, every GPU backend against the CPU; table in build/gpu-check/gpu-check.md
	$(PYTHON) -m paligemma_edge.benchmarks.gpu_check --workdir build/gpu-check

clean:
	rm -rf build .pytest_cache
