//! The app's probes through the real `meshd-agent run`: the agent is started in token
//! mode against a meshd that is not there (so it waits for its first certificate and
//! never starts Envoy), with probes for apps this test serves on loopback; the test
//! asks the agent's health port as the kubelet would.

mod support;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::Command;
use std::time::Duration;

use support::{AGENT, Agent, parse_response};

/// Starts the agent with `probes`, meshd being a port nothing listens on.
fn start_agent(dir: &tempfile::TempDir, probes: &str) -> Agent {
    let nothing = TcpListener::bind("127.0.0.1:0").unwrap();
    let meshd = nothing.local_addr().unwrap().to_string();
    drop(nothing);
    support::start(Command::new(AGENT), dir.path(), &meshd, probes)
}

/// GET `path` on the health port, as the kubelet does: (status, body).
fn get(agent: &Agent, path: &str) -> (u16, String) {
    let mut tcp = TcpStream::connect(&agent.health).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        tcp,
        "GET {path} HTTP/1.1\r\nHost: {}\r\nUser-Agent: kube-probe/1.33\r\nConnection: close\r\n\r\n",
        agent.health
    )
    .unwrap();
    let mut response = String::new();
    tcp.read_to_string(&mut response).unwrap();
    parse_response(&response)
}

/// A plain HTTP app on loopback: `/fail` is 500, anything else 200.
fn app() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for tcp in listener.incoming() {
            let Ok(mut tcp) = tcp else { continue };
            let mut head = String::new();
            let mut reader = BufReader::new(tcp.try_clone().unwrap());
            while reader.read_line(&mut head).is_ok_and(|n| n > 2) {}
            let status = if head.starts_with("GET /fail ") {
                "500 Internal Server Error"
            } else {
                "200 OK"
            };
            let _ = write!(
                tcp,
                "HTTP/1.1 {status}\r\ncontent-length: 8\r\nconnection: close\r\n\r\napp body"
            );
        }
    });
    port
}

#[test]
fn app_probes_are_answered_while_the_agent_still_waits_for_its_certificate() {
    let app = app();
    let closed = {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let probes = format!(
        r#"{{
        "/app-health/web/livez": {{"check": {{"httpGet": {{"port": {app}, "path": "/healthz", "scheme": "HTTP"}}}}, "timeoutSeconds": 1}},
        "/app-health/web/startupz": {{"check": {{"httpGet": {{"port": {app}, "path": "/fail", "scheme": "HTTP"}}}}, "timeoutSeconds": 1}},
        "/app-health/web/readyz": {{"check": {{"tcpSocket": {{"port": {closed}}}}}, "timeoutSeconds": 1}}
    }}"#
    );
    let dir = tempfile::tempdir().unwrap();
    let agent = start_agent(&dir, &probes);

    // The sidecar itself is not ready: no certificate, no Envoy.
    let (status, body) = get(&agent, "/healthz/ready");
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("waiting for the first certificate"), "{body}");

    let (status, body) = get(&agent, "/app-health/web/livez");
    assert_eq!((status, body.as_str()), (200, "the app answered 200 OK\n"));
    let (status, body) = get(&agent, "/app-health/web/startupz");
    assert_eq!(status, 500, "{body}");
    assert!(!body.contains("app body"), "{body}");
    let (status, body) = get(&agent, "/app-health/web/readyz");
    assert_eq!(status, 503, "{body}");
    assert!(
        body.contains(&format!("TCP 127.0.0.1:{closed}: cannot connect")),
        "{body}"
    );
    // Asked again: still failing, logged once; with the reason, not the app's body.
    assert_eq!(get(&agent, "/app-health/web/readyz").0, 503);
    assert_eq!(get(&agent, "/app-health/web/livez").0, 200);
    std::thread::sleep(Duration::from_millis(300));
    let fails = agent.log_lines("app probe fails");
    assert_eq!(fails.len(), 2, "{fails:#?}");
    assert!(
        fails.iter().any(|l| l
            .contains(r#"path="/app-health/web/startupz" status=500 Internal Server Error"#)
            && l.contains("the app answered 500")),
        "{fails:#?}"
    );
    assert!(
        fails.iter().any(|l| l.contains(r#"path="/app-health/web/readyz""#)
            && l.contains("cannot connect")),
        "{fails:#?}"
    );
    assert!(agent.log_lines("app body").is_empty());

    let (status, body) = get(&agent, "/app-health/db/livez");
    assert_eq!(status, 404, "{body}");
    assert!(
        body.contains(r#"no app probe is configured for "/app-health/db/livez""#),
        "{body}"
    );
}

#[test]
fn bad_app_probes_refuse_the_start_naming_the_variable() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(AGENT)
        .arg("run")
        .args(["--xds-address", "127.0.0.1:1", "--health-address", "127.0.0.1:0"])
        .arg("--dir")
        .arg(dir.path().join("agent"))
        .env(
            "MESHD_AGENT_APP_PROBES",
            r#"{"/app-health/web/livez": {"check": {"httpGet": {"port": 8080}}, "timeoutSeconds": 1}}"#,
        )
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains(
            "MESHD_AGENT_APP_PROBES (--app-probes) is not the JSON of the app's probes: missing field `path`"
        ),
        "{stderr}"
    );
    assert!(!stderr.contains("meshd-agent starting"), "{stderr}");
}
