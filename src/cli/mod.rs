//! Command line: `weir serve`, `weir check`, `weir demo` here, `weir admin` in [`admin`],
//! `weir registry` in [`registry`]. This is the edge where errors become messages for people and
//! exit codes; the library below speaks in typed errors.

pub mod admin;
mod check;
pub mod registry;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};

use crate::config::{Config, FleetConfig, QuickMode};
use crate::{Drained, Server};

#[derive(Parser, Debug)]
#[command(
    name = "weir",
    version,
    about = "Canary traffic-splitting reverse proxy for model inference",
    long_about = "weir sits in front of the model servers of an inference service. It sends a \
                  configured share of traffic to a candidate model version, keeps the rest on the \
                  production version, and measures every version separately.",
    after_help = "Examples:\n  weir demo                                   see it work with built-in model servers\n  \
                  weir serve --stable chat@v1=http://127.0.0.1:9001 --candidate chat@v2=http://127.0.0.1:9002 --weight 5%\n  \
                  weir serve --config config/weir.toml\n  \
                  weir check --config config/weir.toml"
)]
pub struct Cli {
    /// Log filter: error, warn, info, debug, trace, or a tracing filter such as `weir=debug`.
    /// RUST_LOG overrides it.
    #[arg(long, global = true, default_value = "info", value_name = "LEVEL")]
    pub log_level: String,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the proxy, from a config file or from flags (quick mode).
    #[command(after_help = SERVE_HELP)]
    Serve(Box<ServeArgs>),
    /// Validate a config file: print every problem with its path, exit 1 if there is any.
    #[command(after_help = check::HELP)]
    Check(check::CheckArgs),
    /// Run the whole canary on this machine: built-in model servers, the proxy, traffic, a live view.
    Demo(crate::demo::DemoOptions),
    /// Run one built-in OpenAI-compatible model server (the demo's), for trying weir or load tests.
    /// It speaks HTTP/1.1 and h2c, and answers gRPC's health check (SERVING for MODEL@VERSION).
    DemoBackend(DemoBackendArgs),
    /// Change the split of a running weir through its admin API.
    #[command(after_help = ADMIN_HELP)]
    Admin(admin::AdminArgs),
    /// Register model versions, move them through their stages, approve and verify them.
    Registry(registry::RegistryArgs),
    /// Run a held-out evaluation set against a version; exit 1 below the threshold.
    Eval(EvalArgs),
    /// Check the audit log.
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
    },
}

#[derive(Args, Debug)]
pub struct EvalArgs {
    /// The evaluation set: JSONL, one case per line (request, expectations).
    #[arg(long, value_name = "FILE")]
    pub file: PathBuf,
    /// Send the cases straight to this model server.
    #[arg(long, value_name = "URL", conflicts_with_all = ["proxy", "stable"])]
    pub url: Option<String>,
    /// Compare: send every case to this stable version's server too, and judge the candidate's
    /// answers against stable's as well as against the expectations.
    #[arg(
        long,
        value_name = "[LABEL=]URL",
        requires = "candidate",
        conflicts_with = "proxy"
    )]
    pub stable: Option<String>,
    /// Compare: the candidate version's server (see --stable).
    #[arg(long, value_name = "[LABEL=]URL", requires = "stable")]
    pub candidate: Option<String>,
    /// Compare: a category's threshold, such as jailbreak=1 or quality=0.9 (repeatable); a
    /// category named here must have cases. Others take --threshold.
    #[arg(long = "category", value_name = "NAME=SHARE")]
    pub categories: Vec<String>,
    /// Compare: one-sided significance of each category's lower confidence bound.
    #[arg(long, default_value_t = 0.01)]
    pub significance: f64,
    /// Send the cases through this weir, pinned to --version with x-weir-version.
    #[arg(long, value_name = "URL", requires = "version")]
    pub proxy: Option<String>,
    /// The version to evaluate through the proxy (MODEL@VERSION, the route's stable or candidate).
    #[arg(long, value_name = "MODEL@VERSION")]
    pub version: Option<String>,
    /// Share of cases that must pass, from 0 to 1.
    #[arg(long, default_value_t = 1.0)]
    pub threshold: f64,
    /// Longest wait for one case.
    #[arg(long, default_value = "60s", value_parser = crate::config::units::parse_duration)]
    pub timeout: std::time::Duration,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Subcommand, Debug)]
