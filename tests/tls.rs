//! TLS: weir terminates TLS (h2 and HTTP/1.1 by ALPN) for rustls clients and curl, shrugs off
//! plain HTTP on its TLS port, enforces client certificates under mTLS, and reaches https
//! backends signed by a private CA.

mod common;

use std::convert::Infallible;
use std::path::PathBuf;
use std::sync::Arc;

use bytes::Bytes;
use common::pki::Pki;
use common::*;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

impl Pki {
    fn roots(&self) -> rustls::RootCertStore {
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_file_iter(self.path("ca.pem")).unwrap() {
            roots.add(cert.unwrap()).unwrap();
        }
        roots
    }

    fn client_config(&self, client_cert: Option<(PathBuf, PathBuf)>) -> rustls::ClientConfig {
        let roots = self.roots();
        let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
        match client_cert {
            None => builder.with_no_client_auth(),
            Some((cert, key)) => builder
                .with_client_auth_cert(
                    CertificateDer::pem_file_iter(cert)
                        .unwrap()
                        .map(Result::unwrap)
                        .collect(),
                    PrivateKeyDer::from_pem_file(key).unwrap(),
                )
                .unwrap(),
        }
    }

    fn client(
        &self,
        h2: bool,
        client_cert: Option<(PathBuf, PathBuf)>,
    ) -> Client<
        hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>,
        Empty<Bytes>,
    > {
        let builder = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(self.client_config(client_cert))
            .https_only();
        let connector = if h2 {
            builder.enable_http2().build()
        } else {
            builder.enable_http1().build()
        };
        Client::builder(TokioExecutor::new())
            .http2_only(h2)
            .build(connector)
    }
}

fn tls_config(pki: &Pki, client_ca: bool) -> String {
    let (cert, key) = pki.issue("server");
    format!(
        r#"
        [listener]
        addr = "127.0.0.1:0"
        [listener.tls]
        cert = {cert:?}
        key = {key:?}
        {}
        [[versions]]
        model = "chat"
        version = "v1"
        backends = ["{{v1}}"]
        [[routes]]
        name = "chat"
        stable = "chat@v1"
        "#,
        if client_ca {
            format!("client_ca = {:?}", pki.path("ca.pem"))
        } else {
            String::new()
        },
    )
}

async fn get_tls(
    client: &Client<
        hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>,
        Empty<Bytes>,
    >,
    url: &str,
) -> Result<(http::Version, serde_json::Value), String> {
    let response = tokio::time::timeout(DEADLINE, client.get(url.parse().unwrap()))
        .await
        .map_err(|_| "timed out".to_string())?
        .map_err(|e| format!("{e:?}"))?;
    let version = response.version();
    let body = response
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    Ok((
        version,
        serde_json::from_slice(&body).map_err(|e| format!("{e}: {body:?}"))?,
    ))
}

#[tokio::test]
async fn rustls_clients_reach_weir_over_h2_and_http1_and_backends_see_https() {
    let pki = Pki::new();
    let backend = Backend::echo("v1").await;
    let weir = Weir::start(&tls_config(&pki, false), &[("v1", &backend.url())]).await;
    let url = format!("https://localhost:{}/v1/models", weir.proxy.port());

    let (version, echo) = get_tls(&pki.client(true, None), &url).await.unwrap();
    assert_eq!(version, http::Version::HTTP_2);
    assert_eq!(echoed_header(&echo, "x-forwarded-proto"), ["https"]);

    let (version, echo) = get_tls(&pki.client(false, None), &url).await.unwrap();
    assert_eq!(version, http::Version::HTTP_11);
    assert_eq!(echo["path"], "/v1/models");
}

