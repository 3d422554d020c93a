//! `meshd-agent run` for tests that ask its health port: token mode against a meshd that
//! is not there, so the agent waits for its first certificate (and never starts Envoy)
//! while its health port answers.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, mpsc};
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;

pub const AGENT: &str = env!("CARGO_BIN_EXE_meshd-agent");

/// The agent process, killed when the test ends.
pub struct Agent {
    child: Child,
    /// Where its health port is, as its start line names it.
    pub health: String,
    log: Arc<Mutex<Vec<String>>>,
}

impl Agent {
    /// The lines of its log so far that contain `text`.
    pub fn log_lines(&self, text: &str) -> Vec<String> {
        let log = self.log.lock().unwrap();
        log.iter().filter(|l| l.contains(text)).cloned().collect()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Adds `run` and its arguments to `command` (the agent, or what runs it): a pod-bound
/// token and a trust bundle written into `dir`, the agent's own directory in it, `meshd`
/// as the xDS address, the health port on 127.0.0.1:0 and `probes` as
/// MESHD_AGENT_APP_PROBES; then starts it.
pub fn start(mut command: Command, dir: &Path, meshd: &str, probes: &str) -> Agent {
    let claims = r#"{"kubernetes.io":{"namespace":"shop","pod":{"name":"web-1"},"serviceaccount":{"name":"web"}}}"#;
    let token = format!("e30.{}.c2ln", URL_SAFE_NO_PAD.encode(claims));
    std::fs::write(dir.join("token"), token).unwrap();
    let root = rcgen::generate_simple_self_signed(vec!["meshd.invalid".into()]).unwrap();
    std::fs::write(dir.join("bundle.pem"), root.cert.pem()).unwrap();
    let mut child = command
        .arg("run")
        .arg("--token-file")
        .arg(dir.join("token"))
        .arg("--trust-bundle")
        .arg(dir.join("bundle.pem"))
        .arg("--dir")
        .arg(dir.join("agent"))
        .args(["--xds-address", meshd, "--health-address", "127.0.0.1:0"])
        .env("MESHD_AGENT_APP_PROBES", probes)
        .env("MESHD_AGENT_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = mpsc::channel();
    let log = Arc::new(Mutex::new(Vec::new()));
    let lines = log.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            eprintln!("agent: {line}");
            lines.lock().unwrap().push(line.clone());
            if let Some(at) = line.find(" health=") {
                let addr = line[at + 8..].split_whitespace().next().unwrap();
                let _ = tx.send(addr.to_string());
            }
        }
    });
    let health = rx
        .recv_timeout(Duration::from_secs(10))
        .expect("the agent did not say where its health port is");
    Agent { child, health, log }
}

/// (status, body) of an HTTP/1.1 response as read off the wire.
pub fn parse_response(response: &str) -> (u16, String) {
    let status = response
        .get(9..12)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP response: {response:?}"));
    let body = response.split_once("\r\n\r\n").unwrap().1.to_string();
    (status, body)
}
