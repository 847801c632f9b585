# syntax=docker/dockerfile:1
#
# The sluice agent image: a static (musl) binary, kubectl, git and the
# OpenSSH client on Alpine.
#
#   docker build -t ghcr.io/sluice-dev/sluice:0.1.0 .
#   docker buildx build --platform linux/amd64,linux/arm64 -t ... --push .
#
# kubectl is in the image because sluice renders kustomize folders with
# `kubectl kustomize`, as Argo CD and Flux do; git and ssh because every
# fetch runs the git command line (protocol v2, shallow fetches), as Argo
# CD's does.

FROM rust:1-alpine AS builder
# TARGETARCH (amd64, arm64, ...) is set by BuildKit from --platform.
ARG TARGETARCH
ARG KUBECTL_VERSION=v1.32.4
RUN apk add --no-cache musl-dev openssl-dev openssl-libs-static pkgconf perl make git \
        zlib-dev zlib-static curl
# Link OpenSSL (kube, reqwest, git2) statically.
ENV OPENSSL_STATIC=1
WORKDIR /src

# kubectl, checked against the release's published sha256.
RUN set -eu; \
    arch="${TARGETARCH:-$(uname -m | sed -e 's/x86_64/amd64/' -e 's/aarch64/arm64/')}"; \
    base="https://dl.k8s.io/release/${KUBECTL_VERSION}/bin/linux/${arch}"; \
    curl -fsSLo /usr/local/bin/kubectl "${base}/kubectl"; \
    curl -fsSLo /tmp/kubectl.sha256 "${base}/kubectl.sha256"; \
    echo "$(cat /tmp/kubectl.sha256)  /usr/local/bin/kubectl" | sha256sum -c -; \
    chmod 0755 /usr/local/bin/kubectl; \
    rm /tmp/kubectl.sha256

COPY . .
# The `sluice` binary (package agent/cli). The target directory is a cache
# mount, so the binary is copied out of it in the same step.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/usr/local/cargo/git \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p sluice \
    && install -m 0755 target/release/sluice /usr/local/bin/sluice

FROM alpine:3.20
RUN apk add --no-cache git openssh-client ca-certificates \
    && adduser -D -H -u 65532 -s /sbin/nologin nonroot
COPY --from=builder /usr/local/bin/sluice /usr/local/bin/sluice
COPY --from=builder /usr/local/bin/kubectl /usr/local/bin/kubectl
ENV SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt
USER 65532:65532
EXPOSE 8181
ENTRYPOINT ["/usr/local/bin/sluice"]
CMD ["run"]
