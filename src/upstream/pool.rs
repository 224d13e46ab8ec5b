//! A backend's idle HTTP/1 connections, kept for the next request to it.

use std::io;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use tokio::net::TcpStream;

/// A connection put back with a read buffer grown past this gets a fresh one, so one large
/// response does not pin its buffer for the connection's life.
const KEPT_BUFFER: usize = 32 * 1024;

/// A kept-alive connection to one backend, with what it has read but not yet passed on.
#[derive(Debug)]
pub struct Connection {
    pub(crate) stream: TcpStream,
    pub(crate) buf: BytesMut,
    pub(crate) idle_since: Instant,
}

/// A backend's idle connections: a lock-free queue, so checkouts never wait on each other.
pub struct Pool {
    idle: crossbeam_queue::ArrayQueue<Connection>,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("idle", &self.idle.len())
            .finish()
    }
}

impl Pool {
    /// A pool holding at most `capacity` idle connections (`proxy.pool_max_idle_per_backend`);
    /// its slots are allocated up front, so it is sized by that setting, not by a constant.
    pub fn new(capacity: usize) -> Pool {
        Pool {
            idle: crossbeam_queue::ArrayQueue::new(capacity.max(1)),
        }
    }

    /// The longest-idle connection that is still usable (the queue is first in, first out);
    /// older than `max_idle` ones, and ones the backend closed (or wrote to) while they sat idle,
    /// are dropped on the way.
    pub(crate) fn checkout(&self, max_idle: Duration) -> Option<Connection> {
        while let Some(conn) = self.idle.pop() {
            if conn.idle_since.elapsed() < max_idle && still_open(&conn.stream) {
                return Some(conn);
            }
        }
        None
    }

    /// Closes the idle connections older than `max_idle` or closed by the backend, keeping the
    /// rest in order; returns how many it closed. Checkouts do the same on their way, but a
    /// backend that gets no traffic (a rolled-back candidate) has none: without this its
    /// connections would sit open, or half-closed by the backend, for as long as weir runs.
    pub fn reap(&self, max_idle: Duration) -> usize {
        let mut closed = 0;
        for _ in 0..self.idle.len() {
            let Some(conn) = self.idle.pop() else {
                break;
            };
            if conn.idle_since.elapsed() < max_idle && still_open(&conn.stream) {
                // Full only if checkins raced in meanwhile: then this one goes.
                closed += usize::from(self.idle.push(conn).is_err());
            } else {
                closed += 1;
            }
        }
        closed
    }

    pub(crate) fn put(&self, mut conn: Connection, max: usize) {
        if self.idle.len() < max {
            conn.idle_since = Instant::now();
            if conn.buf.capacity() > KEPT_BUFFER {
                conn.buf = BytesMut::new();
            }
            let _ = self.idle.push(conn);
        }
    }
}

/// Whether an idle connection is still open, without a syscall in the usual case: the reactor has
/// marked the socket readable if a FIN (or anything) arrived while it sat idle; only then is it
/// read to tell a close from a stale readiness.
fn still_open(stream: &TcpStream) -> bool {
    let mut cx = Context::from_waker(std::task::Waker::noop());
    match stream.poll_read_ready(&mut cx) {
        Poll::Pending => true,
        Poll::Ready(Err(_)) => false,
        Poll::Ready(Ok(())) => {
            let mut probe = [0u8; 1];
            matches!(stream.try_read(&mut probe), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
        }
    }
}
