# syntax=docker/dockerfile:1.7
#
# mapsnap: one image with the three binaries (static, musl) and the CRIU plugin.
#
#   mapsnap            the CLI (dump, restore, inspect, ...)
#   mapsnap-hook       OCI hook and CRIU action script (copied to the host by the agent's
#                      init container; static so it runs on any node)
#   mapsnap-operator   `controller` (Deployment) and `agent` (DaemonSet)
#   libmapsnap_criu.so the CRIU plugin (loaded by the host's CRIU; copied to the host into
#                      /usr/lib/criu): linked against glibc 2.28 symbol versions with zig, so
#                      it loads on every host from RHEL 8 on, and built without object storage
#
#   docker build -t ghcr.io/mapsnap/mapsnap:0.1.0 .
#   docker buildx build --platform linux/amd64,linux/arm64 -t ... --push .
#
# Not built in this repository's CI (no container engine there); see docs/OPERATOR.md.

ARG RUST_VERSION=1.95

# Built natively per platform (buildx runs arm64 under emulation): musl cross compilers
# are not packaged in Debian.
FROM rust:${RUST_VERSION}-bookworm AS build
ARG TARGETARCH
# musl-tools: C parts (zstd, ring, aws-lc) of the static binaries; cmake/clang: aws-lc-sys.
# python3-pip + zig (PyPI ziglang) + cargo-zigbuild: the CRIU plugin against glibc 2.28.
RUN apt-get update \
 && apt-get install -y --no-install-recommends musl-tools cmake clang file python3-pip \
 && rm -rf /var/lib/apt/lists/* \
 && pip3 install --break-system-packages --no-cache-dir ziglang==0.17.1 \
 && cargo install --locked cargo-zigbuild@0.24.1
RUN case "$TARGETARCH" in \
      amd64) echo x86_64 > /arch ;; \
      arm64) echo aarch64 > /arch ;; \
      *) echo "unsupported TARGETARCH $TARGETARCH" >&2; exit 1 ;; \
    esac \
 && rustup target add "$(cat /arch)-unknown-linux-musl"
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    set -eux; \
    arch="$(cat /arch)"; \
    cargo build --release --locked --target "$arch-unknown-linux-musl" \
        --bin mapsnap --bin mapsnap-hook --bin mapsnap-operator; \
    mkdir -p /out/bin /out/lib; \
    bash scripts/build-criu-plugin.sh --locked --out /out/lib/libmapsnap_criu.so; \
    for b in mapsnap mapsnap-hook mapsnap-operator; do \
        cp "target/$arch-unknown-linux-musl/release/$b" /out/bin/; \
        file "/out/bin/$b" | grep -Eq 'statically linked|static-pie linked' \
            || { echo "$b is not static" >&2; exit 1; }; \
    done

# Minimal final image: no shell, no package manager; CA certificates for object storage.
FROM gcr.io/distroless/static-debian12:nonroot
LABEL org.opencontainers.image.title="mapsnap" \
      org.opencontainers.image.description="eBPF map snapshots; Kubernetes operator for checkpoint, restore and migration with BPF maps" \
      org.opencontainers.image.source="https://github.com/mapsnap/mapsnap" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=build /out/bin/ /usr/local/bin/
COPY --from=build /out/lib/ /usr/local/lib/mapsnap/
# Non-root by default (the controller). The agent and its init containers run as root: the
# chart sets runAsUser 0 for them (host paths owned by root).
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/mapsnap-operator"]
CMD ["--help"]
