# syntax=docker/dockerfile:1
# One image for both processes of a foldmesh node: run `fold-node` (the default) or
# `p2p-sidecar` (override the command); `foldctl` is in it too (docker exec … foldctl check).
# Build: docker build -t foldmesh .

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
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p fold-node -p p2p-sidecar -p foldctl \
 && mkdir -p /out \
 && cp target/release/fold-node target/release/p2p-sidecar target/release/foldctl /out/

FROM debian:bookworm-slim AS runtime
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 fold \
 && useradd --system --uid 10001 --gid fold --home-dir /data --shell /usr/sbin/nologin fold \
 && mkdir -p /data \
 && chown fold:fold /data
COPY --from=build /out/fold-node /out/p2p-sidecar /out/foldctl /usr/local/bin/
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
