# chiller-metrics: see README.md. Targets that need Docker and kind say so.
SHELL := /bin/bash
CARGO ?= cargo
TOOLS := $(CURDIR)/.tools
export PATH := $(TOOLS)/bin:$(TOOLS)/venv/bin:$(PATH)
NAMESPACE ?= chiller-metrics
SERVICE ?= chiller-metrics
IMAGE ?= chiller-metrics:dev
KIND_CLUSTER ?= chiller-metrics

.PHONY: all build demo test tools lint fmt e2e image kind-load certs bench fuzz golden clean

all: build

build:
	$(CARGO) build --release --locked

## Local demo: HTTPS webhook with generated certs, a real chiller pod through it.
demo:
	./scripts/demo.sh

## Everything CI runs: lint, unit, golden, schema, HTTPS, gunicorn, promtool, chart tests.
test: tools
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --all-targets --locked -- -D warnings
	$(CARGO) test --all-targets --locked

## Installs the test tools that need no root into .tools/ (gunicorn, flask, helm, kubectl).
tools:
	./scripts/tools.sh

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --all-targets --locked -- -D warnings

fmt:
	$(CARGO) fmt --all

## Regenerates the golden files from the current code.
golden:
	UPDATE_GOLDEN=1 $(CARGO) test --test golden --locked

## Self-managed certificates for the in-cluster Service (manifests/ explains both modes).
certs:
	$(CARGO) run --quiet --release --locked -- certs --out certs --dns $(SERVICE) --dns $(SERVICE).$(NAMESPACE) --dns $(SERVICE).$(NAMESPACE).svc --dns $(SERVICE).$(NAMESPACE).svc.cluster.local

clean:
	$(CARGO) clean
	rm -rf .tools .bench
