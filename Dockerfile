# syntax=docker/dockerfile:1
# chiller-metrics: webhook and reconciler in one static-ish binary on distroless.
# Build: make image (IMAGE=chiller-metrics:dev)

# The Rust that layout/hot-symbols.txt was made with (its symbol names are
# that compiler's); scripts/hot-symbols.sh says when to change both.
FROM rust:1.95.0-bookworm AS build
WORKDIR /src
COPY . .
# Packed relative relocations (build.rs): the image's glibc (Debian 12, 2.36)
# has them; a plain `cargo build --release` leaves them out to run on 2.34.
ENV CHILLER_METRICS_PACK_RELOCS=1
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin chiller-metrics \
 && cp target/release/chiller-metrics /chiller-metrics \
 && /chiller-metrics --version

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /chiller-metrics /usr/local/bin/chiller-metrics
# distroless "nonroot" is UID/GID 65532; numeric so runAsNonRoot can verify it.
USER 65532:65532
EXPOSE 8443 9090
ENTRYPOINT ["/usr/local/bin/chiller-metrics"]
CMD ["serve", "--log-format", "json"]
