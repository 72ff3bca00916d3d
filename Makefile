# ldm-lab developer commands. `make setup` creates .venv in the repo root and installs everything.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
RUN := $(BIN)/python

.PHONY: setup test test-slow lint demo demo-lora pretrained data bench clean

setup:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip uv
	$(BIN)/uv pip install --python $(RUN) -e ".[dev]"

test:
	$(BIN)/pytest -q -m "not slow"

test-slow:
	$(BIN)/pytest -q -m slow

lint:
	$(BIN)/ruff check src tests

# The main job: a text-to-image UNet trained from scratch on the shapes world (CPU, offline).
# accelerate launch gives each process one CPU thread unless told otherwise.
NPROC := $(shell nproc 2>/dev/null || echo 2)
demo:
	$(BIN)/accelerate launch --num_processes 1 --num_machines 1 --num_cpu_threads_per_process $(NPROC) \
		--mixed_precision no --dynamo_backend no -m ldm_lab.train recipes/shapes/t2i.yaml

# LoRA demo: teach the shipped base (data/pretrained/shapes-t2i) the colour pink.
demo-lora:
	$(BIN)/ldm-lab train recipes/shapes/lora.yaml

# Re-train everything shipped in data/pretrained/: the stage-one parts (autoencoder, CLIP) and
# the main job's pipeline, which the fine-tuning demos start from.
pretrained:
	$(BIN)/ldm-lab train recipes/shapes/autoencoder.yaml
	$(BIN)/ldm-lab train recipes/shapes/clip.yaml
	$(BIN)/ldm-lab train recipes/shapes/t2i.yaml output.export_to=data/pretrained/shapes-t2i

clean:
	rm -rf runs .pytest_cache
