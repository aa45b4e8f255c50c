//! A fake upstream that keeps pod sandboxes the way containerd 1.6.20 does,
//! as far as the slot tests need: ids, prefix lookups, list filters
//! (id, state, exact-match label selector), status (verbose too), stats,
//! containers (create, list, stats) and port forwarding, and containerd's
//! exact answers for an unknown sandbox id (captured from a live 1.6.20).
//! Unlike 1.6 it also streams container events, one per sandbox, shaped like
//! containerd 1.7's, so the shim's event rewriting can be seen.

use std::{
    collections::HashMap,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
};

use fast_sandbox_proto::cri::{
    self, image_service_server::ImageService, runtime_service_server::RuntimeService,
};
use tonic::{Request, Response, Status};

use super::{EventStream, Seen};

/// containerd 1.6.20's `PodSandboxStatus` answer for an unknown id.
pub const STATUS_NOT_FOUND: &str = "an error occurred when try to find sandbox: not found";

/// containerd 1.6.20's `PodSandboxStats` answer for an unknown id.
pub fn stats_not_found(requested: &str) -> String {
    format!("an error occurred when trying to find sandbox {requested}: not found")
}

/// containerd 1.6.20's `StopPodSandbox` answer for an unknown id (the id
/// Go-quoted: ids here are plain hex).
pub fn stop_not_found(requested: &str) -> String {
    format!("an error occurred when try to find sandbox \"{requested}\": not found")
}

/// containerd 1.6.20's `CreateContainer` answer for an unknown sandbox id.
pub fn create_not_found(requested: &str) -> String {
    format!("failed to find sandbox id \"{requested}\": not found")
}

/// containerd 1.6.20's `PortForward` answer for an unknown sandbox id.
pub fn port_forward_not_found(requested: &str) -> String {
    format!("failed to find sandbox \"{requested}\": not found")
}

#[derive(Debug, Clone)]
pub struct StoredContainer {
    pub id: String,
    pub sandbox_id: String,
    pub config: cri::ContainerConfig,
}

#[derive(Debug, Clone)]
pub struct Stored {
    pub id: String,
    pub config: cri::PodSandboxConfig,
    pub handler: String,
    pub created_at: i64,
    pub ready: bool,
}

impl Stored {
    fn labels(&self) -> &HashMap<String, String> {
        &self.config.labels
    }

    fn item(&self) -> cri::PodSandbox {
        cri::PodSandbox {
            id: self.id.clone(),
            metadata: self.config.metadata.clone(),
            state: self.state(),
            created_at: self.created_at,
            labels: self.config.labels.clone(),
            annotations: self.config.annotations.clone(),
            runtime_handler: self.handler.clone(),
        }
    }

    fn state(&self) -> i32 {
        if self.ready {
            cri::PodSandboxState::SandboxReady as i32
        } else {
            cri::PodSandboxState::SandboxNotready as i32
        }
    }

    fn stats(&self) -> cri::PodSandboxStats {
        cri::PodSandboxStats {
            attributes: Some(cri::PodSandboxAttributes {
                id: self.id.clone(),
                metadata: self.config.metadata.clone(),
                labels: self.config.labels.clone(),
                annotations: self.config.annotations.clone(),
            }),
            linux: Some(cri::LinuxPodSandboxStats {
                cpu: Some(cri::CpuUsage {
                    timestamp: 1,
                    usage_core_nano_seconds: Some(cri::UInt64Value { value: 1234 }),
                    usage_nano_cores: None,
                }),
                ..Default::default()
            }),
            windows: None,
        }
    }

    fn namespace_options(&self) -> cri::NamespaceOption {
        let ns = self
            .config
            .linux
            .as_ref()
            .and_then(|l| l.security_context.as_ref())
            .and_then(|s| s.namespace_options.as_ref());
        cri::NamespaceOption {
            network: ns.map_or(0, |n| n.network),
            pid: ns.map_or(0, |n| n.pid),
            ipc: ns.map_or(0, |n| n.ipc),
            ..Default::default()
        }
    }

