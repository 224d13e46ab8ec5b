//! Compiles etcd's .proto files (in ../proto) into the Rust modules the vendored etcd-client
//! includes (../src/rpc/generated), the same output etcd-client's own build script makes with
//! protoc, so building weir needs neither protoc nor a build script.

use std::path::Path;

const PROTOS: &[&str] = &[
    "etcd/api/authpb/auth.proto",
    "etcd/api/etcdserverpb/rpc.proto",
    "etcd/api/mvccpb/kv.proto",
    "etcd/server/etcdserver/api/v3election/v3electionpb/v3election.proto",
    "etcd/server/etcdserver/api/v3lock/v3lockpb/v3lock.proto",
];

/// The generated modules `src/rpc/pb.rs` includes.
const MODULES: &[&str] = &["authpb", "etcdserverpb", "mvccpb", "v3electionpb", "v3lockpb"];

fn main() {
    let crate_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let proto_root = crate_dir.join("proto");
    let out_dir = crate_dir.join("src/rpc/generated");
    let files: Vec<_> = PROTOS.iter().map(|p| proto_root.join(p)).collect();
    let descriptors = protox::compile(&files, [&proto_root]).unwrap_or_else(|e| {
        eprintln!("cannot compile the etcd protos: {e:?}");
        std::process::exit(1);
    });
    tonic_prost_build::configure()
        .build_server(false)
        .out_dir(&out_dir)
        .compile_fds(descriptors)
        .unwrap_or_else(|e| {
            eprintln!("cannot generate into {}: {e}", out_dir.display());
            std::process::exit(1);
        });
    // prost also writes the modules of imported annotation protos (google.api, openapiv2), which
    // hold only options nothing reads; etcd-client includes just these.
    for entry in std::fs::read_dir(&out_dir).expect("the output directory exists") {
        let path = entry.expect("a readable directory entry").path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        if !MODULES.iter().any(|m| name == format!("{m}.rs")) {
            std::fs::remove_file(&path).expect("an unused generated file can be removed");
        }
    }
    println!("generated {}", out_dir.display());
}
