//! The call sequence kubelet makes for one pod, recorded as a [`Transcript`]
//! so two runs (direct vs shim, cold vs warm) can be compared exactly. Besides
//! CRI answers it records what the pod and the host observe: hostname,
//! `/etc/hostname`, `/etc/resolv.conf`, a namespaced sysctl, the container's
//! and the pause's cgroups, the IP reachable from the host, and the log file.

use std::{collections::HashMap, io::Write as _, time::Duration};

use fast_sandbox_proto::cri::{
    ContainerFilter, ContainerState, ContainerStateValue, ContainerStatsFilter,
    ContainerStatsRequest, ContainerStatusRequest, CreateContainerRequest, ExecSyncRequest,
    ImageSpec, ImageStatusRequest, ListContainerStatsRequest, ListContainersRequest,
    ListPodSandboxRequest, ListPodSandboxStatsRequest, PodSandboxFilter, PodSandboxState,
    PodSandboxStateValue, PodSandboxStatsFilter, PodSandboxStatsRequest, PodSandboxStatusRequest,
    PullImageRequest, RemoveContainerRequest, RemovePodSandboxRequest, RunPodSandboxRequest,
    StartContainerRequest, StopContainerRequest, StopPodSandboxRequest, VersionRequest,
};

use crate::{
    equiv::Transcript,
    pod::{TestPod, TEST_LABEL},
    wait_for, Cri, DevNode,
};

/// Port the workload serves its hostname on, inside the pod.
pub const POD_PORT: u16 = 8080;

/// The workload: logs its identity, then idles until SIGTERM, exiting 0.
/// It also serves its hostname on [`POD_PORT`], so the host can reach it.
pub const SCRIPT: &str = "echo hello from $POD_NAME; hostname; nc -ll -p 8080 -e /bin/hostname & \
     trap 'exit 0' TERM; while :; do sleep 1 & wait $!; done";

