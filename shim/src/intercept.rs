//! The claim decision: is a `RunPodSandbox` one a warm slot may serve, and of
//! which [`PoolKey`]? And its inverse: the placeholder config a pool builds a
//! slot of a given key with.
//!
//! Both directions live here so that they cannot drift apart: a placeholder
//! built by [`PoolKey::placeholder_config`] validates back into the same key
//! (tested below).
//!
//! What makes a pod ineligible (it starts cold, with its handler rewritten to
//! the upstream one) follows `docs/containerd-1.6-sandbox-state.md`: anything
//! containerd fixes when the sandbox starts and that a claim cannot change
//! afterwards, and that the pool does not key on.

use fast_sandbox_proto::cri::{
    self, security_profile::ProfileType, NamespaceMode, PodSandboxConfig, RunPodSandboxRequest,
};

use crate::misses::Ineligible;
use crate::misses::UNTRUSTED_WORKLOAD_ANNOTATION;
use crate::slots::{
    Claim, HandlerMap, Placeholder, PoolKey, SeLinuxShape, SeccompShape, Shape, POOL_LABEL,
    RUNTIME_HANDLER_LABEL, SLOT_LABEL, SLOT_TOKEN_LABEL, SLOT_UNCLAIMED,
};

/// Bandwidth shaping is applied by CNI at ADD, with the placeholder's values.
pub const BANDWIDTH_ANNOTATIONS: [&str; 2] = [
    "kubernetes.io/ingress-bandwidth",
    "kubernetes.io/egress-bandwidth",
];

/// containerd's prefix for localhost seccomp profiles, trimmed from both the
/// deprecated path and `localhost_ref`.
const LOCALHOST_PREFIX: &str = "localhost/";

impl Claim {
    /// Validates a `RunPodSandbox` once, at the shim's edge: `Ok` only for an
    /// exposed handler and a pod a slot of the returned key can serve
    /// indistinguishably from a cold start. Clones the pod's config into the
    /// claim, less the reserved [`RUNTIME_HANDLER_LABEL`]: a cold start
    /// replaces the pod's value of it and never reports it either.
    pub fn from_request(
        request: &RunPodSandboxRequest,
        handlers: &HandlerMap,
    ) -> Result<Claim, Ineligible> {
        let upstream = handlers
            .upstream_for(&request.runtime_handler)
            .ok_or_else(|| Ineligible::NotFastHandler(request.runtime_handler.clone()))?;
        let config = request.config.as_ref().ok_or(Ineligible::MissingConfig)?;
        let shape = Shape::of(config)?;
        let mut config = config.clone();
        config.labels.remove(RUNTIME_HANDLER_LABEL);
        Ok(Claim {
            exposed_handler: request.runtime_handler.clone(),
            key: PoolKey {
                upstream_handler: upstream.to_owned(),
                shape,
            },
            config,
        })
    }
}

/// Turns a `RunPodSandbox` of exposed handler `exposed` that missed into the
/// cold request upstream runs: the upstream handler, and the reserved
/// [`RUNTIME_HANDLER_LABEL`] set to `exposed` (over any value the pod set),
/// so that every later answer about the sandbox can report `exposed`, as a
/// warm hit does (rewrite.rs). Upstream stores the label, so nothing is lost
/// when the shim or the node plugin restarts.
pub(crate) fn make_cold(request: &mut RunPodSandboxRequest, exposed: &str, upstream_handler: &str) {
    request.runtime_handler = upstream_handler.to_owned();
    if let Some(config) = request.config.as_mut() {
        config
            .labels
            .insert(RUNTIME_HANDLER_LABEL.to_owned(), exposed.to_owned());
    }
}

