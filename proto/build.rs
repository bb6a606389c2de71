// protox compiles the .proto files in pure Rust, so building needs no system protoc.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "proto/tributary/core/v1/core.proto";
    println!("cargo:rerun-if-changed={proto}");
    let fds = protox::compile([proto], ["proto"])?;
    tonic_prost_build::configure().bytes(".").compile_fds(fds)?;
    Ok(())
}
