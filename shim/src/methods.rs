//! Every CRI v1 method the shim knows, by gRPC path: its name for logs, the
//! level of its span, what the shim does with it, and how to read its
//! request (validation, span fields, deadline budget) without re-encoding
//! it. A path not in the table is relayed as it is (a method newer than the
//! compiled schema, or another service).

use bytes::Bytes;
use fast_sandbox_proto::cri;
use prost::Message;
use serde::Serialize;
use tracing::{Level, Span};

use crate::{deadline::Budget, request::CriRequest};

/// What the shim does with a known method.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Handling {
    /// Relayed as bytes, request validated first.
    Relay,
    /// Handled by the shim when it serves slots (server.rs); relayed
    /// otherwise.
    Intercept(Intercepted),
}

/// The calls the shim changes or guards when it serves slots.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Intercepted {
    RunPodSandbox,
    StopPodSandbox,
    RemovePodSandbox,
    CreateContainer,
    PortForward,
    ListContainers,
    ListContainerStats,
    ListPodSandbox,
    PodSandboxStatus,
    ListPodSandboxStats,
    PodSandboxStats,
    GetContainerEvents,
    Status,
}

/// One known method.
#[derive(Debug)]
pub(crate) struct Method {
    pub(crate) path: &'static str,
    pub(crate) name: &'static str,
    /// DEBUG for the calls kubelet makes every second or so (relist,
    /// status, stats, probes), INFO for the rest.
    pub(crate) level: Level,
    pub(crate) handling: Handling,
    /// Server-streaming answer.
    pub(crate) streaming: bool,
    /// Decodes the request: records its fields on the span and returns the
    /// deadline budget it asks for.
    pub(crate) inspect: fn(&[u8], &Span) -> Result<Budget, prost::DecodeError>,
    /// JSON of a request and of an answer, for the capture file.
    pub(crate) json: fn(&[u8], bool) -> Option<serde_json::Value>,
}

fn inspect<T: Message + Default + CriRequest>(
    bytes: &[u8],
    span: &Span,
) -> Result<Budget, prost::DecodeError> {
    let request = T::decode(bytes)?;
    if !span.is_disabled() {
        request.record(span);
    }
    Ok(request.budget())
}

fn json<Req, Resp>(bytes: &[u8], response: bool) -> Option<serde_json::Value>
where
    Req: Message + Default + Serialize,
    Resp: Message + Default + Serialize,
{
    if response {
        serde_json::to_value(Resp::decode(bytes).ok()?).ok()
    } else {
        serde_json::to_value(Req::decode(bytes).ok()?).ok()
    }
}

macro_rules! methods {
    ($( $service:literal $level:ident $name:literal $req:ident -> $resp:ident $handling:expr $(, $streaming:ident)? ; )*) => {
        /// The table, in proto order.
        pub(crate) static METHODS: &[Method] = &[
            $(Method {
                path: concat!("/runtime.v1.", $service, "/", $name),
                name: $name,
                level: Level::$level,
                handling: $handling,
                streaming: methods!(@streaming $($streaming)?),
                inspect: inspect::<cri::$req>,
                json: json::<cri::$req, cri::$resp>,
            },)*
        ];
    };
    (@streaming) => { false };
    (@streaming streaming) => { true };
}

use Handling::{Intercept as I, Relay};
use Intercepted as X;

