// protox compiles the .proto files in pure Rust, so building needs no system protoc.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = [
        "proto/tributary/core/v1/core.proto",
        "proto/tributary/amqp/link/v1/link.proto",
    ];
    for p in protos {
        println!("cargo:rerun-if-changed={p}");
    }
    let fds = protox::compile(protos, ["proto"])?;
    tonic_prost_build::configure().bytes(".").compile_fds(fds)?;
    Ok(())
}
