//! Generated protobuf and gRPC code for every foldmesh wire, plus helpers to move between
//! `google.protobuf.Value`/`Struct` and `serde_json`.

pub mod fold {
    pub mod v1 {
        tonic::include_proto!("fold.v1");
    }
    pub mod wire {
        pub mod v1 {
            tonic::include_proto!("fold.wire.v1");
        }
    }
    pub mod sidecar {
        pub mod v1 {
            tonic::include_proto!("fold.sidecar.v1");
        }
    }
}

pub use fold::sidecar::v1 as sidecar;
pub use fold::v1;
pub use fold::wire::v1 as wire;

/// Serialized `FileDescriptorSet` of all foldmesh protos (with imports), for server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/fold_descriptor.bin"));

pub mod json;
pub mod limits;
pub mod status;