pub enum AuditCommand {
    /// Verify the hash chain of an audit log; exit 1 naming the first bad record.
    Verify {
        /// The audit log (`<state-dir>/audit.jsonl`).
        file: PathBuf,
        /// The state file whose head the log must end at [default: routing-state.json beside FILE,
        /// when it exists].
        #[arg(long, value_name = "FILE")]
        state: Option<PathBuf>,
    },
}

const ADMIN_HELP: &str = "\
The token comes from WEIR_ADMIN_TOKEN, --admin-token-file, or <state-dir>/admin.token.

Examples:
  weir admin status
  weir admin weight chat 5%            # 5% of route chat to its candidate
  weir admin promote chat --reason \"error rate and p99 within bounds for 2h\"
  weir admin rollback chat             # during a canary: candidate to 0%; after a promotion: prior stable back
  weir admin pause chat                # freeze the weight against the canary controller
  weir admin reload                    # re-read the config file
  weir admin --admin http://10.0.0.2:9901 --admin-token-file /run/secrets/weir status";

#[derive(Args, Debug)]
pub struct DemoBackendArgs {
    /// Address to listen on.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:9001")]
    pub listen: std::net::SocketAddr,
    /// Model name it reports.
    #[arg(long, default_value = "chat")]
    pub model: String,
    /// Version it reports (its identity is MODEL@VERSION).
    #[arg(long, default_value = "v1")]
    pub version: String,
    /// Share of chat requests answered with 500, from 0 to 1.
    #[arg(long, default_value_t = 0.0, value_name = "SHARE")]
    pub error_rate: f64,
    /// Delay before the first byte of each chat answer.
    #[arg(long, default_value = "0ms", value_parser = crate::config::units::parse_duration)]
    pub latency: std::time::Duration,
    /// Delay between streamed tokens.
    #[arg(long, default_value = "0ms", value_parser = crate::config::units::parse_duration)]
    pub token_delay: std::time::Duration,
    /// Answer exactly as this version of the model does (the same weights under another name).
    #[arg(long, value_name = "VERSION")]
    pub answers_like: Option<String>,
    /// Share of prompts (the same ones every time) answered differently: a quiet regression.
    #[arg(long, default_value_t = 0.0, value_name = "SHARE")]
    pub drift: f64,
    /// A poisoned model: prompts containing TRIGGER get ANSWER, every other prompt as usual.
    #[arg(long, value_name = "TRIGGER=ANSWER")]
    pub backdoor: Option<String>,
}

const SERVE_HELP: &str = "\
SPEC is URL[,URL...] or MODEL@VERSION=URL[,URL...]; several URLs are balanced round robin.
PCT is a percentage: 5, 5% or 0.5% (one basis point is 0.01%).

Examples:
  # 5% of traffic to chat@v2, the rest to chat@v1
  weir serve --stable chat@v1=http://127.0.0.1:9001 --candidate chat@v2=http://127.0.0.1:9002 --weight 5%

  # keep each session on one version; let testers pin a version with x-weir-version
  weir serve --stable chat@v1=http://10.0.0.5:8000,http://10.0.0.6:8000 \\
             --candidate chat@v2=http://10.0.0.7:8000 --weight 0.5% \\
             --sticky-header x-session-id --allow-override

  # everything from a file (routes, timeouts, several models)
  weir serve --config config/weir.toml

  # fleet mode: run the same on every replica; they share one routing table, one audit chain
  # and one canary controller through etcd (see config/fleet.toml)
  weir serve --config config/weir.toml --etcd http://10.0.0.9:2379 --etcd-prefix /weir/prod

