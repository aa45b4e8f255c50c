//! Misses are explained (issue 10, item 7): the node plugin counts misses
//! per handler and reason, shows them in `/pools`, and when a handler's
//! pods miss because no pool has their shape it logs once per handler and
//! differing field, at WARN, what the pod asked and what the pools serve.
//! Driven through `SlotSource::missed`, the hook the shim calls for every
//! cold `RunPodSandbox`, on a pool manager over a fake upstream (no root).

use std::{
    io::Write,
    sync::{Arc, Mutex},
};

use fast_sandbox_node::{admin, metrics::Metrics};
use fast_sandbox_shim::slots::{MissReason, PoolKey, SeccompShape, Shape, SlotSource};
use fast_sandbox_tests::fake_cri::{runc_key, PoolRig};

/// Log lines written while a test runs.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Captured {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().expect("log buffer")).into_owned()
    }
}

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("log buffer").extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn kubelet_key(run_as_user: Option<i64>) -> PoolKey {
    PoolKey {
        upstream_handler: "runc".into(),
        shape: Shape {
            seccomp: SeccompShape::RuntimeDefault,
            run_as_user,
            ..Shape::default()
        },
    }
}

#[tokio::test]
async fn no_pool_misses_are_counted_shown_and_explained_once_per_field() {
    let logs = Captured::default();
    let writer = logs.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .with_max_level(tracing::Level::INFO)
        .finish();
    // The test's runtime is single-threaded: the default is seen by all of it.
    let _default = tracing::subscriber::set_default(subscriber);

    // A pool serving Unconfined (the old default) under handler "fast-runc".
    let rig = PoolRig::start("fast-runc", 0).await;
    assert_eq!(rig.manager.specs()[0].key, runc_key());
    let source: &dyn SlotSource = &*rig.manager;

    // Kubelet's pods ask RuntimeDefault: three misses, one explanation.
    for _ in 0..3 {
        source.missed("fast-runc", Some(&kubelet_key(None)), MissReason::NoPool);
    }
    source.missed("fast-runc", Some(&runc_key()), MissReason::PoolEmpty);
    source.missed("fast-runc", None, MissReason::HostNetwork);
    // Not ours: not a miss of this node's pools.
    source.missed("runc", None, MissReason::NotFastHandler);

    let text = logs.text();
    let explained: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("pod sandbox asks"))
        .collect();
    assert_eq!(explained.len(), 1, "once per handler and field:\n{text}");
    assert!(
        explained[0].contains("WARN")
            && explained[0].contains(
                "pod sandbox asks seccomp RuntimeDefault; pools for fast-runc serve Unconfined"
            ),
        "{text}"
    );

    // A new differing field (run_as_user) is explained once more.
    source.missed(
        "fast-runc",
        Some(&kubelet_key(Some(1000))),
        MissReason::NoPool,
    );
    let text = logs.text();
    let user: Vec<&str> = text
        .lines()
        .filter(|l| {
            l.contains("pod sandbox asks run_as_user 1000; pools for fast-runc serve unset")
        })
        .collect();
    assert_eq!(user.len(), 1, "{text}");
    assert_eq!(
        text.lines()
            .filter(|l| l.contains("pod sandbox asks seccomp"))
            .count(),
        1,
        "seccomp was already explained:\n{text}"
    );

    // /pools shows the handler's misses by reason.
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let (addr, server) = admin::bind(
        "127.0.0.1:0".parse().expect("addr"),
        Some(Arc::clone(&rig.manager)),
        Arc::new(Metrics::default()),
        rig.health.clone(),
        async {
            let _ = rx.await;
        },
    )
    .await
    .expect("admin endpoint");
    let server = tokio::spawn(server);
    let body = admin::get(addr, "/pools").await.expect("GET /pools");
    let pools: serde_json::Value = serde_json::from_str(&body).expect("JSON");
    let misses = &pools[0]["misses"];
    assert_eq!(misses["no_pool"], 4, "{body}");
    assert_eq!(misses["pool_empty"], 1, "{body}");
    assert_eq!(misses["host_network"], 1, "{body}");
    assert!(misses.get("not_fast_handler").is_none(), "{body}");
    tx.send(()).expect("stop");
    server.await.expect("join").expect("admin serves");
}
