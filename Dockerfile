# syntax=docker/dockerfile:1
#
# deepmad's container images: one binary, `deepmad`, in two runtimes.
#
#   docker build --target cpu  -t deepmad:cpu  .   # coordinator, CPU workers, the CLI
#   docker build --target cuda -t deepmad:cuda .   # GPU workers (built with --features cuda)
#
# compose.yaml builds both; docs/deploy.md is the deployment guide. The images set no
# DEEPMAD_* variables: a deployment's settings all come from its compose.yaml (or its
# Kubernetes manifests), which is what cli/tests/compose.rs checks with --check-config.

# The toolchain the project is built and tested with (rust-toolchain.toml follows stable; the
# image pins the release CI used when this file was written). Must be >= rust-version in
# Cargo.toml.
ARG RUST_VERSION=1.95.0
# CUDA 12.x runs on any driver from the 525 series on, the GPU machines' 580 included.
ARG CUDA_VERSION=12.6.3

# ---------------------------------------------------------------------------------------------
# CPU build: the release binary without CUDA.
FROM rust:${RUST_VERSION}-bookworm AS builder
ARG RUST_VERSION
# rust-toolchain.toml says "stable", which rustup would resolve by downloading the newest
# release; naming the image's toolchain keeps the build pinned and offline after the fetch.
ENV RUSTUP_TOOLCHAIN=${RUST_VERSION}
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p deepmad --bin deepmad \
    && install -m 0755 target/release/deepmad /usr/local/bin/deepmad

# ---------------------------------------------------------------------------------------------
# CPU runtime: the coordinator, CPU workers and the command-line client.
FROM debian:bookworm-slim AS cpu
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/*
# A fixed uid, so volume permissions are the same on every node. /var/lib/deepmad is the
# working directory: sweeps name datasets relative to it (compose mounts ./data at data/), and
# work/ exists owned by the user so a fresh named volume mounted there inherits that owner.
RUN useradd --system --uid 10001 --user-group --home-dir /var/lib/deepmad --shell /usr/sbin/nologin deepmad \
    && install -d -o deepmad -g deepmad /var/lib/deepmad /var/lib/deepmad/work /var/lib/deepmad/data \
        /var/lib/deepmad/weights
COPY --from=builder /usr/local/bin/deepmad /usr/local/bin/deepmad
USER deepmad
WORKDIR /var/lib/deepmad
EXPOSE 50051 9090 8080
CMD ["deepmad", "--help"]

# ---------------------------------------------------------------------------------------------
# CUDA build: the same binary with candle's CUDA backend (the cli crate's `cuda` feature).
FROM nvidia/cuda:${CUDA_VERSION}-devel-ubuntu22.04 AS cuda-builder
ARG RUST_VERSION
# candle compiles its kernels for one compute capability, and no GPU is there to ask during
# the build: 90 is the H100 / H200 (80: A100, 86: A10 / RTX 30xx, 89: L4 / L40S / RTX 40xx).
ARG CUDA_COMPUTE_CAP=90
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates g++ \
    && rm -rf /var/lib/apt/lists/*
# The same pinned toolchain as the CPU build, taken from the official image (rustup's
# toolchains are built for old glibc and run on Ubuntu 22.04).
COPY --from=rust:${RUST_VERSION}-bookworm /usr/local/rustup /usr/local/rustup
COPY --from=rust:${RUST_VERSION}-bookworm /usr/local/cargo /usr/local/cargo
ENV RUSTUP_HOME=/usr/local/rustup \
    CARGO_HOME=/usr/local/cargo \
    PATH=/usr/local/cargo/bin:/usr/local/cuda/bin:${PATH} \
    RUSTUP_TOOLCHAIN=${RUST_VERSION} \
    CUDA_HOME=/usr/local/cuda \
    CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP}
# cudarc reads the CUDA version from `nvcc --version` and links the driver library against
# the toolkit's stub (lib64/stubs); the real libcuda.so.1 is mounted at run time by the
# NVIDIA Container Toolkit.
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p deepmad --bin deepmad --features cuda \
    && install -m 0755 target/release/deepmad /usr/local/bin/deepmad

# ---------------------------------------------------------------------------------------------
# CUDA runtime: GPU workers. The runtime image carries cudart, cuBLAS, cuRAND and NVRTC,
# which the binary links; the driver comes from the host.
FROM nvidia/cuda:${CUDA_VERSION}-runtime-ubuntu22.04 AS cuda
RUN useradd --system --uid 10001 --user-group --home-dir /var/lib/deepmad --shell /usr/sbin/nologin deepmad \
    && install -d -o deepmad -g deepmad /var/lib/deepmad /var/lib/deepmad/work /var/lib/deepmad/data \
        /var/lib/deepmad/weights
COPY --from=cuda-builder /usr/local/bin/deepmad /usr/local/bin/deepmad
USER deepmad
WORKDIR /var/lib/deepmad
CMD ["deepmad", "--help"]