    fn status(&self) -> cri::PodSandboxStatus {
        cri::PodSandboxStatus {
            id: self.id.clone(),
            metadata: self.config.metadata.clone(),
            state: self.state(),
            created_at: self.created_at,
            network: Some(cri::PodSandboxNetworkStatus {
                ip: "10.209.0.7".into(),
                additional_ips: Vec::new(),
            }),
            linux: Some(cri::LinuxPodSandboxStatus {
                namespaces: Some(cri::Namespace {
                    options: Some(self.namespace_options()),
                }),
            }),
            labels: self.config.labels.clone(),
            annotations: self.config.annotations.clone(),
            runtime_handler: self.handler.clone(),
        }
    }

    /// A verbose info shaped like containerd's (much shorter).
    fn verbose_info(&self) -> String {
        let meta = self.config.metadata.clone().unwrap_or_default();
        let parent = self
            .config
            .linux
            .as_ref()
            .map_or(String::new(), |l| l.cgroup_parent.clone());
        serde_json::json!({
            "pid": 4242,
            "processStatus": "running",
            "runtimeHandler": self.handler,
            "config": {
                "metadata": {"name": meta.name, "uid": meta.uid, "namespace": meta.namespace},
                "hostname": self.config.hostname,
                "labels": self.config.labels,
            },
            "runtimeSpec": {
                "hostname": self.config.hostname,
                "annotations": {
                    "io.kubernetes.cri.sandbox-id": self.id,
                    "io.kubernetes.cri.sandbox-name": meta.name,
                    "io.kubernetes.cri.sandbox-namespace": meta.namespace,
                    "io.kubernetes.cri.sandbox-uid": meta.uid,
                    "io.kubernetes.cri.sandbox-log-directory": self.config.log_directory,
                },
                "linux": {"cgroupsPath": format!("{parent}/{}", self.id)},
            },
            "cniResult": {"Interfaces": {}},
        })
        .to_string()
    }
}

/// What the fake holds and saw.
#[derive(Debug, Default)]
pub struct Store {
    pub sandboxes: Vec<Stored>,
    pub containers: Vec<StoredContainer>,
    /// Every `RunPodSandbox` request, in order.
    pub runs: Vec<cri::RunPodSandboxRequest>,
    /// The filter of every `ListPodSandbox`.
    pub list_filters: Vec<Option<cri::PodSandboxFilter>>,
    /// The filter of every `ListPodSandboxStats`.
    pub stats_filters: Vec<Option<cri::PodSandboxStatsFilter>>,
    next: u64,
}

impl Store {
    /// containerd's truncindex: an exact id or a unique prefix.
    fn find(&self, id: &str) -> Result<&Stored, Status> {
        if id.is_empty() {
            return Err(Status::unknown("Prefix can't be empty"));
        }
        let mut matches = self.sandboxes.iter().filter(|s| s.id.starts_with(id));
        match (matches.next(), matches.next()) {
            (Some(one), None) => Ok(one),
            (Some(_), Some(_)) => Err(Status::unknown(format!("ambiguous prefix {id:?}"))),
            (None, _) => Err(Status::not_found("not found")),
        }
    }

    /// containerd's answer for an id it cannot resolve, from `find`'s
    /// error: not found becomes `not_found(requested)`, anything else
    /// (empty, ambiguous) is wrapped the same way as `Unknown`.
    fn find_or(&self, id: &str, not_found: impl Fn(&str) -> String) -> Result<&Stored, Status> {
        self.find(id).map_err(|e| match e.code() {
            tonic::Code::NotFound => Status::not_found(not_found(id)),
            _ => Status::unknown(not_found(id).replace("not found", e.message())),
        })
    }

    /// containerd's `normalizeContainerFilter`: a sandbox id prefix that
    /// resolves becomes the full id, anything else is kept (and matches
    /// nothing).
    fn normalize(&self, sandbox_id: &str) -> String {
        self.find(sandbox_id)
            .map_or_else(|_| sandbox_id.to_owned(), |s| s.id.clone())
    }

    fn containers_of(&self, sandbox_id: &str) -> impl Iterator<Item = &StoredContainer> {
        let sandbox_id = (!sandbox_id.is_empty()).then(|| self.normalize(sandbox_id));
        self.containers
            .iter()
            .filter(move |c| sandbox_id.as_ref().is_none_or(|id| &c.sandbox_id == id))
    }
}

fn selected(selector: &HashMap<String, String>, labels: &HashMap<String, String>) -> bool {
    selector
        .iter()
        .all(|(k, v)| labels.get(k).is_some_and(|got| got == v))
}

