# One image for both processes of a foldmesh node: run `fold-node` (the default) or
# `p2p-sidecar` (override the command); `foldctl` is in it too (docker exec … foldctl check).
#
# Two ways to build it, one image (same user, environment, ports, healthcheck, entrypoints):
#
#   From source, with a registry (rust and debian images pulled; the default, last stage):
#     docker build -t foldmesh .
#
#   With no registry (binaries built by cargo on the host, copied onto a locally imported
#   Debian base; what scripts/docker-image.sh does and the e2e test runs):
#     scripts/docker-image.sh
#   which amounts to
#     docker build --target prebuilt --build-arg BASE=foldmesh-base:bookworm \
#       -f Dockerfile -t foldmesh <dir holding bin/fold-node bin/p2p-sidecar bin/foldctl>
#
# No `# syntax=` line: nothing here needs a Dockerfile frontend from a registry. The stages are
# ordered so that `--target prebuilt` never reaches the `rust` stage, also with the classic
# builder (which builds every stage before its target).

# The Debian the runtime stages start from: debian:bookworm-slim from a registry, or a local
# import (`debootstrap --variant=minbase bookworm DIR && tar -C DIR -c . | docker import - NAME`).
ARG BASE=debian:bookworm-slim

# ---- runtime: what every image of a node is, whatever put the binaries in ------------------
FROM ${BASE} AS runtime-base
# ca-certificates comes from apt unless the base already has it (a debootstrap with
# --include=ca-certificates does), so a local base builds with no network at all.
RUN set -eu; \
    if ! dpkg -s ca-certificates >/dev/null 2>&1; then \
      apt-get update \
      && apt-get install -y --no-install-recommends ca-certificates \
      && rm -rf /var/lib/apt/lists/*; \
    fi; \
    groupadd --system --gid 10001 fold; \
    useradd --system --uid 10001 --gid fold --home-dir /data --shell /usr/sbin/nologin fold; \
    mkdir -p /data; \
    chown fold:fold /data
USER 10001:10001
WORKDIR /data
# Container defaults: listen on all interfaces (the binaries default to loopback), data and
# sockets under /data (a volume shared by the two containers of a node).
ENV FOLD_DATA_DIR=/data \
    FOLD_LISTEN=0.0.0.0:50051 \
    FOLD_ADMIN_LISTEN=0.0.0.0:9464 \
    FOLD_SIDECAR_LISTEN=/ip4/0.0.0.0/tcp/4001,/ip4/0.0.0.0/udp/4001/quic-v1 \
    FOLD_SIDECAR_ADMIN_LISTEN=0.0.0.0:9465
VOLUME ["/data"]
# gRPC API, plaintext health (when --health-listen is set), libp2p tcp + quic, metrics.
EXPOSE 50051/tcp 50052/tcp 4001/tcp 4001/udp 9464/tcp 9465/tcp
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
    CMD ["fold-node", "probe", "--addr", "127.0.0.1:50051"]
ENTRYPOINT []
CMD ["fold-node"]

# ---- prebuilt: the runtime with binaries from the build context (bin/) ----------------------
FROM runtime-base AS prebuilt
COPY bin/fold-node bin/p2p-sidecar bin/foldctl /usr/local/bin/

# ---- build: the binaries from source (needs the rust image) ---------------------------------
FROM rust:1.90-bookworm AS build
WORKDIR /src
# Dependencies first, so source edits do not rebuild the whole dependency tree.
COPY Cargo.toml Cargo.lock ./
COPY proto proto
COPY client client
COPY foldctl foldctl
COPY services services
COPY sidecar sidecar
COPY e2e e2e
COPY bench bench
COPY patches patches
RUN cargo build --release --locked -p fold-node -p p2p-sidecar -p foldctl \
 && mkdir -p /out \
 && cp target/release/fold-node target/release/p2p-sidecar target/release/foldctl /out/

# ---- runtime (default): the runtime with binaries from the build stage ----------------------
FROM runtime-base AS runtime
COPY --from=build /out/fold-node /out/p2p-sidecar /out/foldctl /usr/local/bin/