#[tokio::test]
async fn curl_reaches_weir_over_tls_with_h2_and_http1() {
    let pki = Pki::new();
    let backend = Backend::named("v1").await;
    let weir = Weir::start(&tls_config(&pki, false), &[("v1", &backend.url())]).await;
    let url = format!("https://localhost:{}/", weir.proxy.port());
    let ca = pki.path("ca.pem");
    for (flag, expected) in [("--http2", "2"), ("--http1.1", "1.1")] {
        let (url, ca) = (url.clone(), ca.clone());
        let output = tokio::task::spawn_blocking(move || {
            std::process::Command::new("curl")
                .args(["-sS", "--max-time", "10", "--cacert"])
                .arg(&ca)
                .args([flag, "-w", "\n%{http_version} %{http_code}", &url])
                .output()
                .expect("curl runs (install it: apt-get install curl)")
        })
        .await
        .unwrap();
        let text = String::from_utf8_lossy(&output.stdout).to_string();
        assert!(
            output.status.success(),
            "curl {flag}: {text} {}",
            String::from_utf8_lossy(&output.stderr)
        );
        assert!(
            text.ends_with(&format!("{expected} 200")),
            "curl {flag}: {text}"
        );
        assert!(text.starts_with("v1"), "{text}");
    }
}

#[tokio::test]
async fn plain_http_on_the_tls_port_does_no_harm() {
    let pki = Pki::new();
    let backend = Backend::named("v1").await;
    let weir = Weir::start(&tls_config(&pki, false), &[("v1", &backend.url())]).await;
    for _ in 0..20 {
        let mut raw = tokio::net::TcpStream::connect(weir.proxy).await.unwrap();
        raw.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let mut buf = Vec::new();
        let read = tokio::time::timeout(DEADLINE, raw.read_to_end(&mut buf)).await;
        assert!(
            read.is_ok(),
            "a plain-HTTP connection to the TLS port was left hanging"
        );
        assert!(
            !String::from_utf8_lossy(&buf).contains("v1"),
            "plain HTTP must not be served"
        );
    }
    assert_eq!(backend.hits(), 0);
    let url = format!("https://localhost:{}/", weir.proxy.port());
    let response = pki
        .client(false, None)
        .get(url.parse().unwrap())
        .await
        .unwrap();
    assert_eq!(
        response.status(),
        200,
        "TLS still works after plain-HTTP junk"
    );
}

#[tokio::test]
async fn mtls_refuses_a_client_without_a_certificate() {
    let pki = Pki::new();
    let backend = Backend::echo("v1").await;
    let weir = Weir::start(&tls_config(&pki, true), &[("v1", &backend.url())]).await;
    let url = format!("https://localhost:{}/", weir.proxy.port());

    let refused = get_tls(&pki.client(false, None), &url).await;
    assert!(
        refused.is_err(),
        "a client without a certificate got through: {refused:?}"
    );
    assert_eq!(backend.hits(), 0);

    let client_cert = pki.issue("client");
    let (_, echo) = get_tls(&pki.client(false, Some(client_cert)), &url)
        .await
        .unwrap();
    assert_eq!(echo["path"], "/");

    // A certificate from another CA is refused too.
    let other = Pki::new();
    let stranger = other.issue("stranger");
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(pki.roots())
    .with_client_auth_cert(
        CertificateDer::pem_file_iter(&stranger.0)
            .unwrap()
            .map(Result::unwrap)
            .collect(),
        PrivateKeyDer::from_pem_file(&stranger.1).unwrap(),
    )
    .unwrap();
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(config)
        .https_only()
        .enable_http1()
        .build();
    let client: Client<_, Empty<Bytes>> = Client::builder(TokioExecutor::new()).build(connector);
    assert!(
        get_tls(&client, &url).await.is_err(),
        "a certificate from another CA got through"
    );
}

/// A TLS acceptor with a certificate from `pki`'s CA for `localhost`.
fn backend_acceptor(pki: &Pki) -> tokio_rustls::TlsAcceptor {
    backend_acceptor_offering(pki, &[])
}

