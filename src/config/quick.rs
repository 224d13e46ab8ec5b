//! Quick mode: a one-route configuration from command-line flags, no file needed.
//!
//! SPEC is `URL[,URL...]` or `MODEL@VERSION=URL[,URL...]`; an unnamed stable is `default@stable`
//! and an unnamed candidate `default@candidate`.

use std::path::PathBuf;

use http::HeaderName;

use super::file::parse_backend_url;
use super::units::parse_percent;
use super::*;

/// The flags of `weir serve` without `--config`.
#[derive(Clone, Debug, Default)]
pub struct QuickMode {
    pub stable: String,
    pub candidate: Option<String>,
    pub weight: Option<String>,
    pub sticky_header: Option<String>,
    pub allow_override: bool,
    pub listen: Option<String>,
    pub admin: Option<String>,
    pub state_dir: Option<PathBuf>,
    pub registry: Option<PathBuf>,
    /// `PATH#POINTER`, e.g. `/v1/models#/data/0/id`.
    pub identity_probe: Option<String>,
    pub identity_interval: Option<String>,
    /// Share of stable-routed requests shadowed to the candidate.
    pub mirror: Option<String>,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    pub tls_client_ca: Option<PathBuf>,
    /// `10%,50%,100%`: canary steps.
    pub canary: Option<String>,
    pub canary_interval: Option<String>,
    pub canary_min_requests: Option<u64>,
    /// `http1` (default), `http2` or `auto`, for every version.
    pub backend_protocol: Option<String>,
    /// MLflow tracking server whose aliases pin the route (with `mlflow_model`).
    pub mlflow: Option<String>,
    /// The registered model whose `champion` and `challenger` aliases are stable and candidate.
    pub mlflow_model: Option<String>,
}

#[derive(Debug, thiserror::Error)]
#[error("{flag}: {message}")]
pub struct QuickSpecError {
    pub flag: &'static str,
    pub message: String,
}

fn flag_error(flag: &'static str) -> impl Fn(String) -> QuickSpecError {
    move |message| QuickSpecError { flag, message }
}

impl QuickMode {
    pub fn into_config(self) -> Result<Config, QuickSpecError> {
        let mlflow = self.mlflow()?;
        let (mut stable, mut candidate) = match &mlflow {
            Some(_) => self.mlflow_versions()?,
            None => self.versions()?,
        };
        if let Some(text) = &self.backend_protocol {
            let protocol =
                BackendProtocol::parse(text).map_err(flag_error("--backend-protocol"))?;
            for v in stable.iter_mut().chain(candidate.iter_mut()) {
                v.protocol = protocol;
            }
        }
        // With MLflow, the candidate is whatever the challenger alias names.
        let has_candidate = candidate.is_some() || mlflow.is_some();
        let weight = percent_flag(self.weight.as_deref(), "--weight")?;
        if weight > 0 && !has_candidate {
            return Err(flag_error("--weight")(
                "a weight above 0 needs --candidate".to_string(),
            ));
        }
        let sticky = self.sticky()?;
        let mirror = percent_flag(self.mirror.as_deref(), "--mirror")?;
        if mirror > 0 && !has_candidate {
            return Err(flag_error("--mirror")(
                "mirroring needs --candidate".to_string(),
            ));
        }
        let canary = self.canary(has_candidate)?;
        let (binding, stable_label, candidate_label) = match mlflow {
            Some((_, binding)) => (Some(binding), String::new(), None),
            None => (
                None,
                stable
                    .as_ref()
                    .map(VersionConfig::label)
                    .unwrap_or_default(),
                candidate.as_ref().map(VersionConfig::label),
            ),
        };
        let route = RouteConfig {
            mlflow: binding,
            canary,
            mirror,
            compare: CompareConfig::default(),
            name: "default".to_string(),
            prefix: "/".to_string(),
            host: None,
            stable: stable_label,
            candidate: candidate_label,
            weight,
            sticky,
            models: Vec::new(),
            model_header: None,
            api: Api::Plain,
            allow_override: self.allow_override,
        };
        let listener = self.listener()?;
        let admin = AdminConfig {
            addr: address_flag(self.admin.as_deref(), DEFAULT_ADMIN, "--admin")?,
            token: None,
            token_file: None,
            tls: None,
        };
        let identity = self.identity()?;
        Ok(Config {
            listener,
            admin,
            proxy: ProxyConfig::default(),
            state_dir: self
                .state_dir
                .unwrap_or_else(|| PathBuf::from(DEFAULT_STATE_DIR)),
            fleet: None,
            versions: stable.into_iter().chain(candidate).collect(),
            routes: vec![route],
            source: None,
            from_flags: true,
            shadow: ShadowConfig::default(),
            registry: self.registry,
            mlflow: self.mlflow.clone().map(MlflowConfig::new),
            mlflow_versions: Vec::new(),
            identity,
        })
    }

