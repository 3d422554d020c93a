//! Kubernetes API objects (`k8s-openapi` types) → model objects.
//!
//! Each function checks what the model relies on and returns a [`FieldError`] that names
//! the offending field by its path in the object, e.g. `spec.ports[1].port`.

use std::collections::BTreeMap;
use std::net::IpAddr;

use k8s_openapi::api::core::v1 as core;
use k8s_openapi::api::discovery::v1 as discovery;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::{
    APP_PORTS_ANNOTATION, CAPTURE_ANNOTATION, EGRESS_PORT_ANNOTATION, SCOPE_ANNOTATION,
    UPSTREAMS_ANNOTATION,
};
use crate::model::{
    Capture, ContainerPort, Egress, EndpointSlice, EndpointSlicePort, Namespace, ObjectKey,
    Protocol, ScopeEntry, Service, ServicePort, SliceEndpoint, TargetPort, Upstream, Workload,
};

/// A field of an object that is missing or wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct FieldError {
    /// Path of the field in the object, e.g. `spec.ports[0].port`.
    pub field: String,
    pub message: String,
}

impl FieldError {
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            message: message.into(),
        }
    }
}

type Result<T> = std::result::Result<T, FieldError>;

const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// The object's key; a missing namespace means `default`, as with `kubectl apply`.
pub fn object_key(meta: &ObjectMeta) -> Result<ObjectKey> {
    let name = meta
        .name
        .as_deref()
        .filter(|n| !n.is_empty())
        .ok_or_else(|| FieldError::new("metadata.name", "is required"))?;
    let namespace = meta.namespace.as_deref().unwrap_or("default");
    Ok(ObjectKey::new(namespace, name))
}

pub fn namespace(ns: &core::Namespace) -> Result<Namespace> {
    let key = object_key(&ns.metadata)?;
    Ok(Namespace {
        name: key.name,
        labels: ns.metadata.labels.clone().unwrap_or_default(),
    })
}

pub fn service(svc: &core::Service) -> Result<Service> {
    let key = object_key(&svc.metadata)?;
    let spec = svc
        .spec
        .as_ref()
        .ok_or_else(|| FieldError::new("spec", "is required"))?;
    let cluster_ip = match spec.cluster_ip.as_deref() {
        None | Some("") | Some("None") => None,
        Some(ip) => Some(parse_ip("spec.clusterIP", ip)?),
    };
    let mut ports: Vec<ServicePort> = Vec::new();
    for (i, p) in spec.ports.iter().flatten().enumerate() {
        let field = |f: &str| format!("spec.ports[{i}].{f}");
        // UDP and SCTP are not carried by the mesh; such ports are simply not meshed.
        if let Some(proto) = p.protocol.as_deref().filter(|p| *p != "TCP") {
            tracing::debug!(service = %key, port = p.port, protocol = proto, "port not meshed");
            continue;
        }
        let port = port_number(&field("port"), p.port)?;
        if ports.iter().any(|q| q.port == port) {
            return Err(FieldError::new(
                field("port"),
                format!("port {port} is listed twice"),
            ));
        }
        let target_port = match &p.target_port {
            None => TargetPort::Number(port),
            Some(IntOrString::Int(n)) => TargetPort::Number(port_number(&field("targetPort"), *n)?),
            Some(IntOrString::String(s)) if s.is_empty() => {
                return Err(FieldError::new(field("targetPort"), "must not be empty"));
            }
            Some(IntOrString::String(s)) => match s.parse::<i32>() {
                Ok(n) => TargetPort::Number(port_number(&field("targetPort"), n)?),
                Err(_) => TargetPort::Named(s.clone()),
            },
        };
        if spec.ports.as_ref().is_some_and(|all| all.len() > 1)
            && p.name.as_deref().unwrap_or("").is_empty()
        {
            return Err(FieldError::new(
                field("name"),
                "is required when a service has more than one port",
            ));
        }
        ports.push(ServicePort {
            name: p.name.clone().filter(|n| !n.is_empty()),
            port,
            target_port,
            protocol: protocol(p.app_protocol.as_deref(), p.name.as_deref()),
        });
    }
    Ok(Service {
        key,
        cluster_ip,
        ports,
        selector: spec.selector.clone().filter(|s| !s.is_empty()),
    })
}

