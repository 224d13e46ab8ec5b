//! A real headless chromium for the dashboard's tests: `--dump-dom` for what a page shows once
//! its scripts ran, and the Chrome DevTools Protocol over a WebSocket for typing, clicking and
//! watching the console and the network.
//!
//! The binary is `$WEIR_CHROMIUM`, else `chromium`. Without it the tests skip with a message,
//! unless `CI` or `WEIR_REQUIRE_CHROMIUM` is set (`.ci/run` sets it): then they fail.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use super::{temp_dir, TempDir};

/// Longest a browser start, a page load or one protocol call may take.
const BROWSER_DEADLINE: Duration = Duration::from_secs(30);

/// The chromium to run, or `None` (after saying why) when the test should skip.
pub fn chromium() -> Option<PathBuf> {
    let bin = std::env::var("WEIR_CHROMIUM").unwrap_or_else(|_| "chromium".to_string());
    let runs = std::process::Command::new(&bin)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if runs {
        return Some(PathBuf::from(bin));
    }
    let required =
        std::env::var_os("CI").is_some() || std::env::var_os("WEIR_REQUIRE_CHROMIUM").is_some();
    assert!(
        !required,
        "the dashboard's browser tests need chromium ({bin} does not run): `apt-get install chromium`, \
         or point WEIR_CHROMIUM at one"
    );
    eprintln!(
        "SKIPPED: no chromium ({bin} does not run); install it or set WEIR_CHROMIUM. \
         With CI or WEIR_REQUIRE_CHROMIUM set this test fails instead."
    );
    None
}

/// The flags every run shares: headless, no sandbox (tests run as root), nothing fetched on the
/// browser's own account, a fresh profile.
fn base_args(profile: &TempDir) -> Vec<String> {
    [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--no-first-run",
        "--no-default-browser-check",
        "--disable-extensions",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--window-size=1280,1800",
    ]
    .iter()
    .map(|s| s.to_string())
    .chain([format!("--user-data-dir={}", profile.path().display())])
    .collect()
}

