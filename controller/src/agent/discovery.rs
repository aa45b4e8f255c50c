//! Which nodes' agents the directory follows: the Kubernetes Node
//! list/watch, only Nodes an administrator opted in, at their InternalIP.

use super::*;

/// The label of [`DEFAULT_NODE_SELECTOR`].
pub const OPT_IN_LABEL: &str = "node-restriction.kubernetes.io/fast-sandbox";

/// Whether an administrator opted `node` in: it carries [`OPT_IN_LABEL`]
/// = `true`. Discovery checks it whatever the selector, so a selector can
/// only narrow the set of nodes, never admit a self-labelled one.
pub fn opted_in(node: &Node) -> bool {
    node.labels().get(OPT_IN_LABEL).map(String::as_str) == Some("true")
}

/// The agent address of a Node: its `InternalIP` and `port`.
pub fn node_address(node: &Node, port: u16) -> Option<String> {
    let ip = node
        .status
        .as_ref()?
        .addresses
        .as_ref()?
        .iter()
        .find(|a| a.type_ == "InternalIP")?
        .address
        .parse::<std::net::IpAddr>()
        .ok()?;
    Some(std::net::SocketAddr::new(ip, port).to_string())
}
impl AgentDirectory {
    /// Applies one Node watch event: `seen` collects the names of a
    /// (re)list, whose end drops every node it did not list.
    fn on_node_event(
        &self,
        event: watcher::Event<Node>,
        port: u16,
        seen: &mut Option<BTreeSet<String>>,
    ) {
        match event {
            watcher::Event::Init => {
                *seen = Some(BTreeSet::new());
                self.inner.lock().relisting = true;
            }
            watcher::Event::InitApply(node) => {
                if let Some(seen) = seen.as_mut() {
                    seen.insert(node.name_any());
                }
                self.on_node(&node, port);
            }
            watcher::Event::InitDone => {
                let Some(listed) = seen.take() else { return };
                for name in self.node_names() {
                    if !listed.contains(&name) {
                        self.remove(&name);
                    }
                }
                let mut guard = self.inner.lock();
                let nodes = &mut *guard;
                nodes.relisting = false;
                if std::mem::take(&mut nodes.dirty) {
                    self.inner.rebuild(nodes);
                }
            }
            watcher::Event::Apply(node) => self.on_node(&node, port),
            watcher::Event::Delete(node) => {
                self.remove(&node.name_any());
            }
        }
    }

    fn on_node(&self, node: &Node, port: u16) {
        let name = node.name_any();
        if node.metadata.deletion_timestamp.is_some() {
            self.remove(&name);
            return;
        }
        if !opted_in(node) {
            if node.labels().contains_key(DEPRECATED_NODE_LABEL) {
                tracing::warn!(
                    node = %name,
                    "node labelled only {DEPRECATED_NODE_LABEL}, which a kubelet can set on \
                     itself: not trusted; label it {OPT_IN_LABEL}=true to opt it in"
                );
            }
            self.remove(&name);
            return;
        }
        match node_address(node, port) {
            Some(address) => {
                if let Err(error) = self.upsert(&name, &address) {
                    tracing::warn!(node = %name, %error, "node not followed");
                }
            }
            None => {
                tracing::warn!(node = %name, "node has no InternalIP: its agent cannot be reached");
                self.remove(&name);
            }
        }
    }

