//! A small CRI v1 client over a unix socket: wait until a runtime is ready,
//! pull from a loopback registry, and reset a runtime to no pods.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use hyper_util::rt::TokioIo;
use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use k8s_cri::v1::{
    ContainerFilter, ImageSpec, ImageStatusRequest, ListContainersRequest, ListPodSandboxRequest,
    PullImageRequest, RemoveContainerRequest, RemoveImageRequest, RemovePodSandboxRequest,
    StatusRequest, StopContainerRequest, StopPodSandboxRequest, VersionRequest,
};
use tokio::net::UnixStream;
use tonic::transport::{Channel, Endpoint, Uri};
use tonic::Code;

/// Deadline for a single CRI call. Stopping a pod whose processes ignore
/// SIGTERM is the slowest call we make; containerd bounds that itself.
const CALL_TIMEOUT: Duration = Duration::from_secs(60);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const POLL_INTERVAL: Duration = Duration::from_millis(200);

pub type Runtime = RuntimeServiceClient<Channel>;
pub type Images = ImageServiceClient<Channel>;

/// `unix:///run/x.sock` or a plain absolute path.
pub fn socket_path(endpoint: &str) -> Result<PathBuf> {
    let path = endpoint.strip_prefix("unix://").unwrap_or(endpoint);
    ensure!(
        path.starts_with('/'),
        "endpoint {endpoint:?}: expected unix:///absolute/path (only unix sockets are supported)"
    );
    Ok(PathBuf::from(path))
}

/// Connects to the CRI socket at `endpoint`.
pub async fn connect(endpoint: &str) -> Result<Channel> {
    let path = socket_path(endpoint)?;
    Endpoint::try_from("http://[::]:50051")
        .context("static endpoint URI")?
        .connect_timeout(CONNECT_TIMEOUT)
        .timeout(CALL_TIMEOUT)
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let path = path.clone();
            async move { Ok::<_, std::io::Error>(TokioIo::new(UnixStream::connect(path).await?)) }
        }))
        .await
        .with_context(|| format!("connect to {endpoint}"))
}

/// What a ready runtime reported.
#[derive(Debug, Clone)]
pub struct Ready {
    pub runtime: String,
    pub version: String,
}

/// Polls `Version`, then `Status`, until the runtime reports `RuntimeReady`
/// (and `NetworkReady` when `require_network`), or `timeout` passes.
pub async fn wait(endpoint: &str, timeout: Duration, require_network: bool) -> Result<Ready> {
    let deadline = Instant::now() + timeout;
    let mut last = String::from("no attempt finished");
    loop {
        let remaining = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(remaining, probe(endpoint, require_network)).await {
            Ok(Ok(Ok(ready))) => return Ok(ready),
            Ok(Ok(Err(not_ready))) => last = not_ready,
            Ok(Err(error)) => last = format!("{error:#}"),
            Err(_) => last = format!("the last attempt did not finish ({last})"),
        }
        let remaining = deadline.saturating_duration_since(Instant::now());
        if remaining.is_zero() {
            bail!("{endpoint} not ready after {timeout:?}: {last}");
        }
        tokio::time::sleep(POLL_INTERVAL.min(remaining)).await;
    }
}

/// `Ok(Err(reason))` when the runtime answers but is not ready yet.
async fn probe(
    endpoint: &str,
    require_network: bool,
) -> Result<std::result::Result<Ready, String>> {
    let mut client = Runtime::new(connect(endpoint).await?);
    let version = client
        .version(VersionRequest {
            version: "v1".into(),
        })
        .await
        .context("Version")?
        .into_inner();
    let status = client
        .status(StatusRequest { verbose: false })
        .await
        .context("Status")?
        .into_inner()
        .status
        .context("Status: no runtime status in the response")?;
    let mut required = vec!["RuntimeReady"];
    if require_network {
        required.push("NetworkReady");
    }
    let mut unmet = Vec::new();
    for name in required {
        match status.conditions.iter().find(|c| c.r#type == name) {
            Some(c) if c.status => {}
            Some(c) => unmet.push(format!("{name}=false ({}: {})", c.reason, c.message)),
            None => unmet.push(format!("{name} not reported")),
        }
    }
    if !unmet.is_empty() {
        return Ok(Err(unmet.join("; ")));
    }
    Ok(Ok(Ready {
        runtime: version.runtime_name,
        version: version.runtime_version,
    }))
}