/// [`backend_acceptor`], offering `alpn` (none: no ALPN negotiation).
fn backend_acceptor_offering(pki: &Pki, alpn: &[&[u8]]) -> tokio_rustls::TlsAcceptor {
    let (cert, key) = pki.issue("backend");
    let server_config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(
        CertificateDer::pem_file_iter(&cert)
            .unwrap()
            .map(Result::unwrap)
            .collect(),
        PrivateKeyDer::from_pem_file(&key).unwrap(),
    )
    .unwrap();
    let mut server_config = server_config;
    server_config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    tokio_rustls::TlsAcceptor::from(Arc::new(server_config))
}

/// An https backend with a certificate from `pki`'s CA for `localhost`, answering every request
/// with `body` and `x-backend: body`; returns its port.
async fn https_backend(pki: &Pki, body: &'static str) -> u16 {
    tls_server(pki, move |tls| async move {
        let service = hyper::service::service_fn(move |_req| async move {
            let mut response = http::Response::new(full(body));
            response
                .headers_mut()
                .insert("x-backend", http::HeaderValue::from_static(body));
            Ok::<_, Infallible>(response)
        });
        let _ = hyper::server::conn::http1::Builder::new()
            .serve_connection(TokioIo::new(tls), service)
            .await;
    })
    .await
}

/// One route to one version served by the https backend on `port`, trusting `pki`'s CA.
fn https_backend_config(pki: &Pki, port: u16) -> String {
    format!(
        r#"
        [proxy.backend_tls]
        ca = {:?}
        [[versions]]
        model = "chat"
        version = "v1"
        backends = ["https://localhost:{port}"]
        [[routes]]
        name = "chat"
        stable = "chat@v1"
        "#,
        pki.path("ca.pem")
    )
}

#[tokio::test]
async fn an_https_backend_with_a_private_ca_works() {
    let pki = Pki::new();
    let port = https_backend(&pki, "secret backend").await;
    let config = https_backend_config(&pki, port);
    let weir = Weir::start(&config, &[]).await;
    let reply = get(&http1(), &weir.url("/")).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.text(), "secret backend");

    // Without the private CA the backend's certificate is not trusted: 502, not a silent pass.
    let untrusting = config.replace(&format!("ca = {:?}", pki.path("ca.pem")), "");
    let weir = Weir::start(&untrusting, &[]).await;
    let reply = get(&http1(), &weir.url("/")).await;
    assert_weir_error(&reply, 502, "connect", Some("chat@v1"));
}

#[tokio::test]
async fn certificates_are_reread_without_dropping_open_connections() {
    let old_ca = Pki::new();
    let backend = Backend::named("v1").await;
    let weir = Weir::start(&tls_config(&old_ca, false), &[("v1", &backend.url())]).await;
    let url = format!("https://localhost:{}/", weir.proxy.port());
    let old_client = old_ca.client(false, None);
    let first = old_client.get(url.parse().unwrap()).await.unwrap();
    assert_eq!(first.status(), 200);
    first.into_body().collect().await.unwrap();

    // Replace the files with a certificate from another CA and re-read them (what SIGHUP does).
    let new_ca = Pki::new();
    let (cert, key) = new_ca.issue("server2");
    std::fs::copy(cert, old_ca.path("server.pem")).unwrap();
    std::fs::copy(key, old_ca.path("server.key")).unwrap();
    let reloaded = weir.running.as_ref().unwrap().reload_tls().unwrap();
    assert_eq!(reloaded, 1);

    let fresh = new_ca
        .client(false, None)
        .get(url.parse().unwrap())
        .await
        .map(|r| r.status());
    assert!(
        fresh.is_ok(),
        "a new handshake does not present the new certificate: {fresh:?}"
    );
    // The old client trusts only the old CA: its request can only succeed on its open connection.
    let again = old_client.get(url.parse().unwrap()).await;
    assert!(
        again.is_ok_and(|r| r.status() == 200),
        "the open connection was dropped by the reload"
    );
    let stranger = Pki::new()
        .client(false, None)
        .get(url.parse().unwrap())
        .await;
    assert!(stranger.is_err(), "an unrelated CA must not be accepted");
}