/// The protocol of a port, from `appProtocol` or else the Istio-style name prefix
/// (`http-`, `http2-`, `grpc-`). Anything unknown is TCP: bytes pass unchanged.
pub fn protocol(app_protocol: Option<&str>, name: Option<&str>) -> Protocol {
    let by_app = match app_protocol.map(str::to_ascii_lowercase).as_deref() {
        Some("http") => Some(Protocol::Http),
        Some("http2" | "kubernetes.io/h2c") => Some(Protocol::Http2),
        Some("grpc") => Some(Protocol::Grpc),
        Some(_) => Some(Protocol::Tcp),
        None => None,
    };
    if let Some(p) = by_app {
        return p;
    }
    let name = name.unwrap_or("").to_ascii_lowercase();
    let prefix = name.split('-').next().unwrap_or("");
    match prefix {
        "http" => Protocol::Http,
        "http2" => Protocol::Http2,
        "grpc" => Protocol::Grpc,
        _ => Protocol::Tcp,
    }
}

pub fn endpoint_slice(slice: &discovery::EndpointSlice) -> Result<EndpointSlice> {
    let key = object_key(&slice.metadata)?;
    let service = slice
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(SERVICE_NAME_LABEL))
        .filter(|s| !s.is_empty())
        .ok_or_else(|| {
            FieldError::new(
                format!("metadata.labels[\"{SERVICE_NAME_LABEL}\"]"),
                "is required: it names the service this slice belongs to",
            )
        })?
        .clone();
    if !matches!(slice.address_type.as_str(), "IPv4" | "IPv6") {
        return Err(FieldError::new(
            "addressType",
            format!("must be IPv4 or IPv6, not {:?}", slice.address_type),
        ));
    }
    let mut ports = Vec::new();
    for (i, p) in slice.ports.iter().flatten().enumerate() {
        let field = format!("ports[{i}].port");
        let n = p
            .port
            .ok_or_else(|| FieldError::new(&field, "is required"))?;
        ports.push(EndpointSlicePort {
            name: p.name.clone().filter(|n| !n.is_empty()),
            port: port_number(&field, n)?,
        });
    }
    let mut endpoints = Vec::new();
    for (i, ep) in slice.endpoints.iter().enumerate() {
        let addresses = ep
            .addresses
            .iter()
            .enumerate()
            .map(|(j, a)| parse_ip(&format!("endpoints[{i}].addresses[{j}]"), a))
            .collect::<Result<Vec<_>>>()?;
        if addresses.is_empty() {
            return Err(FieldError::new(
                format!("endpoints[{i}].addresses"),
                "must list at least one address",
            ));
        }
        let pod = ep
            .target_ref
            .as_ref()
            .filter(|r| r.kind.as_deref() == Some("Pod"))
            .and_then(|r| r.name.clone());
        endpoints.push(SliceEndpoint {
            addresses,
            // Kubernetes: an unset `ready` is to be read as ready.
            ready: ep.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true),
            pod,
        });
    }
    Ok(EndpointSlice {
        key,
        service,
        ports,
        endpoints,
    })
}