methods! {
    "RuntimeService" DEBUG "Version" VersionRequest -> VersionResponse Relay;
    "RuntimeService" INFO "RunPodSandbox" RunPodSandboxRequest -> RunPodSandboxResponse I(X::RunPodSandbox);
    "RuntimeService" INFO "StopPodSandbox" StopPodSandboxRequest -> StopPodSandboxResponse I(X::StopPodSandbox);
    "RuntimeService" INFO "RemovePodSandbox" RemovePodSandboxRequest -> RemovePodSandboxResponse I(X::RemovePodSandbox);
    "RuntimeService" DEBUG "PodSandboxStatus" PodSandboxStatusRequest -> PodSandboxStatusResponse I(X::PodSandboxStatus);
    "RuntimeService" DEBUG "ListPodSandbox" ListPodSandboxRequest -> ListPodSandboxResponse I(X::ListPodSandbox);
    "RuntimeService" INFO "CreateContainer" CreateContainerRequest -> CreateContainerResponse I(X::CreateContainer);
    "RuntimeService" INFO "StartContainer" StartContainerRequest -> StartContainerResponse Relay;
    "RuntimeService" INFO "StopContainer" StopContainerRequest -> StopContainerResponse Relay;
    "RuntimeService" INFO "RemoveContainer" RemoveContainerRequest -> RemoveContainerResponse Relay;
    "RuntimeService" DEBUG "ListContainers" ListContainersRequest -> ListContainersResponse I(X::ListContainers);
    "RuntimeService" DEBUG "ContainerStatus" ContainerStatusRequest -> ContainerStatusResponse Relay;
    "RuntimeService" INFO "UpdateContainerResources" UpdateContainerResourcesRequest -> UpdateContainerResourcesResponse Relay;
    "RuntimeService" INFO "ReopenContainerLog" ReopenContainerLogRequest -> ReopenContainerLogResponse Relay;
    "RuntimeService" DEBUG "ExecSync" ExecSyncRequest -> ExecSyncResponse Relay;
    // Streaming URLs are upstream's, returned unchanged: the caller talks
    // to containerd's streaming server directly.
    "RuntimeService" INFO "Exec" ExecRequest -> ExecResponse Relay;
    "RuntimeService" INFO "Attach" AttachRequest -> AttachResponse Relay;
    "RuntimeService" INFO "PortForward" PortForwardRequest -> PortForwardResponse I(X::PortForward);
    "RuntimeService" DEBUG "ContainerStats" ContainerStatsRequest -> ContainerStatsResponse Relay;
    "RuntimeService" DEBUG "ListContainerStats" ListContainerStatsRequest -> ListContainerStatsResponse I(X::ListContainerStats);
    "RuntimeService" DEBUG "PodSandboxStats" PodSandboxStatsRequest -> PodSandboxStatsResponse I(X::PodSandboxStats);
    "RuntimeService" DEBUG "ListPodSandboxStats" ListPodSandboxStatsRequest -> ListPodSandboxStatsResponse I(X::ListPodSandboxStats);
    "RuntimeService" INFO "UpdateRuntimeConfig" UpdateRuntimeConfigRequest -> UpdateRuntimeConfigResponse Relay;
    "RuntimeService" DEBUG "Status" StatusRequest -> StatusResponse I(X::Status);
    "RuntimeService" INFO "CheckpointContainer" CheckpointContainerRequest -> CheckpointContainerResponse Relay;
    "RuntimeService" INFO "GetContainerEvents" GetEventsRequest -> ContainerEventResponse I(X::GetContainerEvents), streaming;
    "RuntimeService" DEBUG "ListMetricDescriptors" ListMetricDescriptorsRequest -> ListMetricDescriptorsResponse Relay;
    // containerd 1.6 does not implement it (Unimplemented). One that does
    // would report unclaimed slots here: hide them when moving on.
    "RuntimeService" DEBUG "ListPodSandboxMetrics" ListPodSandboxMetricsRequest -> ListPodSandboxMetricsResponse Relay;
    "RuntimeService" DEBUG "RuntimeConfig" RuntimeConfigRequest -> RuntimeConfigResponse Relay;
    "ImageService" DEBUG "ListImages" ListImagesRequest -> ListImagesResponse Relay;
    "ImageService" DEBUG "ImageStatus" ImageStatusRequest -> ImageStatusResponse Relay;
    "ImageService" INFO "PullImage" PullImageRequest -> PullImageResponse Relay;
    "ImageService" INFO "RemoveImage" RemoveImageRequest -> RemoveImageResponse Relay;
    "ImageService" DEBUG "ImageFsInfo" ImageFsInfoRequest -> ImageFsInfoResponse Relay;
}

/// The known method at `path`.
pub(crate) fn lookup(path: &str) -> Option<&'static Method> {
    METHODS.iter().find(|m| m.path == path)
}

/// A span for one call of `method` (`name` for unknown methods).
pub(crate) fn span(level: Level, name: &str) -> Span {
    macro_rules! cri_span {
        ($level:expr) => {
            ::tracing::span!(
                $level,
                "cri",
                method = name,
                pod_namespace = ::tracing::field::Empty,
                pod_name = ::tracing::field::Empty,
                pod_uid = ::tracing::field::Empty,
                pod_sandbox_id = ::tracing::field::Empty,
                container_id = ::tracing::field::Empty,
                container_name = ::tracing::field::Empty,
                image = ::tracing::field::Empty,
                runtime_handler = ::tracing::field::Empty,
            )
        };
    }
    if level == Level::DEBUG {
        cri_span!(Level::DEBUG)
    } else {
        cri_span!(Level::INFO)
    }
}

/// The message of a unary gRPC body: `Err` with tonic's wording when the
/// framing is broken.
pub(crate) fn message_of(body: &Bytes) -> Option<Bytes> {
    if body.len() < 5 || body[0] != 0 {
        return None;
    }
    let len = u32::from_be_bytes([body[1], body[2], body[3], body[4]]) as usize;
    (body.len() == 5 + len).then(|| body.slice(5..))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_path_is_unique_and_every_service_method_is_known() {
        let mut paths: Vec<_> = METHODS.iter().map(|m| m.path).collect();
        paths.sort_unstable();
        paths.dedup();
        assert_eq!(paths.len(), METHODS.len());
        // Every method of both services in the compiled schema.
        let set = <prost_types::FileDescriptorSet as Message>::decode(cri::DESCRIPTOR_SET)
            .unwrap_or_default();
        let mut schema_paths: Vec<String> = set
            .file
            .iter()
            .flat_map(|f| &f.service)
            .flat_map(|s| {
                s.method
                    .iter()
                    .map(move |m| format!("/runtime.v1.{}/{}", s.name(), m.name()))
            })
            .collect();
        schema_paths.sort_unstable();
        assert_eq!(paths, schema_paths);
        for m in METHODS {
            assert_eq!(
                m.streaming,
                set.file
                    .iter()
                    .flat_map(|f| &f.service)
                    .flat_map(|s| &s.method)
                    .any(|d| d.name() == m.name && d.server_streaming()),
                "{}",
                m.name
            );
        }
    }
}