/// Reads one HTTP/1.1 response with a `Content-Length` body: (status, head, body).
async fn read_response<S: tokio::io::AsyncRead + Unpin>(
    stream: &mut S,
    pending: &mut Vec<u8>,
) -> (u16, String, String) {
    let head_end = loop {
        if let Some(at) = pending.windows(4).position(|w| w == b"\r\n\r\n") {
            break at + 4;
        }
        let mut chunk = [0u8; 4096];
        let n = tokio::time::timeout(DEADLINE, stream.read(&mut chunk))
            .await
            .expect("a response head in time")
            .unwrap();
        assert!(n > 0, "closed before a response head: {pending:?}");
        pending.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&pending[..head_end]).to_lowercase();
    let status = head[9..12].parse().unwrap();
    let length: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .unwrap_or_else(|| panic!("no content-length in {head}"))
        .trim()
        .parse()
        .unwrap();
    while pending.len() < head_end + length {
        let mut chunk = [0u8; 4096];
        let n = tokio::time::timeout(DEADLINE, stream.read(&mut chunk))
            .await
            .expect("a response body in time")
            .unwrap();
        assert!(n > 0, "closed mid-body");
        pending.extend_from_slice(&chunk[..n]);
    }
    let body = String::from_utf8_lossy(&pending[head_end..head_end + length]).into_owned();
    pending.drain(..head_end + length);
    (status, head, body)
}

#[tokio::test]
async fn http1_over_tls_serves_one_connection_through_fast_and_handed_over_requests() {
    let pki = Pki::new();
    let backend = Backend::echo("v1").await;
    let weir = Weir::start(&tls_config(&pki, false), &[("v1", &backend.url())]).await;
    // Without ALPN and with ALPN http/1.1: both are HTTP/1.1 over TLS.
    for alpn in [None, Some(b"http/1.1".to_vec())] {
        let mut config = pki.client_config(None);
        config.alpn_protocols = alpn.clone().into_iter().collect();
        let tcp = tokio::net::TcpStream::connect(weir.proxy).await.unwrap();
        let mut tls = tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(
                rustls::pki_types::ServerName::try_from("localhost").unwrap(),
                tcp,
            )
            .await
            .unwrap();
        let mut pending = Vec::new();
        let echo = |body: &str| serde_json::from_str::<serde_json::Value>(body).unwrap();

        // A GET, then a POST with a Content-Length body.
        tls.write_all(
            b"GET /v1/models?x=1 HTTP/1.1\r\nHost: localhost\r\nX-Forwarded-For: 10.0.0.9\r\n\r\n",
        )
        .await
        .unwrap();
        let (status, head, body) = read_response(&mut tls, &mut pending).await;
        assert_eq!(status, 200, "{alpn:?}: {head}");
        assert!(head.contains("x-weir-version: chat@v1"), "{head}");
        let e = echo(&body);
        assert_eq!(e["path"], "/v1/models");
        assert_eq!(echoed_header(&e, "x-forwarded-proto"), ["https"]);
        assert_eq!(
            echoed_header(&e, "x-forwarded-for"),
            ["10.0.0.9, 127.0.0.1"]
        );

        let json = r#"{"model":"chat","messages":[]}"#;
        tls.write_all(
            format!(
                "POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nContent-Length: {}\r\n\r\n{json}",
                json.len()
            )
            .as_bytes(),
        )
        .await
        .unwrap();
        let (status, _, body) = read_response(&mut tls, &mut pending).await;
        assert_eq!(status, 200);
        assert_eq!(echo(&body)["body"], json);

        // A chunked body is hyper's: the same connection is handed over mid-stream, and the
        // request after it is still answered.
        tls.write_all(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n",
        )
        .await
        .unwrap();
        let (status, _, body) = read_response(&mut tls, &mut pending).await;
        assert_eq!(status, 200);
        assert_eq!(echo(&body)["body"], "hello world");
        assert_eq!(echoed_header(&echo(&body), "x-forwarded-proto"), ["https"]);
        tls.write_all(b"GET /again HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let (status, _, body) = read_response(&mut tls, &mut pending).await;
        assert_eq!(status, 200);
        assert_eq!(echo(&body)["path"], "/again");
    }
    assert_eq!(backend.hits(), 8);
}

/// The HTTP/1 fast path sends only to plain-HTTP backends and hands other requests (and the rest
/// of their connection) to hyper; the split must still draw once, so a route with one https
/// version splits at its weight.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_route_with_an_https_candidate_splits_http1_requests_at_its_weight() {
    const N: usize = 1000;
    let pki = Pki::new();
    let port = https_backend(&pki, "chat@v2").await;
    let stable = Backend::named("chat@v1").await;
    let config = format!(
        r#"
        [proxy.backend_tls]
        ca = {ca:?}
        [[versions]]
        model = "chat"
        version = "v2"
        backends = ["https://localhost:{port}"]
        [[versions]]
        model = "chat"
        version = "v1"
        backends = ["{{v1}}"]
        [[routes]]
        name = "chat"
        stable = "chat@v1"
        candidate = "chat@v2"
        weight = "50%"
        "#,
        ca = pki.path("ca.pem")
    );
    let weir = Weir::start(&config, &[("v1", &stable.url())]).await;
    let client = http1();
    let mut candidate = 0;
    for i in 0..N {
        // One connection per request: a connection handed over stays with hyper.
        let reply = get_with(&client, &weir.url("/"), &[("connection", "close")]).await;
        assert_eq!(reply.status, 200, "request {i}: {}", reply.text());
        assert_eq!(
            reply.header("x-backend"),
            Some(reply.served_by()),
            "request {i}"
        );
        if reply.served_by() == "chat@v2" {
            candidate += 1;
        }
    }
    // 50% of 1000 is 500 ± 79 (5σ); a split drawn twice for the candidate gives 25%.
    assert!(
        (421..=579).contains(&candidate),
        "candidate served {candidate} of {N} requests at weight 50%"
    );
}

