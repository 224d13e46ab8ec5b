//! Forwarding fidelity: what the backend sees is what the client sent, minus hop-by-hop headers
//! and plus `x-forwarded-*`; what the client gets back is what the backend answered, minus
//! hop-by-hop headers and plus `x-weir-version`. HTTP/1.1 and h2c share one listener.

mod common;

use bytes::Bytes;
use common::*;
use http::{Method, Request, Response};
use http_body_util::BodyExt;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// Sends one request on a fresh HTTP/1.1 connection with exactly the headers given (no pool, no
/// header normalisation beyond what hyper's encoder does).
async fn send_raw_http1(addr: std::net::SocketAddr, req: Request<Body>) -> Reply {
    let stream = TcpStream::connect(addr).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake::<_, Body>(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    let response = tokio::time::timeout(DEADLINE, sender.send_request(req))
        .await
        .expect("response head within the deadline")
        .expect("request");
    let (parts, body) = response.into_parts();
    let body = tokio::time::timeout(DEADLINE, body.collect())
        .await
        .expect("body within the deadline")
        .expect("body")
        .to_bytes();
    Reply {
        status: parts.status,
        version: parts.version,
        headers: parts.headers,
        body,
    }
}

const HOP_BY_HOP: [&str; 9] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "proxy-authorization",
    "proxy-authenticate",
];

#[tokio::test]
async fn request_arrives_unchanged_without_hop_by_hop_headers() {
    let v1 = Backend::echo("chat@v1").await;
    let weir = Weir::start(ONE_VERSION, &[("v1", &v1.url())]).await;
    let body = r#"{"prompt":"hello","n":1}"#;
    let req = Request::builder()
        .method(Method::PATCH)
        .uri("/v1/echo/a%20b/c?b=2&a=1&a=%2F&empty=")
        .header("host", "weir.test")
        .header("connection", "keep-alive, x-drop-me")
        .header("x-drop-me", "secret")
        .header("keep-alive", "timeout=5")
        .header("proxy-connection", "keep-alive")
        .header("te", "trailers")
        .header("trailer", "x-checksum")
        .header("upgrade", "foo/1")
        .header("proxy-authorization", "Basic cHJveHk6c2VjcmV0")
        .header("authorization", "Bearer end-to-end")
        .header("x-custom", "Hello, World")
        .header("x-multi", "one")
        .header("x-multi", "two")
        .header("content-type", "application/json")
        .header("content-length", body.len())
        .body(full(body))
        .unwrap();
    let reply = send_raw_http1(weir.proxy, req).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.served_by(), "chat@v1");
    let echo = reply.json();
    assert_eq!(echo["method"], "PATCH");
    assert_eq!(echo["path"], "/v1/echo/a%20b/c");
    assert_eq!(echo["query"], "b=2&a=1&a=%2F&empty=");
    assert_eq!(echo["body"], body);
    assert_eq!(echoed_header(&echo, "x-custom"), ["Hello, World"]);
    assert_eq!(echoed_header(&echo, "x-multi"), ["one", "two"]);
    assert_eq!(echoed_header(&echo, "authorization"), ["Bearer end-to-end"]);
    assert_eq!(echoed_header(&echo, "content-type"), ["application/json"]);
    assert_eq!(
        echoed_header(&echo, "content-length"),
        [body.len().to_string()]
    );
    assert_eq!(
        echoed_header(&echo, "x-drop-me"),
        Vec::<String>::new(),
        "a header named in Connection reached the backend"
    );
    for name in HOP_BY_HOP {
        if name == "connection" {
            // weir's own client may say keep-alive to the backend; it must not pass the
            // client's connection options on.
            for value in echoed_header(&echo, name) {
                assert!(
                    !value.to_ascii_lowercase().contains("x-drop-me"),
                    "client's Connection header reached the backend: {value:?}"
                );
            }
            continue;
        }
        if name == "transfer-encoding" {
            continue; // the request had a content-length: nothing to check on this hop
        }
        assert_eq!(
            echoed_header(&echo, name),
            Vec::<String>::new(),
            "hop-by-hop header {name} reached the backend"
        );
    }
}

#[tokio::test]
async fn response_arrives_unchanged_without_hop_by_hop_headers() {
    let backend = Backend::start(|_req| async {
        Response::builder()
            .status(201)
            .header("connection", "x-backend-hop")
            .header("x-backend-hop", "secret")
            .header("keep-alive", "timeout=5")
            .header("proxy-authenticate", "Basic realm=\"x\"")
            .header("proxy-connection", "keep-alive")
            .header("trailer", "x-checksum")
            .header("upgrade", "foo/1")
            .header("x-backend-custom", "kept")
            .header("x-multi", "one")
            .header("x-multi", "two")
            .header("set-cookie", "a=1")
            .header("set-cookie", "b=2")
            .body(full("created"))
            .unwrap()
    })
    .await;
    let weir = Weir::start(ONE_VERSION, &[("v1", &backend.url())]).await;
    let req = Request::builder()
        .uri("/v1/anything")
        .header("host", "weir.test")
        .body(empty())
        .unwrap();
    let reply = send_raw_http1(weir.proxy, req).await;
    assert_eq!(reply.status, 201, "{}", reply.text());
    assert_eq!(reply.text(), "created");
    assert_eq!(reply.served_by(), "chat@v1");
    assert_eq!(reply.header("x-backend-custom"), Some("kept"));
    let all = |name: &str| -> Vec<&str> {
        reply
            .headers
            .get_all(name)
            .iter()
            .map(|v| v.to_str().unwrap())
            .collect()
    };
    assert_eq!(all("x-multi"), ["one", "two"]);
    assert_eq!(all("set-cookie"), ["a=1", "b=2"]);
    assert_eq!(
        reply.header("x-backend-hop"),
        None,
        "a header named in the backend's Connection reached the client"
    );
    for value in all("connection") {
        assert!(
            !value.contains("x-backend-hop"),
            "backend's Connection header reached the client: {value:?}"
        );
    }
    for name in [
        "keep-alive",
        "proxy-authenticate",
        "proxy-connection",
        "trailer",
        "upgrade",
    ] {
        assert_eq!(
            reply.header(name),
            None,
            "hop-by-hop header {name} reached the client"
        );
    }
}

