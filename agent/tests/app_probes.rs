//! The app's probes through the real `meshd-agent run`: the agent is started in token
//! mode against a meshd that is not there (so it waits for its first certificate and
//! never starts Envoy), with probes for apps this test serves on loopback; the test
//! asks the agent's health port as the kubelet would.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;

const AGENT: &str = env!("CARGO_BIN_EXE_meshd-agent");

/// The agent process, killed when the test ends.
struct Agent {
    child: Child,
    health: String,
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts the agent with `probes` as MESHD_AGENT_APP_PROBES; its health port is the one
/// its start line names.
fn start_agent(dir: &tempfile::TempDir, probes: &str) -> Agent {
    let claims = r#"{"kubernetes.io":{"namespace":"shop","pod":{"name":"web-1"},"serviceaccount":{"name":"web"}}}"#;
    let token = format!("e30.{}.c2ln", URL_SAFE_NO_PAD.encode(claims));
    std::fs::write(dir.path().join("token"), token).unwrap();
    let root = rcgen::generate_simple_self_signed(vec!["meshd.invalid".into()]).unwrap();
    std::fs::write(dir.path().join("bundle.pem"), root.cert.pem()).unwrap();
    let nothing = TcpListener::bind("127.0.0.1:0").unwrap();
    let meshd = nothing.local_addr().unwrap().to_string();
    drop(nothing);
    let mut child = Command::new(AGENT)
        .arg("run")
        .arg("--token-file")
        .arg(dir.path().join("token"))
        .arg("--trust-bundle")
        .arg(dir.path().join("bundle.pem"))
        .arg("--dir")
        .arg(dir.path().join("agent"))
        .args(["--xds-address", &meshd, "--health-address", "127.0.0.1:0"])
        .env("MESHD_AGENT_APP_PROBES", probes)
        .env("MESHD_AGENT_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            eprintln!("agent: {line}");
            if let Some(at) = line.find(" health=") {
                let addr = line[at + 8..].split_whitespace().next().unwrap();
                let _ = tx.send(addr.to_string());
            }
        }
    });
    let health = rx
        .recv_timeout(Duration::from_secs(10))
        .expect("the agent did not say where its health port is");
    Agent { child, health }
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
    let status = response[9..12].parse().unwrap();
    let body = response.split_once("\r\n\r\n").unwrap().1.to_string();
    (status, body)
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
