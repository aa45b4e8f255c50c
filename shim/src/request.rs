//! What the shim knows about each CRI request type: which identifiers go on
//! the call's tracing span, and how long upstream may take when the caller set
//! no deadline.

use std::time::Duration;

use fast_sandbox_proto::cri;
use tracing::Span;

use crate::deadline::Budget;

/// Implemented by every CRI request message the shim forwards.
pub(crate) trait CriRequest {
    /// Records the pod, sandbox, container or image this call is about.
    /// Only called when the span is enabled.
    fn record(&self, _span: &Span) {}

    /// The default timeout class for this call.
    fn budget(&self) -> Budget {
        Budget::Call
    }
}

fn record_pod(span: &Span, config: Option<&cri::PodSandboxConfig>) {
    if let Some(meta) = config.and_then(|c| c.metadata.as_ref()) {
        span.record("pod_namespace", meta.namespace.as_str());
        span.record("pod_name", meta.name.as_str());
        span.record("pod_uid", meta.uid.as_str());
    }
}

fn record_image(span: &Span, image: Option<&cri::ImageSpec>) {
    if let Some(image) = image {
        span.record("image", image.image.as_str());
    }
}

/// Seconds from a request field, negative treated as zero.
fn secs(value: i64) -> Duration {
    Duration::from_secs(u64::try_from(value).unwrap_or(0))
}

/// Requests with nothing worth recording and the default budget.
macro_rules! plain_requests {
    ($($ty:ident),* $(,)?) => { $( impl CriRequest for cri::$ty {} )* };
}

plain_requests!(
    VersionRequest,
    ListPodSandboxRequest,
    ListContainersRequest,
    ListContainerStatsRequest,
    ListPodSandboxStatsRequest,
    UpdateRuntimeConfigRequest,
    StatusRequest,
    ListMetricDescriptorsRequest,
    ListPodSandboxMetricsRequest,
    RuntimeConfigRequest,
    ListImagesRequest,
    ImageFsInfoRequest,
);

/// Requests that name a sandbox by id.
macro_rules! sandbox_requests {
    ($($ty:ident),* $(,)?) => { $(
        impl CriRequest for cri::$ty {
            fn record(&self, span: &Span) {
                span.record("pod_sandbox_id", self.pod_sandbox_id.as_str());
            }
        }
    )* };
}

sandbox_requests!(
    StopPodSandboxRequest,
    RemovePodSandboxRequest,
    PodSandboxStatusRequest,
    PodSandboxStatsRequest,
    PortForwardRequest,
);

/// Requests that name a container by id.
macro_rules! container_requests {
    ($($ty:ident),* $(,)?) => { $(
        impl CriRequest for cri::$ty {
            fn record(&self, span: &Span) {
                span.record("container_id", self.container_id.as_str());
            }
        }
    )* };
}

container_requests!(
    StartContainerRequest,
    RemoveContainerRequest,
    ContainerStatusRequest,
    UpdateContainerResourcesRequest,
    ReopenContainerLogRequest,
    ExecRequest,
    AttachRequest,
    ContainerStatsRequest,
);

impl CriRequest for cri::RunPodSandboxRequest {
    fn record(&self, span: &Span) {
        record_pod(span, self.config.as_ref());
        span.record("runtime_handler", self.runtime_handler.as_str());
    }
}

impl CriRequest for cri::CreateContainerRequest {
    fn record(&self, span: &Span) {
        record_pod(span, self.sandbox_config.as_ref());
        span.record("pod_sandbox_id", self.pod_sandbox_id.as_str());
        if let Some(meta) = self.config.as_ref().and_then(|c| c.metadata.as_ref()) {
            span.record("container_name", meta.name.as_str());
        }
    }
}

impl CriRequest for cri::StopContainerRequest {
    fn record(&self, span: &Span) {
        span.record("container_id", self.container_id.as_str());
    }

    /// kubelet allows its request timeout plus the grace period.
    fn budget(&self) -> Budget {
        Budget::CallPlus(secs(self.timeout))
    }
}

impl CriRequest for cri::ExecSyncRequest {
    fn record(&self, span: &Span) {
        span.record("container_id", self.container_id.as_str());
    }

    /// kubelet allows its request timeout plus the exec timeout, and sets no
    /// deadline at all when the exec has none (lifecycle hooks).
    fn budget(&self) -> Budget {
        if self.timeout > 0 {
            Budget::CallPlus(secs(self.timeout))
        } else {
            Budget::Unbounded
        }
    }
}

impl CriRequest for cri::CheckpointContainerRequest {
    fn record(&self, span: &Span) {
        span.record("container_id", self.container_id.as_str());
    }

    fn budget(&self) -> Budget {
        Budget::CallPlus(secs(self.timeout))
    }
}

impl CriRequest for cri::GetEventsRequest {
    /// A watch: open as long as the caller wants it.
    fn budget(&self) -> Budget {
        Budget::Unbounded
    }
}

impl CriRequest for cri::PullImageRequest {
    fn record(&self, span: &Span) {
        record_pod(span, self.sandbox_config.as_ref());
        record_image(span, self.image.as_ref());
    }

    fn budget(&self) -> Budget {
        Budget::PullImage
    }
}

impl CriRequest for cri::ImageStatusRequest {
    fn record(&self, span: &Span) {
        record_image(span, self.image.as_ref());
    }
}

impl CriRequest for cri::RemoveImageRequest {
    fn record(&self, span: &Span) {
        record_image(span, self.image.as_ref());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budgets_follow_kubelet() {
        let stop = cri::StopContainerRequest {
            timeout: 30,
            ..Default::default()
        };
        assert_eq!(stop.budget(), Budget::CallPlus(Duration::from_secs(30)));
        let negative = cri::StopContainerRequest {
            timeout: -5,
            ..Default::default()
        };
        assert_eq!(negative.budget(), Budget::CallPlus(Duration::ZERO));

        let probe = cri::ExecSyncRequest {
            timeout: 1,
            ..Default::default()
        };
        assert_eq!(probe.budget(), Budget::CallPlus(Duration::from_secs(1)));
        let hook = cri::ExecSyncRequest::default();
        assert_eq!(hook.budget(), Budget::Unbounded);

        assert_eq!(cri::PullImageRequest::default().budget(), Budget::PullImage);
        assert_eq!(cri::GetEventsRequest::default().budget(), Budget::Unbounded);
        assert_eq!(cri::VersionRequest::default().budget(), Budget::Call);
    }
}
