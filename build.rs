//! Compiles `proto/twopc/v1/*.proto` without a system `protoc`: `protox` parses the files into
//! a descriptor set, tonic generates the code from it, and the encoded set is written to
//! `OUT_DIR` so the servers can offer gRPC reflection. With the `tools` feature, the example
//! services' protos too (the demo, the crash harness and loadgen run those services); a
//! service that depends on the library alone builds only the contract.

use prost::Message;
use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos: Vec<PathBuf> = std::fs::read_dir("proto/twopc/v1")?
        .map(|entry| entry.map(|e| e.path()))
        .collect::<Result<_, _>>()?;
    let protos: Vec<PathBuf> = protos
        .into_iter()
        .filter(|p| p.extension().is_some_and(|e| e == "proto"))
        .collect();
    println!("cargo:rerun-if-changed=proto");

    let fds = protox::compile(&protos, ["proto"])?;
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out_dir.join("twopc_descriptor.bin"), fds.encode_to_vec())?;

    tonic_prost_build::configure().compile_fds(fds)?;

    // The example services' own contracts (examples/proto), each with its descriptor set for
    // reflection.
    if std::env::var_os("CARGO_FEATURE_TOOLS").is_none() {
        return Ok(());
    }
    println!("cargo:rerun-if-changed=examples/proto");
    for (name, file) in [
        ("ledger", "examples/proto/ledger/v1/ledger.proto"),
        ("audit", "examples/proto/audit/v1/audit.proto"),
        ("payments", "examples/proto/payments/v1/payments.proto"),
    ] {
        let fds = protox::compile([file], ["examples/proto"])?;
        std::fs::write(
            out_dir.join(format!("{name}_descriptor.bin")),
            fds.encode_to_vec(),
        )?;
        tonic_prost_build::configure().compile_fds(fds)?;
    }
    Ok(())
}
