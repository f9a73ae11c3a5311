# chiller-metrics: see README.md. Targets that need Docker and kind say so.
SHELL := /bin/bash
CARGO ?= cargo
TOOLS := $(CURDIR)/.tools
export PATH := $(TOOLS)/bin:$(TOOLS)/venv/bin:$(PATH)
NAMESPACE ?= chiller-metrics
SERVICE ?= chiller-metrics
# The tag the chart pulls by default (its appVersion).
IMAGE ?= chiller-metrics:$(shell sed -n "s/^appVersion: *\"\?\([^\"]*\)\"\?/\1/p" manifests/chart/chiller-metrics/Chart.yaml)
KIND_CLUSTER ?= chiller-metrics

.PHONY: all build demo test system-packages tools cluster-tools cluster-up cluster-down cluster-load e2e-local lint fmt e2e image kind-load certs manifests bench bench-admission scale server-profile hot-symbols fuzz golden clean

all: build

build:
	$(CARGO) build --release --locked

## Local demo: HTTPS webhook with generated certs, a real chiller pod through it.
demo:
	./scripts/demo.sh

## Limits: every test the one tests/time-limits gives it (default 300 s), a
## test process (one module) at most TEST_BINARY_TIMEOUT seconds (default
## 3600), the whole `cargo test` TEST_TIMEOUT (default 80m).
TEST_TIMEOUT ?= 80m
export TEST_BINARY_TIMEOUT ?= 3600

## Everything CI runs: lint, unit, golden, schema, HTTPS, gunicorn, promtool, chart tests.
test: system-packages tools cluster-tools
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --all-targets --locked -- -D warnings
	@mkdir -p target
	@# tests/offline/demo.rs runs scripts/demo.sh, whose client `cargo test` builds only as a test harness.
	$(CARGO) build --locked --bin chiller-metrics --example admission_client
	@# Two integration test binaries, tests/offline and tests/cluster: scripts/test-timeout.sh runs
	@# each module in a process of its own, one after another, every test under its time limit
	@# (tests/time-limits); the whole run is under another.
	set -o pipefail; CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUNNER=$(CURDIR)/scripts/test-timeout.sh \
		timeout --kill-after=60 $(TEST_TIMEOUT) $(CARGO) test --all-targets --locked 2>&1 | tee target/test-output.log
	@awk '/^test result:/ { passed += $$4; failed += $$6 } END { printf "tests: %d passed, %d failed\n", passed, failed }' target/test-output.log

## Installs the Debian packages the tests need (as root or with password-less
## sudo); otherwise says which to install and why.
system-packages:
	./scripts/system-packages.sh

## Installs the test tools that need no root into .tools/ (gunicorn, flask, helm, kubectl).
tools:
	./scripts/tools.sh

## Builds the control plane (etcd, kube-apiserver, kube-controller-manager,
## kube-scheduler), the test node's kubelet and kube-proxy, and kubectl from the
## Go modules pinned in tools/cluster, and the rest of the real test node (runc,
## containerd, CNI plugins, crictl, CoreDNS) from tools/{runc,containerd,
## cni-plugins,crictl,coredns}, each into .tools/MODULE/bin (needs Go 1.26+;
## runc needs gcc and libseccomp-dev, which make system-packages installs).
cluster-tools:
	for module in cluster runc containerd cni-plugins crictl coredns; do ./tools/build.sh $$module || exit; done

## Our kind: the tests' cluster with its real node (kubelet, containerd,
## CoreDNS) and the images of our chart, the operator and the test app, left
## running in its own network namespace (as root); prints `export KUBECONFIG=...`.
cluster-up: system-packages tools cluster-tools
	@$(CARGO) run --quiet --locked --example local_cluster -- up

## Stops the local cluster and leaves the host as it was.
cluster-down:
	@$(CARGO) run --quiet --locked --example local_cluster -- down

## Loads an image of your own onto the local cluster's node:
##   make cluster-load NAME=my-app:dev ARCHIVE=my-app.oci.tar
##   make cluster-load NAME=my-app:dev ROOTFS=./rootfs ENTRYPOINT="/usr/bin/my-app --flag"
cluster-load:
	@$(CARGO) run --quiet --locked --example local_cluster -- load $(NAME) \
		$(if $(ARCHIVE),--archive $(ARCHIVE)) $(if $(ROOTFS),--rootfs $(ROOTFS) -- $(ENTRYPOINT))

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --all-targets --locked -- -D warnings

fmt:
	$(CARGO) fmt --all

## Regenerates the golden files from the current code.
golden:
	UPDATE_GOLDEN=1 $(CARGO) test --test offline --locked -- golden::