/// Runs kubelet's call sequence for `pod` on `handler` and records every answer.
pub async fn kubelet_sequence(
    cri: &mut Cri,
    node: &DevNode,
    pod: &TestPod,
    handler: &str,
) -> Transcript {
    let mut t = Transcript::new();
    pod.prepare_log_dirs(&["app"]).expect("log dirs");
    let rt = &mut cri.runtime;
    let img = &mut cri.image;

    let r = rt
        .version(VersionRequest {
            version: "v1".into(),
        })
        .await;
    t.record("Version", &r);

    let config = pod.sandbox_config();
    let r = rt
        .run_pod_sandbox(RunPodSandboxRequest {
            config: Some(config.clone()),
            runtime_handler: handler.into(),
        })
        .await;
    t.record("RunPodSandbox", &r);
    let sid = r.expect("RunPodSandbox").into_inner().pod_sandbox_id;
    t.alias(&sid, "sandbox");

    let r = rt
        .pod_sandbox_status(PodSandboxStatusRequest {
            pod_sandbox_id: sid.clone(),
            verbose: false,
        })
        .await;
    let ip = r
        .as_ref()
        .ok()
        .and_then(|s| {
            s.get_ref()
                .status
                .as_ref()?
                .network
                .as_ref()
                .map(|n| n.ip.clone())
        })
        .unwrap_or_default();
    assert!(!ip.is_empty(), "the pod got no IP from CNI");
    t.alias(&ip, "pod-ip");
    t.record("PodSandboxStatus", &r);
    let r = rt
        .pod_sandbox_status(PodSandboxStatusRequest {
            pod_sandbox_id: sid.clone(),
            verbose: true,
        })
        .await;
    t.record("PodSandboxStatus(verbose)", &r);

    let image = ImageSpec {
        image: node.registry_image.clone(),
        ..Default::default()
    };
    let r = img
        .pull_image(PullImageRequest {
            image: Some(image.clone()),
            auth: None,
            sandbox_config: Some(config.clone()),
        })
        .await;
    t.record("PullImage", &r);
    let r = img
        .image_status(ImageStatusRequest {
            image: Some(image.clone()),
            verbose: false,
        })
        .await;
    t.record("ImageStatus", &r);

    let r = rt
        .create_container(CreateContainerRequest {
            pod_sandbox_id: sid.clone(),
            config: Some(pod.container_config("app", &node.registry_image, SCRIPT)),
            sandbox_config: Some(config.clone()),
        })
        .await;
    t.record("CreateContainer", &r);
    let cid = r.expect("CreateContainer").into_inner().container_id;
    t.alias(&cid, "container");

    let r = rt
        .start_container(StartContainerRequest {
            container_id: cid.clone(),
        })
        .await;
    t.record("StartContainer", &r);
    let r = rt
        .container_status(ContainerStatusRequest {
            container_id: cid.clone(),
            verbose: false,
        })
        .await;
    t.record("ContainerStatus", &r);

    let r = rt
        .exec_sync(ExecSyncRequest {
            container_id: cid.clone(),
            cmd: vec![
                "sh".into(),
                "-c".into(),
                "hostname; cat /etc/hostname /etc/resolv.conf; echo $POD_NAME; \
                 cat /proc/sys/net/ipv4/ip_unprivileged_port_start /proc/self/cgroup; exit 3"
                    .into(),
            ],
            timeout: 10,
        })
        .await;
    let out = r.as_ref().map(|r| r.get_ref().clone()).expect("ExecSync");
    assert_eq!(out.exit_code, 3, "exec exit code is passed through");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.starts_with(&format!("{}\n{}\n", pod.name, pod.name)),
        "{stdout}"
    );
    assert!(stdout.contains("nameserver 10.209.0.10"), "{stdout}");
    t.record("ExecSync", &r);

    match host_to_pod(&ip).await {
        Ok(answer) => t.note("HostToPod", answer),
        Err(e) => {
            // Say what the pod and the host saw, then fail.
            let diag = rt
                .exec_sync(ExecSyncRequest {
                    container_id: cid.clone(),
                    cmd: vec!["sh".into(), "-c".into(), "ps; netstat -ltn; ip addr".into()],
                    timeout: 10,
                })
                .await
                .map(|r| String::from_utf8_lossy(&r.into_inner().stdout).into_owned());
            let neigh = std::process::Command::new("ip").args(["neigh"]).output();
            panic!(
                "{e:#} (pod {ip}); inside: {diag:?}; host neighbours: {:?}",
                neigh.map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            );
        }
    }
    t.note(
        "PauseCgroup",
        pause_cgroup(rt, &sid, &pod.cgroup_parent()).await,
    );

    let by_case = HashMap::from([(TEST_LABEL.to_owned(), pod.case.clone())]);
    for (name, filter) in [
        (
            "ListPodSandbox(label)",
            PodSandboxFilter {
                label_selector: by_case.clone(),
                ..Default::default()
            },
        ),
        (
            "ListPodSandbox(id)",
            PodSandboxFilter {
                id: sid.clone(),
                ..Default::default()
            },
        ),
        (
            "ListPodSandbox(ready+label)",
            PodSandboxFilter {
                state: Some(PodSandboxStateValue {
                    state: PodSandboxState::SandboxReady as i32,
                }),
                label_selector: by_case.clone(),
                ..Default::default()
            },
        ),
    ] {
        let r = rt
            .list_pod_sandbox(ListPodSandboxRequest {
                filter: Some(filter),
            })
            .await;
        assert_eq!(
            r.as_ref().map(|r| r.get_ref().items.len()).ok(),
            Some(1),
            "{name}"
        );
        t.record(name, &r);
    }
    let pod_labels = HashMap::from([("io.kubernetes.pod.uid".to_owned(), pod.uid.clone())]);
    for (name, filter) in [
        (
            "ListContainers(sandbox)",
            ContainerFilter {
                pod_sandbox_id: sid.clone(),
                ..Default::default()
            },
        ),
        (
            "ListContainers(label)",
            ContainerFilter {
                label_selector: pod_labels.clone(),
                ..Default::default()
            },
        ),
        (
            "ListContainers(running+sandbox)",
            ContainerFilter {
                pod_sandbox_id: sid.clone(),
                state: Some(ContainerStateValue {
                    state: ContainerState::ContainerRunning as i32,
                }),
                ..Default::default()
            },
        ),
    ] {
        let r = rt
            .list_containers(ListContainersRequest {
                filter: Some(filter),
            })
            .await;
        assert_eq!(
            r.as_ref().map(|r| r.get_ref().containers.len()).ok(),
            Some(1),
            "{name}"
        );
        t.record(name, &r);
    }

    let r = rt
        .list_container_stats(ListContainerStatsRequest {
            filter: Some(ContainerStatsFilter {
                pod_sandbox_id: sid.clone(),
                ..Default::default()
            }),
        })
        .await;
    t.record("ListContainerStats", &r);
    let r = rt
        .container_stats(ContainerStatsRequest {
            container_id: cid.clone(),
        })
        .await;
    t.record("ContainerStats", &r);
    let r = rt
        .list_pod_sandbox_stats(ListPodSandboxStatsRequest {
            filter: Some(PodSandboxStatsFilter {
                label_selector: by_case.clone(),
                ..Default::default()
            }),
        })
        .await;
    t.record("ListPodSandboxStats", &r);
    let r = rt
        .pod_sandbox_stats(PodSandboxStatsRequest {
            pod_sandbox_id: sid.clone(),
        })
        .await;
    t.record("PodSandboxStats", &r);

    let r = rt
        .stop_container(StopContainerRequest {
            container_id: cid.clone(),
            timeout: 10,
        })
        .await;
    t.record("StopContainer", &r);
    let r = rt
        .container_status(ContainerStatusRequest {
            container_id: cid.clone(),
            verbose: false,
        })
        .await;
    let status = r
        .as_ref()
        .ok()
        .and_then(|r| r.get_ref().status.clone())
        .expect("status");
    assert_eq!(status.state, ContainerState::ContainerExited as i32);
    assert_eq!(status.exit_code, 0, "the workload exits 0 on SIGTERM");
    t.record("ContainerStatus(exited)", &r);

    let log = std::fs::read_to_string(pod.log_directory.join("app/0.log")).expect("container log");
    let lines: Vec<&str> = log
        .lines()
        .map(|l| l.split_once(' ').map_or(l, |x| x.1))
        .collect();
    assert_eq!(
        lines,
        [
            format!("stdout F hello from {}", pod.name),
            format!("stdout F {}", pod.name)
        ],
        "CRI log format: <time> <stream> <tag> <line>"
    );

    let r = rt
        .remove_container(RemoveContainerRequest {
            container_id: cid.clone(),
        })
        .await;
    t.record("RemoveContainer", &r);
    let r = rt
        .stop_pod_sandbox(StopPodSandboxRequest {
            pod_sandbox_id: sid.clone(),
        })
        .await;
    t.record("StopPodSandbox", &r);
    let r = rt
        .pod_sandbox_status(PodSandboxStatusRequest {
            pod_sandbox_id: sid.clone(),
            verbose: false,
        })
        .await;
    t.record("PodSandboxStatus(stopped)", &r);
    let r = rt
        .remove_pod_sandbox(RemovePodSandboxRequest {
            pod_sandbox_id: sid.clone(),
        })
        .await;
    t.record("RemovePodSandbox", &r);
    let r = rt
        .pod_sandbox_status(PodSandboxStatusRequest {
            pod_sandbox_id: sid.clone(),
            verbose: false,
        })
        .await;
    t.record("PodSandboxStatus(removed)", &r);
    pod.remove_pod_cgroups();
    t
}

