# Thin wrapper over the CMake presets. `make run` and `make test` work on a fresh Debian 12 as root.
STATE ?= .kiln-state
MANIFESTS ?= examples/manifests

.PHONY: deps configure build test chaos run bench asan clean

deps:
	@scripts/install-deps

configure: deps
	@cmake --preset default >/dev/null

build: configure
	@cmake --build --preset default

test: build
	@ctest --preset default

# The long chaos run: kilnd SIGKILLed CHAOS_ITERATIONS times at random moments (the short version
# runs in `make test`). KILN_CHAOS_SEED=N repeats a run's choices; see docs/testing.md.
CHAOS_ITERATIONS ?= 200
chaos: build
	@KILN_CHAOS_ITERATIONS=$(CHAOS_ITERATIONS) build/bin/kiln_chaos_tests --durations yes "[chaos]"

run: build
	@mkdir -p $(STATE)
	build/bin/kilnd --manifests $(MANIFESTS) --state $(STATE)

bench: build
	@scripts/install-deps --bench
	@cmake --build --preset default --target bench

# Unit and integration tests again under AddressSanitizer + UBSan (CI runs this after `make test`).
asan: deps
	@cmake --preset asan >/dev/null
	@cmake --build --preset asan
	@ctest --preset asan

clean:
	rm -rf build build-asan