/// The registry host of a loopback image name (`127.0.0.1:5000/x:y`).
/// Pulls are only ever made from a registry on this machine: a pull of a
/// public name makes containerd contact that registry even when the image
/// is present.
pub fn ensure_loopback_registry(image: &str) -> Result<()> {
    let host = image.split('/').next().unwrap_or_default();
    let name = host.rsplit_once(':').map_or(host, |(name, _port)| name);
    ensure!(
        image.contains('/') && matches!(name, "127.0.0.1" | "localhost" | "[::1]"),
        "refusing to pull {image:?}: only images from a registry on 127.0.0.1 may be pulled here"
    );
    Ok(())
}

/// `PullImage`; returns the image reference (id) containerd reports.
pub async fn pull(channel: Channel, image: &str) -> Result<String> {
    ensure_loopback_registry(image)?;
    let response = Images::new(channel)
        .pull_image(PullImageRequest {
            image: Some(image_spec(image)),
            auth: None,
            sandbox_config: None,
        })
        .await
        .with_context(|| format!("PullImage {image}"))?;
    Ok(response.into_inner().image_ref)
}

/// `RemoveImage`.
pub async fn remove_image(channel: Channel, image: &str) -> Result<()> {
    Images::new(channel)
        .remove_image(RemoveImageRequest {
            image: Some(image_spec(image)),
        })
        .await
        .with_context(|| format!("RemoveImage {image}"))?;
    Ok(())
}

/// The image id when `image` is present on the node.
pub async fn image_id(channel: Channel, image: &str) -> Result<Option<String>> {
    let response = Images::new(channel)
        .image_status(ImageStatusRequest {
            image: Some(image_spec(image)),
            verbose: false,
        })
        .await
        .with_context(|| format!("ImageStatus {image}"))?;
    Ok(response.into_inner().image.map(|i| i.id))
}

pub fn image_spec(image: &str) -> ImageSpec {
    ImageSpec {
        image: image.to_owned(),
        ..Default::default()
    }
}

/// What [`reset`] removed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Reset {
    pub sandboxes: usize,
    pub containers: usize,
}