    /// Follows the agents of the Nodes `selector` matches (all Nodes when
    /// `None`) at their `InternalIP` and `port`, until the future is
    /// dropped. Needs `list` and `watch` on nodes.
    pub async fn discover(&self, nodes: Api<Node>, selector: Option<&str>, port: u16) {
        let mut config = watcher::Config::default();
        if let Some(selector) = selector.filter(|s| !s.is_empty()) {
            config = config.labels(selector);
        }
        let mut events = watcher(nodes, config).default_backoff().boxed();
        let mut seen = None;
        while let Some(event) = events.next().await {
            match event {
                Ok(event) => self.on_node_event(event, port, &mut seen),
                Err(error) => tracing::warn!(%error, "node watch (agent discovery)"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{NodeAddress, NodeStatus as K8sNodeStatus};
    use kube::api::ObjectMeta;

    #[test]
    fn node_address_is_the_internal_ip_and_port() {
        let node = |addresses: Vec<(&str, &str)>| Node {
            metadata: ObjectMeta {
                name: Some("n".into()),
                ..Default::default()
            },
            status: Some(K8sNodeStatus {
                addresses: Some(
                    addresses
                        .into_iter()
                        .map(|(t, a)| NodeAddress {
                            type_: t.into(),
                            address: a.into(),
                        })
                        .collect(),
                ),
                ..Default::default()
            }),
            ..Default::default()
        };
        let n = node(vec![("Hostname", "n"), ("InternalIP", "10.0.0.7")]);
        assert_eq!(node_address(&n, 9465).as_deref(), Some("10.0.0.7:9465"));
        let v6 = node(vec![("InternalIP", "fd00::7")]);
        assert_eq!(node_address(&v6, 9465).as_deref(), Some("[fd00::7]:9465"));
        assert_eq!(
            node_address(&node(vec![("ExternalIP", "1.2.3.4")]), 1),
            None
        );
        assert_eq!(node_address(&node(vec![("InternalIP", "nope")]), 1), None);
        assert_eq!(node_address(&Node::default(), 1), None);
    }

    #[tokio::test]
    async fn node_events_add_move_and_drop_nodes() {
        let directory = AgentDirectory::new(AgentConfig::new(AgentToken::new("t").unwrap()));
        let node = |name: &str, ip: Option<&str>| Node {
            metadata: ObjectMeta {
                name: Some(name.into()),
                labels: Some([(OPT_IN_LABEL.to_owned(), "true".to_owned())].into()),
                ..Default::default()
            },
            status: Some(K8sNodeStatus {
                addresses: ip.map(|ip| {
                    vec![NodeAddress {
                        type_: "InternalIP".into(),
                        address: ip.into(),
                    }]
                }),
                ..Default::default()
            }),
            ..Default::default()
        };
        let mut seen = None;
        let generation = *directory.subscribe().borrow();
        for event in [
            watcher::Event::Init,
            watcher::Event::InitApply(node("a", Some("127.0.0.2"))),
            watcher::Event::InitApply(node("b", Some("127.0.0.3"))),
        ] {
            directory.on_node_event(event, 1, &mut seen);
        }
        // Followed at once, indexed once at the end of the list.
        assert_eq!(directory.node_names(), ["a", "b"]);
        assert!(directory.snapshot().is_empty());
        directory.on_node_event(watcher::Event::InitDone, 1, &mut seen);
        assert_eq!(*directory.subscribe().borrow(), generation + 1);
        assert_eq!(directory.node_names(), ["a", "b"]);
        assert_eq!(directory.snapshot().len(), 2);
        assert!(!directory.snapshot().node("a").unwrap().ready);
        directory.on_node_event(
            watcher::Event::Apply(node("a", Some("127.0.0.4"))),
            1,
            &mut seen,
        );
        assert_eq!(directory.health("a").unwrap().address, "127.0.0.4:1");
        directory.on_node_event(watcher::Event::Apply(node("b", None)), 1, &mut seen);
        assert_eq!(directory.node_names(), ["a"]);
        // A relist that no longer shows a: dropped.
        for event in [
            watcher::Event::Init,
            watcher::Event::InitApply(node("c", Some("127.0.0.5"))),
            watcher::Event::InitDone,
        ] {
            directory.on_node_event(event, 1, &mut seen);
        }
        assert_eq!(directory.node_names(), ["c"]);
        directory.on_node_event(watcher::Event::Delete(node("c", None)), 1, &mut seen);
        assert!(directory.node_names().is_empty());
        assert!(directory.snapshot().is_empty());
        assert!(directory.upsert("x", "no port").is_err());
        assert!(directory.upsert("x", "127.0.0.1:1/path").is_err());
    }
}
