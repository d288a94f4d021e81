# mapsnap: build, lint, test and demo entry points. CI runs `make test` (.ci/run).
#
#   make deps    install system packages and Rust tools, mount bpffs (root; scripts/install-deps.sh)
#   make build   release build of the workspace
#   make lint    rustfmt check + clippy (warnings are errors)
#   make test    deps + lint + every test (kernel tests need root)
#   make bench   the benchmark of docs/PERFORMANCE.md (BENCH_ARGS=--quick for a smoke run)
#   make demo    deps + build + scripts/demo.sh (pinned maps -> dump -> restore -> diff)
#   make clean   cargo clean, demo/test leftovers in bpffs and /tmp
#
# Tests run with cargo-nextest when it is installed, otherwise with `cargo test`;
# force one with TEST_RUNNER=cargo or TEST_RUNNER=nextest.

SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c
.NOTPARALLEL:
.DEFAULT_GOAL := build

CARGO ?= cargo
TEST_RUNNER ?= auto
TARGET_DIR := $(or $(CARGO_TARGET_DIR),$(CURDIR)/target)
MAPSNAP ?= $(TARGET_DIR)/release/mapsnap

export RUST_BACKTRACE ?= 1

.PHONY: deps build lint fmt-check clippy test test-only demo bench clean

deps:
	bash scripts/install-deps.sh

build:
	$(CARGO) build --release --workspace

fmt-check:
	$(CARGO) fmt --all -- --check

clippy:
	$(CARGO) clippy --workspace --all-targets -- -D warnings

lint: fmt-check clippy

# Kernel tests create, pin and load BPF objects: they need root and bpffs (make deps).
test: deps lint test-only

test-only:
	CARGO="$(CARGO)" TEST_RUNNER="$(TEST_RUNNER)" bash scripts/run-tests.sh

# The full benchmark table of docs/PERFORMANCE.md (several minutes; root).
bench: deps build
	python3 bench/bench.py --mapsnap "$(MAPSNAP)" $(BENCH_ARGS)

demo: deps build
	MAPSNAP="$(MAPSNAP)" bash scripts/demo.sh

clean:
	$(CARGO) clean
	rm -f /tmp/mapsnap-demo.snap /tmp/mapsnap-demo.snap.manifest.json
	@for d in /sys/fs/bpf/mapsnap-demo /sys/fs/bpf/mapsnap-test; do \
	    if [[ -e "$$d" ]]; then echo "rm -rf $$d"; rm -rf "$$d" || true; fi; \
	done
