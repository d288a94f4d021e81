# mapsnap: build, lint, test and demo entry points. CI runs `make test` (.ci/run).
#
#   make deps    install system packages and Rust tools, mount bpffs (root; scripts/install-deps.sh)
#   make build   release build of the workspace
#   make lint    rustfmt check + clippy (warnings are errors)
#   make test    deps + lint + every test (kernel tests need root)
#   make bench   the benchmark of docs/PERFORMANCE.md (BENCH_ARGS=--quick for a smoke run)
#   make bench-downtime  checkpoint/restore downtime with Podman + runc + CRIU, with and
#                without mapsnap (docs/PERFORMANCE.md; BENCH_ARGS=--quick for a smoke run)
#   make demo    deps + build + scripts/demo.sh (pinned maps -> dump -> restore -> diff)
#   make fuzz    every cargo-fuzz target for FUZZ_SECONDS each (default 600); fuzz-smoke: 20 s
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

.PHONY: deps build lint fmt-check clippy test test-only demo bench bench-downtime clean fuzz fuzz-smoke

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
test: deps lint fuzz-smoke test-only

test-only:
	CARGO="$(CARGO)" TEST_RUNNER="$(TEST_RUNNER)" bash scripts/run-tests.sh

# Fuzzing: fuzz/ (snapshot reader, manifest, OCI state, annotations) and criu-plugin/fuzz
# (the dump index), each a cargo workspace of its own. cargo-fuzz passes -Z flags
# (-Zsanitizer=address): RUSTC_BOOTSTRAP=1 lets this stable toolchain take them. Each
# target runs FUZZ_SECONDS on its seeds plus a corpus kept in <dir>/corpus/<target>; a crash
# stops the run and leaves the input in <dir>/artifacts/<target>/.
FUZZ_SECONDS ?= 600
# --release (optimised, the default) for real runs; fuzz-smoke builds --dev, which compiles
# in a fraction of the time and still runs every target with the sanitizer.
FUZZ_BUILD ?= --release
FUZZ_DIRS := fuzz $(wildcard criu-plugin/fuzz)

fuzz:
	@command -v cargo-fuzz >/dev/null || $(CARGO) install cargo-fuzz --locked
	@for d in $(FUZZ_DIRS); do \
	    for t in $$(cd $$d && RUSTC_BOOTSTRAP=1 $(CARGO) fuzz list); do \
	        echo "==> fuzz $$d $$t for $(FUZZ_SECONDS)s"; \
	        mkdir -p $$d/corpus/$$t; \
	        (cd $$d && RUSTC_BOOTSTRAP=1 $(CARGO) fuzz run $(FUZZ_BUILD) $$t corpus/$$t seeds/$$t \
	            -- -max_total_time=$(FUZZ_SECONDS) -timeout=10 -rss_limit_mb=2048 -print_final_stats=1) \
	            2>&1 | grep -vE '^#[0-9]+' \
	            || exit 1; \
	    done; \
	done

# A short run of every target: part of `make test` (before the tests, so the test runner's
# summary closes the output), so CI fuzzes each for a few seconds.
# Under CI (CI=true) the sanitizer builds (~3 GB) are removed afterwards: the tests need the disk.
fuzz-smoke:
	$(MAKE) fuzz FUZZ_SECONDS=20 FUZZ_BUILD=--dev
	@if [[ "$${CI:-}" == true ]]; then \
	    for d in $(FUZZ_DIRS); do rm -rf $$d/target; done; \
	fi

# The full benchmark table of docs/PERFORMANCE.md (several minutes; root).
bench: deps build
	python3 bench/bench.py --mapsnap "$(MAPSNAP)" $(BENCH_ARGS)

# Podman + runc + CRIU with the hook and the plugin installed under a private root (root; tens
# of minutes). Builds what it runs (release hook and plugin, the C workload and anchor).
bench-downtime: deps
	python3 bench/downtime.py $(BENCH_ARGS)

demo: deps build
	MAPSNAP="$(MAPSNAP)" bash scripts/demo.sh

clean:
	$(CARGO) clean
	rm -f /tmp/mapsnap-demo.snap /tmp/mapsnap-demo.snap.manifest.json
	@for d in /sys/fs/bpf/mapsnap-demo /sys/fs/bpf/mapsnap-test; do \
	    if [[ -e "$$d" ]]; then echo "rm -rf $$d"; rm -rf "$$d" || true; fi; \
	done
