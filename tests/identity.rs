//! Backend identity probe: a backend that starts reporting another model is out of rotation
//! within a probe interval and serves nothing after detection; with no verified backend left the
//! version fails closed (503 `unverified`); a backend reporting the right identity comes back.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use common::*;
use http::Response;

/// A model server whose reported identity the test can change, counting the requests it
/// serves apart from identity probes.
struct Switchable {
    backend: Backend,
    identity: Arc<Mutex<String>>,
    served: Arc<AtomicUsize>,
}

impl Switchable {
    async fn start(name: &str, identity: &str) -> Switchable {
        let identity = Arc::new(Mutex::new(identity.to_string()));
        let served = Arc::new(AtomicUsize::new(0));
        let (id, count, name) = (identity.clone(), served.clone(), name.to_string());
        let backend = Backend::start(move |req| {
            let (id, count, name) = (id.clone(), count.clone(), name.clone());
            async move {
                if req.uri().path() == "/v1/models" {
                    let current = id.lock().unwrap().clone();
                    let body = serde_json::json!({"object": "list", "data": [{"id": current, "object": "model"}]});
                    return Response::new(full(body.to_string()));
                }
                count.fetch_add(1, Ordering::SeqCst);
                Response::new(full(name))
            }
        })
        .await;
        Switchable {
            backend,
            identity,
            served,
        }
    }

    fn report(&self, identity: &str) {
        *self.identity.lock().unwrap() = identity.to_string();
    }

    fn served(&self) -> usize {
        self.served.load(Ordering::SeqCst)
    }
}

const CONFIG: &str = r#"
[identity]
probe = "/v1/models#/data/0/id"
interval = "150ms"

[[versions]]
model = "chat"
version = "v1"
backends = ["{a}", "{b}"]

[[routes]]
name = "chat"
stable = "chat@v1"
"#;

async fn mismatch(weir: &Weir, backend: &Backend) -> Option<f64> {
    weir.metric(
        "weir_backend_version_mismatch",
        &[("version", "chat@v1"), ("backend", &backend.url())],
    )
    .await
}

#[tokio::test]
async fn a_backend_that_starts_serving_another_model_is_taken_out_and_brought_back() {
    let a = Switchable::start("a", "chat@v1").await;
    let b = Switchable::start("b", "chat@v1").await;
    let weir = Weir::start(CONFIG, &[("a", &a.backend.url()), ("b", &b.backend.url())]).await;
    let client = http1();

    for _ in 0..20 {
        assert_eq!(
            get(&client, &weir.url("/v1/chat/completions")).await.status,
            200
        );
    }
    assert!(
        a.served() > 0 && b.served() > 0,
        "both verified backends take traffic"
    );

    // b is swapped for another model.
    b.report("chat@v9-poisoned");
    assert_eventually_eq!(
        mismatch(&weir, &b.backend).await,
        Some(1.0),
        "mismatch gauge of b"
    );
    let served_by_b = b.served();
    for _ in 0..40 {
        let reply = get(&client, &weir.url("/v1/chat/completions")).await;
        assert_eq!(reply.status, 200);
        assert_eq!(
            reply.text(),
            "a",
            "a request reached the mismatched backend"
        );
    }
    assert_eq!(b.served(), served_by_b, "b served traffic after detection");

    // No verified backend left: fail closed.
    a.report("something-else");
    assert_eventually_eq!(
        mismatch(&weir, &a.backend).await,
        Some(1.0),
        "mismatch gauge of a"
    );
    let served = (a.served(), b.served());
    let reply = get(&client, &weir.url("/v1/chat/completions")).await;
    assert_weir_error(&reply, 503, "unverified", Some("chat@v1"));
    assert_eq!(
        (a.served(), b.served()),
        served,
        "an unverified model served a request"
    );

    // Right identity again: back in rotation.
    a.report("chat@v1");
    b.report("chat@v1");
    assert_eventually!(
        get(&client, &weir.url("/v1/chat/completions")).await.status == 200,
        "verified backends did not come back"
    );
    assert_eventually_eq!(
        mismatch(&weir, &b.backend).await,
        Some(0.0),
        "mismatch gauge of b after repair"
    );

    let audit = std::fs::read_to_string(weir.state_dir.path().join("audit.jsonl")).unwrap();
    let mismatch_record = audit
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .find(|r| r["action"] == "identity_mismatch")
        .expect("an identity_mismatch audit record");
    assert_eq!(mismatch_record["after"]["expected"], "chat@v1");
    assert_eq!(mismatch_record["after"]["reported"], "chat@v9-poisoned");
}

#[tokio::test]
async fn a_backend_lying_from_the_start_never_serves() {
    let honest = Switchable::start("honest", "chat@v1").await;
    let liar = Switchable::start("liar", "chat@v2").await;
    let weir = Weir::start(
        CONFIG,
        &[("a", &honest.backend.url()), ("b", &liar.backend.url())],
    )
    .await;
    let client = http1();
    for _ in 0..20 {
        assert_eq!(get(&client, &weir.url("/")).await.text(), "honest");
    }
    assert_eq!(liar.served(), 0);
    assert_eq!(mismatch(&weir, &liar.backend).await, Some(1.0));
}