pub fn pod(pod: &core::Pod) -> Result<Workload> {
    let key = object_key(&pod.metadata)?;
    let spec = pod
        .spec
        .as_ref()
        .ok_or_else(|| FieldError::new("spec", "is required"))?;
    let mut container_ports = Vec::new();
    for (c, container) in spec.containers.iter().enumerate() {
        for (i, p) in container.ports.iter().flatten().enumerate() {
            container_ports.push(ContainerPort {
                name: p.name.clone().filter(|n| !n.is_empty()),
                port: port_number(
                    &format!("spec.containers[{c}].ports[{i}].containerPort"),
                    p.container_port,
                )?,
            });
        }
    }
    let status = pod.status.as_ref();
    let address = match status.and_then(|s| s.pod_ip.as_deref()) {
        None | Some("") => None,
        Some(ip) => Some(parse_ip("status.podIP", ip)?),
    };
    // A pod written by hand has no conditions: take it as ready. One that reports
    // conditions is ready exactly when its Ready condition is True.
    let ready = match status.and_then(|s| s.conditions.as_ref()) {
        None => true,
        Some(conds) => conds
            .iter()
            .any(|c| c.type_ == "Ready" && c.status == "True"),
    };
    let annotations = pod.metadata.annotations.as_ref();
    let upstreams = match annotations.and_then(|a| a.get(UPSTREAMS_ANNOTATION)) {
        Some(text) => parse_upstreams(text, &key.namespace).map_err(|m| {
            FieldError::new(
                format!("metadata.annotations[\"{UPSTREAMS_ANNOTATION}\"]"),
                m,
            )
        })?,
        None => Vec::new(),
    };
    let app_ports = match annotations.and_then(|a| a.get(APP_PORTS_ANNOTATION)) {
        Some(text) => parse_app_ports(text).map_err(|m| {
            FieldError::new(
                format!("metadata.annotations[\"{APP_PORTS_ANNOTATION}\"]"),
                m,
            )
        })?,
        None => BTreeMap::new(),
    };
    let field = |name: &str| format!("metadata.annotations[\"{name}\"]");
    let egress_port = match annotations.and_then(|a| a.get(EGRESS_PORT_ANNOTATION)) {
        Some(text) => Some(parse_port(text.trim()).ok_or_else(|| {
            FieldError::new(
                field(EGRESS_PORT_ANNOTATION),
                format!("{text:?} is not a port (1-65535)"),
            )
        })?),
        None => None,
    };
    let scope = match annotations.and_then(|a| a.get(SCOPE_ANNOTATION)) {
        Some(text) => {
            Some(parse_scope(text).map_err(|m| FieldError::new(field(SCOPE_ANNOTATION), m))?)
        }
        None => None,
    };
    let capture = match annotations.and_then(|a| a.get(CAPTURE_ANNOTATION)) {
        Some(text) => Capture::parse(text.trim()).ok_or_else(|| {
            FieldError::new(
                field(CAPTURE_ANNOTATION),
                format!("{text:?} is not a capture mode (explicit, transparent)"),
            )
        })?,
        None => Capture::Explicit,
    };
    let egress = match egress_port {
        Some(port) => {
            if capture == Capture::Transparent {
                return Err(FieldError::new(
                    field(EGRESS_PORT_ANNOTATION),
                    "a transparent pod needs no egress port: its app calls services by \
                     their own address (remove the annotation, or set meshd.io/capture: explicit)",
                ));
            }
            if let Some(up) = upstreams.iter().find(|u| u.local_port == port) {
                return Err(FieldError::new(
                    field(EGRESS_PORT_ANNOTATION),
                    format!(
                        "port {port} is already the local port of upstream {}:{}",
                        up.service, up.port
                    ),
                ));
            }
            Some(Egress { port })
        }
        None => {
            if scope.is_some() && capture == Capture::Explicit {
                return Err(FieldError::new(
                    field(SCOPE_ANNOTATION),
                    format!("a scope needs an egress port: set {EGRESS_PORT_ANNOTATION} too"),
                ));
            }
            None
        }
    };
    Ok(Workload {
        key,
        uid: pod.metadata.uid.clone(),
        labels: pod.metadata.labels.clone().unwrap_or_default(),
        service_account: spec
            .service_account_name
            .clone()
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| "default".to_string()),
        address,
        ready,
        container_ports,
        app_ports,
        upstreams,
        egress,
        scope,
        capture,
    })
}

/// `"shop, payments/api, *"`: namespaces, `namespace/service`s, or `*` for the whole
/// mesh, comma-separated.
pub fn parse_scope(text: &str) -> std::result::Result<Vec<ScopeEntry>, String> {
    let mut out = Vec::new();
    for entry in text.split(',').map(str::trim).filter(|e| !e.is_empty()) {
        let valid = |s: &str| {
            !s.is_empty()
                && s.chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        };
        out.push(match entry.split_once('/') {
            _ if entry == "*" => ScopeEntry::All,
            None if valid(entry) => ScopeEntry::Namespace(entry.to_string()),
            Some((ns, svc)) if valid(ns) && valid(svc) => {
                ScopeEntry::Service(ObjectKey::new(ns, svc))
            }
            _ => {
                return Err(format!(
                    "entry {entry:?}: expected a namespace, namespace/service, or *"
                ));
            }
        });
    }
    if out.is_empty() {
        return Err("empty: name at least one namespace, namespace/service, or *".into());
    }
    out.sort();
    out.dedup();
    Ok(out)
}

/// `"web:80=15001, db.data:5432=15002"`: service[.namespace]:port=localPort, comma-separated.
fn parse_upstreams(text: &str, own_namespace: &str) -> std::result::Result<Vec<Upstream>, String> {
    let mut out: Vec<Upstream> = Vec::new();
    for entry in text.split(',').map(str::trim).filter(|e| !e.is_empty()) {
        let bad = |why: &str| {
            format!("entry {entry:?}: {why} (expected service[.namespace]:port=localPort)")
        };
        let (target, local) = entry.split_once('=').ok_or_else(|| bad("missing '='"))?;
        let (host, port) = target
            .trim()
            .rsplit_once(':')
            .ok_or_else(|| bad("missing ':port'"))?;
        let (name, namespace) = host.split_once('.').unwrap_or((host, own_namespace));
        if name.is_empty() || namespace.is_empty() {
            return Err(bad("empty service name or namespace"));
        }
        let port = parse_port(port).ok_or_else(|| bad("service port is not 1-65535"))?;
        let local_port =
            parse_port(local.trim()).ok_or_else(|| bad("local port is not 1-65535"))?;
        if let Some(dup) = out.iter().find(|u| u.local_port == local_port) {
            return Err(bad(&format!(
                "local port {local_port} is already used for {}:{}",
                dup.service, dup.port
            )));
        }
        out.push(Upstream {
            service: ObjectKey::new(namespace, name),
            port,
            local_port,
        });
    }
    Ok(out)
}

