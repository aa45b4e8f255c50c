//! The verbose `PodSandboxStatus` info of a claimed slot.
//!
//! containerd 1.6 answers `info["info"]` with Go `encoding/json` of its
//! `SandboxInfo`: `config` is the stored (placeholder) `PodSandboxConfig`,
//! encoded through the gogo struct tags of cri-api (snake_case, `omitempty`,
//! enums as integers, map keys sorted, HTML-safe escaping); `runtimeSpec` is
//! the pause container's OCI spec as stored in its container record.
//!
//! Rewritten for a claimed slot:
//! - `config`: the pod's real config, encoded the way containerd 1.6.20
//!   encodes it (checked against a live answer; fields cri-api added after
//!   v0.25, such as `supplemental_groups_policy`, are unknown to it and left
//!   out, as a cold start would);
//! - `runtimeHandler`: the exposed handler;
//! - `runtimeSpec`: the parts containerd derives from the config:
//!   `hostname`; the annotations `io.kubernetes.cri.sandbox-name`,
//!   `-namespace`, `-uid`, `-log-directory` and the sizing annotations
//!   `-cpu-period`, `-cpu-quota`, `-cpu-shares`, `-memory` (from
//!   `linux.resources`); `linux.cgroupsPath` (what containerd derives from
//!   the pod's `cgroup_parent`, which is where the claim moves the pause);
//!   `linux.sysctl` (the pod's sysctls over containerd's defaults; a
//!   placeholder sets none).
//!
//! Not rewritten, because they are the slot's and equal to what a cold
//! start would show, or because the shim cannot know them: `pid`,
//! `processStatus`, `netNamespaceClosed`, `image`, `snapshotKey`,
//! `snapshotter`, `runtimeType`, `runtimeOptions`, `cniResult` (the
//! placeholder's CNI result; right for the `keep` network mode, not for
//! `rebind`), and in `runtimeSpec`: the process user, groups, seccomp and
//! SELinux labels (shape fields: equal by construction, except the random
//! MCS level containerd picks per sandbox anyway), mounts and the netns path
//! (keyed by sandbox id), namespaces, and annotations passed through from
//! the pod by a runtime's `pod_annotations` globs (the shim does not know
//! containerd's runtime config).
//!
//! Everything not rewritten is copied byte for byte, in containerd's order.
//!
//! For a cold-started sandbox of an exposed handler ([`rewrite_cold_info`]),
//! only the reserved [`RUNTIME_HANDLER_LABEL`] is taken out of
//! `config.labels` and `runtimeHandler` becomes the exposed handler; the
//! rest is containerd's, byte for byte.

use std::{borrow::Cow, collections::BTreeMap, collections::HashMap, fmt::Write as _};

use fast_sandbox_proto::cri;
use serde::de::{Deserialize, Deserializer, MapAccess, Visitor};
use serde_json::value::RawValue;

use crate::slots::{ClaimedPod, RUNTIME_HANDLER_LABEL};

/// containerd's CRI namespace: the default `cgroupsPath` is `/k8s.io/<id>`.
const CRI_NAMESPACE: &str = "k8s.io";
/// runc's systemd cgroup path is `slice:prefix:name`; containerd's prefix.
const SYSTEMD_CGROUP_PREFIX: &str = "cri-containerd";

const SANDBOX_NAME: &str = "io.kubernetes.cri.sandbox-name";
const SANDBOX_NAMESPACE: &str = "io.kubernetes.cri.sandbox-namespace";
const SANDBOX_UID: &str = "io.kubernetes.cri.sandbox-uid";
const SANDBOX_LOG_DIRECTORY: &str = "io.kubernetes.cri.sandbox-log-directory";
const SANDBOX_CPU_PERIOD: &str = "io.kubernetes.cri.sandbox-cpu-period";
const SANDBOX_CPU_QUOTA: &str = "io.kubernetes.cri.sandbox-cpu-quota";
const SANDBOX_CPU_SHARES: &str = "io.kubernetes.cri.sandbox-cpu-shares";
const SANDBOX_MEMORY: &str = "io.kubernetes.cri.sandbox-memory";

/// Keys of the OCI `Spec` after `hostname`, in Go field order.
const AFTER_HOSTNAME: &[&str] = &[
    "domainname",
    "mounts",
    "hooks",
    "annotations",
    "linux",
    "solaris",
    "windows",
    "vm",
];
/// Keys of the OCI `Linux` after `sysctl`, in Go field order.
const AFTER_SYSCTL: &[&str] = &[
    "resources",
    "cgroupsPath",
    "namespaces",
    "devices",
    "seccomp",
    "rootfsPropagation",
    "maskedPaths",
    "readonlyPaths",
    "mountLabel",
    "intelRdt",
    "personality",
];

/// Rewrites containerd's verbose info JSON for `sandbox_id`, claimed by
/// `pod`.
pub(crate) fn rewrite_info(
    info: &str,
    sandbox_id: &str,
    pod: &ClaimedPod,
) -> Result<String, serde_json::Error> {
    let mut fields = Fields::parse(info)?;
    if fields.contains("config") {
        let mut config = String::with_capacity(1024);
        encode_config(&mut config, &pod.config);
        fields.replace("config", config);
    }
    if fields.contains("runtimeHandler") {
        let mut handler = String::new();
        go_string(&mut handler, &pod.exposed_handler);
        fields.replace("runtimeHandler", handler);
    }
    if let Some(spec) = fields.get("runtimeSpec").filter(|raw| *raw != "null") {
        let spec = rewrite_spec(&spec, sandbox_id, &pod.config)?;
        fields.replace("runtimeSpec", spec);
    }
    Ok(fields.encode())
}

