//! The audit log: one JSON line per routing change, chained by SHA-256.
//!
//! Each record carries the hash of the record before it (`prev`) and its own `hash`, the SHA-256
//! of its canonical bytes: the exact line with the trailing `,"hash":"…"` removed. Editing,
//! deleting, inserting or reordering a line breaks the chain; the state file remembers the head,
//! so cutting off the tail is caught too.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};

pub const AUDIT_FILE: &str = "audit.jsonl";

/// The head of the audit chain as the state file remembers it. The audit log owns its hashing
/// and its head; the state file only stores the head.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditHead {
    pub seq: u64,
    pub hash: String,
    /// The whole record line, so a crash between writing the state and appending the record can
    /// be repaired exactly on restart.
    pub line: String,
}

/// Lowercase hex SHA-256 of `bytes`: the audit chain's hashes and the state file's checksum.
pub fn sha256_hex(bytes: &[u8]) -> String {
    let digest = Sha256::digest(bytes);
    let mut out = String::with_capacity(64);
    for b in digest {
        out.push_str(&format!("{b:02x}"));
    }
    out
}

/// `prev` of the first record.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// One change, as it is written.
#[derive(Debug, Serialize, Deserialize)]
pub struct Record {
    pub seq: u64,
    pub time: String,
    /// Who made the change: `admin:<token fingerprint>`, `config`, `canary`, `weir`.
    pub actor: String,
    pub action: String,
    pub route: Option<String>,
    pub before: Value,
    pub after: Value,
    /// The generation this change starts.
    pub generation: u64,
    pub reason: Option<String>,
    /// The serving window this change closes: the generation before it, who served how much.
    pub window: Option<Value>,
    /// The replica that wrote the record (fleet mode only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replica: Option<String>,
    pub prev: String,
}

/// A record ready to append: its line and hash are final.
#[derive(Clone, Debug)]
pub struct Prepared {
    pub seq: u64,
    pub hash: String,
    pub line: String,
}

impl Prepared {
    pub fn head(&self) -> AuditHead {
        AuditHead {
            seq: self.seq,
            hash: self.hash.clone(),
            line: self.line.clone(),
        }
    }
}

/// The append-only audit file.
#[derive(Debug)]
pub struct AuditLog {
    path: PathBuf,
    file: File,
    next_seq: u64,
    head: String,
    replica: Option<String>,
    /// The log's last record names a replica: it is a fleet replica's copy of etcd's chain.
    fleet_copy: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("cannot open the audit log {path}: {source}")]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot append to the audit log {path}: {source}")]
    Append {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "the audit log {path} does not end where the state file says it should ({detail}); it was cut off \
         or edited. Run `weir audit verify {path}` to find the first bad record"
    )]
    HeadMismatch { path: PathBuf, detail: String },
}

/// The seq and hash of the last line of a log, checking only that line.
/// The last record's seq and hash, and whether a fleet replica wrote it.
fn last_record(path: &Path) -> Result<Option<(u64, String, bool)>, String> {
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e.to_string()),
    };
    let mut last = None;
    for line in BufReader::new(file).lines() {
        let line = line.map_err(|e| e.to_string())?;
        if !line.is_empty() {
            last = Some(line);
        }
    }
    match last {
        None => Ok(None),
        Some(line) => {
            let (seq, hash) = check_line(&line)?;
            let fleet = serde_json::from_str::<Value>(&line)
                .is_ok_and(|record| record.get("replica").is_some_and(|r| !r.is_null()));
            Ok(Some((seq, hash, fleet)))
        }
    }
}

/// Checks one line's own hash; returns its seq and hash.
fn check_line(line: &str) -> Result<(u64, String), String> {
    let record: Value = serde_json::from_str(line).map_err(|e| format!("not JSON: {e}"))?;
    let hash = record["hash"].as_str().ok_or("no hash field")?.to_string();
    let suffix = format!(",\"hash\":\"{hash}\"}}");
    let canonical = line
        .strip_suffix(&suffix)
        .ok_or("the hash is not the last field")?;
    let actual = sha256_hex(format!("{canonical}}}").as_bytes());
    if actual != hash {
        return Err(format!(
            "its content hashes to {actual}, not to its recorded {hash}: it was edited"
        ));
    }
    let seq = record["seq"].as_u64().ok_or("no seq field")?;
    Ok((seq, hash))
}

