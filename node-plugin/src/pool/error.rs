//! What can go wrong in the pool, one variant per step, so a log line or a
//! claim's fall-back reason says where. Each cause is a `source`, printed
//! once by [`crate::blocking::chain`].

use crate::{
    blocking::BlockingError, fault::Injected, fixup::FixupFailed, network::CniError,
    random::NoRandomness,
};

use super::records::RecordError;

/// A pool operation failed.
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error("the claim records")]
    Records(#[from] RecordError),
    #[error("a claim-record operation")]
    RecordsBlocked(#[source] BlockingError),
    #[error("containerd's CNI configuration")]
    CniConfig(#[source] CniError),
    #[error("reading containerd's CNI configuration")]
    CniBlocked(#[source] BlockingError),
    #[error(transparent)]
    KeepRefused(#[from] super::spec::KeepRefused),
    #[error("listing this node's slots upstream")]
    List(#[source] tonic::Status),
    #[error("listing containers upstream")]
    ListContainers(#[source] tonic::Status),
    #[error("creating a slot upstream")]
    Create(#[source] tonic::Status),
    #[error("status of slot {id}")]
    Status {
        id: String,
        #[source]
        source: tonic::Status,
    },
    #[error("slot {id} is not ready after creation")]
    NotReady { id: String },
    #[error("containerd's verbose info of slot {id}")]
    Info {
        id: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("containerd reported no pid for slot {id}")]
    NoPid { id: String },
    #[error("slot {id} cannot be fixed up")]
    Prepare {
        id: String,
        #[source]
        source: FixupFailed,
    },
    #[error("a slot uid")]
    Random(#[from] NoRandomness),
    #[error(transparent)]
    Fault(#[from] Injected),
    #[error("fix-up")]
    Fixup(#[from] FixupFailed),
    #[error("network rebind: no CNI configuration loaded")]
    NoCni,
    #[error("network rebind, releasing the placeholder's attachment")]
    CniRelease(#[source] CniError),
    #[error("network rebind, attaching the pod")]
    CniAttach(#[source] CniError),
    #[error("network rebind, the pod's addresses")]
    PodIps(#[source] CniError),
}