/// Rewrites containerd's verbose info JSON for a cold-started sandbox whose
/// config carries [`RUNTIME_HANDLER_LABEL`]: the label leaves
/// `config.labels` (and `labels` goes when it was the only one, as Go's
/// `omitempty` would have it), and `runtimeHandler` becomes `handler` when
/// given.
pub(crate) fn rewrite_cold_info(
    info: &str,
    handler: Option<&str>,
) -> Result<String, serde_json::Error> {
    let mut fields = Fields::parse(info)?;
    if let Some(handler) = handler.filter(|_| fields.contains("runtimeHandler")) {
        let mut json = String::new();
        go_string(&mut json, handler);
        fields.replace("runtimeHandler", json);
    }
    if let Some(raw) = fields.get("config").filter(|raw| *raw != "null") {
        let mut config = Fields::parse(&raw)?;
        if let Some(raw) = config.get("labels").filter(|raw| *raw != "null") {
            let mut labels: BTreeMap<String, String> = serde_json::from_str(&raw)?;
            if labels.remove(RUNTIME_HANDLER_LABEL).is_some() {
                if labels.is_empty() {
                    config.remove("labels");
                } else {
                    config.replace("labels", encode_sorted_map(&labels));
                }
                fields.replace("config", config.encode());
            }
        }
    }
    Ok(fields.encode())
}

fn rewrite_spec(
    raw: &str,
    sandbox_id: &str,
    config: &cri::PodSandboxConfig,
) -> Result<String, serde_json::Error> {
    let mut spec = Fields::parse(raw)?;
    if config.hostname.is_empty() {
        spec.remove("hostname");
    } else {
        let mut hostname = String::new();
        go_string(&mut hostname, &config.hostname);
        spec.set("hostname", hostname, AFTER_HOSTNAME);
    }

    if let Some(raw) = spec.get("annotations").filter(|raw| *raw != "null") {
        let mut annotations: BTreeMap<String, String> = serde_json::from_str(&raw)?;
        let meta = config.metadata.clone().unwrap_or_default();
        annotations.insert(SANDBOX_NAME.into(), meta.name);
        annotations.insert(SANDBOX_NAMESPACE.into(), meta.namespace);
        annotations.insert(SANDBOX_UID.into(), meta.uid);
        annotations.insert(SANDBOX_LOG_DIRECTORY.into(), config.log_directory.clone());
        let sizing = [
            SANDBOX_CPU_PERIOD,
            SANDBOX_CPU_QUOTA,
            SANDBOX_CPU_SHARES,
            SANDBOX_MEMORY,
        ];
        match config.linux.as_ref().and_then(|l| l.resources.as_ref()) {
            Some(r) => {
                let values = [
                    r.cpu_period,
                    r.cpu_quota,
                    r.cpu_shares,
                    r.memory_limit_in_bytes,
                ];
                for (key, value) in sizing.into_iter().zip(values) {
                    annotations.insert(key.into(), value.to_string());
                }
            }
            None => {
                for key in sizing {
                    annotations.remove(key);
                }
            }
        }
        spec.replace("annotations", encode_sorted_map(&annotations));
    }

    if let Some(raw) = spec.get("linux").filter(|raw| *raw != "null") {
        let mut linux = Fields::parse(&raw)?;
        if linux.contains("cgroupsPath") {
            let parent = config
                .linux
                .as_ref()
                .map_or("", |l| l.cgroup_parent.as_str());
            let mut path = String::new();
            go_string(&mut path, &cgroups_path(parent, sandbox_id));
            linux.replace("cgroupsPath", path);
        }
        let sysctls = config.linux.as_ref().map(|l| &l.sysctls);
        if let Some(sysctls) = sysctls.filter(|s| !s.is_empty()) {
            let mut merged: BTreeMap<String, String> = match linux.get("sysctl") {
                Some(raw) if raw != "null" => serde_json::from_str(&raw)?,
                _ => BTreeMap::new(),
            };
            merged.extend(sysctls.iter().map(|(k, v)| (k.clone(), v.clone())));
            linux.set("sysctl", encode_sorted_map(&merged), AFTER_SYSCTL);
        }
        spec.replace("linux", linux.encode());
    }
    Ok(spec.encode())
}

/// containerd's `getCgroupsPath` for a pod's `cgroup_parent`: a systemd
/// slice gives `slice:cri-containerd:<id>`, a path gives `<parent>/<id>`,
/// none gives the default `/k8s.io/<id>`.
fn cgroups_path(parent: &str, sandbox_id: &str) -> String {
    if parent.is_empty() {
        return format!("/{CRI_NAMESPACE}/{sandbox_id}");
    }
    let base = go_base(parent);
    if base.ends_with(".slice") {
        return format!("{base}:{SYSTEMD_CGROUP_PREFIX}:{sandbox_id}");
    }
    go_clean(&format!("{parent}/{sandbox_id}"))
}