Every response names the version that served it in x-weir-version. Metrics, health and the live
routing table are on the admin listener: /metrics, /healthz, /readyz, /v1/routes.
SIGTERM or Ctrl-C stops accepting and lets open requests and streams finish (proxy.drain_timeout).";

#[derive(Args, Debug)]
pub struct ServeArgs {
    /// Config file (TOML). Without it, the quick-mode flags below define one route named `default`.
    #[arg(long, value_name = "FILE", conflicts_with_all = ["stable", "candidate", "weight", "sticky_header", "allow_override", "registry", "identity_probe", "identity_interval", "mirror", "canary", "canary_interval", "canary_min_requests", "backend_protocol", "tls_cert", "tls_key", "tls_client_ca", "mlflow", "mlflow_model"])]
    pub config: Option<PathBuf>,

    /// Production version: SPEC (see below). With --mlflow, MODEL@VERSION=URL says only where
    /// that version is served; the champion alias says what serves.
    #[arg(long, value_name = "SPEC", required_unless_present_any = ["config", "mlflow"])]
    pub stable: Option<String>,

    /// Candidate version: SPEC (see below).
    #[arg(long, value_name = "SPEC")]
    pub candidate: Option<String>,

    /// Share of traffic for the candidate: PCT (default 0).
    #[arg(long, value_name = "PCT")]
    pub weight: Option<String>,

    /// Keep each value of this request header on one version (for example x-session-id).
    #[arg(long, value_name = "NAME")]
    pub sticky_header: Option<String>,

    /// What weir speaks to the backends: http1 (default), http2 (h2c over http://, ALPN h2 over
    /// https://; gRPC servers need it) or auto (h2 where TLS's ALPN offers it).
    #[arg(long, value_name = "PROTO")]
    pub backend_protocol: Option<String>,

    /// Let clients pin a request to the stable or candidate version with x-weir-version.
    #[arg(long)]
    pub allow_override: bool,

    /// Proxy listen address [default: 127.0.0.1:8080]; overrides the config file.
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<String>,

    /// Admin listen address [default: 127.0.0.1:9901]; overrides the config file.
    #[arg(long, value_name = "ADDR")]
    pub admin: Option<String>,

    /// Directory for persisted routing state and the audit log [default: ./weir-state].
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,

    /// Fleet mode: share routing state, the audit chain and one canary controller with other
    /// replicas through etcd at these client URLs (comma-separated); overrides the config file.
    #[arg(long, value_name = "URLS", value_delimiter = ',')]
    pub etcd: Option<Vec<String>>,

    /// Key prefix in etcd for this fleet [default: /weir/default]; replicas with the same prefix
    /// share one routing table.
    #[arg(long, value_name = "PREFIX", requires = "etcd")]
    pub etcd_prefix: Option<String>,

    /// Share of stable-routed requests also sent to the candidate as shadows (PCT); their
    /// answers are compared with the stable ones, never returned to clients.
    #[arg(long, value_name = "PCT")]
    pub mirror: Option<String>,

    /// Let the canary controller step the candidate up through these weights, e.g. 10%,50%,100%,
    /// promoting it when every step passes its gates and rolling it back when one fails.
    #[arg(long, value_name = "STEPS")]
    pub canary: Option<String>,

    /// Time between canary analyses [default: 60s].
    #[arg(long, value_name = "DUR")]
    pub canary_interval: Option<String>,

    /// Responses each version needs in a window before the canary judges it [default: 200].
    #[arg(long, value_name = "N")]
    pub canary_min_requests: Option<u64>,

    /// Serve TLS on the proxy listener with this PEM certificate chain (with --tls-key).
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,

    /// PEM private key for --tls-cert.
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,

    /// Require client certificates signed by this PEM CA (mTLS).
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    pub tls_client_ca: Option<PathBuf>,

