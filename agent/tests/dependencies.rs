//! meshd-agent runs in every pod: it must never pull in kube (a Kubernetes client and
//! its types) nor the control plane (`meshd`, which holds both and much more).

use std::process::Command;

/// What `cargo tree` prints for a package that must not be there (`meshd v…`, the
/// control plane; `kube v…`, `kube-client v…`, ...).
fn forbidden(line: &str) -> bool {
    let name = line
        .trim_start_matches(|c: char| !c.is_ascii_alphanumeric())
        .split(' ')
        .next()
        .unwrap_or_default();
    name == "meshd" || name == "kube" || name.starts_with("kube-") || name == "k8s-openapi"
}

#[test]
fn the_agent_depends_on_neither_kube_nor_the_control_plane() {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let out = Command::new(cargo)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .args(["tree", "-p", "meshd-agent", "-e", "normal", "--offline"])
        .output()
        .expect("cannot run cargo tree");
    assert!(
        out.status.success(),
        "cargo tree failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let tree = String::from_utf8_lossy(&out.stdout);
    assert!(
        tree.contains("meshd-proto v"),
        "not the agent's tree:\n{tree}"
    );
    let bad: Vec<&str> = tree.lines().filter(|l| forbidden(l)).collect();
    assert!(bad.is_empty(), "meshd-agent depends on {bad:#?}");
}

#[test]
fn the_check_recognises_what_it_forbids() {
    assert!(forbidden("│   ├── meshd v0.1.0 (/work/control-plane)"));
    assert!(forbidden("├── kube v5.0.0"));
    assert!(forbidden("│   └── kube-client v5.0.0"));
    assert!(forbidden("├── k8s-openapi v0.29.0"));
    assert!(!forbidden("├── meshd-ca v0.1.0 (/work/ca)"));
    assert!(!forbidden("meshd-agent v0.1.0 (/work/agent)"));
}
