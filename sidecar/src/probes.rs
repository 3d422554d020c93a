//! App probes through the agent, the part the injector and the agent share.
//!
//! Under STRICT mTLS the kubelet's plaintext probes cannot reach the app through Envoy,
//! and with transparent capture they would be captured. So the injector rewrites every
//! liveness, readiness and startup probe of the app's containers into an HTTP GET of the
//! agent's health port ([`crate::capture::AGENT_HEALTH_PORT`], never captured) at
//! [`path`]`(container, kind)`, and hands the agent the original probes in the
//! environment variable [`ENV`] as the JSON of [`AppProbes`]. The agent performs the
//! original probe on the pod's loopback (HTTP GET, TCP connect or gRPC health check,
//! within the original timeout) and answers the kubelet with its outcome: the app's own
//! HTTP status for an HTTP probe, 200 or 503 for TCP and gRPC. The originals are also kept
//! on the pod in [`ORIGINAL_PROBES_ANNOTATION`], for people and for `kubectl`.
//!
//! Named ports are resolved by the injector (against the container's `ports`), so the
//! agent only ever sees numbers.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

/// The agent's environment variable holding [`AppProbes`] as JSON.
pub const ENV: &str = "MESHD_AGENT_APP_PROBES";
/// The pod annotation with the original probes (the same JSON as [`ENV`]).
pub const ORIGINAL_PROBES_ANNOTATION: &str = "meshd.io/original-probes";
/// Every rewritten probe's path starts with this.
pub const PATH_PREFIX: &str = "/app-health/";

/// Which of a container's probes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProbeKind {
    Liveness,
    Readiness,
    Startup,
}

impl ProbeKind {
    pub const ALL: [ProbeKind; 3] = [
        ProbeKind::Liveness,
        ProbeKind::Readiness,
        ProbeKind::Startup,
    ];

    /// The last segment of the rewritten path.
    pub fn segment(self) -> &'static str {
        match self {
            ProbeKind::Liveness => "livez",
            ProbeKind::Readiness => "readyz",
            ProbeKind::Startup => "startupz",
        }
    }
}

impl fmt::Display for ProbeKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.segment())
    }
}

/// The agent's path for `container`'s probe of `kind`: `/app-health/<container>/<kind>`.
/// Container names are DNS labels, so the path needs no escaping.
pub fn path(container: &str, kind: ProbeKind) -> String {
    format!("{PATH_PREFIX}{container}/{}", kind.segment())
}

/// The original probes, by rewritten path ([`path`]).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct AppProbes(pub BTreeMap<String, AppProbe>);

impl AppProbes {
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn get(&self, path: &str) -> Option<&AppProbe> {
        self.0.get(path)
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("probes serialise")
    }

    /// Parses [`ENV`]'s value; the error says what is wrong with it.
    pub fn from_json(text: &str) -> Result<AppProbes, serde_json::Error> {
        serde_json::from_str(text)
    }
}

/// One original probe: what to check and how long the kubelet allowed for it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AppProbe {
    pub check: Check,
    /// The probe's `timeoutSeconds` (Kubernetes' default: 1).
    pub timeout_seconds: u32,
}

/// What the agent does for a probe, on the pod's loopback.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Check {
    /// GET `scheme://127.0.0.1:port/path` (or `host` if the probe named one) with the
    /// probe's headers; HTTPS does not verify the app's certificate, as the kubelet does
    /// not. Status 200–399 passes, and is what the kubelet sees.
    HttpGet {
        port: u16,
        path: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        host: Option<String>,
        scheme: HttpScheme,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        headers: Vec<Header>,
    },
    /// A TCP connection to `127.0.0.1:port` (or `host`) passes.
    TcpSocket {
        port: u16,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        host: Option<String>,
    },
    /// `grpc.health.v1.Health/Check` on `127.0.0.1:port` for `service` ("" = the
    /// server as a whole); SERVING passes.
    Grpc {
        port: u16,
        #[serde(default)]
        service: String,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum HttpScheme {
    Http,
    Https,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Header {
    pub name: String,
    pub value: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_name_the_container_and_the_probe() {
        assert_eq!(path("app", ProbeKind::Readiness), "/app-health/app/readyz");
        assert_eq!(
            path("web-1", ProbeKind::Liveness),
            "/app-health/web-1/livez"
        );
        assert_eq!(path("x", ProbeKind::Startup), "/app-health/x/startupz");
    }

    #[test]
    fn the_json_round_trips_and_reads_like_the_pod_spec() {
        let mut probes = AppProbes::default();
        probes.0.insert(
            path("app", ProbeKind::Readiness),
            AppProbe {
                check: Check::HttpGet {
                    port: 8080,
                    path: "/healthz".into(),
                    host: None,
                    scheme: HttpScheme::Http,
                    headers: vec![Header {
                        name: "X-Probe".into(),
                        value: "1".into(),
                    }],
                },
                timeout_seconds: 1,
            },
        );
        probes.0.insert(
            path("app", ProbeKind::Liveness),
            AppProbe {
                check: Check::TcpSocket {
                    port: 8080,
                    host: None,
                },
                timeout_seconds: 2,
            },
        );
        probes.0.insert(
            path("grpc", ProbeKind::Startup),
            AppProbe {
                check: Check::Grpc {
                    port: 9090,
                    service: String::new(),
                },
                timeout_seconds: 3,
            },
        );
        let json = probes.to_json();
        assert!(
            json.contains(r#""/app-health/app/readyz":{"check":{"httpGet":{"port":8080,"path":"/healthz","scheme":"HTTP","headers":[{"name":"X-Probe","value":"1"}]}},"timeoutSeconds":1}"#),
            "{json}"
        );
        assert!(
            json.contains(r#"{"check":{"tcpSocket":{"port":8080}},"timeoutSeconds":2}"#),
            "{json}"
        );
        assert_eq!(AppProbes::from_json(&json).unwrap(), probes);
    }

    #[test]
    fn a_bad_value_says_what_is_wrong() {
        let err = AppProbes::from_json(
            r#"{"/app-health/a/livez":{"check":{"exec":{}},"timeoutSeconds":1}}"#,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("exec"), "{err}");
    }
}