/// The stateful fake upstream.
#[derive(Debug, Clone, Default)]
pub struct Pods {
    pub seen: Arc<Seen>,
    pub store: Arc<Mutex<Store>>,
    /// Makes `RemovePodSandbox` fail.
    pub refuse_remove: Arc<AtomicBool>,
}

impl Pods {
    pub fn store(&self) -> std::sync::MutexGuard<'_, Store> {
        self.store.lock().expect("lock")
    }

    /// Ids of every sandbox upstream holds.
    pub fn ids(&self) -> Vec<String> {
        self.store()
            .sandboxes
            .iter()
            .map(|s| s.id.clone())
            .collect()
    }
}

fake_service! {
    impl RuntimeService for Pods {
        unimplemented {
            version(VersionRequest) -> VersionResponse;
            start_container(StartContainerRequest) -> StartContainerResponse;
            stop_container(StopContainerRequest) -> StopContainerResponse;
            remove_container(RemoveContainerRequest) -> RemoveContainerResponse;
            container_status(ContainerStatusRequest) -> ContainerStatusResponse;
            update_container_resources(UpdateContainerResourcesRequest) -> UpdateContainerResourcesResponse;
            reopen_container_log(ReopenContainerLogRequest) -> ReopenContainerLogResponse;
            exec_sync(ExecSyncRequest) -> ExecSyncResponse;
            exec(ExecRequest) -> ExecResponse;
            attach(AttachRequest) -> AttachResponse;
            container_stats(ContainerStatsRequest) -> ContainerStatsResponse;
            update_runtime_config(UpdateRuntimeConfigRequest) -> UpdateRuntimeConfigResponse;
            status(StatusRequest) -> StatusResponse;
            checkpoint_container(CheckpointContainerRequest) -> CheckpointContainerResponse;
            list_metric_descriptors(ListMetricDescriptorsRequest) -> ListMetricDescriptorsResponse;
            list_pod_sandbox_metrics(ListPodSandboxMetricsRequest) -> ListPodSandboxMetricsResponse;
            runtime_config(RuntimeConfigRequest) -> RuntimeConfigResponse;
        }

        async fn run_pod_sandbox(
            &self,
            request: Request<cri::RunPodSandboxRequest>,
        ) -> Result<Response<cri::RunPodSandboxResponse>, Status> {
            self.seen.record(&request);
            let request = request.into_inner();
            let mut store = self.store();
            store.runs.push(request.clone());
            let config = request
                .config
                .filter(|c| c.metadata.is_some())
                .ok_or_else(|| Status::unknown("sandbox config must include metadata"))?;
            store.next += 1;
            let n = store.next;
            // Distinct leading digits, like containerd's random ids, so
            // short prefixes are unique.
            let id = format!("{:016x}{n:048x}", n.wrapping_mul(0x9e37_79b9_7f4a_7c15));
            store.sandboxes.push(Stored {
                id: id.clone(),
                config,
                handler: request.runtime_handler,
                created_at: 1_700_000_000_000_000_000 + i64::try_from(n).expect("small"),
                ready: true,
            });
            Ok(Response::new(cri::RunPodSandboxResponse { pod_sandbox_id: id }))
        }

        async fn stop_pod_sandbox(
            &self,
            request: Request<cri::StopPodSandboxRequest>,
        ) -> Result<Response<cri::StopPodSandboxResponse>, Status> {
            self.seen.record(&request);
            let mut store = self.store();
            let id = store
                .find_or(&request.get_ref().pod_sandbox_id, stop_not_found)?
                .id
                .clone();
            if let Some(s) = store.sandboxes.iter_mut().find(|s| s.id == id) {
                s.ready = false;
            }
            Ok(Response::new(cri::StopPodSandboxResponse {}))
        }

        async fn remove_pod_sandbox(
            &self,
            request: Request<cri::RemovePodSandboxRequest>,
        ) -> Result<Response<cri::RemovePodSandboxResponse>, Status> {
            self.seen.record(&request);
            if self.refuse_remove.load(Ordering::SeqCst) {
                return Err(Status::unknown("failed to remove sandbox: device busy"));
            }
            let mut store = self.store();
            // Like containerd: removing an unknown sandbox succeeds.
            if let Ok(id) = store.find(&request.get_ref().pod_sandbox_id).map(|s| s.id.clone()) {
                store.sandboxes.retain(|s| s.id != id);
            }
            Ok(Response::new(cri::RemovePodSandboxResponse {}))
        }

        async fn pod_sandbox_status(
            &self,
            request: Request<cri::PodSandboxStatusRequest>,
        ) -> Result<Response<cri::PodSandboxStatusResponse>, Status> {
            self.seen.record(&request);
            let store = self.store();
            let request = request.get_ref();
            let stored = store
                .find(&request.pod_sandbox_id)
                .map_err(|e| match e.code() {
                    tonic::Code::NotFound => Status::not_found(STATUS_NOT_FOUND),
                    _ => Status::unknown(format!(
                        "an error occurred when try to find sandbox: {}",
                        e.message()
                    )),
                })?;
            let info = if request.verbose {
                HashMap::from([("info".to_owned(), stored.verbose_info())])
            } else {
                HashMap::new()
            };
            Ok(Response::new(cri::PodSandboxStatusResponse {
                status: Some(stored.status()),
                info,
                containers_statuses: Vec::new(),
                timestamp: 0,
            }))
        }

        async fn list_pod_sandbox(
            &self,
            request: Request<cri::ListPodSandboxRequest>,
        ) -> Result<Response<cri::ListPodSandboxResponse>, Status> {
            self.seen.record(&request);
            let filter = request.into_inner().filter;
            let mut store = self.store();
            store.list_filters.push(filter.clone());
            let filter = filter.unwrap_or_default();
            let id = match filter.id.as_str() {
                "" => None,
                prefix => Some(store.find(prefix).map(|s| s.id.clone()).unwrap_or_default()),
            };
            let items = store
                .sandboxes
                .iter()
                .filter(|s| id.as_ref().is_none_or(|id| &s.id == id))
                .filter(|s| filter.state.as_ref().is_none_or(|st| st.state == s.state()))
                .filter(|s| selected(&filter.label_selector, s.labels()))
                .map(Stored::item)
                .collect();
            Ok(Response::new(cri::ListPodSandboxResponse { items }))
        }

        async fn pod_sandbox_stats(
            &self,
            request: Request<cri::PodSandboxStatsRequest>,
        ) -> Result<Response<cri::PodSandboxStatsResponse>, Status> {
            self.seen.record(&request);
            let requested = &request.get_ref().pod_sandbox_id;
            let store = self.store();
            let stored = store
                .find(requested)
                .map_err(|_| Status::not_found(stats_not_found(requested)))?;
            if !stored.ready {
                return Err(Status::unknown(format!(
                    "failed to decode pod sandbox metrics {}: not in ready state",
                    stored.id
                )));
            }
            Ok(Response::new(cri::PodSandboxStatsResponse {
                stats: Some(stored.stats()),
            }))
        }

        async fn list_pod_sandbox_stats(
            &self,
            request: Request<cri::ListPodSandboxStatsRequest>,
        ) -> Result<Response<cri::ListPodSandboxStatsResponse>, Status> {
            self.seen.record(&request);
            let filter = request.into_inner().filter;
            let mut store = self.store();
            store.stats_filters.push(filter.clone());
            let Some(filter) = filter else {
                // containerd 1.6: without a filter, a sandbox that is not
                // ready fails the whole call.
                if let Some(dead) = store.sandboxes.iter().find(|s| !s.ready) {
                    return Err(Status::unknown(format!(
                        "failed to decode sandbox container metrics for sandbox {:?}: \
                         not in ready state",
                        dead.id
                    )));
                }
                let stats = store.sandboxes.iter().map(Stored::stats).collect();
                return Ok(Response::new(cri::ListPodSandboxStatsResponse { stats }));
            };
            let id = match filter.id.as_str() {
                "" => None,
                prefix => Some(store.find(prefix).map(|s| s.id.clone()).unwrap_or_default()),
            };
            let stats = store
                .sandboxes
                .iter()
                .filter(|s| s.ready)
                .filter(|s| id.as_ref().is_none_or(|id| &s.id == id))
                .filter(|s| selected(&filter.label_selector, s.labels()))
                .map(Stored::stats)
                .collect();
            Ok(Response::new(cri::ListPodSandboxStatsResponse { stats }))
        }

        async fn create_container(
            &self,
            request: Request<cri::CreateContainerRequest>,
        ) -> Result<Response<cri::CreateContainerResponse>, Status> {
            self.seen.record(&request);
            let request = request.into_inner();
            let mut store = self.store();
            let sandbox_id = store
                .find_or(&request.pod_sandbox_id, create_not_found)?
                .id
                .clone();
            let config = request
                .config
                .ok_or_else(|| Status::unknown("container config must not be nil"))?;
            let id = format!("ctr-{}-{}", &sandbox_id[..8], store.containers.len());
            store.containers.push(StoredContainer {
                id: id.clone(),
                sandbox_id,
                config,
            });
            Ok(Response::new(cri::CreateContainerResponse { container_id: id }))
        }

        async fn list_containers(
            &self,
            request: Request<cri::ListContainersRequest>,
        ) -> Result<Response<cri::ListContainersResponse>, Status> {
            self.seen.record(&request);
            let filter = request.into_inner().filter.unwrap_or_default();
            let store = self.store();
            let containers = store
                .containers_of(&filter.pod_sandbox_id)
                .map(|c| cri::Container {
                    id: c.id.clone(),
                    pod_sandbox_id: c.sandbox_id.clone(),
                    metadata: c.config.metadata.clone(),
                    labels: c.config.labels.clone(),
                    ..Default::default()
                })
                .collect();
            Ok(Response::new(cri::ListContainersResponse { containers }))
        }

        async fn list_container_stats(
            &self,
            request: Request<cri::ListContainerStatsRequest>,
        ) -> Result<Response<cri::ListContainerStatsResponse>, Status> {
            self.seen.record(&request);
            let filter = request.into_inner().filter.unwrap_or_default();
            let store = self.store();
            let stats = store
                .containers_of(&filter.pod_sandbox_id)
                .map(|c| cri::ContainerStats {
                    attributes: Some(cri::ContainerAttributes {
                        id: c.id.clone(),
                        metadata: c.config.metadata.clone(),
                        labels: c.config.labels.clone(),
                        annotations: c.config.annotations.clone(),
                    }),
                    ..Default::default()
                })
                .collect();
            Ok(Response::new(cri::ListContainerStatsResponse { stats }))
        }

        async fn port_forward(
            &self,
            request: Request<cri::PortForwardRequest>,
        ) -> Result<Response<cri::PortForwardResponse>, Status> {
            self.seen.record(&request);
            let store = self.store();
            let stored = store.find_or(&request.get_ref().pod_sandbox_id, port_forward_not_found)?;
            if !stored.ready {
                return Err(Status::unknown("sandbox container is not running"));
            }
            Ok(Response::new(cri::PortForwardResponse {
                url: format!("http://127.0.0.1:10010/portforward/{}", &stored.id[..8]),
            }))
        }

        type GetContainerEventsStream = EventStream;

        /// One `CONTAINER_CREATED_EVENT` per sandbox held, naming the
        /// sandbox as the container (as containerd 1.7 does for sandboxes),
        /// then the stream ends.
        async fn get_container_events(
            &self,
            request: Request<cri::GetEventsRequest>,
        ) -> Result<Response<EventStream>, Status> {
            self.seen.record(&request);
            let events: Vec<Result<cri::ContainerEventResponse, Status>> = self
                .store()
                .sandboxes
                .iter()
                .map(|s| {
                    Ok(cri::ContainerEventResponse {
                        container_id: s.id.clone(),
                        container_event_type: cri::ContainerEventType::ContainerCreatedEvent
                            as i32,
                        created_at: s.created_at,
                        pod_sandbox_status: Some(s.status()),
                        containers_statuses: Vec::new(),
                    })
                })
                .collect();
            Ok(Response::new(Box::pin(futures::stream::iter(events))))
        }
    }
}

fake_service! {
    impl ImageService for Pods {
        unimplemented {
            list_images(ListImagesRequest) -> ListImagesResponse;
            image_status(ImageStatusRequest) -> ImageStatusResponse;
            pull_image(PullImageRequest) -> PullImageResponse;
            remove_image(RemoveImageRequest) -> RemoveImageResponse;
            image_fs_info(ImageFsInfoRequest) -> ImageFsInfoResponse;
        }
    }
}
