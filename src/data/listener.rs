//! Accepting connections: HTTP/1.1 and HTTP/2 (prior knowledge) on one port, chosen per
//! connection from its first bytes, with graceful drain on shutdown.
//!
//! Invariant: once shutdown starts no new connection is accepted; open connections finish their
//! in-flight requests and streams (HTTP/1.1 closes after the current response, HTTP/2 sends
//! GOAWAY) until the drain timeout, after which they are closed.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;

use http::{Request, Response};
use http_body::Body;
use hyper::body::Incoming;
use hyper::service::Service;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::watch;

use super::body::BoxError;
use super::h1::ClientTransport;
use crate::shutdown::stopped;

/// How a drain ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Drained {
    /// Every in-flight request and stream finished.
    Clean,
    /// The drain timeout passed with connections still open; they were closed.
    TimedOut,
}

/// Connection-level settings of one listener.
#[derive(Clone, Debug)]
pub struct ConnSettings {
    pub header_read_timeout: Duration,
    pub drain_timeout: Duration,
    pub limits: crate::config::ConnLimits,
}

/// The HTTP/1.1 + HTTP/2 connection builder every listener uses.
pub fn http_builder(settings: &ConnSettings) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    let limits = &settings.limits;
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(settings.header_read_timeout)
        .keep_alive(true)
        .max_buf_size(limits.max_header_bytes)
        .max_headers(limits.max_headers);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(limits.http2_max_concurrent_streams)
        .max_pending_accept_reset_streams(limits.http2_max_pending_resets)
        .max_header_list_size(limits.max_header_bytes as u32)
        .keep_alive_interval(Some(Duration::from_secs(30)))
        .keep_alive_timeout(Duration::from_secs(20));
    builder
}

/// The live TLS config of a listener; swapped on SIGHUP, read at each handshake.
pub type TlsConfigCell = Arc<ArcSwap<rustls::ServerConfig>>;

/// Accepts connections until `stop` turns true, then drains them. With `tls`, each connection
/// completes a TLS handshake (within the header read timeout) before HTTP starts. With `fast`,
/// plain connections and TLS ones that did not negotiate h2 are served by weir's HTTP/1.1
/// server ([`super::h1`]), and move to hyper only for HTTP/2 with prior knowledge.
pub async fn serve<F, S, B>(
    name: &'static str,
    listener: TcpListener,
    settings: ConnSettings,
    tls: Option<TlsConfigCell>,
    fast: Option<Arc<super::proxy::Proxy>>,
    service_for: F,
    mut stop: watch::Receiver<bool>,
) -> Drained
where
    F: Fn(SocketAddr, bool) -> S,
    S: Service<Request<Incoming>, Response = Response<B>> + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    let builder = Arc::new(http_builder(&settings));
    let graceful = GracefulShutdown::new();
    let (force_close, force_closed) = watch::channel(false);
    let connections = Arc::new(tokio::sync::Semaphore::new(settings.limits.max_connections));
    // Fast-path connections hold a sender each; the drain waits until every one is dropped.
    let (alive, mut all_closed) = tokio::sync::mpsc::channel::<()>(1);
    let conn_settings = Arc::new(settings.clone());
    loop {
        // At the connection limit, stop accepting: new clients wait in the kernel's queue
        // instead of taking memory here.
        let permit = tokio::select! {
            biased;
            _ = stopped(&mut stop) => break,
            permit = Arc::clone(&connections).acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => break,
            },
        };
        let (stream, peer) = tokio::select! {
            biased;
            _ = stopped(&mut stop) => break,
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(e) => {
                    // Out of file descriptors or similar: back off instead of spinning.
                    tracing::warn!(listener = name, error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let service = service_for(peer, tls.is_some());
        let watcher = graceful.watcher();
        let builder = Arc::clone(&builder);
        let mut force_closed = force_closed.clone();
        let tls = tls.as_ref().map(|cell| cell.load_full());
        let handshake_timeout = settings.header_read_timeout;
        let fast = fast.clone();
        let alive = alive.clone();
        let conn_settings = Arc::clone(&conn_settings);
        let mut conn_stop = stop.clone();
        // Each kind of connection is its own boxed future, so an idle fast-path connection's
        // task is not as large as a TLS handshake's or hyper's connection state.
        let serving: Pin<Box<dyn Future<Output = ()> + Send>> = match (tls, fast) {
            (None, Some(proxy)) => Box::pin(async move {
                let _alive = alive;
                let served = super::h1::serve(
                    &proxy,
                    stream,
                    peer,
                    ClientTransport::Plain,
                    &conn_settings,
                    &mut conn_stop,
                )
                .await;
                if let super::h1::Served::HandOff(io) = served {
                    Box::pin(serve_io(&builder, io, service, watcher, name, peer)).await
                }
            }),
            (None, None) => {
                Box::pin(
                    async move { serve_io(&builder, stream, service, watcher, name, peer).await },
                )
            }
            (Some(config), fast) => Box::pin(async move {
                let _alive = alive;
                let accept = tokio_rustls::TlsAcceptor::from(config).accept(stream);
                match tokio::time::timeout(handshake_timeout, accept).await {
                    // HTTP/1.1 over TLS (ALPN http/1.1 or none) takes the fast path too; h2 is
                    // hyper's from the start.
                    Ok(Ok(stream)) => match fast {
                        Some(proxy) if stream.get_ref().1.alpn_protocol() != Some(b"h2") => {
                            let served = super::h1::serve(
                                &proxy,
                                stream,
                                peer,
                                ClientTransport::Tls,
                                &conn_settings,
                                &mut conn_stop,
                            )
                            .await;
                            if let super::h1::Served::HandOff(io) = served {
                                Box::pin(serve_io(&builder, io, service, watcher, name, peer)).await
                            }
                        }
                        _ => serve_io(&builder, stream, service, watcher, name, peer).await,
                    },
                    Ok(Err(e)) => {
                        tracing::debug!(listener = name, %peer, error = %e, "TLS handshake failed")
                    }
                    Err(_) => tracing::debug!(listener = name, %peer, "TLS handshake timed out"),
                }
            }),
        };
        tokio::spawn(async move {
            let _permit = permit;
            tokio::select! {
                _ = serving => {}
                _ = stopped(&mut force_closed) => {}
            }
        });
    }
    drop(listener);
    drop(alive);
    let open = graceful.count();
    if open > 0 {
        tracing::info!(listener = name, open, "draining open connections");
    }
    let both = async {
        graceful.shutdown().await;
        let _ = all_closed.recv().await;
    };
    let drained = tokio::time::timeout(settings.drain_timeout, both).await;
    let _ = force_close.send(true);
    match drained {
        Ok(()) => Drained::Clean,
        Err(_) => {
            tracing::warn!(listener = name, timeout = ?settings.drain_timeout, "drain timed out; closing the remaining connections");
            Drained::TimedOut
        }
    }
}

/// Serves HTTP on one accepted (and, with TLS, handshaken) connection until it ends or drains.
async fn serve_io<I, S, B>(
    builder: &auto::Builder<TokioExecutor>,
    io: I,
    service: S,
    watcher: hyper_util::server::graceful::Watcher,
    name: &'static str,
    peer: SocketAddr,
) where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    S: Service<Request<Incoming>, Response = Response<B>> + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    let conn = builder.serve_connection(TokioIo::new(io), service);
    if let Err(e) = watcher.watch(conn.into_owned()).await {
        tracing::debug!(listener = name, %peer, error = %e, "connection ended with an error");
    }
}
