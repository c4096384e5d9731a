//! Generates the kubelet gRPC stubs (plugin registration, DRA v1 and v1beta1,
//! DRA health v1alpha1) from the workspace's `proto/` tree into `OUT_DIR`.
//!
//! `protox` parses the `.proto` files in pure Rust, so no system `protoc` is
//! needed; `tonic-prost-build` turns the descriptors into message types plus
//! server and client code (clients serve tests and probes).
//!
//! Every package is generated into its own sub-directory of `OUT_DIR`: the
//! kubelet uses bare package names (`pluginregistration`, `v1alpha1`, and
//! later `v1` for health) that would overwrite each other's `<package>.rs` in
//! one directory. `src/proto.rs` includes each file from its sub-directory.

// A build script talks to cargo only through stdout and learns OUT_DIR only
// from the environment, so the workspace-wide bans on both do not apply here.
#![allow(clippy::print_stdout, clippy::disallowed_methods)]

use std::error::Error;
use std::path::{Path, PathBuf};

/// (file under `proto/`, sub-directory of `OUT_DIR`).
const PROTOS: &[(&str, &str)] = &[
    ("pluginregistration/v1/api.proto", "registration"),
    ("dra/v1/api.proto", "dra_v1"),
    ("dra/v1beta1/api.proto", "dra_v1beta1"),
    ("dra-health/v1alpha1/api.proto", "health_v1alpha1"),
];

fn main() -> Result<(), Box<dyn Error>> {
    let manifest_dir = PathBuf::from(
        std::env::var_os("CARGO_MANIFEST_DIR").ok_or("CARGO_MANIFEST_DIR is not set")?,
    );
    let out_dir = PathBuf::from(std::env::var_os("OUT_DIR").ok_or("OUT_DIR is not set")?);
    let proto_root = manifest_dir.join("../../proto");

    println!("cargo:rerun-if-changed=build.rs");
    // A directory makes cargo rerun when any file below it changes, which
    // also catches new files; the per-file lines document what is compiled.
    println!("cargo:rerun-if-changed={}", proto_root.display());
    for (file, sub_dir) in PROTOS {
        println!("cargo:rerun-if-changed={}", proto_root.join(file).display());
        generate(&proto_root, file, &out_dir.join(sub_dir))?;
    }
    Ok(())
}

fn generate(proto_root: &Path, file: &str, out_dir: &Path) -> Result<(), Box<dyn Error>> {
    let descriptors =
        protox::compile([file], [proto_root]).map_err(|err| format!("compiling {file}: {err}"))?;
    std::fs::create_dir_all(out_dir)?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        // Deterministic map order keeps responses and test diffs stable.
        .btree_map(".")
        .out_dir(out_dir)
        .compile_fds(descriptors)
        .map_err(|err| format!("generating code for {file}: {err}"))?;
    Ok(())
}