/// Go's `path.Base`.
fn go_base(path: &str) -> &str {
    if path.is_empty() {
        return ".";
    }
    let trimmed = path.trim_end_matches('/');
    if trimmed.is_empty() {
        return "/";
    }
    trimmed.rsplit('/').next().unwrap_or(trimmed)
}

/// Go's `path.Clean` (what `filepath.Join` applies on Linux).
fn go_clean(path: &str) -> String {
    let rooted = path.starts_with('/');
    let mut parts: Vec<&str> = Vec::new();
    for part in path.split('/') {
        match part {
            "" | "." => {}
            ".." => match parts.last() {
                Some(&last) if last != ".." => {
                    parts.pop();
                }
                _ if rooted => {}
                _ => parts.push(".."),
            },
            part => parts.push(part),
        }
    }
    let joined = parts.join("/");
    match (rooted, joined.is_empty()) {
        (true, _) => format!("/{joined}"),
        (false, true) => ".".to_owned(),
        (false, false) => joined,
    }
}

/// A JSON object's members in their original order, values kept as raw
/// JSON text until replaced.
#[derive(Debug)]
struct Fields<'a>(Vec<(String, Cow<'a, str>)>);

impl<'a> Fields<'a> {
    fn parse(json: &'a str) -> Result<Self, serde_json::Error> {
        serde_json::from_str(json)
    }

    fn position(&self, key: &str) -> Option<usize> {
        self.0.iter().position(|(k, _)| k == key)
    }

    fn contains(&self, key: &str) -> bool {
        self.position(key).is_some()
    }

    /// The raw JSON of `key`; borrowed from the input unless replaced.
    fn get(&self, key: &str) -> Option<Cow<'a, str>> {
        self.position(key).map(|i| self.0[i].1.clone())
    }

    /// Replaces the value of an existing `key`.
    fn replace(&mut self, key: &str, json: String) {
        if let Some(i) = self.position(key) {
            self.0[i].1 = Cow::Owned(json);
        }
    }

    /// Sets `key`, inserting it before the first of `before` present (Go
    /// struct order), else at the end.
    fn set(&mut self, key: &str, json: String, before: &[&str]) {
        if let Some(i) = self.position(key) {
            self.0[i].1 = Cow::Owned(json);
            return;
        }
        let at = self
            .0
            .iter()
            .position(|(k, _)| before.contains(&k.as_str()))
            .unwrap_or(self.0.len());
        self.0.insert(at, (key.to_owned(), Cow::Owned(json)));
    }

    fn remove(&mut self, key: &str) {
        self.0.retain(|(k, _)| k != key);
    }

    fn encode(&self) -> String {
        let len: usize = self.0.iter().map(|(k, v)| k.len() + v.len() + 4).sum();
        let mut out = String::with_capacity(len + 2);
        out.push('{');
        for (i, (key, value)) in self.0.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            go_string(&mut out, key);
            out.push(':');
            out.push_str(value);
        }
        out.push('}');
        out
    }
}

impl<'de> Deserialize<'de> for Fields<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Members;
        impl<'de> Visitor<'de> for Members {
            type Value = Fields<'de>;

            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a JSON object")
            }

            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut members = Vec::new();
                while let Some((key, value)) = map.next_entry::<String, &'de RawValue>()? {
                    members.push((key, Cow::Borrowed(value.get())));
                }
                Ok(Fields(members))
            }
        }
        deserializer.deserialize_map(Members)
    }
}

/// Appends `s` as a JSON string the way Go's `encoding/json` writes it:
/// `<`, `>`, `&`, U+2028 and U+2029 escaped, control characters as
/// `\u00XX` except `\n`, `\r`, `\t` (Go before 1.22, which containerd 1.6
/// is built with).
fn go_string(out: &mut String, s: &str) {
    out.push('"');
    let mut plain = 0;
    for (i, c) in s.char_indices() {
        let escape: Option<&str> = match c {
            '"' => Some("\\\""),
            '\\' => Some("\\\\"),
            '\n' => Some("\\n"),
            '\r' => Some("\\r"),
            '\t' => Some("\\t"),
            '\u{2028}' => Some("\\u2028"),
            '\u{2029}' => Some("\\u2029"),
            c if c < ' ' || c == '<' || c == '>' || c == '&' => Some(""),
            _ => None,
        };
        let Some(escape) = escape else { continue };
        out.push_str(&s[plain..i]);
        if escape.is_empty() {
            let _ = write!(out, "\\u{:04x}", u32::from(c));
        } else {
            out.push_str(escape);
        }
        plain = i + c.len_utf8();
    }
    out.push_str(&s[plain..]);
    out.push('"');
}

fn encode_sorted_map(map: &BTreeMap<String, String>) -> String {
    let mut out = String::new();
    out.push('{');
    for (i, (k, v)) in map.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        go_string(&mut out, k);
        out.push(':');
        go_string(&mut out, v);
    }
    out.push('}');
    out
}

/// One JSON object being written, members in Go struct order, zero values
/// left out (`omitempty`).
struct Object<'o> {
    out: &'o mut String,
    empty: bool,
}

impl<'o> Object<'o> {
    fn open(out: &'o mut String) -> Self {
        out.push('{');
        Object { out, empty: true }
    }