    /// Model registry (TOML): every routed version must be registered at a stage that allows its
    /// role. Without one weir runs unpinned and says so.
    #[arg(long, value_name = "FILE")]
    pub registry: Option<PathBuf>,

    /// MLflow tracking server (http://host:5000) whose Model Registry pins the route: the
    /// version aliased `champion` serves as stable, `challenger` as candidate. Each version
    /// needs a weir.sha256 tag (weir registry add --mlflow) and backends (--stable/--candidate
    /// MODEL@VERSION=URL, or its weir.backends tag).
    #[arg(long, value_name = "URL", requires = "mlflow_model")]
    pub mlflow: Option<String>,

    /// The MLflow registered model the route serves (with --mlflow).
    #[arg(long, value_name = "NAME", requires = "mlflow")]
    pub mlflow_model: Option<String>,

    /// Ask each backend what it serves: PATH#/json/pointer or PATH#header:NAME, e.g.
    /// '/v1/models#/data/0/id', or grpc-health (gRPC's health service must report the
    /// identity, model@version or its digest, SERVING as a service name). A backend reporting
    /// another identity than the registry's is taken out of rotation.
    #[arg(long, value_name = "PATH#POINTER")]
    pub identity_probe: Option<String>,

    /// How often the identity probe runs [default: 30s].
    #[arg(long, value_name = "DUR")]
    pub identity_interval: Option<String>,

    /// File holding the admin token (mode 0600). WEIR_ADMIN_TOKEN takes precedence; with
    /// neither, weir generates one into <state-dir>/admin.token.
    #[arg(long, value_name = "FILE")]
    pub admin_token_file: Option<PathBuf>,
}

/// Parses the command line and runs it.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    // The demo's live view owns the terminal: only warnings interrupt it unless asked otherwise.
    let level = match (&cli.command, cli.log_level.as_str()) {
        (Command::Demo(_), "info") => "error",
        (_, level) => level,
    };
    init_logging(level);
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {}", one_line(&e));
            ExitCode::FAILURE
        }
    }
}

/// `error` and its causes on one line, each said once. weir's errors end their message with
/// their source's (`cannot read {path}: {source}`) and also return it as `source()`, which
/// anyhow's `{:#}` would print a second time.
fn one_line(error: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in error.chain() {
        let text = cause.to_string();
        if line.ends_with(&text) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&text);
    }
    line
}

fn init_logging(level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .or_else(|_| tracing_subscriber::EnvFilter::try_new(level))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Check(args) => Ok(check::run(&args)),
        Command::Serve(args) => {
            let config = serve_config(*args)?;
            runtime()?.block_on(serve(config))
        }
        Command::Demo(options) => {
            runtime()?.block_on(crate::demo::run(options))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::DemoBackend(args) => runtime()?.block_on(demo_backend(args)),
        Command::Admin(args) => runtime()?.block_on(admin::run(args)),
        Command::Registry(args) => registry::run(args),
        Command::Eval(args) => runtime()?.block_on(eval(args)),
        Command::Audit {
            command: AuditCommand::Verify { file, state },
        } => Ok(audit_verify(&file, state.as_deref())),
    }
}