impl AuditLog {
    /// Opens the log in `dir`, making sure it ends at `expected` (the head the state file
    /// remembers). A log exactly one record short of it — a crash between writing the state and
    /// appending — is repaired from the record the state file keeps.
    pub fn open(dir: &Path, expected: Option<&AuditHead>) -> Result<AuditLog, AuditError> {
        let path = dir.join(AUDIT_FILE);
        let open_error = |source| AuditError::Open {
            path: path.clone(),
            source,
        };
        std::fs::create_dir_all(dir).map_err(open_error)?;
        let mismatch = |detail: String| AuditError::HeadMismatch {
            path: path.clone(),
            detail,
        };
        let last =
            last_record(&path).map_err(|e| mismatch(format!("its last record is bad: {e}")))?;
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(open_error)?;
        let (mut next_seq, mut head, fleet_copy) = match &last {
            Some((seq, hash, fleet)) => (seq + 1, hash.clone(), *fleet),
            None => (1, GENESIS.to_string(), false),
        };
        let mut log = AuditLog {
            path: path.clone(),
            file,
            next_seq,
            head: head.clone(),
            replica: None,
            fleet_copy,
        };
        if let Some(expected) = expected {
            if head != expected.hash {
                let (pending_seq, pending_prev) = serde_json::from_str::<Value>(&expected.line)
                    .ok()
                    .and_then(|v| Some((v["seq"].as_u64()?, v["prev"].as_str()?.to_string())))
                    .unwrap_or((0, String::new()));
                let repairable = pending_seq == next_seq
                    && pending_prev == head
                    && check_line(&expected.line).is_ok_and(|(_, h)| h == expected.hash);
                if !repairable {
                    return Err(mismatch(format!(
                        "the state's head is record {} ({}), the log ends at record {} ({})",
                        expected.seq,
                        expected.hash,
                        next_seq - 1,
                        head
                    )));
                }
                tracing::warn!(seq = pending_seq, "the audit log missed its last record (a crash between state and log); appending it from the state file");
                log.append(&Prepared {
                    seq: pending_seq,
                    hash: expected.hash.clone(),
                    line: expected.line.clone(),
                })?;
                next_seq = log.next_seq;
                head = log.head.clone();
            }
        }
        log.next_seq = next_seq;
        log.head = head;
        Ok(log)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The hash of the last record (the genesis hash when empty).
    pub fn head(&self) -> &str {
        &self.head
    }

    /// Re-reads the tail, in case another process (a `weir registry` command holding the state
    /// lock) appended since this log last wrote.
    pub fn refresh(&mut self) -> Result<(), AuditError> {
        let last = last_record(&self.path).map_err(|detail| AuditError::HeadMismatch {
            path: self.path.clone(),
            detail: format!("its last record is bad: {detail}"),
        })?;
        (self.next_seq, self.head) = match last {
            Some((seq, hash, _)) => (seq + 1, hash),
            None => (1, GENESIS.to_string()),
        };
        Ok(())
    }

    /// Whether this is a fleet replica's copy of the chain in etcd (its last record names a
    /// replica): nothing but that replica may append to it.
    pub fn is_fleet_copy(&self) -> bool {
        self.fleet_copy
    }

    /// The seq the next record gets.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// Appends a record another replica wrote (fleet mode), after checking that it is intact and
    /// continues this log's chain.
    pub fn append_foreign(&mut self, line: &str) -> Result<(), AuditError> {
        let mismatch = |detail: String| AuditError::HeadMismatch {
            path: self.path.clone(),
            detail,
        };
        let (seq, hash) =
            check_line(line).map_err(|e| mismatch(format!("a fleet record is bad: {e}")))?;
        let prev = serde_json::from_str::<Value>(line)
            .ok()
            .and_then(|v| v["prev"].as_str().map(str::to_string))
            .unwrap_or_default();
        if seq != self.next_seq || prev != self.head {
            return Err(mismatch(format!(
                "the fleet's record {seq} (prev {prev}) does not follow this log's record {} ({})",
                self.next_seq - 1,
                self.head
            )));
        }
        self.append(&Prepared {
            seq,
            hash,
            line: line.to_string(),
        })
    }

    /// Builds the next record's line without writing it.
    pub fn prepare(&self, entry: Entry<'_>) -> Prepared {
        let mut record = entry.into_record();
        record.replica = self.replica.clone();
        record.seq = self.next_seq;
        record.prev = self.head.clone();
        let canonical = serde_json::to_string(&record).expect("records serialize");
        let hash = sha256_hex(canonical.as_bytes());
        let line = format!(
            "{},\"hash\":\"{hash}\"}}",
            &canonical[..canonical.len() - 1]
        );
        Prepared {
            seq: record.seq,
            hash,
            line,
        }
    }

    /// Appends a prepared record and fsyncs it.
    pub fn append(&mut self, prepared: &Prepared) -> Result<(), AuditError> {
        let append_error = |source| AuditError::Append {
            path: self.path.clone(),
            source,
        };
        let mut line = Vec::with_capacity(prepared.line.len() + 1);
        line.extend_from_slice(prepared.line.as_bytes());
        line.push(b'\n');
        self.file.write_all(&line).map_err(append_error)?;
        self.file.sync_data().map_err(append_error)?;
        self.next_seq = prepared.seq + 1;
        self.head = prepared.hash.clone();
        Ok(())
    }
}

/// A change to record; [`AuditLog::prepare`] adds time, `seq` and `prev`.
#[derive(Debug)]
pub struct Entry<'a> {
    pub actor: &'a str,
    pub action: &'a str,
    pub route: Option<&'a str>,
    pub before: Value,
    pub after: Value,
    pub generation: u64,
    pub reason: Option<&'a str>,
    pub window: Option<Value>,
}