impl Shape {
    /// The shape of an eligible pod's config.
    pub fn of(config: &PodSandboxConfig) -> Result<Shape, Ineligible> {
        if config.metadata.is_none() {
            return Err(Ineligible::MissingMetadata);
        }
        let security = config
            .linux
            .as_ref()
            .and_then(|linux| linux.security_context.as_ref());
        if let Some(ns) = security.and_then(|s| s.namespace_options.as_ref()) {
            let node = NamespaceMode::Node as i32;
            if ns.network == node {
                return Err(Ineligible::HostNetwork);
            }
            if ns.pid == node {
                return Err(Ineligible::HostPid);
            }
            if ns.ipc == node {
                return Err(Ineligible::HostIpc);
            }
            if ns
                .userns_options
                .as_ref()
                .is_some_and(|userns| userns.mode != node)
            {
                return Err(Ineligible::UserNamespace);
            }
        }
        if let Some(port) = config.port_mappings.iter().find(|p| p.host_port > 0) {
            return Err(Ineligible::HostPort {
                container_port: port.container_port,
                host_port: port.host_port,
            });
        }
        if security.is_some_and(|s| s.privileged) {
            return Err(Ineligible::Privileged);
        }
        if config
            .annotations
            .contains_key(UNTRUSTED_WORKLOAD_ANNOTATION)
        {
            return Err(Ineligible::Untrusted);
        }
        if let Some(annotation) = BANDWIDTH_ANNOTATIONS
            .into_iter()
            .find(|a| config.annotations.contains_key(*a))
        {
            return Err(Ineligible::Bandwidth { annotation });
        }
        let Some(security) = security else {
            return Ok(Shape::default());
        };
        let run_as_user = security.run_as_user.as_ref().map(|v| v.value);
        let run_as_group = security.run_as_group.as_ref().map(|v| v.value);
        if run_as_group.is_some() && run_as_user.is_none() {
            return Err(Ineligible::GroupWithoutUser);
        }
        let mut supplemental_groups = security.supplemental_groups.clone();
        supplemental_groups.sort_unstable();
        supplemental_groups.dedup();
        Ok(Shape {
            seccomp: seccomp_shape(security)?,
            run_as_user,
            run_as_group,
            supplemental_groups,
            selinux: security.selinux_options.as_ref().and_then(selinux_shape),
        })
    }

    /// The sandbox security context of a placeholder of this shape: no host
    /// namespaces, not privileged, and exactly this shape's credentials and
    /// confinement.
    pub fn placeholder_security_context(&self) -> cri::LinuxSandboxSecurityContext {
        let seccomp = match &self.seccomp {
            // Left unset, so the slot gets what containerd gives a pod that
            // sets nothing (its `unset_seccomp_profile`, empty by default).
            SeccompShape::Unconfined => None,
            SeccompShape::RuntimeDefault => Some(cri::SecurityProfile {
                profile_type: ProfileType::RuntimeDefault as i32,
                localhost_ref: String::new(),
            }),
            SeccompShape::Localhost(profile) => Some(cri::SecurityProfile {
                profile_type: ProfileType::Localhost as i32,
                // containerd trims one prefix: a profile that itself starts
                // with it must keep it (found by the `claim` fuzz target).
                localhost_ref: if profile.starts_with(LOCALHOST_PREFIX) {
                    format!("{LOCALHOST_PREFIX}{profile}")
                } else {
                    profile.clone()
                },
            }),
        };
        cri::LinuxSandboxSecurityContext {
            namespace_options: Some(cri::NamespaceOption {
                network: NamespaceMode::Pod as i32,
                // What kubelet sends unless the pod shares its process
                // namespace; the pause only distinguishes NODE.
                pid: NamespaceMode::Container as i32,
                ipc: NamespaceMode::Pod as i32,
                ..Default::default()
            }),
            selinux_options: self.selinux.as_ref().map(|s| cri::SeLinuxOption {
                user: s.user.clone(),
                role: s.role.clone(),
                r#type: s.r#type.clone(),
                level: s.level.clone(),
            }),
            run_as_user: self.run_as_user.map(|value| cri::Int64Value { value }),
            run_as_group: self.run_as_group.map(|value| cri::Int64Value { value }),
            supplemental_groups: self.supplemental_groups.clone(),
            seccomp,
            ..Default::default()
        }
    }
}

