//! Wiring: binds the listeners, builds the first routing table and runs until shut down.
//!
//! Shutdown is graceful: stop accepting, let in-flight requests and open streams finish within
//! the drain timeout, then return.

use std::net::SocketAddr;

use crate::config::Config;

/// Why weir could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot listen on {addr} ({what}): {source}")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot build the routing table: {0}")]
    Table(String),
}

/// Entry point of the proxy.
#[derive(Debug)]
pub struct Server;

/// A started proxy: its bound addresses and the handle to stop it.
#[derive(Debug)]
pub struct Running {
    proxy_addr: SocketAddr,
    admin_addr: SocketAddr,
}

impl Server {
    /// Binds the proxy and admin listeners and starts serving. Port 0 picks a free port; the
    /// bound addresses are on the returned [`Running`].
    pub async fn start(config: Config) -> Result<Running, StartError> {
        let _ = config;
        todo!()
    }
}

/// How a drain ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Drained {
    /// Every in-flight request and stream finished.
    Clean,
    /// The drain timeout passed with connections still open; they were closed.
    TimedOut,
}

impl Running {
    pub fn proxy_addr(&self) -> SocketAddr {
        self.proxy_addr
    }

    pub fn admin_addr(&self) -> SocketAddr {
        self.admin_addr
    }

    /// Starts a graceful shutdown: stop accepting, drain open requests and streams.
    pub fn shutdown(&self) {
        todo!()
    }

    /// Waits until the server has stopped (after [`Running::shutdown`] or a signal handler).
    pub async fn wait(self) -> Drained {
        todo!()
    }
}
