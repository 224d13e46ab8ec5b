//! A real single-member etcd on loopback for the fleet tests: free client and peer ports, its own
//! data directory, its output in an `etcd.log` beside the data, whose tail is printed when a
//! test fails while etcd is up.
//!
//! It can be stopped and restarted on the same ports and data, so a test can take etcd away
//! from running replicas and give it back. It is killed when dropped.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::{empty, http1, request, temp_dir, TempDir, DEADLINE};

const ETCD: &str = "etcd";

/// How many times [`Etcd::start`] tries fresh ports when etcd exits at once (a port taken
/// between choosing it and etcd binding it).
const PORT_ATTEMPTS: usize = 3;

pub struct Etcd {
    child: Option<Child>,
    /// Holds `data/` (etcd's data dir) and `etcd.log`.
    dir: TempDir,
    client_port: u16,
    peer_port: u16,
    /// TLS mode: etcd's certificate, key and the CA whose client certificates it requires;
    /// health is then read from a plain-HTTP metrics listener on `metrics_port`.
    tls: Option<EtcdTlsFiles>,
    metrics_port: u16,
}

/// The PEM files etcd serves TLS with and checks client certificates against.
#[derive(Clone)]
pub struct EtcdTlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: PathBuf,
}

impl Etcd {
    /// Starts etcd on free loopback ports and waits until `/health` says `"health":"true"`.
    pub async fn start() -> Etcd {
        Etcd::start_with(None).await
    }

    /// Starts etcd serving clients over TLS only, requiring client certificates signed by
    /// `files.ca` (`--client-cert-auth`).
    pub async fn start_tls(files: EtcdTlsFiles) -> Etcd {
        Etcd::start_with(Some(files)).await
    }

    async fn start_with(tls: Option<EtcdTlsFiles>) -> Etcd {
        assert_etcd_installed();
        let dir = temp_dir("etcd");
        let mut etcd = Etcd {
            child: None,
            dir,
            client_port: 0,
            peer_port: 0,
            tls,
            metrics_port: 0,
        };
        for attempt in 1..=PORT_ATTEMPTS {
            etcd.client_port = free_port();
            etcd.peer_port = free_port();
            etcd.metrics_port = free_port();
            etcd.spawn();
            match etcd.wait_healthy().await {
                Ok(()) => return etcd,
                Err(why) if attempt < PORT_ATTEMPTS => {
                    eprintln!("etcd attempt {attempt} failed ({why}); trying other ports");
                    etcd.stop();
                    let _ = std::fs::remove_dir_all(etcd.data_dir());
                }
                Err(why) => panic!("etcd did not become healthy: {why}\n{}", etcd.log_tail()),
            }
        }
        unreachable!("the last attempt panics or returns")
    }

    /// The client URL, as the replicas' `[state] etcd` list takes it.
    pub fn url(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://127.0.0.1:{}", self.client_port)
    }

    /// Kills etcd (SIGKILL) and waits for it to exit; its data stays for [`Etcd::restart`].
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts etcd again on the same ports and data dir and waits until it is healthy.
    pub async fn restart(&mut self) {
        self.stop();
        self.spawn();
        if let Err(why) = self.wait_healthy().await {
            panic!(
                "etcd did not come back healthy on the same ports: {why}\n{}",
                self.log_tail()
            );
        }
    }

    /// The last lines etcd printed, for failure messages.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(self.log_path()).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let from = lines.len().saturating_sub(40);
        format!(
            "--- last lines of {} ---\n{}",
            self.log_path().display(),
            lines[from..].join("\n")
        )
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("etcd.log")
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .expect("etcd log file opens");
        let client = self.url();
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let mut extra: Vec<String> = Vec::new();
        if let Some(tls) = &self.tls {
            extra.extend([
                "--cert-file".to_string(),
                tls.cert.display().to_string(),
                "--key-file".to_string(),
                tls.key.display().to_string(),
                "--trusted-ca-file".to_string(),
                tls.ca.display().to_string(),
                "--client-cert-auth".to_string(),
                "--listen-metrics-urls".to_string(),
                format!("http://127.0.0.1:{}", self.metrics_port),
            ]);
        }
        let child = Command::new(ETCD)
            .args(extra)
            .args([
                "--name",
                "weir-test",
                "--data-dir",
                &self.data_dir().display().to_string(),
                "--listen-client-urls",
                &client,
                "--advertise-client-urls",
                &client,
                "--listen-peer-urls",
                &peer,
                "--initial-advertise-peer-urls",
                &peer,
                "--initial-cluster",
                &format!("weir-test={peer}"),
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::from(log.try_clone().expect("etcd log file dup")))
            .stderr(Stdio::from(log))
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {ETCD}: {e}"));
        self.child = Some(child);
    }

    /// Polls `/health` until etcd says it is healthy; Err if it exits or the deadline passes.
    async fn wait_healthy(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + DEADLINE;
        let health = match self.tls {
            Some(_) => format!("http://127.0.0.1:{}/health", self.metrics_port),
            None => format!("{}/health", self.url()),
        };
        let mut last = String::from("no answer yet");
        loop {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    self.child = None;
                    return Err(format!("etcd exited with {status}"));
                }
            }
            if let Some(answer) = health_of(&health).await {
                if answer.contains(r#""health":"true""#) {
                    return Ok(());
                }
                last = answer;
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "{health} not healthy within {DEADLINE:?}; last answer: {last}"
                ));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.stop();
        if std::thread::panicking() {
            eprintln!("{}", self.log_tail());
        }
    }
}

/// The body of `GET url`, or None while nothing answers: a refused or reset connection is
/// expected while etcd starts, and would fail the test through `get`.
async fn health_of(url: &str) -> Option<String> {
    use http_body_util::BodyExt;
    let req = request(http::Method::GET, url).body(empty()).ok()?;
    let answer = tokio::time::timeout(Duration::from_secs(2), async {
        let response = http1().request(req).await.ok()?;
        let body = response.into_body().collect().await.ok()?.to_bytes();
        Some(String::from_utf8_lossy(&body).replace(' ', ""))
    });
    answer.await.ok().flatten()
}

fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    listener.local_addr().unwrap().port()
}

/// Fails the test (never skips it) when the etcd binary is not on the PATH.
fn assert_etcd_installed() {
    let found = std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).any(|dir| dir.join(ETCD).is_file()))
        .unwrap_or(false);
    assert!(
        found,
        "the fleet tests need a real etcd: no `{ETCD}` binary on the PATH. `.ci/run` installs it \
         (Debian package etcd-server, which provides /usr/bin/etcd); install it the same way."
    );
}
