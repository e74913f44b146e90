# paligemma-edge: `make demo` installs everything and runs the whole pipeline on a tiny
# model built locally; `make test` runs the test suite (what CI runs).
PYTHON ?= python3
export PIP_ROOT_USER_ACTION := ignore
PIP := $(PYTHON) -m pip
DEMO := build/demo
# torch is pinned to the CPU wheel this project is tested with (an open range pulls a CUDA build).
TORCH := torch==2.13.0

.PHONY: install install-runtime demo test bench clean

install:
	$(PIP) install -q $(TORCH)
	$(PIP) install -q -e ".[export,apps,test,bench,tensorrt-rtx]"

install-runtime:  # what a device needs: numpy, pillow, tokenizers, onnxruntime
	$(PIP) install -q -e .

demo: install
	$(PYTHON) -m paligemma_edge.export.tiny $(DEMO)/checkpoint --family 2
	$(PYTHON) -m paligemma_edge export $(DEMO)/checkpoint --output $(DEMO)/bundle --force \
		--mask-decoder $(DEMO)/checkpoint/vae-oid.npz
	$(PYTHON) -m paligemma_edge run $(DEMO)/bundle --image $(DEMO)/checkpoint/sample.png \
		--prompt "caption en" --prompt "answer en how many shapes are there" --max-new-tokens 12 --json
	$(PYTHON) -m paligemma_edge run $(DEMO)/bundle --image $(DEMO)/checkpoint/sample.png \
		--task detect --objects "circle ; square" --draw $(DEMO)/detections.png

test: install
	$(PYTHON) -m pytest -q

bench: install  # the standard set: mid (minutes); the 3B architectures take far longer on a CPU
	$(PYTHON) -m paligemma_edge bench --model mid --precision fp32,int8,int4

clean:
	rm -rf build .pytest_cache