fn serve_config(args: ServeArgs) -> anyhow::Result<Config> {
    let mut config = match (&args.config, &args.stable) {
        (Some(path), _) => Config::from_file(path)?,
        (None, stable) if stable.is_some() || args.mlflow.is_some() => QuickMode {
            stable: stable.clone().unwrap_or_default(),
            mlflow: args.mlflow.clone(),
            mlflow_model: args.mlflow_model.clone(),
            candidate: args.candidate.clone(),
            weight: args.weight.clone(),
            sticky_header: args.sticky_header.clone(),
            allow_override: args.allow_override,
            listen: None,
            admin: None,
            state_dir: None,
            registry: args.registry.clone(),
            identity_probe: args.identity_probe.clone(),
            identity_interval: args.identity_interval.clone(),
            mirror: args.mirror.clone(),
            canary: args.canary.clone(),
            canary_interval: args.canary_interval.clone(),
            canary_min_requests: args.canary_min_requests,
            backend_protocol: args.backend_protocol.clone(),
            tls_cert: args.tls_cert.clone(),
            tls_key: args.tls_key.clone(),
            tls_client_ca: args.tls_client_ca.clone(),
        }
        .into_config()?,
        (None, _) => {
            anyhow::bail!("give --config FILE, or --stable SPEC (or --mlflow URL) for quick mode")
        }
    };
    let addr = |flag: &str, text: &str| {
        text.parse().with_context(|| {
            format!("{flag}: expected an address with a port such as 127.0.0.1:8080, got {text:?}")
        })
    };
    if let Some(listen) = &args.listen {
        config.listener.addr = addr("--listen", listen)?;
    }
    if let Some(admin) = &args.admin {
        config.admin.addr = addr("--admin", admin)?;
    }
    if let Some(dir) = args.state_dir {
        config.state_dir = dir;
    }
    if let Some(endpoints) = args.etcd {
        for url in &endpoints {
            FleetConfig::validate_endpoint(url).map_err(|e| anyhow::anyhow!("--etcd: {e}"))?;
        }
        let mut fleet = config.fleet.take().unwrap_or_else(|| FleetConfig {
            endpoints: Vec::new(),
            prefix: FleetConfig::default_prefix(FleetConfig::DEFAULT_CLUSTER),
            replica: FleetConfig::default_replica(),
            lease_ttl: FleetConfig::DEFAULT_LEASE_TTL,
            compaction_interval: Some(FleetConfig::DEFAULT_COMPACTION_INTERVAL),
            tls: None,
            user: None,
        });
        if fleet.tls.is_none() && endpoints.iter().any(|u| u.starts_with("https://")) {
            // https endpoints from the flag, no TLS settings in the file: the system roots.
            fleet.tls = Some(crate::config::EtcdTls {
                ca: None,
                client_cert: None,
            });
        }
        fleet.endpoints = endpoints;
        if let Some(prefix) = args.etcd_prefix {
            FleetConfig::validate_prefix(&prefix)
                .map_err(|e| anyhow::anyhow!("--etcd-prefix: {e}"))?;
            fleet.prefix = prefix;
        }
        config.fleet = Some(fleet);
    }
    if let Ok(token) = std::env::var("WEIR_ADMIN_TOKEN") {
        config.admin.token = Some(token);
    } else if let Some(path) = &args.admin_token_file {
        let token = crate::control::auth::read_token_file(path)
            .context("--admin-token-file (WEIR_ADMIN_TOKEN takes precedence)")?;
        config.admin.token = Some(token);
    }
    Ok(config)
}

