//! Compiles meshd's `.proto` files with protox (a protobuf compiler in Rust, so no
//! system `protoc`) and generates the tonic client and server.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = ["proto/meshd/ca/v1/ca.proto"];
    for f in files {
        println!("cargo:rerun-if-changed={f}");
    }
    let descriptors = protox::compile(files, ["proto"])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(descriptors)?;
    Ok(())
}