    fn key(&mut self, key: &str) {
        if !self.empty {
            self.out.push(',');
        }
        self.empty = false;
        self.out.push('"');
        self.out.push_str(key);
        self.out.push_str("\":");
    }

    fn str(&mut self, key: &str, value: &str) {
        if !value.is_empty() {
            self.key(key);
            go_string(self.out, value);
        }
    }

    fn int(&mut self, key: &str, value: impl Into<i128>) {
        let value = value.into();
        if value != 0 {
            self.key(key);
            let _ = write!(self.out, "{value}");
        }
    }

    fn bool(&mut self, key: &str, value: bool) {
        if value {
            self.key(key);
            self.out.push_str("true");
        }
    }

    fn strs(&mut self, key: &str, values: &[String]) {
        self.list(key, values, |out, v| go_string(out, v));
    }

    fn ints(&mut self, key: &str, values: &[i64]) {
        self.list(key, values, |out, v| {
            let _ = write!(out, "{v}");
        });
    }

    fn list<T>(&mut self, key: &str, values: &[T], mut item: impl FnMut(&mut String, &T)) {
        if values.is_empty() {
            return;
        }
        self.key(key);
        self.out.push('[');
        for (i, value) in values.iter().enumerate() {
            if i > 0 {
                self.out.push(',');
            }
            item(self.out, value);
        }
        self.out.push(']');
    }

    fn map(&mut self, key: &str, map: &HashMap<String, String>) {
        if map.is_empty() {
            return;
        }
        self.key(key);
        let mut entries: Vec<(&String, &String)> = map.iter().collect();
        entries.sort_unstable();
        self.out.push('{');
        for (i, (k, v)) in entries.into_iter().enumerate() {
            if i > 0 {
                self.out.push(',');
            }
            go_string(self.out, k);
            self.out.push(':');
            go_string(self.out, v);
        }
        self.out.push('}');
    }

    fn message<T>(&mut self, key: &str, value: Option<&T>, encode: impl FnOnce(&mut String, &T)) {
        if let Some(value) = value {
            self.key(key);
            encode(self.out, value);
        }
    }

    fn close(self) {
        self.out.push('}');
    }
}

/// `PodSandboxConfig` as containerd 1.6.20 (cri-api v0.25) encodes it.
pub(crate) fn encode_config(out: &mut String, c: &cri::PodSandboxConfig) {
    let mut o = Object::open(out);
    o.message("metadata", c.metadata.as_ref(), |out, m| {
        let mut o = Object::open(out);
        o.str("name", &m.name);
        o.str("uid", &m.uid);
        o.str("namespace", &m.namespace);
        o.int("attempt", m.attempt);
        o.close();
    });
    o.str("hostname", &c.hostname);
    o.str("log_directory", &c.log_directory);
    o.message("dns_config", c.dns_config.as_ref(), |out, d| {
        let mut o = Object::open(out);
        o.strs("servers", &d.servers);
        o.strs("searches", &d.searches);
        o.strs("options", &d.options);
        o.close();
    });
    o.list("port_mappings", &c.port_mappings, |out, p| {
        let mut o = Object::open(out);
        o.int("protocol", p.protocol);
        o.int("container_port", p.container_port);
        o.int("host_port", p.host_port);
        o.str("host_ip", &p.host_ip);
        o.close();
    });
    o.map("labels", &c.labels);
    o.map("annotations", &c.annotations);
    o.message("linux", c.linux.as_ref(), encode_linux);
    o.message("windows", c.windows.as_ref(), |out, w| {
        let mut o = Object::open(out);
        o.message("security_context", w.security_context.as_ref(), |out, s| {
            let mut o = Object::open(out);
            o.str("run_as_username", &s.run_as_username);
            o.str("credential_spec", &s.credential_spec);
            o.bool("host_process", s.host_process);
            o.close();
        });
        o.close();
    });
    o.close();
}

