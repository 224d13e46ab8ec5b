//! Fleet mode: the routing state, the audit chain and the canary election live in etcd, so every
//! replica routes the same way and a change made through any of them reaches all.
//!
//! Keys under the prefix (`/weir/<cluster>` by default):
//! - `state` — the [`StateBody`] (routing state + audit head). Every change is one transaction
//!   conditioned on this key's revision, which moves with every generation: two replicas changing
//!   the same route cannot both win; the loser re-reads and re-applies, or answers 409 when the
//!   caller sent `If-Match`.
//! - `audit/<seq>` — each audit record line, written in the same transaction as the state, so
//!   the chain in etcd has no gaps and every replica's local copy can be filled from it.
//! - `leader` — the canary controller's election (etcd's election API, on this replica's lease).
//! - `counters/<replica>` — each replica's cumulative per-version counters, on its lease, which
//!   the controller sums into fleet-wide counts.
//!
//! The connection can use TLS (a private CA or the system roots, and a client certificate) and
//! an etcd user, as production clusters require.
//!
//! Invariant: nothing here changes the table; the [`Writer`](super::Writer) applies what etcd
//! holds. When etcd is unreachable the replica keeps its last table, mutations fail with 503 and
//! readiness says why.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, GetOptions, LeaderKey, PutOptions, SortOrder,
    SortTarget, Txn, TxnOp,
};

use super::audit::Prepared;
use super::state::StateBody;
use crate::config::FleetConfig;

/// Longest wait for one etcd call on the control path (mutations answer 503 after it).
pub const OP_TIMEOUT: Duration = Duration::from_secs(2);
/// Most audit records one read fetches: a replica joining a long-lived fleet fills its copy of
/// the chain page by page, never in one answer bigger than gRPC takes.
pub const AUDIT_PAGE: u64 = 64;
/// Largest answer a page of records may be: [`AUDIT_PAGE`] records of etcd's largest default
/// request (1.5 MiB) each. Records are about a kilobyte, so a page is usually far smaller.
const AUDIT_PAGE_BYTES: usize = AUDIT_PAGE as usize * 3 * 1024 * 1024 / 2;
/// How often each replica publishes its counters for the fleet-wide canary judgement.
pub const PUBLISH_INTERVAL: Duration = Duration::from_millis(500);

/// Why an etcd operation did not happen.
#[derive(Debug, thiserror::Error)]
pub enum FleetError {
    #[error("etcd is unreachable at {endpoints}: {detail}")]
    Unavailable { endpoints: String, detail: String },
    /// A commit was sent but neither its answer nor a later check came back: it may be applied.
    #[error("etcd at {endpoints} did not confirm the change ({detail})")]
    Unconfirmed { endpoints: String, detail: String },
    /// Another replica changed the state first: re-read and try again.
    #[error("another replica changed the routing state first")]
    Stale,
    #[error("this replica is no longer the canary leader (its etcd lease ended)")]
    NotLeader,
    #[error("etcd holds something weir cannot read at {key}: {detail}")]
    Corrupt { key: String, detail: String },
    #[error("cannot read {what} {path}: {source}")]
    File {
        what: &'static str,
        path: std::path::PathBuf,
        source: std::io::Error,
    },
}

/// What `state` holds, with the revision a transaction must compare against.
#[derive(Clone, Debug)]
pub struct StoredState {
    pub body: StateBody,
    pub revision: i64,
    /// etcd's revision when this was read: a watch for later changes starts after it (the state's
    /// own `revision` may be older than etcd's compacted history).
    pub read_at: i64,
}

/// An etcd lease and until when it is known to live (the last keep-alive answer plus its TTL).
#[derive(Clone, Copy, Debug)]
struct Lease {
    id: i64,
    valid_until: Instant,
}

