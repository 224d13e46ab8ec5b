//! `weir admin`: a small client for the admin API, so SREs and scripts need no curl recipes.
//! Exit 0 when the call was accepted, 1 with weir's error message when it was refused.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use bytes::Bytes;
use clap::{Args, Subcommand};
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::{json, Value};

use crate::control::auth::{read_token_file, TOKEN_FILE};

#[derive(Args, Debug)]
pub struct AdminArgs {
    /// Admin endpoint of the weir to talk to; a bare HOST:PORT means http://HOST:PORT.
    #[arg(
        long,
        value_name = "URL",
        default_value = "http://127.0.0.1:9901",
        value_parser = admin_url,
        global = true
    )]
    pub admin: String,
    /// File holding the admin token (WEIR_ADMIN_TOKEN takes precedence).
    #[arg(long, value_name = "FILE", global = true)]
    pub admin_token_file: Option<PathBuf>,
    /// State directory whose admin.token to use when no other token is given.
    #[arg(
        long,
        value_name = "DIR",
        default_value = "./weir-state",
        global = true
    )]
    pub state_dir: PathBuf,
    /// Apply only if the routing table is still at this generation.
    #[arg(long, value_name = "GENERATION", global = true)]
    pub if_match: Option<u64>,
    /// Why: recorded in the audit log.
    #[arg(long, global = true)]
    pub reason: Option<String>,
    /// Print weir's JSON answer instead of a summary.
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub command: AdminCommand,
}

#[derive(Subcommand, Debug)]
pub enum AdminCommand {
    /// Show every route: versions, weight, state, generation.
    Status,
    /// Set the candidate's share of a route: PCT is 5, 5% or 0.5%.
    Weight { route: String, weight: String },
    /// Make the candidate the stable version; the prior stable becomes the rollback target.
    Promote { route: String },
    /// During a canary: candidate to 0% and marked rolled back. After a promotion: prior stable back.
    Rollback { route: String },
    /// Freeze the route's weight against the canary controller.
    Pause { route: String },
    /// Undo a pause.
    Resume { route: String },
    /// Re-read the config file of the running weir.
    Reload,
}

/// `--admin`: a URL, or `HOST:PORT` as printed by `weir serve` (`admin=127.0.0.1:9901`).
fn admin_url(text: &str) -> Result<String, String> {
    let url = if text.contains("://") {
        text.to_string()
    } else {
        format!("http://{text}")
    };
    match url.parse::<http::Uri>() {
        Ok(uri) if uri.host().is_some_and(|h| !h.is_empty()) => {
            Ok(url.trim_end_matches('/').to_string())
        }
        _ => Err(format!(
            "expected a URL such as http://127.0.0.1:9901 or an address such as 127.0.0.1:9901, got {text:?}"
        )),
    }
}

fn token(args: &AdminArgs) -> anyhow::Result<String> {
    if let Ok(token) = std::env::var("WEIR_ADMIN_TOKEN") {
        return Ok(token);
    }
    let path = args
        .admin_token_file
        .clone()
        .unwrap_or_else(|| args.state_dir.join(TOKEN_FILE));
    read_token_file(&path).with_context(|| {
        "no admin token: set WEIR_ADMIN_TOKEN, pass --admin-token-file FILE, or --state-dir DIR of the weir you talk to"
    })
}

pub async fn run(args: AdminArgs) -> anyhow::Result<ExitCode> {
    let base = args.admin.clone();
    let (method, path, body) = match &args.command {
        AdminCommand::Status => (Method::GET, "/v1/routes".to_string(), None),
        AdminCommand::Weight { route, weight } => (
            Method::PUT,
            format!("/v1/routes/{route}/weight"),
            Some(json!({"weight": weight, "reason": args.reason})),
        ),
        AdminCommand::Promote { route } => post(route, "promote", &args),
        AdminCommand::Rollback { route } => post(route, "rollback", &args),
        AdminCommand::Pause { route } => post(route, "pause", &args),
        AdminCommand::Resume { route } => post(route, "resume", &args),
        AdminCommand::Reload => (
            Method::POST,
            "/v1/reload".to_string(),
            Some(json!({"reason": args.reason})),
        ),
    };
    let mut request = Request::builder()
        .method(method.clone())
        .uri(format!("{base}{path}"));
    if method != Method::GET {
        request = request.header("authorization", format!("Bearer {}", token(&args)?));
        if let Some(generation) = args.if_match {
            request = request.header("if-match", generation.to_string());
        }
    }
    let body = body.map(|b| Bytes::from(b.to_string())).unwrap_or_default();
    let request = request
        .header("content-type", "application/json")
        .body(Full::new(body))
        .with_context(|| format!("bad admin URL {base:?}"))?;
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let response = client.request(request).await.with_context(|| {
        format!("cannot reach weir's admin API at {base} (is weir running there? --admin URL)")
    })?;
    let status = response.status();
    let bytes = response.into_body().collect().await?.to_bytes();
    let answer: Value = serde_json::from_slice(&bytes)
        .unwrap_or_else(|_| json!({"error": String::from_utf8_lossy(&bytes)}));
    if args.json {
        println!("{}", serde_json::to_string_pretty(&answer)?);
    }
    if status != StatusCode::OK {
        if !args.json {
            eprintln!(
                "error: {} ({})",
                answer["error"].as_str().unwrap_or("refused"),
                status
            );
            if !answer["detail"].is_null() {
                eprintln!("detail: {}", answer["detail"]);
            }
        }
        return Ok(ExitCode::FAILURE);
    }
    if !args.json {
        match &args.command {
            AdminCommand::Status => print_status(&answer),
            _ => print_change(&answer),
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn post(route: &str, action: &str, args: &AdminArgs) -> (Method, String, Option<Value>) {
    (
        Method::POST,
        format!("/v1/routes/{route}/{action}"),
        Some(json!({"reason": args.reason})),
    )
}

fn print_status(answer: &Value) {
    println!("generation {}", answer["generation"]);
    println!(
        "{:<16} {:<20} {:<28} {:<28} {:>8}",
        "route", "state", "stable", "candidate", "weight"
    );
    for r in answer["routes"].as_array().into_iter().flatten() {
        println!(
            "{:<16} {:<20} {:<28} {:<28} {:>8}",
            r["name"].as_str().unwrap_or(""),
            state(r),
            r["stable"].as_str().unwrap_or(""),
            r["candidate"].as_str().unwrap_or("-"),
            r["weight_percent"].as_str().unwrap_or(""),
        );
    }
}

/// A route's `state`, and its pause when the state does not say it: a rolled-back route can be
/// paused too, and the pause is what holds off the canary controller once a weight is set again.
fn state(route: &Value) -> String {
    let state = route["state"].as_str().unwrap_or("");
    if route["paused"] == json!(true) && state != "paused" {
        format!("{state}, paused")
    } else {
        state.to_string()
    }
}

fn print_change(answer: &Value) {
    let generation = &answer["generation"];
    let changed = if answer["changed"] == json!(true) {
        "changed"
    } else {
        "no change"
    };
    match answer["route"].as_object() {
        Some(r) => println!(
            "route {}: {} — stable {}, candidate {}, weight {} (generation {generation}, {changed})",
            r["name"].as_str().unwrap_or(""),
            state(&answer["route"]),
            r["stable"].as_str().unwrap_or(""),
            r["candidate"].as_str().unwrap_or("-"),
            r["weight_percent"].as_str().unwrap_or(""),
        ),
        None => println!("generation {generation} ({changed})"),
    }
    for note in answer["notes"].as_array().into_iter().flatten() {
        println!("  {}", note.as_str().unwrap_or(""));
    }
}