impl AuditLog {
    /// Names the replica in every record this log prepares from now on (fleet mode).
    pub fn set_replica(&mut self, replica: &str) {
        self.replica = Some(replica.to_string());
    }
}

impl Entry<'_> {
    fn into_record(self) -> Record {
        Record {
            seq: 0,
            time: humantime::format_rfc3339_millis(SystemTime::now()).to_string(),
            actor: self.actor.to_string(),
            action: self.action.to_string(),
            route: self.route.map(str::to_string),
            before: self.before,
            after: self.after,
            generation: self.generation,
            reason: self.reason.map(str::to_string),
            window: self.window,
            replica: None,
            prev: String::new(),
        }
    }
}

/// What `weir audit verify` found wrong first.
#[derive(Debug, thiserror::Error)]
#[error("{path}: line {line}: {message}")]
pub struct VerifyError {
    pub path: PathBuf,
    pub line: usize,
    pub message: String,
}

/// Checks the whole chain of a log: each record's own hash, its link to the one before, and
/// consecutive sequence numbers; then, when given, that the log ends at the state's head.
/// Returns the number of records.
pub fn verify(path: &Path, state_head: Option<&AuditHead>) -> Result<u64, VerifyError> {
    verify_first(path, u64::MAX, state_head)
}

/// [`verify`] on the first `len` bytes of the log: the records that were there when the state
/// head was read, while others are appended.
pub fn verify_first(
    path: &Path,
    len: u64,
    state_head: Option<&AuditHead>,
) -> Result<u64, VerifyError> {
    use std::io::Read;
    let fail = |line: usize, message: String| VerifyError {
        path: path.to_path_buf(),
        line,
        message,
    };
    let file = File::open(path).map_err(|e| fail(0, format!("cannot open: {e}")))?;
    let mut prev = GENESIS.to_string();
    let mut count = 0;
    let lines = BufReader::new(file.take(len)).lines().enumerate();
    for (expected_seq, (i, line)) in (1u64..).zip(lines) {
        let n = i + 1;
        let line = line.map_err(|e| fail(n, format!("cannot read: {e}")))?;
        let (seq, hash) = check_line(&line).map_err(|e| fail(n, format!("record is bad: {e}")))?;
        let record: Value = serde_json::from_str(&line).map_err(|e| fail(n, e.to_string()))?;
        if seq != expected_seq {
            return Err(fail(
                n,
                format!("record {seq} where record {expected_seq} belongs: a record was deleted, inserted or moved"),
            ));
        }
        if record["prev"].as_str() != Some(prev.as_str()) {
            return Err(fail(
                n,
                format!(
                    "record {seq} does not link to the record before it: the chain was rewritten"
                ),
            ));
        }
        prev = hash;
        count += 1;
    }
    if let Some(head) = state_head {
        if head.hash != prev {
            return Err(fail(
                count as usize,
                format!(
                    "the log ends at record {count} but the state file's head is record {}: records were cut off the end",
                    head.seq
                ),
            ));
        }
    }
    Ok(count)
}

/// What the dashboard shows of a log: the chain checked as [`verify`] checks it, and the last
/// records.
#[derive(Debug, Serialize)]
pub struct Report {
    pub file: String,
    /// Records in the log, when the chain is intact.
    pub records: Option<u64>,
    pub intact: bool,
    /// Whether the tail was checked against the head the state file records (a fleet replica's
    /// copy has none: the chain's head is in etcd).
    pub head_checked: bool,
    /// The first thing found wrong, as `weir audit verify` says it.
    pub problem: Option<String>,
    /// How long ago the whole chain was checked, in seconds (see [`ChainWatch`]).
    pub checked_seconds_ago: f64,
    /// The last records, oldest first.
    pub recent: Vec<Value>,
}

