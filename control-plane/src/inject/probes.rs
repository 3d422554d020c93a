//! The app's probes through the agent (`meshd_sidecar::probes` holds the contract).
//!
//! Every HTTP, TCP and gRPC probe of an app container (and of a sidecar of the app's own,
//! an init container with `restartPolicy: Always`) becomes an HTTP GET of the agent's
//! health port at `/app-health/<container>/<kind>`; its timings stay as they were. The
//! original goes to the agent, with a named port resolved against the container's own
//! ports. `exec` probes run inside the container and need nothing.

use k8s_openapi::api::core::v1::{Container, HTTPGetAction, Probe};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use meshd_sidecar::capture::AGENT_HEALTH_PORT;
use meshd_sidecar::probes::{self, AppProbe, AppProbes, Check, Header, HttpScheme, ProbeKind};

use crate::sources::convert::FieldError;

/// Rewrites `container`'s probes (at `field`, e.g. `spec.containers[0]`), adding the
/// originals to `out`.
pub fn rewrite(
    container: &mut Container,
    field: &str,
    out: &mut AppProbes,
) -> Result<(), FieldError> {
    let name = container.name.clone();
    let ports = container.ports.clone().unwrap_or_default();
    for kind in ProbeKind::ALL {
        let slot = match kind {
            ProbeKind::Liveness => &mut container.liveness_probe,
            ProbeKind::Readiness => &mut container.readiness_probe,
            ProbeKind::Startup => &mut container.startup_probe,
        };
        let Some(probe) = slot.as_mut() else { continue };
        let probe_field = format!("{field}.{}", field_name(kind));
        let Some(check) = original(probe, &probe_field, &ports)? else {
            continue;
        };
        let path = probes::path(&name, kind);
        out.0.insert(
            path.clone(),
            AppProbe {
                check,
                timeout_seconds: probe
                    .timeout_seconds
                    .and_then(|t| u32::try_from(t).ok())
                    .filter(|t| *t > 0)
                    .unwrap_or(1),
            },
        );
        probe.http_get = Some(HTTPGetAction {
            path: Some(path),
            port: IntOrString::Int(i32::from(AGENT_HEALTH_PORT)),
            scheme: Some("HTTP".into()),
            ..Default::default()
        });
        probe.tcp_socket = None;
        probe.grpc = None;
    }
    Ok(())
}

fn field_name(kind: ProbeKind) -> &'static str {
    match kind {
        ProbeKind::Liveness => "livenessProbe",
        ProbeKind::Readiness => "readinessProbe",
        ProbeKind::Startup => "startupProbe",
    }
}

/// What the probe checks, or `None` for one the agent need not perform (exec).
fn original(
    probe: &Probe,
    field: &str,
    ports: &[k8s_openapi::api::core::v1::ContainerPort],
) -> Result<Option<Check>, FieldError> {
    if let Some(get) = &probe.http_get {
        let scheme = match get.scheme.as_deref() {
            None | Some("HTTP") => HttpScheme::Http,
            Some("HTTPS") => HttpScheme::Https,
            Some(other) => {
                return Err(FieldError::new(
                    format!("{field}.httpGet.scheme"),
                    format!("{other:?} is not HTTP or HTTPS"),
                ));
            }
        };
        return Ok(Some(Check::HttpGet {
            port: port(&get.port, &format!("{field}.httpGet.port"), ports)?,
            path: get
                .path
                .clone()
                .filter(|p| !p.is_empty())
                .unwrap_or_else(|| "/".into()),
            host: get.host.clone().filter(|h| !h.is_empty()),
            scheme,
            headers: get
                .http_headers
                .iter()
                .flatten()
                .map(|h| Header {
                    name: h.name.clone(),
                    value: h.value.clone(),
                })
                .collect(),
        }));
    }
    if let Some(tcp) = &probe.tcp_socket {
        return Ok(Some(Check::TcpSocket {
            port: port(&tcp.port, &format!("{field}.tcpSocket.port"), ports)?,
            host: tcp.host.clone().filter(|h| !h.is_empty()),
        }));
    }
    if let Some(grpc) = &probe.grpc {
        return Ok(Some(Check::Grpc {
            port: port(
                &IntOrString::Int(grpc.port),
                &format!("{field}.grpc.port"),
                ports,
            )?,
            service: grpc.service.clone().unwrap_or_default(),
        }));
    }
    Ok(None)
}

fn port(
    value: &IntOrString,
    field: &str,
    ports: &[k8s_openapi::api::core::v1::ContainerPort],
) -> Result<u16, FieldError> {
    let number = match value {
        IntOrString::Int(n) => *n,
        IntOrString::String(name) => match name.parse::<i32>() {
            Ok(n) => n,
            Err(_) => ports
                .iter()
                .find(|p| p.name.as_deref() == Some(name.as_str()))
                .map(|p| p.container_port)
                .ok_or_else(|| {
                    FieldError::new(
                        field,
                        format!("the container declares no port named {name:?}"),
                    )
                })?,
        },
    };
    u16::try_from(number)
        .ok()
        .filter(|n| *n > 0)
        .ok_or_else(|| FieldError::new(field, format!("{number} is not a port (1-65535)")))
}