impl PoolKey {
    /// The full config of a placeholder sandbox of this key: the slot's
    /// name, namespace and uid, the slot labels, no port mappings, no
    /// annotations, no sysctls, DNS config without servers (the claim
    /// rewrites `resolv.conf`), and [`Shape::placeholder_security_context`].
    /// [`Claim::from_request`] of it gives back this key.
    pub fn placeholder_config(&self, slot: &Placeholder<'_>) -> PodSandboxConfig {
        PodSandboxConfig {
            metadata: Some(cri::PodSandboxMetadata {
                name: slot.name.to_owned(),
                uid: slot.uid.to_owned(),
                namespace: slot.namespace.to_owned(),
                attempt: 0,
            }),
            hostname: slot.name.to_owned(),
            log_directory: String::new(),
            dns_config: Some(cri::DnsConfig::default()),
            port_mappings: Vec::new(),
            labels: [
                (SLOT_LABEL, SLOT_UNCLAIMED),
                (SLOT_TOKEN_LABEL, slot.token),
                (POOL_LABEL, slot.pool),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect(),
            annotations: Default::default(),
            linux: Some(cri::LinuxPodSandboxConfig {
                cgroup_parent: slot.cgroup_parent.to_owned(),
                security_context: Some(self.shape.placeholder_security_context()),
                ..Default::default()
            }),
            windows: None,
        }
    }

    /// The upstream `RunPodSandbox` that creates a placeholder of this key,
    /// with the upstream handler.
    pub fn placeholder_request(&self, slot: &Placeholder<'_>) -> RunPodSandboxRequest {
        RunPodSandboxRequest {
            config: Some(self.placeholder_config(slot)),
            runtime_handler: self.upstream_handler.clone(),
        }
    }
}

/// The seccomp profile containerd 1.6 gives the pause: the `seccomp` field
/// when set, else the deprecated `seccomp_profile_path`, else none.
///
/// "None" and an explicit unconfined profile are one shape: they differ only
/// on a node whose containerd sets `unset_seccomp_profile`, and there a slot
/// (built unset) is stricter than the cold start, never looser.
fn seccomp_shape(security: &cri::LinuxSandboxSecurityContext) -> Result<SeccompShape, Ineligible> {
    let invalid = |reason: String| Err(Ineligible::InvalidSeccomp(reason));
    if let Some(profile) = &security.seccomp {
        let localhost = ProfileType::Localhost as i32;
        if profile.profile_type != localhost && !profile.localhost_ref.is_empty() {
            return invalid("localhost_ref is set for a non-localhost profile".to_owned());
        }
        return match ProfileType::try_from(profile.profile_type) {
            Ok(ProfileType::RuntimeDefault) => Ok(SeccompShape::RuntimeDefault),
            Ok(ProfileType::Unconfined) => Ok(SeccompShape::Unconfined),
            Ok(ProfileType::Localhost) => localhost_shape(&profile.localhost_ref),
            Err(_) => invalid(format!("unknown profile type {}", profile.profile_type)),
        };
    }
    #[allow(deprecated)] // still sent by older kubelets, still honoured
    let path = security.seccomp_profile_path.as_str();
    match path {
        "" | "unconfined" => Ok(SeccompShape::Unconfined),
        "runtime/default" | "docker/default" => Ok(SeccompShape::RuntimeDefault),
        path => match path.strip_prefix(LOCALHOST_PREFIX) {
            Some(_) => localhost_shape(path),
            None => invalid(format!("invalid profile {path:?}")),
        },
    }
}

fn localhost_shape(reference: &str) -> Result<SeccompShape, Ineligible> {
    let profile = reference
        .strip_prefix(LOCALHOST_PREFIX)
        .unwrap_or(reference);
    if profile.is_empty() {
        return Err(Ineligible::InvalidSeccomp(
            "localhost profile without a path".to_owned(),
        ));
    }
    Ok(SeccompShape::Localhost(profile.to_owned()))
}

/// All-empty options label the pause like no options at all.
fn selinux_shape(options: &cri::SeLinuxOption) -> Option<SeLinuxShape> {
    let shape = SeLinuxShape {
        user: options.user.clone(),
        role: options.role.clone(),
        r#type: options.r#type.clone(),
        level: options.level.clone(),
    };
    (shape != SeLinuxShape::default()).then_some(shape)
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;
    use crate::{misses::MissReason, slots::SLOT_NAMESPACE};

    fn handlers() -> HandlerMap {
        HandlerMap::new([("fast-runc", "runc"), ("fast-gvisor", "runsc")])
    }

    /// What kubelet sends for an ordinary pod.
    fn kubelet_config() -> PodSandboxConfig {
        PodSandboxConfig {
            metadata: Some(cri::PodSandboxMetadata {
                name: "web".into(),
                uid: "uid-1".into(),
                namespace: "default".into(),
                attempt: 0,
            }),
            hostname: "web".into(),
            log_directory: "/var/log/pods/default_web_uid-1".into(),
            port_mappings: vec![cri::PortMapping {
                container_port: 8080,
                ..Default::default()
            }],
            labels: HashMap::from([("io.kubernetes.pod.uid".into(), "uid-1".into())]),
            linux: Some(cri::LinuxPodSandboxConfig {
                cgroup_parent: "/kubepods/besteffort/poduid-1".into(),
                security_context: Some(cri::LinuxSandboxSecurityContext {
                    namespace_options: Some(cri::NamespaceOption {
                        pid: NamespaceMode::Container as i32,
                        ..Default::default()
                    }),
                    seccomp: Some(cri::SecurityProfile::default()),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn request(handler: &str, config: PodSandboxConfig) -> RunPodSandboxRequest {
        RunPodSandboxRequest {
            config: Some(config),
            runtime_handler: handler.into(),
        }
    }

    fn security(config: &mut PodSandboxConfig) -> &mut cri::LinuxSandboxSecurityContext {
        config
            .linux
            .get_or_insert_with(Default::default)
            .security_context
            .get_or_insert_with(Default::default)
    }

    fn shape_of(edit: impl FnOnce(&mut PodSandboxConfig)) -> Result<Shape, Ineligible> {
        let mut config = kubelet_config();
        edit(&mut config);
        Claim::from_request(&request("fast-runc", config), &handlers()).map(|c| c.key.shape)
    }

    #[test]
    fn ordinary_pod_is_a_claim_of_the_mapped_handler() {
        let claim = Claim::from_request(&request("fast-runc", kubelet_config()), &handlers())
            .expect("eligible");
        assert_eq!(claim.exposed_handler, "fast-runc");
        assert_eq!(claim.key.upstream_handler, "runc");
        assert_eq!(
            claim.key.shape,
            Shape {
                seccomp: SeccompShape::RuntimeDefault,
                ..Default::default()
            }
        );
        assert_eq!(claim.config, kubelet_config());

        let gvisor = Claim::from_request(&request("fast-gvisor", kubelet_config()), &handlers())
            .expect("eligible");
        assert_eq!(gvisor.key.upstream_handler, "runsc");
    }

    #[test]
    fn claim_and_cold_request_carry_no_pod_value_of_the_reserved_label() {
        let mut config = kubelet_config();
        config
            .labels
            .insert(RUNTIME_HANDLER_LABEL.into(), "fast-gvisor".into());
        let mut pod = request("fast-runc", config);
        let claim = Claim::from_request(&pod, &handlers()).expect("eligible");
        assert_eq!(claim.config, kubelet_config(), "the pod's value is dropped");

        make_cold(&mut pod, "fast-runc", "runc");
        assert_eq!(pod.runtime_handler, "runc");
        let mut expected = kubelet_config();
        expected
            .labels
            .insert(RUNTIME_HANDLER_LABEL.into(), "fast-runc".into());
        assert_eq!(pod.config, Some(expected), "the shim's value replaces it");

        let mut no_config = RunPodSandboxRequest {
            config: None,
            runtime_handler: "fast-runc".into(),
        };
        make_cold(&mut no_config, "fast-runc", "runc");
        assert_eq!(no_config.config, None, "upstream rejects it as before");
    }

    #[test]
    fn unknown_handlers_and_malformed_requests_are_not_claims() {
        for handler in ["runc", "", "fast-kata"] {
            let err = Claim::from_request(&request(handler, kubelet_config()), &handlers())
                .expect_err(handler);
            assert_eq!(err, Ineligible::NotFastHandler(handler.into()));
            assert_eq!(err.reason(), MissReason::NotFastHandler);
        }
        let no_config = RunPodSandboxRequest {
            config: None,
            runtime_handler: "fast-runc".into(),
        };
        let err = Claim::from_request(&no_config, &handlers()).expect_err("no config");
        assert_eq!(err, Ineligible::MissingConfig);
        assert_eq!(err.reason(), MissReason::InvalidConfig);
        let err = shape_of(|c| c.metadata = None).expect_err("no metadata");
        assert_eq!(err, Ineligible::MissingMetadata);
    }

    #[test]
    fn each_ineligible_cause() {
        let node = NamespaceMode::Node as i32;
        let ns = |c: &mut PodSandboxConfig| {
            security(c)
                .namespace_options
                .get_or_insert_with(Default::default)
                .clone()
        };
        type Edit = Box<dyn Fn(&mut PodSandboxConfig)>;
        let cases: Vec<(Edit, MissReason)> = vec![
            (
                Box::new(move |c| {
                    let mut o = ns(c);
                    o.network = node;
                    security(c).namespace_options = Some(o);
                }),
                MissReason::HostNetwork,
            ),
            (
                Box::new(move |c| {
                    let mut o = ns(c);
                    o.pid = node;
                    security(c).namespace_options = Some(o);
                }),
                MissReason::HostPid,
            ),
            (
                Box::new(move |c| {
                    let mut o = ns(c);
                    o.ipc = node;
                    security(c).namespace_options = Some(o);
                }),
                MissReason::HostIpc,
            ),
            (
                Box::new(move |c| {
                    let mut o = ns(c);
                    o.userns_options = Some(cri::UserNamespace {
                        mode: NamespaceMode::Pod as i32,
                        ..Default::default()
                    });
                    security(c).namespace_options = Some(o);
                }),
                MissReason::UserNamespace,
            ),
            (
                Box::new(|c| {
                    c.port_mappings.push(cri::PortMapping {
                        container_port: 80,
                        host_port: 8080,
                        ..Default::default()
                    })
                }),
                MissReason::HostPort,
            ),
            (
                Box::new(|c| security(c).privileged = true),
                MissReason::Privileged,
            ),
            (
                Box::new(|c| {
                    c.annotations
                        .insert(UNTRUSTED_WORKLOAD_ANNOTATION.into(), "true".into());
                }),
                MissReason::Untrusted,
            ),
            (
                Box::new(|c| {
                    c.annotations
                        .insert("kubernetes.io/ingress-bandwidth".into(), "1M".into());
                }),
                MissReason::Bandwidth,
            ),
            (
                Box::new(|c| {
                    c.annotations
                        .insert("kubernetes.io/egress-bandwidth".into(), "1M".into());
                }),
                MissReason::Bandwidth,
            ),
            (
                Box::new(|c| security(c).run_as_group = Some(cri::Int64Value { value: 5 })),
                MissReason::InvalidConfig,
            ),
        ];
        for (i, (edit, reason)) in cases.iter().enumerate() {
            let err = shape_of(edit).expect_err(&format!("case {i}: {reason}"));
            assert_eq!(err.reason(), *reason, "case {i}: {err}");
        }

        // Look-alikes that stay eligible: a container port without a host
        // port, a user namespace in NODE mode (the host's), the pod's own
        // choice of pid namespace.
        shape_of(|c| {
            let o = security(c)
                .namespace_options
                .get_or_insert_with(Default::default);
            o.userns_options = Some(cri::UserNamespace {
                mode: node,
                ..Default::default()
            });
            o.pid = NamespaceMode::Pod as i32;
        })
        .expect("eligible");
        shape_of(|c| c.linux = None).expect("no linux config at all is eligible");
    }

    #[test]
    fn each_shape_field() {
        let shape = shape_of(|c| {
            let s = security(c);
            s.run_as_user = Some(cri::Int64Value { value: 1000 });
            s.run_as_group = Some(cri::Int64Value { value: 0 });
            s.supplemental_groups = vec![30, 10, 20, 10];
            s.selinux_options = Some(cri::SeLinuxOption {
                user: "system_u".into(),
                role: "system_r".into(),
                r#type: "container_t".into(),
                level: "s0:c1,c2".into(),
            });
            s.seccomp = Some(cri::SecurityProfile {
                profile_type: ProfileType::Localhost as i32,
                localhost_ref: "profiles/audit.json".into(),
            });
        })
        .expect("eligible");
        assert_eq!(
            shape,
            Shape {
                seccomp: SeccompShape::Localhost("profiles/audit.json".into()),
                run_as_user: Some(1000),
                run_as_group: Some(0),
                supplemental_groups: vec![10, 20, 30],
                selinux: Some(SeLinuxShape {
                    user: "system_u".into(),
                    role: "system_r".into(),
                    r#type: "container_t".into(),
                    level: "s0:c1,c2".into(),
                }),
            }
        );

        // uid 0 is a shape of its own, distinct from "unset" (image user).
        let root = shape_of(|c| security(c).run_as_user = Some(cri::Int64Value { value: 0 }))
            .expect("eligible");
        assert_eq!(root.run_as_user, Some(0));
        assert_ne!(root, shape_of(|_| {}).expect("eligible"));

        let empty_selinux =
            shape_of(|c| security(c).selinux_options = Some(Default::default())).expect("ok");
        assert_eq!(empty_selinux.selinux, None);
    }

    #[test]
    #[allow(deprecated)] // the deprecated path is what is tested
    fn seccomp_field_and_deprecated_path() {
        let with = |profile: Option<cri::SecurityProfile>, path: &str| {
            let path = path.to_owned();
            shape_of(move |c| {
                let s = security(c);
                s.seccomp = profile;
                s.seccomp_profile_path = path;
            })
        };
        let profile = |t: ProfileType, r: &str| {
            Some(cri::SecurityProfile {
                profile_type: t as i32,
                localhost_ref: r.into(),
            })
        };
        let ok = |r: Result<Shape, Ineligible>| r.expect("eligible").seccomp;
        use SeccompShape::*;

        assert_eq!(ok(with(None, "")), Unconfined);
        assert_eq!(ok(with(None, "unconfined")), Unconfined);
        assert_eq!(ok(with(None, "runtime/default")), RuntimeDefault);
        assert_eq!(ok(with(None, "docker/default")), RuntimeDefault);
        assert_eq!(
            ok(with(None, "localhost/prof.json")),
            Localhost("prof.json".into())
        );
        assert_eq!(
            ok(with(None, "localhost//var/lib/kubelet/seccomp/p.json")),
            Localhost("/var/lib/kubelet/seccomp/p.json".into())
        );
        assert_eq!(
            ok(with(profile(ProfileType::RuntimeDefault, ""), "")),
            RuntimeDefault
        );
        assert_eq!(
            ok(with(profile(ProfileType::Unconfined, ""), "")),
            Unconfined
        );
        // The field wins over the path, as in containerd.
        assert_eq!(
            ok(with(profile(ProfileType::RuntimeDefault, ""), "unconfined")),
            RuntimeDefault
        );
        // containerd trims "localhost/" from the reference too.
        assert_eq!(
            ok(with(
                profile(ProfileType::Localhost, "localhost/p.json"),
                ""
            )),
            ok(with(profile(ProfileType::Localhost, "p.json"), ""))
        );

        for (p, path) in [
            (None, "bogus"),
            (None, "localhost/"),
            (profile(ProfileType::Localhost, ""), ""),
            (profile(ProfileType::RuntimeDefault, "p.json"), ""),
            (
                Some(cri::SecurityProfile {
                    profile_type: 7,
                    localhost_ref: String::new(),
                }),
                "",
            ),
        ] {
            let err = with(p.clone(), path).expect_err(&format!("{p:?} {path}"));
            assert_eq!(err.reason(), MissReason::InvalidConfig, "{err}");
        }
    }

    fn identity() -> Placeholder<'static> {
        Placeholder {
            name: "slot-runc-0001",
            namespace: SLOT_NAMESPACE,
            uid: "6d1c2c1e-0001",
            pool: "runc-0a1b2c",
            token: "s3cr3t",
            cgroup_parent: "/fast-sandbox/slot-runc-0001",
        }
    }

    #[test]
    fn placeholder_round_trips_to_its_key() {
        let shapes = [
            Shape::default(),
            Shape {
                seccomp: SeccompShape::RuntimeDefault,
                ..Default::default()
            },
            Shape {
                seccomp: SeccompShape::Localhost("/var/lib/kubelet/seccomp/p.json".into()),
                run_as_user: Some(0),
                run_as_group: Some(0),
                supplemental_groups: vec![1, 2, 3],
                selinux: Some(SeLinuxShape {
                    level: "s0:c5,c6".into(),
                    ..Default::default()
                }),
            },
            Shape {
                run_as_user: Some(65534),
                ..Default::default()
            },
            // A profile path that starts with containerd's prefix itself.
            Shape {
                seccomp: SeccompShape::Localhost("localhost/p.json".into()),
                ..Default::default()
            },
        ];
        let handlers = handlers();
        for shape in shapes {
            for (exposed, upstream) in handlers.iter() {
                let key = PoolKey {
                    upstream_handler: upstream.to_owned(),
                    shape: shape.clone(),
                };
                let placeholder = key.placeholder_request(&identity());
                assert_eq!(placeholder.runtime_handler, upstream);
                // Kubelet asking for the exposed handler with the
                // placeholder's config would land in the same pool.
                let as_pod = request(exposed, placeholder.config.clone().expect("config"));
                let claim = Claim::from_request(&as_pod, &handlers).expect("eligible");
                assert_eq!(claim.key, key);
            }
        }
    }

    #[test]
    fn placeholder_carries_the_slot_identity() {
        let key = PoolKey {
            upstream_handler: "runc".into(),
            shape: Shape::default(),
        };
        let config = key.placeholder_config(&identity());
        let meta = config.metadata.as_ref().expect("metadata");
        assert_eq!(meta.namespace, SLOT_NAMESPACE);
        assert_eq!(meta.name, "slot-runc-0001");
        assert_eq!(meta.uid, "6d1c2c1e-0001");
        assert_eq!(config.labels[SLOT_LABEL], SLOT_UNCLAIMED);
        assert_eq!(config.labels[SLOT_TOKEN_LABEL], "s3cr3t");
        assert_eq!(config.labels[POOL_LABEL], "runc-0a1b2c");
        assert_eq!(config.labels.len(), 3);
        assert!(config.annotations.is_empty());
        assert!(config.port_mappings.is_empty());
        let dns = config.dns_config.as_ref().expect("dns config");
        assert!(dns.servers.is_empty());
        let linux = config.linux.as_ref().expect("linux");
        assert_eq!(linux.cgroup_parent, "/fast-sandbox/slot-runc-0001");
        assert!(linux.sysctls.is_empty());
        let security = linux.security_context.as_ref().expect("security context");
        assert!(!security.privileged);
        assert_eq!(security.seccomp, None);
    }

    #[test]
    fn miss_reason_names_are_stable_and_distinct() {
        let names: Vec<&str> = MissReason::ALL.iter().map(|r| r.as_str()).collect();
        assert_eq!(
            names,
            [
                "not_fast_handler",
                "host_network",
                "host_pid",
                "host_ipc",
                "host_port",
                "privileged",
                "untrusted",
                "bandwidth",
                "user_namespace",
                "invalid_config",
                "no_pool",
                "pool_empty",
                "claim_failed",
                "no_hostname",
                "sysctls_at_start_only",
                "unsupported_config",
            ]
        );
    }
}