/// The entries of an `x-forwarded-for` list, over all its header lines.
fn forwarded_list(values: Vec<String>) -> Vec<String> {
    values
        .iter()
        .flat_map(|v| v.split(','))
        .map(|v| v.trim().to_string())
        .collect()
}

#[tokio::test]
async fn forwarded_headers_name_the_client() {
    let v1 = Backend::echo("chat@v1").await;
    let weir = Weir::start(ONE_VERSION, &[("v1", &v1.url())]).await;
    let client = http1();

    let echo = get(&client, &weir.url("/v1/x")).await.json();
    assert_eq!(
        forwarded_list(echoed_header(&echo, "x-forwarded-for")),
        ["127.0.0.1"]
    );
    assert_eq!(echoed_header(&echo, "x-forwarded-proto"), ["http"]);

    let echo = get_with(
        &client,
        &weir.url("/v1/x"),
        &[("x-forwarded-for", "10.1.2.3")],
    )
    .await
    .json();
    assert_eq!(
        forwarded_list(echoed_header(&echo, "x-forwarded-for")),
        ["10.1.2.3", "127.0.0.1"],
        "the client IP must be appended to an existing x-forwarded-for"
    );
}

#[tokio::test]
async fn every_forwarded_for_line_is_kept() {
    let v1 = Backend::echo("chat@v1").await;
    let weir = Weir::start(ONE_VERSION, &[("v1", &v1.url())]).await;
    let client = http1();
    // A client (or an earlier proxy) may send the list as several header lines; none of the
    // earlier hops may be lost.
    let echo = get_with(
        &client,
        &weir.url("/v1/x"),
        &[
            ("x-forwarded-for", "10.1.2.3"),
            ("x-forwarded-for", "10.4.5.6"),
        ],
    )
    .await
    .json();
    assert_eq!(
        forwarded_list(echoed_header(&echo, "x-forwarded-for")),
        ["10.1.2.3", "10.4.5.6", "127.0.0.1"],
        "every x-forwarded-for line must be kept, then the client IP appended"
    );
}

const HOSTS: &str = r#"
[[versions]]
model = "api"
version = "v1"
backends = ["{api}"]

[[versions]]
model = "any"
version = "v1"
backends = ["{any}"]

[[routes]]
name = "any"
stable = "any@v1"

[[routes]]
name = "api"
host = "api.example"
stable = "api@v1"
"#;

#[tokio::test]
async fn host_routes_match_the_host_with_or_without_port() {
    let api = Backend::named("api@v1").await;
    let any = Backend::named("any@v1").await;
    let weir = Weir::start(HOSTS, &[("api", &api.url()), ("any", &any.url())]).await;
    for (host, expected) in [
        ("api.example", "api@v1"),
        ("api.example:8080", "api@v1"),
        ("API.Example", "api@v1"),
        ("other.example", "any@v1"),
        ("api.example.org", "any@v1"),
    ] {
        let req = Request::builder()
            .uri("/v1/x")
            .header("host", host)
            .body(empty())
            .unwrap();
        let reply = send_raw_http1(weir.proxy, req).await;
        assert_eq!(reply.status, 200, "host {host}: {}", reply.text());
        assert_eq!(reply.served_by(), expected, "host {host}");
        assert_eq!(reply.text(), expected, "host {host}");
    }
}

#[tokio::test]
async fn http2_prior_knowledge_and_http1_share_the_listener() {
    let v1 = Backend::echo("chat@v1").await;
    let weir = Weir::start(ONE_VERSION, &[("v1", &v1.url())]).await;
    for (client, version) in [
        (http2(), http::Version::HTTP_2),
        (http1(), http::Version::HTTP_11),
        (http2(), http::Version::HTTP_2),
    ] {
        let req = request(Method::POST, &weir.url("/v1/chat?stream=false"))
            .header("x-custom", "h")
            .body(full("hello over the wire"))
            .unwrap();
        let reply = send(&client, req).await;
        assert_eq!(reply.status, 200, "{version:?}: {}", reply.text());
        assert_eq!(reply.version, version);
        assert_eq!(reply.served_by(), "chat@v1", "{version:?}");
        let echo = reply.json();
        assert_eq!(echo["method"], "POST");
        assert_eq!(echo["path"], "/v1/chat");
        assert_eq!(echo["query"], "stream=false");
        assert_eq!(echo["body"], "hello over the wire");
        assert_eq!(echoed_header(&echo, "x-custom"), ["h"]);
    }
    assert_eq!(v1.hits(), 3);
}

#[tokio::test]
async fn version_header_name_is_configurable() {
    let v1 = Backend::named("chat@v1").await;
    let config = format!("[proxy]\nversion_header = \"x-served-by\"\n{ONE_VERSION}");
    let weir = Weir::start(&config, &[("v1", &v1.url())]).await;
    let reply = get(&http1(), &weir.url("/v1/x")).await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.header("x-served-by"), Some("chat@v1"));
    assert_eq!(reply.header("x-weir-version"), None);
    assert_eq!(reply.body, Bytes::from_static(b"chat@v1"));
}