/// `"8080=18080, 9090=19090"`: inbound port = app port on 127.0.0.1.
fn parse_app_ports(text: &str) -> std::result::Result<BTreeMap<u16, u16>, String> {
    let mut out = BTreeMap::new();
    for entry in text.split(',').map(str::trim).filter(|e| !e.is_empty()) {
        let bad = || format!("entry {entry:?}: expected inboundPort=appPort, both 1-65535");
        let (from, to) = entry.split_once('=').ok_or_else(bad)?;
        let from = parse_port(from.trim()).ok_or_else(bad)?;
        let to = parse_port(to.trim()).ok_or_else(bad)?;
        out.insert(from, to);
    }
    Ok(out)
}

fn parse_port(s: &str) -> Option<u16> {
    s.parse::<u16>().ok().filter(|p| *p != 0)
}

fn port_number(field: &str, n: i32) -> Result<u16> {
    u16::try_from(n)
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| FieldError::new(field, format!("{n} is not a port number (1-65535)")))
}

fn parse_ip(field: &str, s: &str) -> Result<IpAddr> {
    s.parse()
        .map_err(|_| FieldError::new(field, format!("{s:?} is not an IP address")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn protocol_comes_from_app_protocol_then_name() {
        assert_eq!(protocol(Some("grpc"), Some("tcp-x")), Protocol::Grpc);
        assert_eq!(protocol(Some("kubernetes.io/h2c"), None), Protocol::Http2);
        assert_eq!(protocol(Some("mysql"), Some("http")), Protocol::Tcp);
        assert_eq!(protocol(None, Some("http-web")), Protocol::Http);
        assert_eq!(protocol(None, Some("http")), Protocol::Http);
        assert_eq!(protocol(None, Some("grpc-api")), Protocol::Grpc);
        assert_eq!(protocol(None, Some("httpx")), Protocol::Tcp);
        assert_eq!(protocol(None, None), Protocol::Tcp);
    }

    #[test]
    fn scopes_parse_and_bad_entries_are_named() {
        let scope = parse_scope("shop, payments/api, shop").unwrap();
        assert_eq!(
            scope,
            [
                ScopeEntry::Namespace("shop".into()),
                ScopeEntry::Service(ObjectKey::new("payments", "api")),
            ]
        );
        assert_eq!(parse_scope("*").unwrap(), [ScopeEntry::All]);
        let err = parse_scope("shop, Pay/ments").unwrap_err();
        assert!(err.contains("\"Pay/ments\""), "{err}");
        assert!(parse_scope(" , ").unwrap_err().contains("empty"));
    }

    #[test]
    fn an_egress_port_needs_no_scope_but_a_scope_needs_a_port() {
        let with = |annotations: &[(&str, &str)]| {
            let p: core::Pod = serde_json::from_value(serde_json::json!({
                "metadata": {"name": "client-1", "namespace": "shop",
                             "annotations": annotations.iter().copied().collect::<BTreeMap<_, _>>()},
                "spec": {"containers": [{"name": "app"}]},
            }))
            .unwrap();
            pod(&p)
        };
        let w = with(&[(EGRESS_PORT_ANNOTATION, "15080")]).unwrap();
        assert_eq!(w.egress, Some(Egress { port: 15080 }));
        let e = with(&[(SCOPE_ANNOTATION, "shop")]).unwrap_err();
        assert!(e.to_string().contains("meshd.io/egress-port"), "{e}");
        let e = with(&[
            (EGRESS_PORT_ANNOTATION, "15001"),
            (UPSTREAMS_ANNOTATION, "web:80=15001"),
        ])
        .unwrap_err();
        assert!(e.to_string().contains("already the local port"), "{e}");
    }

    #[test]
    fn upstreams_parse_with_default_namespace() {
        let ups = parse_upstreams("web:80=15001, db.data:5432=15002", "shop").unwrap();
        assert_eq!(ups[0].service, ObjectKey::new("shop", "web"));
        assert_eq!(ups[1].service, ObjectKey::new("data", "db"));
        assert_eq!(ups[1].local_port, 15002);
    }

    #[test]
    fn upstream_errors_name_the_entry() {
        let err = parse_upstreams("web:80=15001, db:x=15002", "shop").unwrap_err();
        assert!(err.contains("\"db:x=15002\""), "{err}");
        let err = parse_upstreams("web:80=15001, db:81=15001", "shop").unwrap_err();
        assert!(err.contains("already used for shop/web:80"), "{err}");
    }
}