/// Stops and removes every container and pod sandbox, so containerd itself
/// tears down netns, CNI allocations, mounts and shims. Keeps going past
/// failures and reports them all at the end.
pub async fn reset(channel: Channel) -> Result<Reset> {
    let mut client = Runtime::new(channel);
    let mut failures = Vec::new();
    let mut done = Reset::default();

    let containers = client
        .list_containers(ListContainersRequest { filter: None })
        .await
        .context("ListContainers")?
        .into_inner()
        .containers;
    for container in containers {
        let id = container.id.clone();
        let name = container
            .metadata
            .as_ref()
            .map_or("?", |m| m.name.as_str())
            .to_owned();
        let stopped = client
            .stop_container(StopContainerRequest {
                container_id: id.clone(),
                timeout: 0,
            })
            .await;
        if let Err(status) = ignore_not_found(stopped) {
            failures.push(format!("StopContainer {id} ({name}): {status}"));
        }
        match ignore_not_found(
            client
                .remove_container(RemoveContainerRequest {
                    container_id: id.clone(),
                })
                .await,
        ) {
            Ok(()) => done.containers += 1,
            Err(status) => failures.push(format!("RemoveContainer {id} ({name}): {status}")),
        }
    }

    let sandboxes = client
        .list_pod_sandbox(ListPodSandboxRequest { filter: None })
        .await
        .context("ListPodSandbox")?
        .into_inner()
        .items;
    for sandbox in sandboxes {
        let id = sandbox.id.clone();
        let name = sandbox
            .metadata
            .as_ref()
            .map_or_else(|| "?".to_owned(), |m| format!("{}/{}", m.namespace, m.name));
        let stopped = client
            .stop_pod_sandbox(StopPodSandboxRequest {
                pod_sandbox_id: id.clone(),
            })
            .await;
        if let Err(status) = ignore_not_found(stopped) {
            failures.push(format!("StopPodSandbox {id} ({name}): {status}"));
            continue;
        }
        match ignore_not_found(
            client
                .remove_pod_sandbox(RemovePodSandboxRequest {
                    pod_sandbox_id: id.clone(),
                })
                .await,
        ) {
            Ok(()) => {
                done.sandboxes += 1;
                eprintln!(
                    "removed pod sandbox {id} ({name}, handler {:?})",
                    sandbox.runtime_handler
                );
            }
            Err(status) => failures.push(format!("RemovePodSandbox {id} ({name}): {status}")),
        }
    }

    if !failures.is_empty() {
        bail!(
            "reset left {} failure(s):\n  {}",
            failures.len(),
            failures.join("\n  ")
        );
    }
    let left = client
        .list_pod_sandbox(ListPodSandboxRequest { filter: None })
        .await
        .context("ListPodSandbox after reset")?
        .into_inner()
        .items;
    ensure!(
        left.is_empty(),
        "{} pod sandbox(es) still listed after reset",
        left.len()
    );
    Ok(done)
}

/// Lists the containers of one sandbox.
pub async fn containers_of(
    client: &mut Runtime,
    sandbox_id: &str,
) -> Result<Vec<k8s_cri::v1::Container>> {
    Ok(client
        .list_containers(ListContainersRequest {
            filter: Some(ContainerFilter {
                pod_sandbox_id: sandbox_id.to_owned(),
                ..Default::default()
            }),
        })
        .await
        .context("ListContainers")?
        .into_inner()
        .containers)
}

fn ignore_not_found<T>(
    result: std::result::Result<T, tonic::Status>,
) -> std::result::Result<(), tonic::Status> {
    match result {
        Ok(_) => Ok(()),
        Err(status) if status.code() == Code::NotFound => Ok(()),
        Err(status) => Err(status),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints() {
        assert_eq!(
            socket_path("unix:///run/c.sock").expect("unix"),
            PathBuf::from("/run/c.sock")
        );
        assert_eq!(
            socket_path("/run/c.sock").expect("path"),
            PathBuf::from("/run/c.sock")
        );
        assert!(socket_path("tcp://127.0.0.1:1").is_err());
        assert!(socket_path("unix://relative.sock").is_err());
    }

    #[test]
    fn only_loopback_pulls() {
        ensure_loopback_registry("127.0.0.1:5000/fast-sandbox/busybox:v1").expect("loopback");
        ensure_loopback_registry("localhost:5000/x:y").expect("localhost");
        for bad in [
            "busybox:latest",
            "docker.io/library/busybox:1",
            "registry.k8s.io/pause:3.9",
            "10.0.0.1:5000/x:y",
        ] {
            assert!(ensure_loopback_registry(bad).is_err(), "{bad}");
        }
    }

    #[tokio::test]
    async fn wait_names_the_missing_socket() {
        let dir = tempfile::tempdir().expect("tempdir");
        let endpoint = format!("unix://{}/none.sock", dir.path().display());
        let error = wait(&endpoint, Duration::from_millis(300), true)
            .await
            .expect_err("no socket");
        let message = format!("{error:#}");
        assert!(message.contains("not ready after"), "{message}");
        assert!(message.contains("none.sock"), "{message}");
    }
}
