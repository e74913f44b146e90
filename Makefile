# paligemma-edge: `make demo` installs everything and runs the whole pipeline on the small
# paligemma-shapes model trained in this repo; `make test` runs the test suite (what CI runs).
PYTHON ?= python3
export PIP_ROOT_USER_ACTION := ignore
PIP := $(PYTHON) -m pip
DEMO := build/demo
SHAPES := models/paligemma-shapes
# torch is pinned to the CPU wheel this project is tested with (an open range pulls a CUDA build).
TORCH := torch==2.13.0

.PHONY: install install-runtime demo test bench clean

install:
	$(PIP) install -q $(TORCH)
	$(PIP) install -q -e ".[export,finetune,apps,eval,test,bench,tensorrt-rtx,gpu]"

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

test: install
	$(PYTHON) -m pytest -q

bench: install  # the standard set: mid (minutes); the 3B architectures take far longer on a CPU
	$(PYTHON) -m paligemma_edge bench --model mid --precision fp32,int8,int4

clean:
	rm -rf build .pytest_cache