/// How long a whole-chain check of an unchanged log is reused before the chain is read again.
pub const RECHECK: std::time::Duration = std::time::Duration::from_secs(30);

/// A whole-chain check, and how much of the log it covered.
#[derive(Clone, Debug)]
struct Checked {
    len: u64,
    at: tokio::time::Instant,
    verdict: Result<u64, String>,
}

/// Checks the chain for the dashboard without reading a long log on every look: a check of the
/// same length of log is reused for [`RECHECK`]; a log that grew, or an older check, is read again
/// from its first record. Reads the file only, never under the writer's lock.
#[derive(Debug, Default)]
pub struct ChainWatch {
    last: std::sync::Mutex<Option<Checked>>,
}

impl ChainWatch {
    /// The first `len` bytes of the log at `path` checked against `head`, with their last
    /// `limit` records. Blocking: file reads and hashing.
    pub fn report(
        &self,
        path: &Path,
        len: u64,
        head: Option<&AuditHead>,
        limit: usize,
        now: tokio::time::Instant,
    ) -> Report {
        let reusable = self
            .last
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .filter(|c| c.len == len && now.duration_since(c.at) < RECHECK);
        let checked = reusable.unwrap_or_else(|| {
            let checked = Checked {
                len,
                at: now,
                verdict: verify_first(path, len, head).map_err(|e| e.to_string()),
            };
            *self.last.lock().unwrap_or_else(|p| p.into_inner()) = Some(checked.clone());
            checked
        });
        Report {
            file: path.display().to_string(),
            records: checked.verdict.as_ref().ok().copied(),
            intact: checked.verdict.is_ok(),
            head_checked: head.is_some(),
            problem: checked.verdict.as_ref().err().cloned(),
            checked_seconds_ago: now.duration_since(checked.at).as_secs_f64(),
            recent: recent(path, len, limit),
        }
    }
}

