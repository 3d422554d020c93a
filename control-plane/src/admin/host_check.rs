//! DNS rebinding: a web page whose name an attacker points at 127.0.0.1 can send
//! requests to a loopback port, but its requests carry the attacker's name in `Host`.
//! A port listening on loopback therefore answers only requests whose `Host` is a
//! loopback name or address (any port: `kubectl port-forward` and SSH tunnels pick
//! their own), and refuses the rest with 421 Misdirected Request. A port on another
//! address is reached by names meshd cannot know (the pod IP, a Service name), so it
//! does not check.

use axum::extract::{Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use crate::logging::Escaped;

/// The middleware: `loopback` says whether the port listens on a loopback address.
/// Use as `middleware::from_fn_with_state(addr.ip().is_loopback(), check)`.
pub async fn check(State(loopback): State<bool>, req: Request, next: Next) -> Response {
    if loopback {
        let host = req
            .headers()
            .get(header::HOST)
            .map(|h| String::from_utf8_lossy(h.as_bytes()).into_owned())
            .or_else(|| req.uri().authority().map(|a| a.to_string()));
        if let Some(host) = host.filter(|h| !is_loopback_host(h)) {
            tracing::debug!(host = %Escaped(&host), "refused a request for another host");
            return (
                StatusCode::MISDIRECTED_REQUEST,
                "this port answers only requests for localhost\n",
            )
                .into_response();
        }
    }
    next.run(req).await
}

/// `localhost`, `127.0.0.1` (any of 127/8), `[::1]`, with or without a port.
fn is_loopback_host(host: &str) -> bool {
    let name = match host.strip_prefix('[') {
        Some(rest) => rest.split(']').next().unwrap_or(""),
        None => host.rsplit_once(':').map_or(host, |(name, _)| name),
    };
    let name = name.trim_end_matches('.');
    name.eq_ignore_ascii_case("localhost")
        || name
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

#[cfg(test)]
mod tests {
    use super::is_loopback_host;

    #[test]
    fn only_loopback_names_pass() {
        for ok in [
            "localhost",
            "localhost:15014",
            "LOCALHOST.",
            "127.0.0.1:9000",
            "127.1.2.3",
            "[::1]:15014",
            "[::1]",
        ] {
            assert!(is_loopback_host(ok), "{ok}");
        }
        for bad in [
            "attacker.example",
            "attacker.example:15014",
            "localhost.attacker.example",
            "10.0.0.1:15014",
            "[::2]:1",
            "",
        ] {
            assert!(!is_loopback_host(bad), "{bad}");
        }
    }
}