/// Connects from the host to the pod's IP and reads what the workload
/// serves (its hostname), retrying while `nc` starts (bounded).
pub async fn host_to_pod(ip: &str) -> anyhow::Result<String> {
    let addr: std::net::SocketAddr = format!("{ip}:{POD_PORT}").parse().expect("pod address");
    wait_for(
        "the pod to answer on its IP",
        Duration::from_secs(10),
        || async move {
            tokio::task::spawn_blocking(move || {
                let mut s =
                    std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(1)).ok()?;
                s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
                let _ = s.write_all(b"\n");
                // One line (the hostname); busybox `nc -ll` may keep the
                // connection open after its child exits, so no EOF wait.
                let mut out = String::new();
                std::io::BufRead::read_line(&mut std::io::BufReader::new(s), &mut out).ok()?;
                (!out.is_empty()).then_some(out)
            })
            .await
            .ok()
            .flatten()
        },
    )
    .await
}

/// The pause process's cgroups, once every hierarchy has it under the pod's
/// cgroup parent (a warm slot's pause is moved there just after its claim).
async fn pause_cgroup(
    rt: &mut fast_sandbox_proto::cri::runtime_service_client::RuntimeServiceClient<
        tonic::transport::Channel,
    >,
    sid: &str,
    parent: &str,
) -> Vec<String> {
    let info = rt
        .pod_sandbox_status(PodSandboxStatusRequest {
            pod_sandbox_id: sid.into(),
            verbose: true,
        })
        .await
        .expect("verbose status")
        .into_inner()
        .info;
    let pid = info
        .get("info")
        .and_then(|i| serde_json::from_str::<serde_json::Value>(i).ok())
        .and_then(|v| v.get("pid").and_then(serde_json::Value::as_i64))
        .expect("pause pid in verbose info");
    let under_parent = format!("{parent}/{sid}");
    let read = move || {
        let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
        let mut lines: Vec<String> = text.lines().map(str::to_owned).collect();
        lines.sort();
        lines
            .iter()
            .all(|l| l.ends_with(&under_parent) || l.ends_with(":/"))
            .then_some(lines)
    };
    wait_for(
        "the pause in the pod's cgroup",
        Duration::from_secs(10),
        || {
            let read = read.clone();
            async move { read() }
        },
    )
    .await
    .expect("pause cgroup")
}