fn encode_linux(out: &mut String, l: &cri::LinuxPodSandboxConfig) {
    let mut o = Object::open(out);
    o.str("cgroup_parent", &l.cgroup_parent);
    o.message("security_context", l.security_context.as_ref(), |out, s| {
        let mut o = Object::open(out);
        o.message(
            "namespace_options",
            s.namespace_options.as_ref(),
            |out, n| {
                let mut o = Object::open(out);
                o.int("network", n.network);
                o.int("pid", n.pid);
                o.int("ipc", n.ipc);
                o.str("target_id", &n.target_id);
                o.message("userns_options", n.userns_options.as_ref(), |out, u| {
                    let mut o = Object::open(out);
                    o.int("mode", u.mode);
                    o.list("uids", &u.uids, encode_id_mapping);
                    o.list("gids", &u.gids, encode_id_mapping);
                    o.close();
                });
                o.close();
            },
        );
        o.message("selinux_options", s.selinux_options.as_ref(), |out, se| {
            let mut o = Object::open(out);
            o.str("user", &se.user);
            o.str("role", &se.role);
            o.str("type", &se.r#type);
            o.str("level", &se.level);
            o.close();
        });
        o.message("run_as_user", s.run_as_user.as_ref(), encode_int64_value);
        o.message("run_as_group", s.run_as_group.as_ref(), encode_int64_value);
        o.bool("readonly_rootfs", s.readonly_rootfs);
        o.ints("supplemental_groups", &s.supplemental_groups);
        o.bool("privileged", s.privileged);
        o.message("seccomp", s.seccomp.as_ref(), encode_security_profile);
        o.message("apparmor", s.apparmor.as_ref(), encode_security_profile);
        #[allow(deprecated)] // still sent by older kubelets, still encoded
        o.str("seccomp_profile_path", &s.seccomp_profile_path);
        o.close();
    });
    o.map("sysctls", &l.sysctls);
    o.message("overhead", l.overhead.as_ref(), encode_resources);
    o.message("resources", l.resources.as_ref(), encode_resources);
    o.close();
}

fn encode_id_mapping(out: &mut String, m: &cri::IdMapping) {
    let mut o = Object::open(out);
    o.int("host_id", m.host_id);
    o.int("container_id", m.container_id);
    o.int("length", m.length);
    o.close();
}

fn encode_int64_value(out: &mut String, v: &cri::Int64Value) {
    let mut o = Object::open(out);
    o.int("value", v.value);
    o.close();
}

fn encode_security_profile(out: &mut String, p: &cri::SecurityProfile) {
    let mut o = Object::open(out);
    o.int("profile_type", p.profile_type);
    o.str("localhost_ref", &p.localhost_ref);
    o.close();
}

fn encode_resources(out: &mut String, r: &cri::LinuxContainerResources) {
    let mut o = Object::open(out);
    o.int("cpu_period", r.cpu_period);
    o.int("cpu_quota", r.cpu_quota);
    o.int("cpu_shares", r.cpu_shares);
    o.int("memory_limit_in_bytes", r.memory_limit_in_bytes);
    o.int("oom_score_adj", r.oom_score_adj);
    o.str("cpuset_cpus", &r.cpuset_cpus);
    o.str("cpuset_mems", &r.cpuset_mems);
    o.list("hugepage_limits", &r.hugepage_limits, |out, h| {
        let mut o = Object::open(out);
        o.str("page_size", &h.page_size);
        o.int("limit", h.limit);
        o.close();
    });
    o.map("unified", &r.unified);
    o.int("memory_swap_limit_in_bytes", r.memory_swap_limit_in_bytes);
    o.close();
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    #[test]
    fn go_escaping() {
        let mut out = String::new();
        go_string(&mut out, "<&>\"é\u{2028}\u{2029}\\\n\r\t\u{1}\u{8}\u{7f}x");
        let want = "\"\\u003c\\u0026\\u003e\\\"é\\u2028\\u2029\\\\\\n\\r\\t\\u0001\\u0008\u{7f}x\"";
        assert_eq!(out, want);
    }

    #[test]
    fn cgroups_paths_like_containerd() {
        let id = "abc";
        assert_eq!(cgroups_path("", id), "/k8s.io/abc");
        assert_eq!(
            cgroups_path("/kubepods/besteffort/pod1", id),
            "/kubepods/besteffort/pod1/abc"
        );
        assert_eq!(cgroups_path("/kubepods//pod1/", id), "/kubepods/pod1/abc");
        assert_eq!(cgroups_path("kubepods/../x", id), "x/abc");
        assert_eq!(
            cgroups_path("kubepods-besteffort-pod1.slice", id),
            "kubepods-besteffort-pod1.slice:cri-containerd:abc"
        );
        assert_eq!(
            cgroups_path("/a.slice/b.slice/", id),
            "b.slice:cri-containerd:abc"
        );
    }

    /// The config of a live containerd 1.6.20 verbose answer (the probe pod
    /// of the shim's development notes), byte for byte.
    const LIVE_CONFIG: &str = concat!(
        r#"{"metadata":{"name":"probe","uid":"probe-uid-29891","namespace":"probe-ns","attempt":2},"#,
        r#""hostname":"probe-host","log_directory":"/tmp/probe-logs/probe-uid-29891","#,
        r#""dns_config":{"servers":["10.0.0.10"],"searches":["a.svc","b"],"options":["ndots:5"]},"#,
        r#""port_mappings":[{"container_port":8080},{"protocol":1,"container_port":53}],"#,
        r#""labels":{"app":"probe","io.kubernetes.pod.uid":"probe-uid-29891","z":""},"#,
        r#""annotations":{"b":"\u003c\u0026\u003e\"é\u2028","kubernetes.io/config.source":"api"},"#,
        r#""linux":{"cgroup_parent":"/fast-sandbox-probe","security_context":{"#,
        r#""namespace_options":{"pid":1,"target_id":"tid","userns_options":{"mode":2}},"#,
        r#""selinux_options":{"user":"u","type":"t","level":"s0"},"run_as_user":{},"#,
        r#""run_as_group":{"value":1000},"readonly_rootfs":true,"supplemental_groups":[3,1,2],"#,
        r#""seccomp":{},"apparmor":{"profile_type":1},"seccomp_profile_path":"unconfined"},"#,
        r#""sysctls":{"kernel.shm_rmid_forced":"1"},"overhead":{"cpu_shares":10},"#,
        r#""resources":{"cpu_period":100000,"cpu_quota":50000,"cpu_shares":512,"#,
        r#""memory_limit_in_bytes":67108864,"oom_score_adj":-3,"cpuset_cpus":"0","#,
        r#""hugepage_limits":[{"page_size":"2MB"}],"unified":{"memory.high":"1"},"#,
        r#""memory_swap_limit_in_bytes":5}}}"#,
    );

    /// The config the probe sent (including a field containerd 1.6.20 does
    /// not know, `supplemental_groups_policy`, which it drops).
    #[allow(deprecated)] // the live probe set the deprecated path too
    pub(crate) fn probe_config() -> cri::PodSandboxConfig {
        cri::PodSandboxConfig {
            metadata: Some(cri::PodSandboxMetadata {
                name: "probe".into(),
                uid: "probe-uid-29891".into(),
                namespace: "probe-ns".into(),
                attempt: 2,
            }),
            hostname: "probe-host".into(),
            log_directory: "/tmp/probe-logs/probe-uid-29891".into(),
            dns_config: Some(cri::DnsConfig {
                servers: vec!["10.0.0.10".into()],
                searches: vec!["a.svc".into(), "b".into()],
                options: vec!["ndots:5".into()],
            }),
            port_mappings: vec![
                cri::PortMapping {
                    protocol: 0,
                    container_port: 8080,
                    host_port: 0,
                    host_ip: String::new(),
                },
                cri::PortMapping {
                    protocol: 1,
                    container_port: 53,
                    host_port: 0,
                    host_ip: String::new(),
                },
            ],
            labels: HashMap::from([
                ("app".into(), "probe".into()),
                ("io.kubernetes.pod.uid".into(), "probe-uid-29891".into()),
                ("z".into(), String::new()),
            ]),
            annotations: HashMap::from([
                ("kubernetes.io/config.source".into(), "api".into()),
                ("b".into(), "<&>\"é\u{2028}".into()),
            ]),
            linux: Some(cri::LinuxPodSandboxConfig {
                cgroup_parent: "/fast-sandbox-probe".into(),
                security_context: Some(cri::LinuxSandboxSecurityContext {
                    namespace_options: Some(cri::NamespaceOption {
                        network: 0,
                        pid: 1,
                        ipc: 0,
                        target_id: "tid".into(),
                        userns_options: Some(cri::UserNamespace {
                            mode: 2,
                            uids: vec![],
                            gids: vec![],
                        }),
                    }),
                    selinux_options: Some(cri::SeLinuxOption {
                        user: "u".into(),
                        role: String::new(),
                        r#type: "t".into(),
                        level: "s0".into(),
                    }),
                    run_as_user: Some(cri::Int64Value { value: 0 }),
                    run_as_group: Some(cri::Int64Value { value: 1000 }),
                    readonly_rootfs: true,
                    supplemental_groups: vec![3, 1, 2],
                    supplemental_groups_policy: 1,
                    privileged: false,
                    seccomp: Some(cri::SecurityProfile {
                        profile_type: 0,
                        localhost_ref: String::new(),
                    }),
                    apparmor: Some(cri::SecurityProfile {
                        profile_type: 1,
                        localhost_ref: String::new(),
                    }),
                    seccomp_profile_path: "unconfined".into(),
                }),
                sysctls: HashMap::from([("kernel.shm_rmid_forced".into(), "1".into())]),
                overhead: Some(cri::LinuxContainerResources {
                    cpu_shares: 10,
                    ..Default::default()
                }),
                resources: Some(cri::LinuxContainerResources {
                    cpu_period: 100000,
                    cpu_quota: 50000,
                    cpu_shares: 512,
                    memory_limit_in_bytes: 67108864,
                    oom_score_adj: -3,
                    cpuset_cpus: "0".into(),
                    hugepage_limits: vec![cri::HugepageLimit {
                        page_size: "2MB".into(),
                        limit: 0,
                    }],
                    unified: HashMap::from([("memory.high".into(), "1".into())]),
                    memory_swap_limit_in_bytes: 5,
                    ..Default::default()
                }),
            }),
            windows: None,
        }
    }

    #[test]
    fn config_encodes_like_containerd() {
        let mut out = String::new();
        encode_config(&mut out, &probe_config());
        assert_eq!(out, LIVE_CONFIG);
    }

    /// A placeholder's verbose info, shaped like containerd 1.6.20's (the
    /// seccomp rules and most capabilities cut short).
    pub(crate) fn placeholder_info(id: &str) -> String {
        let config = r#"{"metadata":{"name":"slot-1","uid":"slot-uid-1","namespace":"fast-sandbox-slots"},"hostname":"slot-1","dns_config":{},"labels":{"fast-sandbox.io/pool":"p","fast-sandbox.io/slot":"unclaimed","fast-sandbox.io/slot-token":"t"},"linux":{"cgroup_parent":"/fast-sandbox/slot-1","security_context":{"namespace_options":{"pid":1},"seccomp":{}}}}"#;
        format!(
            concat!(
                r#"{{"pid":29505,"processStatus":"running","netNamespaceClosed":false,"#,
                r#""image":"localhost/fast-sandbox/pause:v1","snapshotKey":"{id}","snapshotter":"overlayfs","#,
                r#""runtimeHandler":"runc","runtimeType":"io.containerd.runc.v2","#,
                r#""runtimeOptions":{{"binary_name":"/usr/bin/runc"}},"config":{config},"#,
                r#""runtimeSpec":{{"ociVersion":"1.0.2-dev","process":{{"user":{{"uid":0,"gid":0}},"args":["/pause"]}},"#,
                r#""root":{{"path":"rootfs","readonly":true}},"hostname":"slot-1","#,
                r#""mounts":[{{"destination":"/proc","type":"proc","source":"proc"}}],"#,
                r#""annotations":{{"io.kubernetes.cri.container-type":"sandbox","io.kubernetes.cri.sandbox-id":"{id}","#,
                r#""io.kubernetes.cri.sandbox-log-directory":"","io.kubernetes.cri.sandbox-name":"slot-1","#,
                r#""io.kubernetes.cri.sandbox-namespace":"fast-sandbox-slots","io.kubernetes.cri.sandbox-uid":"slot-uid-1"}},"#,
                r#""linux":{{"resources":{{"devices":[{{"allow":false,"access":"rwm"}}],"cpu":{{"shares":2}}}},"#,
                r#""cgroupsPath":"/fast-sandbox/slot-1/{id}","namespaces":[{{"type":"pid"}}],"#,
                r#""seccomp":{{"defaultAction":"SCMP_ACT_ERRNO"}}}}}},"#,
                r#""cniResult":{{"Interfaces":{{"eth0":{{"IPConfigs":[{{"IP":"10.209.0.72","Gateway":"10.209.0.1"}}]}}}}}}}}"#
            ),
            id = id,
            config = config
        )
    }

    fn claimed(config: cri::PodSandboxConfig) -> ClaimedPod {
        ClaimedPod {
            config,
            exposed_handler: "fast-runc".into(),
            claimed_at_ns: 1,
            network: None,
        }
    }

    #[test]
    fn info_of_a_claimed_slot() {
        let id = "ff41f558";
        let info = placeholder_info(id);
        serde_json::from_str::<serde_json::Value>(&info).expect("fixture is JSON");
        let out = rewrite_info(&info, id, &claimed(probe_config())).expect("rewrite");
        let v: serde_json::Value = serde_json::from_str(&out).expect("JSON");

        // The real config, exactly as containerd would have encoded it.
        assert!(out.contains(&format!(r#""config":{LIVE_CONFIG},"runtimeSpec""#)));
        assert_eq!(v["runtimeHandler"], "fast-runc");
        let spec = &v["runtimeSpec"];
        assert_eq!(spec["hostname"], "probe-host");
        let a = &spec["annotations"];
        assert_eq!(a[SANDBOX_NAME], "probe");
        assert_eq!(a[SANDBOX_NAMESPACE], "probe-ns");
        assert_eq!(a[SANDBOX_UID], "probe-uid-29891");
        assert_eq!(a[SANDBOX_LOG_DIRECTORY], "/tmp/probe-logs/probe-uid-29891");
        assert_eq!(a[SANDBOX_CPU_PERIOD], "100000");
        assert_eq!(a[SANDBOX_CPU_QUOTA], "50000");
        assert_eq!(a[SANDBOX_CPU_SHARES], "512");
        assert_eq!(a[SANDBOX_MEMORY], "67108864");
        assert_eq!(a["io.kubernetes.cri.sandbox-id"], id);
        assert_eq!(
            spec["linux"]["cgroupsPath"],
            format!("/fast-sandbox-probe/{id}")
        );
        assert_eq!(spec["linux"]["sysctl"]["kernel.shm_rmid_forced"], "1");

        // Nothing of the placeholder is left, and everything else is
        // untouched, in containerd's order.
        for leak in ["slot-1", "fast-sandbox-slots", "unclaimed", "slot-uid-1"] {
            assert!(!out.contains(leak), "{leak} leaks: {out}");
        }
        let keys = |s: &str| -> Vec<String> {
            Fields::parse(s)
                .expect("object")
                .0
                .into_iter()
                .map(|(k, _)| k)
                .collect()
        };
        assert_eq!(keys(&out), keys(&info));
        assert!(out.contains(r#""cniResult":{"Interfaces":{"eth0""#));
        assert!(out.starts_with(r#"{"pid":29505,"processStatus":"running""#));
        // Inserted keys go where Go's struct order puts them.
        let sysctl_at = out.find(r#""sysctl""#).expect("sysctl");
        let resources_at = out.find(r#""resources":{"devices""#).expect("resources");
        assert!(sysctl_at < resources_at, "sysctl goes first in Go's Linux");
    }

    /// containerd 1.6.20's verbose info for the probe pod, as captured.
    const LIVE_INFO: &str = include_str!("testdata/containerd-1.6.20-verbose-info.json");
    const LIVE_ID: &str = "92f605bb4befc0094c0e21b8d3a539f9adce01dc0a2a948a236ad7db6104e5e8";

    #[test]
    fn live_info_rewritten_with_its_own_config_is_unchanged() {
        let pod = ClaimedPod {
            exposed_handler: "runc".into(),
            ..claimed(probe_config())
        };
        let out = rewrite_info(LIVE_INFO, LIVE_ID, &pod).expect("rewrite");
        assert_eq!(out, LIVE_INFO);
    }

    #[test]
    fn live_info_rewritten_for_another_pod() {
        let mut config = probe_config();
        let meta = config.metadata.as_mut().expect("metadata");
        meta.name = "web".into();
        meta.uid = "uid-web".into();
        meta.namespace = "prod".into();
        config.hostname = "web-0".into();
        config.log_directory = "/var/log/pods/prod_web_uid-web".into();
        config.labels = HashMap::from([("app".into(), "web".into())]);
        let linux = config.linux.as_mut().expect("linux");
        linux.cgroup_parent = "/kubepods/pod-uid-web".into();
        linux.sysctls = HashMap::from([("net.ipv4.ip_local_port_range".into(), "1 2".into())]);
        let out = rewrite_info(LIVE_INFO, LIVE_ID, &claimed(config)).expect("rewrite");
        for leak in [
            "probe-uid-29891",
            "probe-ns",
            "probe-host",
            "/fast-sandbox-probe",
        ] {
            assert!(!out.contains(leak), "{leak} leaks");
        }
        let v: serde_json::Value = serde_json::from_str(&out).expect("JSON");
        assert_eq!(v["runtimeHandler"], "fast-runc");
        assert_eq!(v["config"]["metadata"]["name"], "web");
        let spec = &v["runtimeSpec"];
        assert_eq!(spec["hostname"], "web-0");
        assert_eq!(spec["annotations"][SANDBOX_UID], "uid-web");
        assert_eq!(
            spec["linux"]["cgroupsPath"],
            format!("/kubepods/pod-uid-web/{LIVE_ID}")
        );
        // The pod's sysctls over what the spec had.
        assert_eq!(spec["linux"]["sysctl"]["kernel.shm_rmid_forced"], "1");
        assert_eq!(
            spec["linux"]["sysctl"]["net.ipv4.ip_local_port_range"],
            "1 2"
        );
        // Untouched parts are byte for byte upstream's.
        let tail = &LIVE_INFO[LIVE_INFO.find(r#","cniResult""#).expect("cni")..];
        assert!(out.ends_with(tail));
        let seccomp = &LIVE_INFO[LIVE_INFO
            .find(r#""seccomp":{"defaultAction""#)
            .expect("seccomp")..];
        let seccomp = &seccomp[..seccomp.find(r#","maskedPaths""#).expect("masked")];
        assert!(out.contains(seccomp));
    }

    #[test]
    fn empty_hostname_and_no_resources() {
        let id = "abc";
        let mut config = probe_config();
        config.hostname.clear();
        config.linux.as_mut().expect("linux").resources = None;
        config.linux.as_mut().expect("linux").cgroup_parent = "kubepods-pod1.slice".into();
        let out = rewrite_info(&placeholder_info(id), id, &claimed(config)).expect("rewrite");
        let v: serde_json::Value = serde_json::from_str(&out).expect("JSON");
        let spec = &v["runtimeSpec"];
        assert!(spec.get("hostname").is_none());
        assert!(spec["annotations"].get(SANDBOX_MEMORY).is_none());
        assert_eq!(
            spec["linux"]["cgroupsPath"],
            "kubepods-pod1.slice:cri-containerd:abc"
        );
    }

    #[test]
    fn cold_info_loses_the_reserved_label_only() {
        let mut config = probe_config();
        config
            .labels
            .insert(RUNTIME_HANDLER_LABEL.into(), "fast-runc".into());
        let mut encoded = String::new();
        encode_config(&mut encoded, &config);
        let info = LIVE_INFO.replacen(LIVE_CONFIG, &encoded, 1);
        assert_ne!(info, LIVE_INFO, "the fixture holds the config");

        // Back to exactly what containerd shows for the pod without it.
        let out = rewrite_cold_info(&info, Some("runc")).expect("rewrite");
        assert_eq!(out, LIVE_INFO);
        let out = rewrite_cold_info(&info, Some("fast-runc")).expect("rewrite");
        assert_eq!(
            out,
            LIVE_INFO.replacen(
                r#""runtimeHandler":"runc""#,
                r#""runtimeHandler":"fast-runc""#,
                1
            )
        );
        // No handler: the label goes, the handler stays upstream's.
        let out = rewrite_cold_info(&info, None).expect("rewrite");
        assert_eq!(out, LIVE_INFO);

        // The only label: `labels` goes, as Go's omitempty would have it.
        config.labels = HashMap::from([(RUNTIME_HANDLER_LABEL.into(), "fast-runc".into())]);
        let mut encoded = String::new();
        encode_config(&mut encoded, &config);
        let info = LIVE_INFO.replacen(LIVE_CONFIG, &encoded, 1);
        config.labels.clear();
        let mut expected = String::new();
        encode_config(&mut expected, &config);
        let out = rewrite_cold_info(&info, None).expect("rewrite");
        assert_eq!(out, LIVE_INFO.replacen(LIVE_CONFIG, &expected, 1));
        assert!(!expected.contains("labels"));
    }

    #[test]
    fn malformed_info_is_an_error() {
        let pod = claimed(probe_config());
        for bad in ["", "[]", "{", r#"{"runtimeSpec":{"linux":3}}"#] {
            assert!(rewrite_info(bad, "x", &pod).is_err(), "{bad}");
        }
        for bad in ["", "[]", r#"{"config":{"labels":3}}"#] {
            assert!(rewrite_cold_info(bad, None).is_err(), "{bad}");
        }
    }
}