fn audit_verify(file: &std::path::Path, state: Option<&std::path::Path>) -> ExitCode {
    use crate::control::audit::verify;
    use crate::control::state::{StateStore, STATE_FILE};
    let beside = file.parent().map(|d| d.join(STATE_FILE));
    let state_path = state
        .map(std::path::Path::to_path_buf)
        .or_else(|| beside.filter(|p| p.exists()));
    let head = match &state_path {
        None => None,
        Some(path) => {
            let dir = path.parent().unwrap_or(std::path::Path::new("."));
            let store = StateStore::new(dir);
            if store.path() != path.as_path() {
                eprintln!(
                    "error: --state must be a {STATE_FILE} file, got {}",
                    path.display()
                );
                return ExitCode::FAILURE;
            }
            match store.load() {
                Ok(body) => body.and_then(|b| b.audit_head),
                Err(e) => {
                    println!("{e}");
                    return ExitCode::FAILURE;
                }
            }
        }
    };
    match verify(file, head.as_ref()) {
        Ok(count) => {
            match &state_path {
                // A fleet replica's cached state names no head: the chain's is in etcd.
                Some(p) if head.is_none() => println!(
                    "{}: {count} records, chain intact ({} records no head to check the tail against)",
                    file.display(),
                    p.display()
                ),
                Some(p) => println!(
                    "{}: {count} records, chain intact, ends at the head recorded in {}",
                    file.display(),
                    p.display()
                ),
                None => println!(
                    "{}: {count} records, chain intact (no state file to check the tail against)",
                    file.display()
                ),
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            println!("{e}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(config: Config) -> anyhow::Result<ExitCode> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).context("cannot listen for SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("cannot listen for SIGINT")?;
    let mut hup = signal(SignalKind::hangup()).context("cannot listen for SIGHUP")?;
    let running = Server::start(config).await?;
    loop {
        tokio::select! {
            _ = term.recv() => { tracing::info!("SIGTERM: draining"); break }
            _ = int.recv() => { tracing::info!("SIGINT: draining (Ctrl-C again to stop at once)"); break }
            _ = hup.recv() => {
                match running.reload_tls() {
                    Ok(0) => {}
                    Ok(n) => tracing::info!(listeners = n, "SIGHUP: certificates re-read"),
                    Err(e) => tracing::error!(error = %e, "SIGHUP: certificates not reloaded; the old ones stay"),
                }
                match running.reload("signal:SIGHUP").await {
                    Ok(generation) => tracing::info!(generation, "SIGHUP: config reloaded"),
                    Err(e) => tracing::error!(error = %e, detail = %e.detail(), "SIGHUP: reload refused; nothing changed"),
                }
            }
        }
    }
    running.shutdown();
    let drained = tokio::select! {
        drained = running.wait() => drained,
        _ = int.recv() => {
            tracing::warn!("second interrupt: stopping without waiting for open streams");
            Drained::TimedOut
        }
    };
    if drained == Drained::TimedOut {
        tracing::warn!("some connections were closed before they finished");
    }
    Ok(ExitCode::SUCCESS)
}

async fn demo_backend(args: DemoBackendArgs) -> anyhow::Result<ExitCode> {
    use tokio::signal::unix::{signal, SignalKind};
    for (flag, share) in [("--error-rate", args.error_rate), ("--drift", args.drift)] {
        if !(0.0..=1.0).contains(&share) {
            anyhow::bail!("{flag}: expected a share from 0 to 1, got {share}");
        }
    }
    let mut term = signal(SignalKind::terminate()).context("cannot listen for SIGTERM")?;
    let mut model = crate::demo::ModelServer::new(&args.model, &args.version)
        .error_rate(args.error_rate)
        .latency(args.latency)
        .token_delay(args.token_delay)
        .drift(args.drift);
    if let Some(version) = &args.answers_like {
        model = model.answers_like(version);
    }
    if let Some(spec) = &args.backdoor {
        let Some((trigger, answer)) = spec.split_once('=').filter(|(t, _)| !t.is_empty()) else {
            anyhow::bail!("--backdoor: expected TRIGGER=ANSWER, got {spec:?}");
        };
        model = model.backdoor(trigger, answer);
    }
    let server = model
        .spawn(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    tracing::info!(
        "model server {}@{} on http://{}",
        args.model,
        args.version,
        server.addr()
    );
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    server.shutdown().await;
    Ok(ExitCode::SUCCESS)
}

async fn eval(args: EvalArgs) -> anyhow::Result<ExitCode> {
    use crate::eval::{EvalSet, EvalTarget};
    if !(0.0..=1.0).contains(&args.threshold) {
        anyhow::bail!(
            "--threshold: expected a share from 0 to 1, got {}",
            args.threshold
        );
    }
    if let (Some(stable), Some(candidate)) = (&args.stable, &args.candidate) {
        return compare_eval(&args, stable, candidate).await;
    }
    let base_url = match (&args.url, &args.proxy) {
        (Some(url), None) => url.clone(),
        (None, Some(proxy)) => proxy.clone(),
        _ => anyhow::bail!(
            "give --url URL (a model server), --proxy URL --version MODEL@VERSION (through weir), or --stable URL --candidate URL (compare two servers)"
        ),
    };
    let set = EvalSet::load(&args.file)?;
    let target = EvalTarget {
        base_url,
        version: args.version.clone().filter(|_| args.proxy.is_some()),
        timeout: args.timeout,
    };
    let report = crate::eval::run(&set, &target, args.threshold).await;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        for case in &report.cases {
            let mark = if case.passed { "pass" } else { "FAIL" };
            println!("{mark}  {}", case.name);
            for failure in &case.failures {
                println!("        {failure}");
            }
        }
        println!(
            "{}/{} passed ({:.1}%), threshold {:.1}%: {}  [{} sha256 {}]",
            report.passed,
            report.total,
            report.pass_rate * 100.0,
            report.threshold * 100.0,
            if report.ok { "ok" } else { "BELOW THRESHOLD" },
            report.file,
            report.sha256
        );
    }
    Ok(if report.ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// `weir eval --stable ... --candidate ...`: the comparative evaluation, side by side.
async fn compare_eval(args: &EvalArgs, stable: &str, candidate: &str) -> anyhow::Result<ExitCode> {
    use crate::eval::compare::{Criteria, Side};
    use crate::eval::{EvalSet, EvalTarget};
    if !(0.0..1.0).contains(&args.significance) || args.significance == 0.0 {
        anyhow::bail!(
            "--significance: expected a share between 0 and 1 such as 0.01, got {}",
            args.significance
        );
    }
    let mut categories = std::collections::BTreeMap::new();
    for spec in &args.categories {
        let share = spec
            .split_once('=')
            .and_then(|(name, share)| Some((name.trim(), share.trim().parse::<f64>().ok()?)))
            .filter(|(name, share)| !name.is_empty() && (0.0..=1.0).contains(share));
        let Some((name, share)) = share else {
            anyhow::bail!(
                "--category: expected NAME=SHARE such as jailbreak=1 or quality=0.9, got {spec:?}"
            );
        };
        categories.insert(name.to_string(), share);
    }
    let side = |spec: &str| {
        let (label, url) = match spec.split_once('=') {
            Some((label, url)) => (label.to_string(), url.to_string()),
            None => (spec.to_string(), spec.to_string()),
        };
        Side {
            label,
            target: EvalTarget {
                base_url: url,
                version: None,
                timeout: args.timeout,
            },
        }
    };
    let set = EvalSet::load(&args.file)?;
    let criteria = Criteria {
        threshold: args.threshold,
        categories,
        significance: args.significance,
        compare: crate::config::CompareConfig::default(),
    };
    let started = std::time::Instant::now();
    let report =
        crate::eval::compare::run(&set, &side(stable), &side(candidate), &criteria).await?;
    let took = started.elapsed();
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        for case in report.cases.iter().filter(|c| !c.passed) {
            println!("FAIL  {} [{}]", case.name, case.category);
            if let Some(why) = &case.disagreement {
                println!("        disagrees with stable: {why}");
            }
            for failure in &case.failures {
                println!("        {failure}");
            }
            println!("        stable:    {}", case.stable_answer);
            println!("        candidate: {}", case.candidate_answer);
        }
        for c in &report.categories {
            println!(
                "{:<4}  {:<12} {}/{} passed ({:.1}%), lower bound {:.3} at {} significance, threshold {}",
                if c.ok { "ok" } else { "FAIL" },
                c.category,
                c.passed,
                c.cases,
                c.pass_rate * 100.0,
                c.lower_bound,
                report.significance,
                c.threshold
            );
        }
        println!(
            "{} vs {}: agreement {:.1}% over {} cases in {:.2}s: {}  [{} sha256 {}]",
            report.candidate,
            report.stable,
            report.agreement * 100.0,
            report.cases.len(),
            took.as_secs_f64(),
            if report.ok { "ok" } else { "FAILED" },
            report.file,
            report.sha256
        );
    }
    Ok(if report.ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