    /// `--mlflow URL` with `--mlflow-model NAME`.
    fn mlflow(&self) -> Result<Option<(String, MlflowRoute)>, QuickSpecError> {
        let (url, model) = match (&self.mlflow, &self.mlflow_model) {
            (None, None) => return Ok(None),
            (Some(url), Some(model)) => (url, model),
            (Some(_), None) => {
                return Err(flag_error("--mlflow")(
                    "name the registered model with --mlflow-model NAME".into(),
                ))
            }
            (None, Some(_)) => {
                return Err(flag_error("--mlflow-model")(
                    "needs --mlflow URL (the tracking server)".into(),
                ))
            }
        };
        MlflowConfig::validate_url(url).map_err(flag_error("--mlflow"))?;
        if model.is_empty() {
            return Err(flag_error("--mlflow-model")("the name is empty".into()));
        }
        Ok(Some((
            url.clone(),
            MlflowRoute {
                model: model.clone(),
                stable_alias: MlflowConfig::DEFAULT_STABLE_ALIAS.into(),
                candidate_alias: MlflowConfig::DEFAULT_CANDIDATE_ALIAS.into(),
            },
        )))
    }

    /// With MLflow, `--stable` and `--candidate` only say where named versions are served
    /// (`MODEL@VERSION=URL`); which of them serve is the aliases' to say. Versions without one
    /// take their backends from their `weir.backends` tag.
    fn mlflow_versions(
        &self,
    ) -> Result<(Option<VersionConfig>, Option<VersionConfig>), QuickSpecError> {
        let named = |spec: &Option<String>, flag: &'static str| {
            spec.as_deref()
                .map(|s| {
                    if !s.contains('=') {
                        return Err(format!(
                            "with --mlflow, name the version: MODEL@VERSION=URL (such as chat@3=http://127.0.0.1:9001), got {s:?}"
                        ));
                    }
                    parse_spec(s, "")
                })
                .transpose()
                .map_err(flag_error(flag))
        };
        let stable = named(
            &Some(self.stable.clone()).filter(|s| !s.is_empty()),
            "--stable",
        )?;
        let candidate = named(&self.candidate, "--candidate")?;
        Ok((stable, candidate))
    }

    /// `--stable` and `--candidate`, named apart.
    fn versions(&self) -> Result<(Option<VersionConfig>, Option<VersionConfig>), QuickSpecError> {
        let stable = parse_spec(&self.stable, "default@stable").map_err(flag_error("--stable"))?;
        let candidate = self
            .candidate
            .as_deref()
            .map(|s| parse_spec(s, "default@candidate"))
            .transpose()
            .map_err(flag_error("--candidate"))?;
        if let Some(c) = &candidate {
            if c.label() == stable.label() {
                return Err(flag_error("--candidate")(format!(
                    "{} is also the stable version; name them apart as MODEL@VERSION=URL",
                    c.label()
                )));
            }
        }
        Ok((Some(stable), candidate))
    }

    fn sticky(&self) -> Result<Option<StickyKey>, QuickSpecError> {
        self.sticky_header
            .as_deref()
            .map(|h| {
                HeaderName::try_from(h)
                    .map(StickyKey::Header)
                    .map_err(|_| format!("{h:?} is not a valid header name"))
            })
            .transpose()
            .map_err(flag_error("--sticky-header"))
    }

    /// `--canary STEPS` with `--canary-interval` and `--canary-min-requests`.
    fn canary(&self, has_candidate: bool) -> Result<Option<CanaryPolicy>, QuickSpecError> {
        let Some(spec) = &self.canary else {
            return Ok(None);
        };
        let steps = spec
            .split(',')
            .map(|s| parse_percent(s.trim()))
            .collect::<Result<Vec<u16>, _>>()
            .map_err(flag_error("--canary"))?;
        if steps.is_empty() || steps.windows(2).any(|w| w[0] >= w[1]) || steps[0] == 0 {
            return Err(flag_error("--canary")(format!(
                "steps must rise, each above 0%, such as 10%,50%,100%; got {spec:?}"
            )));
        }
        if !has_candidate {
            return Err(flag_error("--canary")(
                "a canary needs --candidate".to_string(),
            ));
        }
        let mut policy = CanaryPolicy::with_steps(steps);
        if let Some(interval) = &self.canary_interval {
            policy.interval =
                super::units::parse_duration(interval).map_err(flag_error("--canary-interval"))?;
        }
        if let Some(n) = self.canary_min_requests {
            policy.min_requests = n;
        }
        policy.progress_deadline = policy.progress_deadline.max(policy.interval * 10);
        Ok(Some(policy))
    }

    /// `--listen` and the listener's TLS (`--tls-cert`, `--tls-key`, `--tls-client-ca`).
    fn listener(&self) -> Result<ListenerConfig, QuickSpecError> {
        let addr = address_flag(self.listen.as_deref(), DEFAULT_LISTEN, "--listen")?;
        let tls = match (&self.tls_cert, &self.tls_key) {
            (Some(cert), Some(key)) => Some(TlsConfig {
                cert: cert.clone(),
                key: key.clone(),
                client_ca: self.tls_client_ca.clone(),
            }),
            (None, None) => None,
            _ => {
                return Err(flag_error("--tls-cert")(
                    "--tls-cert and --tls-key go together".to_string(),
                ))
            }
        };
        Ok(ListenerConfig {
            addr,
            header_read_timeout: DEFAULT_HEADER_READ_TIMEOUT,
            max_request_body: DEFAULT_MAX_REQUEST_BODY,
            limits: ConnLimits::default(),
            http1_fast_path: true,
            max_body_scan: DEFAULT_MAX_BODY_SCAN,
            models_endpoint: ModelsEndpoint::Auto,
            tls,
        })
    }

    /// `--identity-probe` with `--identity-interval`.
    fn identity(&self) -> Result<Option<IdentityProbe>, QuickSpecError> {
        let Some(spec) = &self.identity_probe else {
            return Ok(None);
        };
        let interval = match &self.identity_interval {
            None => IdentityProbe::DEFAULT_INTERVAL,
            Some(text) => {
                super::units::parse_duration(text).map_err(flag_error("--identity-interval"))?
            }
        };
        IdentityProbe::parse(spec, interval, IdentityProbe::DEFAULT_TIMEOUT)
            .map(Some)
            .map_err(flag_error("--identity-probe"))
    }
}