## Self-managed certificates for the in-cluster Service (manifests/ explains both modes).
## Also fills manifests/overlays/self-managed (serving pair + caBundle patch).
certs:
	$(CARGO) run --quiet --release --locked -- certs --out certs --dns $(SERVICE) --dns $(SERVICE).$(NAMESPACE) --dns $(SERVICE).$(NAMESPACE).svc --dns $(SERVICE).$(NAMESPACE).svc.cluster.local
	./manifests/overlays/self-managed/fill-certs.sh certs

## Container image (needs Docker): IMAGE=chiller-metrics:dev by default.
image:
	docker build -t $(IMAGE) .

## Loads the image into the kind cluster KIND_CLUSTER (needs Docker and kind).
kind-load: image
	kind load docker-image $(IMAGE) --name $(KIND_CLUSTER)

## Renders what `kubectl apply -k` / `helm install` would apply, into manifests/out/.
manifests: tools
	mkdir -p manifests/out
	kubectl kustomize manifests/overlays/cert-manager > manifests/out/cert-manager.yaml
	helm template chiller-metrics manifests/chart/chiller-metrics --namespace $(NAMESPACE) > manifests/out/helm-default.yaml
	@echo "rendered into manifests/out/ (self-managed: make certs, then kubectl kustomize manifests/overlays/self-managed)"

## The kind journey without Docker (part of `make test`): the scenario of
## `make e2e` (tests/e2e/scenario.sh) on our own real node (kubelet,
## containerd, runc, CNI, kube-proxy, CoreDNS); everything is real. As root.
e2e-local: system-packages tools cluster-tools
	$(CARGO) test --locked --test cluster -- e2e_ --nocapture

## End-to-end on kind (needs Docker and kind; skipped with a message otherwise).
## KEEP_CLUSTER=1 keeps the cluster afterwards.
e2e:
	./tests/e2e/run.sh

## Benchmarks (not part of `make test`): criterion mutation benches, the heap
## the reconcile loop's stores hold per pod and per namespace, then the
## HTTPS load benchmark against the baseline server and the Go webhook of
## benches/go-webhook (needs h2load and Go), with 16
## clients and again with 4, each with its raw figures in .bench/. BENCHMARKS.md explains.
bench:
	$(CARGO) bench --locked --bench mutate
	$(CARGO) bench --locked --bench cache_memory
	BENCH_OUT=.bench/16-clients ./scripts/bench.sh
	BENCH_OUT=.bench/4-clients CLIENTS=4 STREAMS=1 LARGE_PODS=0 ./scripts/bench.sh

## What a pod create pays (not part of `make test`): the tests' control plane
## (cluster-tools), pods created at RATE/s (100) for SECONDS (60) with no
## webhook, with ours (the chart, `serve` out of cluster; then with
## --no-reconcile, the webhook alone) and with the
## controller-runtime webhook of benches/go-webhook (needs Go); p50/p99 of the
## create and the API server's admission histogram. BENCHMARKS.md explains.
bench-admission: tools cluster-tools
	$(CARGO) bench --locked --bench admission --no-run
	timeout --kill-after=30 20m $(CARGO) bench --locked --bench admission

## The reconcile loop at scale (not part of `make test`): SCALE_NAMESPACES
## namespaces (default 1000) of 2 Deployments, SCALE_PODS pods in all (default
## 10 per namespace) on kwok nodes, labeled at once; prints the table and
## writes it into BENCHMARKS.md. Bounded by SCALE_TIMEOUT (default 2h).
SCALE_TIMEOUT ?= 2h
scale: tools cluster-tools
	$(CARGO) build --release --locked --bin chiller-metrics
	SCALE_SERVE_BINARY=$(CURDIR)/target/release/chiller-metrics \
		timeout --kill-after=60 $(SCALE_TIMEOUT) $(CARGO) test --locked --test cluster -- \
		--ignored --exact apiserver_scale::the_reconcile_loop_at_scale_into_benchmarks --nocapture

## Instructions, cache and branch misses per request over the whole server,
## the webhook against the baseline (callgrind; PROTO=h1|h2). BENCHMARKS.md explains.
server-profile:
	./scripts/server-profile.sh

## Regenerates layout/hot-symbols.txt, the functions serving runs, which the
## release link places together (build.rs); needs valgrind and h2load.
hot-symbols:
	./scripts/hot-symbols.sh

## Fuzzes the request path for FUZZ_SECONDS (default 300) with cargo-fuzz on the
## stable toolchain (RUSTC_BOOTSTRAP); installs cargo-fuzz if it is missing.
FUZZ_SECONDS ?= 300
fuzz:
	command -v cargo-fuzz >/dev/null || $(CARGO) install --locked cargo-fuzz
	cd fuzz && RUSTC_BOOTSTRAP=1 $(CARGO) fuzz run -O review corpus/review -- \
		-max_total_time=$(FUZZ_SECONDS) -max_len=65536 -dict=review.dict

clean:
	$(CARGO) clean
	rm -rf .tools .bench
