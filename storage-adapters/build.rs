// protox compiles the .proto in pure Rust, so building needs no system protoc (etcd-client's
// build script would).
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = ["proto/etcd/kv.proto"];
    for p in protos {
        println!("cargo:rerun-if-changed={p}");
    }
    let fds = protox::compile(protos, ["proto"])?;
    tonic_prost_build::configure()
        .build_server(false)
        .bytes(".")
        .compile_fds(fds)?;
    Ok(())
}