/// The last `limit` records among the first `len` bytes of the log at `path`, oldest first.
/// Reads from the end only as far back as it needs.
pub fn recent(path: &Path, len: u64, limit: usize) -> Vec<Value> {
    use std::io::{Read, Seek, SeekFrom};
    let Ok(mut file) = File::open(path) else {
        return Vec::new();
    };
    let mut window = 64 * 1024u64;
    loop {
        let start = len.saturating_sub(window);
        let mut bytes = Vec::new();
        let read = file
            .seek(SeekFrom::Start(start))
            .and_then(|_| (&mut file).take(len - start).read_to_end(&mut bytes));
        if read.is_err() {
            return Vec::new();
        }
        let text = String::from_utf8_lossy(&bytes);
        let mut lines: Vec<&str> = text.split('\n').filter(|l| !l.is_empty()).collect();
        if start > 0 && !lines.is_empty() {
            // Cut in the middle of a record (or just after one: it is read on a wider pass).
            lines.remove(0);
        }
        if lines.len() >= limit || start == 0 {
            let from = lines.len().saturating_sub(limit);
            return lines[from..]
                .iter()
                .filter_map(|l| serde_json::from_str(l).ok())
                .collect();
        }
        window *= 4;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn dir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("weir-audit-unit-{}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    fn write_three(d: &Path) -> Vec<Prepared> {
        let mut log = AuditLog::open(d, None).unwrap();
        (1..=3)
            .map(|i| {
                let p = log.prepare(Entry {
                    actor: "test",
                    action: "set_weight",
                    route: Some("r"),
                    before: json!(i - 1),
                    after: json!(i),
                    generation: i,
                    reason: None,
                    window: None,
                });
                log.append(&p).unwrap();
                p
            })
            .collect()
    }

    #[test]
    fn an_untouched_chain_verifies_and_edits_are_caught() {
        let d = dir("chain");
        let records = write_three(&d);
        let path = d.join(AUDIT_FILE);
        assert_eq!(verify(&path, Some(&records[2].head())).unwrap(), 3);

        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        let edited = text.replacen("\"after\":2", "\"after\":9", 1);
        std::fs::write(&path, edited).unwrap();
        let err = verify(&path, None).unwrap_err();
        assert_eq!(err.line, 2, "{err}");

        std::fs::write(&path, format!("{}\n{}\n", lines[0], lines[2])).unwrap();
        assert_eq!(verify(&path, None).unwrap_err().line, 2);

        std::fs::write(&path, format!("{}\n{}\n{}\n", lines[1], lines[0], lines[2])).unwrap();
        assert_eq!(verify(&path, None).unwrap_err().line, 1);

        std::fs::write(&path, format!("{}\n{}\n", lines[0], lines[1])).unwrap();
        assert!(
            verify(&path, None).is_ok(),
            "a cut tail alone looks fine..."
        );
        let err = verify(&path, Some(&records[2].head())).unwrap_err();
        assert!(
            err.message.contains("cut off"),
            "...but not next to the state's head: {err}"
        );
        let _ = std::fs::remove_dir_all(&d);
    }

    fn len(path: &Path) -> u64 {
        std::fs::metadata(path).unwrap().len()
    }

    #[tokio::test(start_paused = true)]
    async fn a_report_keeps_the_last_records_and_names_a_broken_chain_within_a_recheck() {
        let d = dir("report");
        let records = write_three(&d);
        let path = d.join(AUDIT_FILE);
        let watch = ChainWatch::default();
        let now = tokio::time::Instant::now;
        let head = Some(records[2].head());
        let report = watch.report(&path, len(&path), head.as_ref(), 2, now());
        assert!(report.intact && report.head_checked, "{report:?}");
        assert_eq!(report.records, Some(3));
        let seqs: Vec<_> = report.recent.iter().map(|r| r["seq"].as_u64()).collect();
        assert_eq!(seqs, [Some(2), Some(3)]);

        // An edit that keeps the length is found at the next whole check, not before.
        let text = std::fs::read_to_string(&path).unwrap();
        std::fs::write(&path, text.replacen("\"after\":2", "\"after\":9", 1)).unwrap();
        let cached = watch.report(&path, len(&path), head.as_ref(), 10, now());
        assert!(
            cached.intact,
            "within {RECHECK:?} an unchanged length is not read again"
        );
        assert_eq!(cached.recent.len(), 3);
        tokio::time::advance(RECHECK).await;
        let report = watch.report(&path, len(&path), head.as_ref(), 10, now());
        assert!(!report.intact);
        assert!(report.problem.unwrap().contains("line 2"));
        assert_eq!(report.recent.len(), 3, "the records are still shown");

        // A record appended after the head was read is neither checked nor shown.
        std::fs::write(&path, &text).unwrap();
        tokio::time::advance(RECHECK).await;
        let before = len(&path);
        std::fs::write(&path, format!("{text}{{\"half\": ")).unwrap();
        let report = watch.report(&path, before, head.as_ref(), 10, now());
        assert!(report.intact, "{report:?}");
        assert_eq!(report.recent.len(), 3);
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn the_tail_is_read_from_the_end_across_windows() {
        let d = dir("tail");
        let mut log = AuditLog::open(&d, None).unwrap();
        let reason = "x".repeat(2000);
        for i in 1..=100 {
            let p = log.prepare(Entry {
                actor: "test",
                action: "set_weight",
                route: Some("r"),
                before: json!(i - 1),
                after: json!(i),
                generation: i,
                reason: Some(&reason),
                window: None,
            });
            log.append(&p).unwrap();
        }
        let path = d.join(AUDIT_FILE);
        assert!(len(&path) > 64 * 1024, "the log spans several windows");
        let tail = recent(&path, len(&path), 60);
        let seqs: Vec<u64> = tail.iter().filter_map(|r| r["seq"].as_u64()).collect();
        assert_eq!(seqs, (41..=100).collect::<Vec<_>>());
        assert_eq!(recent(&path, len(&path), 500).len(), 100);
        assert!(recent(&path, len(&path), 0).is_empty());
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn a_log_one_record_short_of_the_state_is_repaired_and_others_are_refused() {
        let d = dir("repair");
        let records = write_three(&d);
        let path = d.join(AUDIT_FILE);
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        std::fs::write(&path, format!("{}\n{}\n", lines[0], lines[1])).unwrap();
        AuditLog::open(&d, Some(&records[2].head())).unwrap();
        assert_eq!(verify(&path, Some(&records[2].head())).unwrap(), 3);

        std::fs::write(&path, format!("{}\n", lines[0])).unwrap();
        let err = AuditLog::open(&d, Some(&records[2].head())).unwrap_err();
        assert!(err.to_string().contains("weir audit verify"), "{err}");
        let _ = std::fs::remove_dir_all(&d);
    }
}
