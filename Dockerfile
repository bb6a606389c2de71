# The tributary binary in a container: every role of docker-compose.yml (core nodes, gateways)
# runs this image with its own command. The build needs nothing beyond the Rust image (the
# .proto files compile in pure Rust, no system protoc or C libraries).
#
#   docker build -t tributary .
#   docker run --rm -p 127.0.0.1:9092:9092 tributary standalone --kafka-listen 0.0.0.0:9092
#
# Builder and runtime share Debian bookworm, so the binary links the glibc it runs on.

FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
# Cache mounts keep the registry and the target dir between builds (BuildKit).
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin tributary \
    && cp target/release/tributary /usr/local/bin/tributary

FROM debian:bookworm-slim
# ca-certificates: TLS to S3, GCS or Azure; curl: health checks (GET /healthz).
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates curl \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --user-group --home-dir /var/lib/tributary --create-home tributary
COPY --from=build /usr/local/bin/tributary /usr/local/bin/tributary
# Not root; a named volume mounted here starts owned by this user (the image's directory is).
USER tributary
WORKDIR /var/lib/tributary
ENV TRIBUTARY_DATA_DIR=/var/lib/tributary
# core gRPC, admin HTTP, Kafka, MQTT, MQTT over WebSocket, AMQP, SQS, RocketMQ NameServer and
# broker
EXPOSE 7400 7480 9092 1883 8083 5672 9324 9876 10911
ENTRYPOINT ["tributary"]
CMD ["standalone"]