/// A connection to etcd for one replica.
pub struct Fleet {
    client: Client,
    config: FleetConfig,
    /// The replica's lease, which carries the election key and counters (`None` before the first
    /// grant).
    lease: Mutex<Option<Lease>>,
    /// Held while a lease is granted: two tasks that find the lease lapsed get one new lease
    /// between them, not one each (the one nobody keeps alive would take the counters with it).
    granting: tokio::sync::Mutex<()>,
    /// Last etcd call succeeded.
    up: AtomicBool,
    /// Why the last call failed, for readiness and `/v1/routes`.
    last_error: Mutex<Option<String>>,
    /// Why the fleet's current state could not be applied here (etcd answered, the replica
    /// could not build a table from it), for readiness and `/v1/routes`.
    apply_problem: Mutex<Option<String>>,
    leader: Mutex<Option<LeaderKey>>,
    /// Changes on every process start, so the controller never mixes two runs' counters.
    pub incarnation: String,
}

impl std::fmt::Debug for Fleet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fleet")
            .field("endpoints", &self.config.endpoints)
            .field("prefix", &self.config.prefix)
            .field("replica", &self.config.replica)
            .finish()
    }
}

impl Fleet {
    /// A client for the configured endpoints. The channel connects lazily: only etcd auth (a
    /// token to fetch) makes this fail when etcd is away; the first read tells reachability.
    pub async fn connect(config: &FleetConfig) -> Result<Fleet, FleetError> {
        let read = |what: &'static str, path: &std::path::Path| {
            std::fs::read(path).map_err(|source| FleetError::File {
                what,
                path: path.to_path_buf(),
                source,
            })
        };
        let mut options = ConnectOptions::new()
            .with_connect_timeout(OP_TIMEOUT)
            .with_keep_alive(Duration::from_secs(2), OP_TIMEOUT);
        if let Some(tls) = &config.tls {
            let mut tls_options = etcd_client::TlsOptions::new();
            tls_options = match &tls.ca {
                Some(ca) => tls_options
                    .ca_certificate(etcd_client::Certificate::from_pem(read("the etcd CA", ca)?)),
                None => tls_options.with_native_roots(),
            };
            if let Some((cert, key)) = &tls.client_cert {
                tls_options = tls_options.identity(etcd_client::Identity::from_pem(
                    read("the etcd client certificate", cert)?,
                    read("the etcd client key", key)?,
                ));
            }
            options = options.with_tls(tls_options);
        }
        if let Some(user) = &config.user {
            let password = read("the etcd password file", &user.password_file)?;
            let password = String::from_utf8_lossy(&password).trim_end().to_string();
            options = options.with_user(user.name.clone(), password);
        }
        let unavailable = |detail: String| FleetError::Unavailable {
            endpoints: config.endpoints.join(","),
            detail,
        };
        let client = tokio::time::timeout(
            OP_TIMEOUT * 3,
            Client::connect(&config.endpoints, Some(options)),
        )
        .await
        .map_err(|_| unavailable("no answer within 6s".into()))?
        .map_err(|e| unavailable(e.to_string()))?;
        let fleet = Fleet {
            client,
            config: config.clone(),
            lease: Mutex::new(None),
            granting: tokio::sync::Mutex::new(()),
            up: AtomicBool::new(true),
            last_error: Mutex::new(None),
            apply_problem: Mutex::new(None),
            leader: Mutex::new(None),
            incarnation: format!("{:016x}", rand::random::<u64>()),
        };
        // The writer's first read proves the endpoints are etcd and reachable (or, when they are
        // not, makes the replica start from its cached state).
        Ok(fleet)
    }

    pub fn config(&self) -> &FleetConfig {
        &self.config
    }

    pub fn replica(&self) -> &str {
        &self.config.replica
    }

    fn key(&self, suffix: &str) -> String {
        format!("{}/{suffix}", self.config.prefix)
    }

    fn audit_key(&self, seq: u64) -> String {
        self.key(&format!("audit/{seq:020}"))
    }

    /// The last etcd call succeeded.
    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Relaxed)
    }

    /// Why etcd is considered unreachable (None while it answers).
    pub fn down_reason(&self) -> Option<String> {
        if self.is_up() {
            None
        } else {
            lock(&self.last_error).clone()
        }
    }

    /// Why this replica cannot apply the fleet's current state, while that lasts.
    pub fn apply_problem(&self) -> Option<String> {
        lock(&self.apply_problem).clone()
    }

    /// Records whether the last catch-up applied the fleet's state (`None`) or why not, in
    /// `weir_fleet_state_applied` too; says so when a problem starts.
    pub(crate) fn set_apply_problem(
        &self,
        metrics: &crate::metrics::Metrics,
        problem: Option<&str>,
    ) {
        metrics.set_fleet_state_applied(problem.is_none());
        let mut current = lock(&self.apply_problem);
        if let (Some(why), None) = (problem, current.as_ref()) {
            tracing::error!(
                error = why,
                "cannot apply the fleet's routing state: this replica routes by an older generation and reports unready until it can"
            );
        }
        *current = problem.map(str::to_string);
    }

    fn unavailable(&self, detail: String) -> FleetError {
        FleetError::Unavailable {
            endpoints: self.config.endpoints.join(","),
            detail,
        }
    }

    /// Runs one etcd call with the control-path timeout, tracking reachability.
    async fn call<T, F>(&self, what: &str, call: F) -> Result<T, FleetError>
    where
        F: std::future::Future<Output = Result<T, etcd_client::Error>>,
    {
        let result = match tokio::time::timeout(OP_TIMEOUT, call).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(e)) => Err(format!("{what}: {e}")),
            Err(_) => Err(format!("{what}: no answer within {OP_TIMEOUT:?}")),
        };
        match result {
            Ok(value) => {
                if !self.up.swap(true, Ordering::Relaxed) {
                    tracing::info!("etcd is reachable again");
                }
                Ok(value)
            }
            Err(detail) => {
                if self.up.swap(false, Ordering::Relaxed) {
                    tracing::warn!(error = %detail, "etcd is unreachable: serving the last routing table, changes are refused until it returns");
                }
                *lock(&self.last_error) = Some(detail.clone());
                Err(self.unavailable(detail))
            }
        }
    }

    // === state and audit ===

    /// The shared state, or `None` when no replica has written one yet.
    pub async fn load(&self) -> Result<Option<StoredState>, FleetError> {
        let key = self.key("state");
        let mut kv = self.client.kv_client();
        let response = self
            .call("read the state", kv.get(key.clone(), None))
            .await?;
        let Some(kv) = response.kvs().first() else {
            return Ok(None);
        };
        let body: StateBody =
            serde_json::from_slice(kv.value()).map_err(|e| FleetError::Corrupt {
                key: key.clone(),
                detail: e.to_string(),
            })?;
        Ok(Some(StoredState {
            body,
            revision: kv.mod_revision(),
            read_at: response.header().map_or(0, |h| h.revision()),
        }))
    }

    /// Writes `body` and the audit record it names as its head, if the state key is still at
    /// `revision` (0: if there is no state yet) and, with `fenced`, this replica still leads.
    /// Returns the new revision.
    pub async fn commit(
        &self,
        revision: i64,
        body: &StateBody,
        record: &Prepared,
        fenced: bool,
    ) -> Result<i64, FleetError> {
        let state_key = self.key("state");
        let mut compares = vec![Compare::mod_revision(
            state_key.clone(),
            CompareOp::Equal,
            revision,
        )];
        if fenced {
            let Some(leader) = lock(&self.leader).clone() else {
                return Err(FleetError::NotLeader);
            };
            compares.push(Compare::create_revision(
                leader.key().to_vec(),
                CompareOp::Equal,
                leader.rev(),
            ));
        }
        // A record number is written once: never over a record already in the chain.
        compares.push(Compare::version(
            self.audit_key(record.seq),
            CompareOp::Equal,
            0,
        ));
        let value = serde_json::to_vec(body).expect("state serializes");
        let txn = Txn::new().when(compares).and_then(vec![
            TxnOp::put(state_key.clone(), value, None),
            TxnOp::put(self.audit_key(record.seq), record.line.clone(), None),
        ]);
        let mut kv = self.client.kv_client();
        let response = match self.call("commit a change", kv.txn(txn.clone())).await {
            Ok(response) => response,
            Err(lost) => return self.settle(record, txn, lost).await,
        };
        if response.succeeded() {
            return Ok(response.header().map_or(0, |h| h.revision()));
        }
        if fenced {
            // Either the state moved or the leadership went; only the first is worth a retry.
            let now = self.load().await?;
            if now.is_none_or(|s| s.revision == revision) {
                self.lost_leadership("a fenced change found the election key gone");
                return Err(FleetError::NotLeader);
            }
        }
        Err(FleetError::Stale)
    }

    /// A commit whose answer never came (a timeout, a dropped connection) may have been applied,
    /// may be applied later (still in flight), or not at all. Sending the same transaction again
    /// settles it, because its conditions let it apply at most once: if it succeeds now, the
    /// change is committed; if not, the audit record says whether the first one was (its
    /// revision) or another change came first ([`FleetError::Stale`]). When etcd cannot be asked,
    /// [`FleetError::Unconfirmed`] tells the caller the outcome is unknown, so nobody blindly
    /// repeats a promotion or rollback.
    async fn settle(
        &self,
        record: &Prepared,
        txn: Txn,
        lost: FleetError,
    ) -> Result<i64, FleetError> {
        let FleetError::Unavailable { endpoints, detail } = lost else {
            return Err(lost);
        };
        let unconfirmed = || FleetError::Unconfirmed {
            endpoints: endpoints.clone(),
            detail: detail.clone(),
        };
        let mut kv = self.client.kv_client();
        let Ok(again) = self.call("commit the change again", kv.txn(txn)).await else {
            return Err(unconfirmed());
        };
        if again.succeeded() {
            return Ok(again.header().map_or(0, |h| h.revision()));
        }
        let key = self.audit_key(record.seq);
        match self
            .call("check whether the change was committed", kv.get(key, None))
            .await
        {
            Ok(response) => match response.kvs().first() {
                Some(kv) if kv.value() == record.line.as_bytes() => {
                    tracing::info!(
                        seq = record.seq,
                        "etcd applied a change whose answer was lost"
                    );
                    Ok(kv.mod_revision())
                }
                // The state moved under it (another replica, or the seat went): never applied.
                _ => Err(FleetError::Stale),
            },
            Err(_) => Err(unconfirmed()),
        }
    }

    /// Audit record lines `from..=to` in order, at most [`AUDIT_PAGE`] of them (missing ones are
    /// an error: the chain in etcd is written with the state, so a gap means someone deleted
    /// keys).
    pub async fn records(&self, from: u64, to: u64) -> Result<Vec<String>, FleetError> {
        if from > to {
            return Ok(Vec::new());
        }
        debug_assert!(
            to - from < AUDIT_PAGE,
            "records {from}..={to}: more than a page"
        );
        let mut kv = self
            .client
            .kv_client()
            .max_decoding_message_size(AUDIT_PAGE_BYTES);
        let options = GetOptions::new().with_range(self.audit_key(to + 1));
        let response = self
            .call(
                "read audit records",
                kv.get(self.audit_key(from), Some(options)),
            )
            .await?;
        let lines: Vec<String> = response
            .kvs()
            .iter()
            .map(|kv| String::from_utf8_lossy(kv.value()).into_owned())
            .collect();
        if lines.len() as u64 != to - from + 1 {
            return Err(FleetError::Corrupt {
                key: self.key("audit/"),
                detail: format!(
                    "records {from}..={to} should be there, found {} of them",
                    lines.len()
                ),
            });
        }
        Ok(lines)
    }

    /// Resolves when the state key changes after `revision`, or after `wait` at the latest
    /// (the caller re-reads either way, so a lost watch costs at most one `wait`).
    pub async fn changed_after(&self, revision: i64, wait: Duration) {
        let mut watch = self.client.watch_client();
        let options = etcd_client::WatchOptions::new().with_start_revision(revision + 1);
        let watched = async {
            let Ok(Ok(mut stream)) =
                tokio::time::timeout(OP_TIMEOUT, watch.watch(self.key("state"), Some(options)))
                    .await
            else {
                // etcd is away: the caller's next read notices and reports it.
                tokio::time::sleep(wait).await;
                return;
            };
            while let Ok(Some(message)) = stream.message().await {
                if !message.events().is_empty() || message.canceled() {
                    return;
                }
            }
        };
        let _ = tokio::time::timeout(wait, watched).await;
    }

    // === lease and election ===

    /// The replica's lease, granted (again) when it has none or it lapsed.
    pub async fn lease(&self) -> Result<i64, FleetError> {
        if let Some(id) = self.live_lease() {
            return Ok(id);
        }
        let _granting = self.granting.lock().await;
        // Another task may have granted one while this one waited.
        if let Some(id) = self.live_lease() {
            return Ok(id);
        }
        let ttl = self.config.lease_ttl.as_secs().max(1) as i64;
        let mut leases = self.client.lease_client();
        let granted = self.call("grant a lease", leases.grant(ttl, None)).await?;
        *lock(&self.lease) = Some(Lease {
            id: granted.id(),
            valid_until: Instant::now() + Duration::from_secs(granted.ttl().max(1) as u64),
        });
        Ok(granted.id())
    }

    /// The lease's id while it is known to live.
    fn live_lease(&self) -> Option<i64> {
        lock(&self.lease)
            .filter(|lease| Instant::now() < lease.valid_until)
            .map(|lease| lease.id)
    }

    /// Records a keep-alive answer for lease `id`: lives `ttl` seconds more, or has ended (`ttl`
    /// 0). Returns false, changing nothing, when this replica has since replaced `id` (it lapsed
    /// here and another task was granted a new one).
    fn renewed(&self, id: i64, ttl: i64) -> bool {
        let mut lease = lock(&self.lease);
        if !lease.is_some_and(|l| l.id == id) {
            return false;
        }
        *lease = (ttl > 0).then(|| Lease {
            id,
            valid_until: Instant::now() + Duration::from_secs(ttl as u64),
        });
        true
    }

    /// Keeps lease `id` alive until it lapses (etcd unreachable for a TTL, or revoked) or is
    /// replaced; a replaced lease is revoked, so the seat and counters on it go at once and
    /// nothing keeps two leases alive.
    pub async fn keep_lease(&self, id: i64) {
        let ttl = self.config.lease_ttl;
        let mut leases = self.client.lease_client();
        let Ok((mut keeper, mut answers)) =
            self.call("keep the lease", leases.keep_alive(id)).await
        else {
            return;
        };
        loop {
            if keeper.keep_alive().await.is_err() {
                return;
            }
            match tokio::time::timeout(OP_TIMEOUT, answers.message()).await {
                Ok(Ok(Some(answer))) => {
                    if !self.renewed(id, answer.ttl()) {
                        return self.revoke_replaced(id).await;
                    }
                    // TTL 0: etcd no longer has the lease.
                    if answer.ttl() <= 0 {
                        return;
                    }
                }
                _ => {
                    if self.live_lease() != Some(id) {
                        return self.revoke_replaced(id).await;
                    }
                }
            }
            tokio::time::sleep(ttl / 3).await;
        }
    }

    /// Revokes lease `id` (best effort) when another lease has replaced it here: the seat on it
    /// goes at once instead of after its TTL, so the campaign on the new lease is not queued
    /// behind this replica's own old key.
    async fn revoke_replaced(&self, id: i64) {
        if lock(&self.lease).is_some_and(|lease| lease.id != id) {
            let mut leases = self.client.lease_client();
            let _ = self
                .call("revoke a replaced lease", leases.revoke(id))
                .await;
        }
    }

    /// Campaigns for the canary controller's seat on `lease`; resolves once this replica leads.
    pub async fn campaign(&self, lease: i64) -> Result<(), FleetError> {
        let mut election = self.client.election_client();
        let response = election
            .campaign(self.key("leader"), self.config.replica.clone(), lease)
            .await
            .map_err(|e| self.unavailable(format!("campaign: {e}")))?;
        let key = response.leader().cloned().ok_or(FleetError::NotLeader)?;
        *lock(&self.leader) = Some(key);
        Ok(())
    }

    /// The replica that holds the controller's seat, as etcd's election has it: the owner of the
    /// oldest key under the election's name (none while no replica campaigns).
    pub async fn leader_name(&self) -> Result<Option<String>, FleetError> {
        let mut kv = self.client.kv_client();
        let options = GetOptions::new()
            .with_prefix()
            .with_sort(SortTarget::Create, SortOrder::Ascend)
            .with_limit(1);
        let response = self
            .call(
                "read the canary leader",
                kv.get(format!("{}/", self.key("leader")), Some(options)),
            )
            .await?;
        Ok(response
            .kvs()
            .first()
            .map(|kv| String::from_utf8_lossy(kv.value()).into_owned()))
    }

    /// This replica holds the controller's seat and its lease is alive.
    pub fn is_leader(&self) -> bool {
        let seat = lock(&self.leader).as_ref().map(LeaderKey::lease);
        seat.is_some() && seat == self.live_lease()
    }

    /// Forgets the seat (the lease lapsed or a fenced write failed).
    pub fn lost_leadership(&self, why: &str) {
        if lock(&self.leader).take().is_some() {
            tracing::warn!("no longer the canary leader: {why}");
        }
    }

    /// Gives the seat up, keeping the lease (and the counters on it): a replica that cannot apply
    /// the fleet's state cannot run its canaries, and another one takes over at once.
    pub async fn step_down(&self, why: &str) {
        let Some(seat) = lock(&self.leader).take() else {
            return;
        };
        tracing::warn!("leaving the canary controller's seat to another replica: {why}");
        let mut election = self.client.election_client();
        let options = etcd_client::ResignOptions::new().with_leader(seat);
        let _ = self
            .call("resign the canary seat", election.resign(Some(options)))
            .await;
    }

    /// Gives the seat up on shutdown so another replica takes over at once, not after the TTL.
    pub async fn resign(&self) {
        let lease = lock(&self.lease).take();
        lock(&self.leader).take();
        if let Some(Lease { id, .. }) = lease {
            let mut leases = self.client.lease_client();
            let _ = self.call("revoke the lease", leases.revoke(id)).await;
        }
    }

    // === history ===

    /// etcd's current revision (the header of a one-key count read).
    pub async fn revision(&self) -> Result<i64, FleetError> {
        let mut kv = self.client.kv_client();
        let options = GetOptions::new().with_count_only();
        let response = self
            .call(
                "read the revision",
                kv.get(self.key("state"), Some(options)),
            )
            .await?;
        Ok(response.header().map_or(0, |h| h.revision()))
    }

    /// Drops etcd's history before `revision` (every key's older values; current values stay).
    /// Returns false when something else had already compacted past it.
    pub async fn compact(&self, revision: i64) -> Result<bool, FleetError> {
        let mut kv = self.client.kv_client();
        match tokio::time::timeout(OP_TIMEOUT, kv.compact(revision, None)).await {
            Ok(Ok(_)) => Ok(true),
            Ok(Err(e)) if e.to_string().contains("compacted") => Ok(false),
            Ok(Err(e)) => Err(self.unavailable(format!("compact: {e}"))),
            Err(_) => Err(self.unavailable(format!("compact: no answer within {OP_TIMEOUT:?}"))),
        }
    }

    // === counters ===

    /// Publishes this replica's counters (JSON) on its lease.
    pub async fn publish(&self, value: String) -> Result<(), FleetError> {
        let lease = self.lease().await?;
        let mut kv = self.client.kv_client();
        let key = self.key(&format!("counters/{}", self.config.replica));
        self.call(
            "publish counters",
            kv.put(key, value, Some(PutOptions::new().with_lease(lease))),
        )
        .await?;
        Ok(())
    }

    /// Every live replica's published counters, by replica name.
    pub async fn counters(&self) -> Result<Vec<(String, String)>, FleetError> {
        let prefix = self.key("counters/");
        let mut kv = self.client.kv_client();
        let response = self
            .call(
                "read counters",
                kv.get(prefix.clone(), Some(GetOptions::new().with_prefix())),
            )
            .await?;
        Ok(response
            .kvs()
            .iter()
            .map(|kv| {
                let key = String::from_utf8_lossy(kv.key());
                (
                    key.strip_prefix(&prefix).unwrap_or(&key).to_string(),
                    String::from_utf8_lossy(kv.value()).into_owned(),
                )
            })
            .collect())
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