/// A percentage flag (`5%`, `0.5%`); absent: 0.
fn percent_flag(value: Option<&str>, flag: &'static str) -> Result<u16, QuickSpecError> {
    value.map_or(Ok(0), |v| parse_percent(v).map_err(flag_error(flag)))
}

/// An address flag (`host:port`), or its default.
fn address_flag(
    text: Option<&str>,
    default: &str,
    flag: &'static str,
) -> Result<SocketAddr, QuickSpecError> {
    let text = text.unwrap_or(default);
    text.parse::<SocketAddr>().map_err(|_| QuickSpecError {
        flag,
        message: format!("expected an address with a port such as \"{default}\", got {text:?}"),
    })
}

/// Parses `URL[,URL...]` or `MODEL@VERSION=URL[,URL...]`.
fn parse_spec(spec: &str, unnamed: &str) -> Result<VersionConfig, String> {
    let (label, urls) = match spec.split_once('=') {
        Some((label, urls)) => (label.trim(), urls),
        None => (unnamed, spec),
    };
    let Some((model, version)) = label.split_once('@') else {
        return Err(format!(
            "expected MODEL@VERSION before '=', got {label:?} (for example chat@2024-06-01=http://127.0.0.1:9000)"
        ));
    };
    if model.is_empty() || version.is_empty() || version.contains('@') {
        return Err(format!("expected MODEL@VERSION, got {label:?}"));
    }
    if version.eq_ignore_ascii_case("latest") {
        return Err(
            "\"latest\" is not a version: pin an explicit version so a restart cannot change what is served"
                .to_string(),
        );
    }
    let backends = urls
        .split(',')
        .map(|u| parse_backend_url(u.trim()))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(VersionConfig {
        model: model.to_string(),
        version: version.to_string(),
        backends,
        balance: Balance::RoundRobin,
        protocol: BackendProtocol::Http1,
        from_registry: false,
        served_model: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn named_and_unnamed_specs() {
        let config = QuickMode {
            stable: "http://127.0.0.1:9001".into(),
            candidate: Some("chat@v2=http://127.0.0.1:9002,http://127.0.0.1:9003".into()),
            weight: Some("0.5%".into()),
            ..Default::default()
        }
        .into_config()
        .unwrap();
        assert_eq!(config.routes[0].stable, "default@stable");
        assert_eq!(config.routes[0].candidate.as_deref(), Some("chat@v2"));
        assert_eq!(config.routes[0].weight, 50);
        assert_eq!(config.versions[1].backends.len(), 2);
        assert_eq!(config.listener.addr.to_string(), DEFAULT_LISTEN);
    }

    #[test]
    fn bad_specs_name_the_flag() {
        let err = QuickMode {
            stable: "chat=http://x:1".into(),
            ..Default::default()
        }
        .into_config()
        .unwrap_err();
        assert_eq!(err.flag, "--stable");
        let err = QuickMode {
            stable: "http://127.0.0.1:1".into(),
            weight: Some("5%".into()),
            ..Default::default()
        }
        .into_config()
        .unwrap_err();
        assert_eq!(err.flag, "--weight");
    }
}
