# medgen: `make demo` runs the main job, `make test` runs every test. Both set up first.
PYTHON ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.medgen-setup
FIXTURES := target/fixtures

.PHONY: setup build fixtures test demo clean-fixtures

setup: $(STAMP)

# Idempotent: redone only when the requirements change.
$(STAMP): tests/requirements.txt
	test -x $(VPY) || $(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install --quiet --disable-pip-version-check -r tests/requirements.txt
	ln -sfn "$$($(VPY) -c 'import os, torch; print(os.path.relpath(os.path.dirname(torch.__file__), "$(VENV)"))')" $(VENV)/libtorch
	touch $@

build: setup
	cargo build --release

# Parity fixtures: MONAI/PyTorch objects with fixed seeds, their state dicts and outputs.
fixtures: setup
	$(VPY) tests/gen_checkpoint_fixtures.py --out $(FIXTURES)/checkpoint
	$(VPY) tests/gen_aekl_fixtures.py --out $(FIXTURES)/aekl
	$(VPY) tests/gen_scheduler_fixtures.py --out $(FIXTURES)/schedulers
	$(VPY) tests/gen_unet_fixtures.py --out $(FIXTURES)/unet
	$(VPY) tests/gen_sampling_fixtures.py --out $(FIXTURES)/sampling

test: fixtures
	MEDGEN_FIXTURES=$(CURDIR)/$(FIXTURES) MEDGEN_VENV_PYTHON=$(CURDIR)/$(VPY) cargo test -- --test-threads=1

demo: build
	@echo "medgen demo: the end-to-end FLAIR->T1w job is not built yet (issues 5-7)."
	@echo "What works today: medgen convert / forward / inspect for AutoencoderKL (see README)."
	./target/release/medgen --help

clean-fixtures:
	rm -rf $(FIXTURES)