/// An https backend that answers each request (read up to the end of its head) with the raw
/// bytes `response`, keeping the connection open; returns its port.
async fn raw_https_backend(pki: &Pki, response: &'static str) -> u16 {
    tls_server(pki, move |tls| async move {
        let mut wire = common::wire::Wire::new(tls);
        while wire.head().await.is_ok() {
            if wire.io.write_all(response.as_bytes()).await.is_err() {
                return;
            }
        }
        // Held open: a body read until close would never end by itself.
        std::future::pending::<()>().await;
    })
    .await
}

/// A TLS server on a port of its own with `pki`'s `localhost` certificate, each connection
/// served by `serve`; returns the port.
async fn tls_server<F, Fut>(pki: &Pki, serve: F) -> u16
where
    F: Fn(tokio_rustls::server::TlsStream<tokio::net::TcpStream>) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let acceptor = backend_acceptor(pki);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let (acceptor, serve) = (acceptor.clone(), serve.clone());
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                serve(tls).await;
            });
        }
    });
    port
}

/// Responses from an https backend come through hyper's client; they are held to the same
/// framing rules as the fast path's (tests/framing.rs checks those for plain backends).
#[tokio::test]
async fn responses_from_an_https_backend_are_held_to_the_framing_rules() {
    // (what, the backend's response, the client's body and Content-Length or weir's error kind)
    type Expected = Result<(&'static str, Option<&'static str>), &'static str>;
    let rows: [(&str, &'static str, Expected); 6] = [
        (
            "chunked beside Content-Length: framed by chunked alone",
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
            Ok(("hello", None)),
        ),
        (
            "one Content-Length, twice",
            "HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\nhello",
            Ok(("hello", Some("5"))),
        ),
        (
            "gzip transfer coding",
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\nhello",
            Err("protocol"),
        ),
        (
            "chunked, identity",
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, identity\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
            Err("protocol"),
        ),
        (
            "101 to a request that asked no upgrade",
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\nConnection: upgrade\r\n\r\n",
            Err("protocol"),
        ),
        (
            "chunked in HTTP/1.0",
            "HTTP/1.0 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
            Err("protocol"),
        ),
    ];
    let pki = Pki::new();
    for (what, response, expected) in rows {
        let port = raw_https_backend(&pki, response).await;
        let config = https_backend_config(&pki, port);
        let weir = Weir::start(&config, &[]).await;
        let stream = tokio::net::TcpStream::connect(weir.proxy).await.unwrap();
        let mut client = common::wire::Wire::new(stream);
        client
            .io
            .write_all(b"GET /v1/x HTTP/1.1\r\nHost: weir.test\r\n\r\n")
            .await
            .unwrap();
        let reply = client.response().await;
        match expected {
            Ok((body, length)) => {
                assert_eq!(reply.status, 200, "{what}: {}", reply.text());
                assert_eq!(reply.text(), body, "{what}");
                let lengths = reply.headers.all("content-length");
                assert_eq!(lengths, length.into_iter().collect::<Vec<_>>(), "{what}");
            }
            Err(kind) => {
                assert_eq!(reply.status, 502, "{what}: {}", reply.text());
                assert_eq!(reply.json()["kind"], kind, "{what}");
            }
        }
    }
}

/// `protocol = "http2"` over `https://` needs the backend to offer `h2` by ALPN: weir refuses to
/// start naming a backend that offers only HTTP/1.1 (or no ALPN), and starts with one that offers
/// h2.
#[tokio::test]
async fn an_http2_version_over_tls_needs_a_backend_that_offers_h2() {
    let pki = Pki::new();
    const HTTP1: &[&[u8]] = &[b"http/1.1"];
    const H2: &[&[u8]] = &[b"h2"];
    let listen = |alpn: &'static [&'static [u8]]| {
        let acceptor = backend_acceptor_offering(&pki, alpn);
        async move {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let port = listener.local_addr().unwrap().port();
            tokio::spawn(async move {
                while let Ok((tcp, _)) = listener.accept().await {
                    let acceptor = acceptor.clone();
                    tokio::spawn(async move {
                        let _ = acceptor.accept(tcp).await;
                    });
                }
            });
            port
        }
    };
    let config = |port: u16| {
        format!(
            r#"
            [listener]
            addr = "127.0.0.1:0"
            [admin]
            addr = "127.0.0.1:0"
            [proxy.backend_tls]
            ca = {:?}
            [[versions]]
            model = "chat"
            version = "v1"
            backends = ["https://localhost:{port}"]
            protocol = "http2"
            [[routes]]
            name = "chat"
            stable = "chat@v1"
            "#,
            pki.path("ca.pem")
        )
    };
    let state = temp_dir("h2-alpn");
    let start = |text: String| {
        let dir = state.path().to_path_buf();
        async move {
            let text = format!("[state]\ndir = {:?}\n{text}", dir.display().to_string());
            let config = weir::Config::from_toml_str(&text, "alpn.toml").unwrap();
            weir::Server::start(config).await
        }
    };
    for alpn in [HTTP1, &[]] {
        let port = listen(alpn).await;
        let refused = start(config(port)).await.expect_err("no h2 offered");
        let text = refused.to_string();
        assert!(
            text.contains("chat@v1") && text.contains("does not offer HTTP/2 by ALPN (h2)"),
            "{text}"
        );
        assert!(
            text.contains(&format!("https://localhost:{port}")),
            "{text}"
        );
    }
    let port = listen(H2).await;
    let running = start(config(port))
        .await
        .expect("a backend offering h2 is fine");
    running.shutdown();
}