/// The DOM of `url` after its scripts ran for `budget` of virtual time.
pub async fn dump_dom(bin: &PathBuf, url: &str, budget: Duration) -> String {
    let profile = temp_dir("chromium");
    let output = Command::new(bin)
        .args(base_args(&profile))
        .arg(format!("--virtual-time-budget={}", budget.as_millis()))
        .arg("--dump-dom")
        .arg(url)
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(BROWSER_DEADLINE, output)
        .await
        .expect("chromium --dump-dom finishes")
        .expect("chromium runs");
    assert!(
        output.status.success(),
        "chromium --dump-dom {url}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Writes a PNG of `url` after `budget` of virtual time.
pub async fn screenshot(bin: &PathBuf, url: &str, budget: Duration, out: &std::path::Path) {
    let profile = temp_dir("chromium");
    let status = Command::new(bin)
        .args(base_args(&profile))
        .arg(format!("--virtual-time-budget={}", budget.as_millis()))
        // The last --window-size wins: one screen of the page, not the tests' tall window.
        .arg("--window-size=1280,1250")
        .arg("--hide-scrollbars")
        .arg(format!("--screenshot={}", out.display()))
        .arg(url)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .status();
    let status = tokio::time::timeout(BROWSER_DEADLINE, status)
        .await
        .expect("chromium --screenshot finishes")
        .expect("chromium runs");
    assert!(status.success(), "chromium --screenshot {url}: {status}");
}

type Socket = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// One headless chromium with one page, driven over the DevTools protocol. Every event the page
/// sends (console, exceptions, network requests) is kept in `events`.
pub struct Browser {
    _child: Child,
    _profile: TempDir,
    socket: Socket,
    session: String,
    next_id: u64,
    pub events: Vec<Value>,
}

impl Browser {
    pub async fn launch(bin: &PathBuf) -> Browser {
        let profile = temp_dir("chromium");
        let mut child = Command::new(bin)
            .args(base_args(&profile))
            .arg("--remote-debugging-port=0")
            .arg("about:blank")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("chromium starts");
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let find_url = async {
            while let Some(line) = lines.next_line().await.expect("chromium's stderr") {
                if let Some(at) = line.find("ws://") {
                    return line[at..].trim().to_string();
                }
            }
            panic!("chromium exited without a DevTools URL");
        };
        let url = tokio::time::timeout(BROWSER_DEADLINE, find_url)
            .await
            .expect("chromium prints `DevTools listening on ws://...`");
        // Keep reading its stderr, or a full pipe would stall the browser.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        let (socket, _) = tokio_tungstenite::connect_async(url.as_str())
            .await
            .expect("the DevTools WebSocket opens");
        let mut browser = Browser {
            _child: child,
            _profile: profile,
            socket,
            session: String::new(),
            next_id: 0,
            events: Vec::new(),
        };
        let target = browser
            .send(None, "Target.createTarget", json!({"url": "about:blank"}))
            .await;
        let attached = browser
            .send(
                None,
                "Target.attachToTarget",
                json!({"targetId": target["targetId"], "flatten": true}),
            )
            .await;
        browser.session = attached["sessionId"].as_str().unwrap().to_string();
        for domain in ["Runtime", "Network", "Log", "Page"] {
            browser.call(&format!("{domain}.enable"), json!({})).await;
        }
        browser
    }

    /// One protocol call on the page; panics on an error answer.
    pub async fn call(&mut self, method: &str, params: Value) -> Value {
        let session = self.session.clone();
        self.send(Some(&session), method, params).await
    }

    async fn send(&mut self, session: Option<&str>, method: &str, params: Value) -> Value {
        self.next_id += 1;
        let id = self.next_id;
        let mut message = json!({"id": id, "method": method, "params": params});
        if let Some(session) = session {
            message["sessionId"] = json!(session);
        }
        self.socket
            .send(Message::text(message.to_string()))
            .await
            .expect("a DevTools message is sent");
        let answer = async {
            loop {
                let frame = self
                    .socket
                    .next()
                    .await
                    .expect("the DevTools socket stays open");
                let Ok(Message::Text(text)) = frame else {
                    continue;
                };
                let value: Value = serde_json::from_str(&text).expect("DevTools sends JSON");
                if value["id"] == id {
                    return value;
                }
                if value.get("method").is_some() {
                    self.events.push(value);
                }
            }
        };
        let value = tokio::time::timeout(BROWSER_DEADLINE, answer)
            .await
            .unwrap_or_else(|_| panic!("no answer to {method} within {BROWSER_DEADLINE:?}"));
        assert!(
            value.get("error").is_none(),
            "{method} failed: {}",
            value["error"]
        );
        value["result"].clone()
    }

    pub async fn goto(&mut self, url: &str) {
        self.call("Page.navigate", json!({"url": url})).await;
        self.wait_for("document.readyState === 'complete'", "the page loads")
            .await;
    }

    /// The value of a JavaScript expression in the page (promises awaited); panics if it throws.
    pub async fn eval(&mut self, expression: &str) -> Value {
        let result = self
            .call(
                "Runtime.evaluate",
                json!({"expression": expression, "returnByValue": true, "awaitPromise": true}),
            )
            .await;
        assert!(
            result.get("exceptionDetails").is_none(),
            "`{expression}` threw: {}",
            result["exceptionDetails"]
        );
        result["result"]["value"].clone()
    }

    /// Polls `expression` until it is truthy (and returns its value), or panics naming `what`.
    pub async fn wait_for(&mut self, expression: &str, what: &str) -> Value {
        let deadline = std::time::Instant::now() + BROWSER_DEADLINE;
        loop {
            let value = self.eval(expression).await;
            let truthy = match &value {
                Value::Null => false,
                Value::Bool(b) => *b,
                Value::String(s) => !s.is_empty(),
                Value::Number(n) => n.as_f64() != Some(0.0),
                _ => true,
            };
            if truthy {
                return value;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{what}: `{expression}` still {value} after {BROWSER_DEADLINE:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Presses Enter on whatever has the keyboard focus, as a keyboard does.
    pub async fn press_enter(&mut self) {
        for kind in ["keyDown", "keyUp"] {
            let mut event = json!({"type": kind, "key": "Enter", "code": "Enter",
                "windowsVirtualKeyCode": 13, "nativeVirtualKeyCode": 13});
            if kind == "keyDown" {
                event["text"] = json!("\r");
            }
            self.call("Input.dispatchKeyEvent", event).await;
        }
    }

    /// Uncaught exceptions, `console.error` calls and error log entries so far, as text.
    pub fn errors(&self) -> Vec<String> {
        self.events
            .iter()
            .filter_map(|e| match e["method"].as_str()? {
                "Runtime.exceptionThrown" => Some(e["params"]["exceptionDetails"].to_string()),
                "Runtime.consoleAPICalled" if e["params"]["type"] == "error" => {
                    Some(e["params"]["args"].to_string())
                }
                "Log.entryAdded" if e["params"]["entry"]["level"] == "error" => {
                    Some(e["params"]["entry"].to_string())
                }
                _ => None,
            })
            .collect()
    }

    /// Every URL the page asked for so far.
    pub fn requested(&self) -> Vec<String> {
        self.events
            .iter()
            .filter(|e| e["method"] == "Network.requestWillBeSent")
            .filter_map(|e| e["params"]["request"]["url"].as_str().map(str::to_string))
            .collect()
    }
}
