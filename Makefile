# tapsync — build, test and demo. `make test` and `make demo` run as root on
# a fresh Debian 12 machine and install what they need first.

GO        ?= go
GOFLAGS   ?=
BIN       := bin
# Debian packages the privileged tests, the e2e guest and the demo need.
DEB_PKGS  := qemu-system-x86 busybox-static iproute2 iputils-ping util-linux ca-certificates containerd runc containernetworking-plugins
TEST_TIMEOUT ?= 40m
# VERSION is what `tapsync version` prints and the image's tag.
VERSION   ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo dev)
IMAGE_REPO ?= tapsync/tapsync

.PHONY: all build deps test test-unit vet demo bench clean generate image faults

all: build

build:
	$(GO) build ./...
	$(GO) build -ldflags "-X main.version=$(VERSION)" -o $(BIN)/tapsync ./cmd/tapsync
	$(GO) build -o $(BIN)/tapsync-demo ./e2e/demo
	$(GO) build -trimpath -ldflags "-s -w" -o $(BIN)/tapsync-qemu ./cmd/tapsync-qemu

# image builds the container image without Docker (deploy/image):
# $(BIN)/image/ (OCI layout), $(BIN)/tapsync-image.tar (for ctr images
# import and crane push) and $(BIN)/daemonset.yaml naming its tag
# $(IMAGE_REPO):$(VERSION). One commit gives one digest.
image:
	$(GO) run ./deploy/image -out $(BIN) -version $(VERSION) -repo $(IMAGE_REPO) -daemonset deploy/daemonset.yaml

# deps installs missing Debian packages; nothing is done when all are present.
deps:
	@missing=$$(for p in $(DEB_PKGS); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q 'install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "installing:" $$missing; \
		if [ "$$(id -u)" != 0 ]; then echo "need root to apt-get install $$missing" >&2; exit 1; fi; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	fi
	$(GO) mod download

vet:
	@fmt=$$(gofmt -l $$(git ls-files '*.go' 2>/dev/null || find . -name '*.go')); \
	if [ -n "$$fmt" ]; then echo "gofmt needed:" $$fmt >&2; exit 1; fi
	$(GO) vet ./...
	$(GO) vet -tags e2e ./...
	$(GO) vet -tags 'e2e faults' ./...

# test runs everything: unit tests, privileged tests (real netns, taps, tc,
# QEMU) and the e2e suite behind the e2e build tag. As root nothing skips.
test: deps vet
	$(GO) test -race -count=1 -timeout $(TEST_TIMEOUT) -tags e2e ./...

# faults runs issue 17's slow fault scenarios (e2e/faults_test.go, build
# tag faults; run it before each stop): QEMU killed as it enters
# netdev_add and 0–16 ms after a link appears, a 3000-link netlink
# burst that overflows the socket, a churn soak of
# FAULTS_SOAK (default 3m) with no fd or goroutine leak, and 10
# simultaneous starts on one state dir. The fast ones stay in `make test`:
# cmd/tapsync TestFullStateDirIsCauseState (state dir full),
# TestHungQEMUsDoNotDelayOthers (hung QEMUs) and e2e
# TestGuestRepairedAfterResetAndFlush (guest reset).
faults: deps vet
	$(GO) test -race -count=1 -timeout 30m -tags 'e2e faults' -run '^TestFault' ./e2e/

# test-unit runs what needs neither root nor QEMU.
test-unit:
	$(GO) test -race -count=1 ./...

# fuzz runs each fuzz target for FUZZTIME; their seed corpora (and any
# failures saved in testdata/fuzz) run in every `go test`. FUZZ_TARGETS
# lists package:FuzzName; add yours with another `FUZZ_TARGETS +=` line.
FUZZTIME ?= 20s
# Go minimizes each new interesting input for up to 60 s by default, and
# the fuzzing stops meanwhile: FuzzReadMessages spent 57 of its 60 s so
# (20 k execs; 850 k in 30 s with 5 s).
FUZZMINIMIZE ?= 5s
FUZZ_TARGETS += ./qmp:FuzzReadMessages ./qmp:FuzzParseInfoNetwork ./qmp:FuzzChoosePlacement ./qmp:FuzzParseQtree ./qmp:FuzzHMPReply ./qmp:FuzzUnquote
FUZZ_TARGETS += ./watcher:FuzzInDir ./watcher:FuzzUnderDir ./watcher:FuzzQMPSocket ./watcher:FuzzStatusUIDs ./watcher:FuzzNetlinkMessage
FUZZ_TARGETS += ./state:FuzzLoad ./cmd/tapsync:FuzzConfig ./datapath:FuzzParseRtnl ./datapath:FuzzParseLink ./datapath:FuzzNLAnswers
FUZZ_TARGETS += ./cmd/tapsync-qemu:FuzzWrapperArgv
.PHONY: fuzz
fuzz:
	@set -e; for t in $(FUZZ_TARGETS); do \
		echo "fuzz $$t for $(FUZZTIME)"; \
		$(GO) test -run '^$$' -fuzz "^$${t#*:}\$$" -fuzztime $(FUZZTIME) -fuzzminimizetime $(FUZZMINIMIZE) $${t%%:*}; \
	done

demo: deps build
	./$(BIN)/tapsync-demo -tapsync $(BIN)/tapsync

# bench prints issue 9's table (docs/benchmarks.md): B1/B1' for tapsync
# and the floor program side by side, B5 (CNI ADD → a usable address in
# the guest), B2–B4 at N sandboxes (default 250, fewer when memory is
# short). A measurement, not a test; takes minutes.
bench: deps build
	$(GO) build -o $(BIN)/tapsync-bench ./e2e/bench
	$(GO) build -o $(BIN)/tapsync-floor ./e2e/bench/floor
	./$(BIN)/tapsync-bench -n $${N:-250} -tapsync $(BIN)/tapsync -floor $(BIN)/tapsync-floor

# generate rebuilds agent/agentpb from its .proto files (a developer step, not
# part of test): protoc and the well-known protos from Debian's
# protobuf-compiler and libprotobuf-dev, protoc-gen-go at the
# google.golang.org/protobuf version go.mod pins.
PROTO_INCLUDE ?= /usr/include
generate:
	$(GO) build -o $(BIN)/protoc-gen-go google.golang.org/protobuf/cmd/protoc-gen-go
	protoc --plugin=protoc-gen-go=$(BIN)/protoc-gen-go -I . -I $(PROTO_INCLUDE) \
		--go_out=. --go_opt=paths=source_relative \
		agent/agentpb/types.proto agent/agentpb/agent.proto agent/agentpb/health.proto

clean:
	rm -rf $(BIN)
