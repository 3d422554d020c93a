//! `meshctl admission check`, the real binary on real files: exit status 1 for a
//! denied object and 0 for an allowed one, the denial message, `-o json`, policies from
//! `--policy` and from the manifests, an invalid policy (status 2, the field named), a
//! directory, stdin, and `meshctl inject | meshctl admission check`: meshd's injected
//! init container passes `restricted`, a hand-written copy of it fails `baseline`.

use std::io::Write as _;
use std::path::Path;
use std::process::{Command, Stdio};

use anyhow::{Context, ensure};
use meshd_integration::tools::meshd_binary;
use serde_json::{Value, json};

/// Status, stdout and stderr of `meshctl ARGS` with `stdin` on its standard input.
fn meshctl(args: &[&str], stdin: &str) -> anyhow::Result<(i32, String, String)> {
    let mut child = Command::new(meshd_binary("meshctl")?)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    child
        .stdin
        .take()
        .context("stdin")?
        .write_all(stdin.as_bytes())?;
    let out = child.wait_with_output()?;
    Ok((
        out.status.code().context("killed by a signal")?,
        String::from_utf8(out.stdout)?,
        String::from_utf8(out.stderr)?,
    ))
}

const RESTRICTED: &str = "apiVersion: security.meshd.io/v1alpha1
kind: WorkloadPolicy
metadata: {name: restricted, namespace: meshd-system}
spec:
  mode: Enforce
  profile: restricted
  rules: {forbidLatestTag: true}
";

/// A Deployment whose pod passes `restricted` (and has no `latest` tag), in `shop`.
fn good_deployment() -> Value {
    let sc = json!({"allowPrivilegeEscalation": false, "capabilities": {"drop": ["ALL"]}});
    json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": "web", "namespace": "shop"},
        "spec": {
            "selector": {"matchLabels": {"app": "web"}},
            "template": {
                "metadata": {"labels": {"app": "web"}},
                "spec": {
                    "securityContext": {"runAsNonRoot": true, "seccompProfile": {"type": "RuntimeDefault"}},
                    "containers": [{"name": "app", "image": "registry.example/shop/web:1.4", "securityContext": sc}],
                },
            },
        },
    })
}

fn bad_deployment() -> Value {
    let mut d = good_deployment();
    d["metadata"]["name"] = json!("bad");
    let app = &mut d["spec"]["template"]["spec"]["containers"][0];
    app["image"] = json!("nginx:latest");
    app["securityContext"]["runAsNonRoot"] = json!(false);
    d
}

fn yaml(documents: &[Value]) -> anyhow::Result<String> {
    Ok(documents
        .iter()
        .map(serde_saphyr::to_string)
        .collect::<Result<Vec<_>, _>>()?
        .join("---\n"))
}

fn write(path: &Path, text: &str) -> anyhow::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    Ok(std::fs::write(path, text)?)
}

#[test]
fn a_bad_deployment_is_denied_with_the_reason_and_a_good_one_passes() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let policy = dir.path().join("restricted.yaml");
    write(&policy, RESTRICTED)?;
    let (good, bad) = (dir.path().join("good.yaml"), dir.path().join("bad.yaml"));
    write(&good, &yaml(&[good_deployment()])?)?;
    write(&bad, &yaml(&[good_deployment(), bad_deployment()])?)?;
    let arg = |p: &Path| p.to_str().unwrap().to_string();

    let (code, out, err) = meshctl(
        &[
            "admission",
            "check",
            "-f",
            &arg(&good),
            "--policy",
            &arg(&policy),
        ],
        "",
    )?;
    ensure!(code == 0, "status {code}: {out}{err}");
    ensure!(out == "Deployment shop/web: allowed\n", "{out}");
    ensure!(
        err == "1 object checked against 1 WorkloadPolicy: 0 denied, 0 with warnings, 0 audited, 1 allowed\n",
        "{err}"
    );

    let (code, out, err) = meshctl(
        &[
            "admission",
            "check",
            "-f",
            &arg(&bad),
            "--policy",
            &arg(&policy),
        ],
        "",
    )?;
    ensure!(code == 1, "status {code}: {out}{err}");
    ensure!(
        out == "Deployment shop/web: allowed\nDeployment shop/bad: denied\n  denied by meshd-system/restricted (Enforce): \
                container \"app\": securityContext.runAsNonRoot must be true, not false [runAsNonRoot]; \
                container \"app\": image \"nginx:latest\" uses the tag latest [forbidLatestTag]\n",
        "{out}"
    );
    ensure!(err.contains(": 1 denied,"), "{err}");

    // -o json: every object with its verdict, every finding with its violations.
    let (code, out, _) = meshctl(
        &[
            "admission",
            "check",
            "-f",
            &arg(&bad),
            "--policy",
            &arg(&policy),
            "-o",
            "json",
        ],
        "",
    )?;
    ensure!(code == 1);
    let report: Value = serde_json::from_str(&out)?;
    ensure!(
        report["policies"] == json!(["meshd-system/restricted"]),
        "{report:#}"
    );
    let objects = report["objects"].as_array().context("objects")?;
    ensure!(objects.len() == 2, "{report:#}");
    ensure!(
        objects[0]
            == json!({
                "kind": "Deployment", "namespace": "shop", "name": "web",
                "file": arg(&bad), "document": 1, "mode": null, "messages": [], "findings": [],
            }),
        "{report:#}"
    );
    let denied = &objects[1];
    ensure!(
        (&denied["name"], &denied["document"], &denied["mode"])
            == (&json!("bad"), &json!(2), &json!("Enforce")),
        "{denied:#}"
    );
    ensure!(
        denied["findings"]
            == json!([{
                "policy": "meshd-system/restricted", "mode": "Enforce",
                "violations": [{
                    "rule": "runAsNonRoot", "container": "app",
                    "field": "spec.template.spec.containers[0].securityContext.runAsNonRoot",
                    "message": "securityContext.runAsNonRoot must be true, not false",
                }, {
                    "rule": "forbidLatestTag", "container": "app",
                    "field": "spec.template.spec.containers[0].image",
                    "message": "image \"nginx:latest\" uses the tag latest",
                }],
            }]),
        "{denied:#}"
    );
    Ok(())
}

#[test]
fn policies_in_the_manifests_directories_and_stdin() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    // A directory tree: the policy and a Namespace in one file, the workload in a
    // subdirectory, a file that is not YAML by name.
    let warn = "apiVersion: security.meshd.io/v1alpha1
kind: WorkloadPolicy
metadata: {name: registries, namespace: meshd-system}
spec:
  mode: Warn
  namespaceSelector: {matchLabels: {tier: prod}}
  rules: {allowedRegistries: [registry.example/]}
---
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {tier: prod}}
";
    write(&dir.path().join("mesh/policies.yml"), warn)?;
    write(
        &dir.path().join("apps/shop/deploy.yaml"),
        &yaml(&[bad_deployment()])?,
    )?;
    write(&dir.path().join("apps/README.md"), "not: [yaml")?;
    let root = dir.path().to_str().unwrap();
    let (code, out, err) = meshctl(&["admission", "check", "-f", root], "")?;
    ensure!(code == 0, "Warn does not deny: status {code}: {out}{err}");
    ensure!(
        out == "Deployment shop/bad: allowed with warnings\n  warning by meshd-system/registries (Warn): \
                container \"app\": image \"nginx:latest\": registry docker.io is not allowed \
                (docker.io/library/nginx:latest is under none of registry.example/) [allowedRegistries]\n",
        "{out}"
    );
    ensure!(err.contains("1 with warnings"), "{err}");

    // The same manifests on stdin, with the policy from a --policy directory and a
    // Namespace that is not labelled: the Warn policy no longer applies to shop.
    let stdin = format!(
        "{}---\napiVersion: v1\nkind: Namespace\nmetadata: {{name: shop}}\n",
        yaml(&[bad_deployment()])?
    );
    write(
        &dir.path().join("policy-only/p.yaml"),
        warn.split("---").next().unwrap(),
    )?;
    let policies = dir.path().join("policy-only");
    let (code, out, _) = meshctl(
        &[
            "admission",
            "check",
            "-f",
            "-",
            "--policy",
            policies.to_str().unwrap(),
        ],
        &stdin,
    )?;
    ensure!(
        code == 0 && out == "Deployment shop/bad: allowed\n",
        "{out}"
    );

    // No policy anywhere: said so, nothing denied.
    let (code, out, err) = meshctl(&["admission", "check", "-f", "-"], &stdin)?;
    ensure!(
        code == 0 && out == "Deployment shop/bad: allowed\n",
        "{out}"
    );
    ensure!(
        err.starts_with("no WorkloadPolicy in the manifests or --policy files"),
        "{err}"
    );
    Ok(())
}

#[test]
fn bad_input_is_exit_status_2_naming_the_field_and_an_unreadable_pod_is_denied()
-> anyhow::Result<()> {
    let invalid = RESTRICTED.replace("Enforce", "Block");
    let manifests = format!("{}---\n{invalid}", yaml(&[good_deployment()])?);
    let (code, out, err) = meshctl(&["admission", "check", "-f", "-"], &manifests)?;
    ensure!(code == 2, "status {code}: {out}{err}");
    ensure!(out.is_empty(), "nothing is half-reported: {out}");
    ensure!(
        err == "meshctl: stdin: document 2 (WorkloadPolicy meshd-system/restricted): spec.mode: \
                \"Block\" is not a mode: use Enforce, Warn or Audit\n",
        "{err}"
    );

    let (code, _, err) = meshctl(&["admission", "check", "-f", "/nonexistent/x.yaml"], "")?;
    ensure!(
        code == 2 && err.starts_with("meshctl: cannot read /nonexistent/x.yaml: "),
        "{err}"
    );
    let (code, _, err) = meshctl(&["admission", "check"], "")?;
    ensure!(code == 2 && err.contains("--filename"), "{err}");

    // A pod template that does not parse is denied with the parse error, as the
    // webhook denies it.
    let mut unreadable = good_deployment();
    unreadable["spec"]["template"]["spec"]["containers"][0]["ports"] =
        json!([{"containerPort": "http"}]);
    let (code, out, _) = meshctl(&["admission", "check", "-f", "-"], &yaml(&[unreadable])?)?;
    ensure!(code == 1, "status {code}: {out}");
    ensure!(
        out.starts_with(
            "Deployment shop/web: denied\n  its pod cannot be read: \
             spec.template.spec.containers[0].ports[0].containerPort: invalid type: string \"http\""
        ),
        "{out}"
    );
    Ok(())
}

#[test]
fn meshds_injected_init_container_passes_and_a_hand_written_copy_fails() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let policy = dir.path().join("policies.yaml");
    let baseline = RESTRICTED
        .replace("name: restricted", "name: baseline")
        .replace("profile: restricted", "profile: baseline");
    write(&policy, &format!("{RESTRICTED}---\n{baseline}"))?;
    let policy = policy.to_str().unwrap();
    // The restricted-clean pod of the good Deployment, as a Pod.
    let mut pod = good_deployment()["spec"]["template"].clone();
    pod["apiVersion"] = json!("v1");
    pod["kind"] = json!("Pod");
    pod["metadata"]["name"] = json!("web-0");
    pod["metadata"]["namespace"] = json!("shop");

    let (code, injected, err) = meshctl(&["inject", "-f", "-"], &yaml(&[pod.clone()])?)?;
    ensure!(code == 0, "meshctl inject: {err}");
    ensure!(injected.contains("meshd-init"), "{injected}");
    let (code, out, err) = meshctl(
        &["admission", "check", "-f", "-", "--policy", policy],
        &injected,
    )?;
    ensure!(code == 0, "status {code}: {out}{err}");
    ensure!(out == "Pod shop/web-0: allowed\n", "{out}");

    // meshd-init written by hand (its name, image and capabilities, a command of
    // one's own) into the pod: no exemption, and it breaks baseline (NET_ADMIN, NET_RAW).
    let injected: Value = serde_saphyr::from_str(&injected)?;
    let init = injected["spec"]["initContainers"]
        .as_array()
        .and_then(|c| c.iter().find(|c| c["name"] == "meshd-init"))
        .context("meshd-init")?;
    let mut copy = pod.clone();
    copy["spec"]["initContainers"] = json!([{
        "name": "meshd-init",
        "image": init["image"],
        "command": ["sh", "-c", "iptables -t nat -F"],
        "securityContext": init["securityContext"],
    }]);
    let (code, out, _) = meshctl(
        &["admission", "check", "-f", "-", "--policy", policy],
        &yaml(&[copy])?,
    )?;
    ensure!(code == 1, "status {code}: {out}");
    ensure!(
        out.starts_with(
            "Pod shop/web-0: denied\n  denied by meshd-system/baseline (Enforce): \
             container \"meshd-init\": securityContext.capabilities.add must not include \
             \"NET_ADMIN\", \"NET_RAW\""
        ) && out.contains("[capabilities_baseline]\n  denied by meshd-system/restricted"),
        "{out}"
    );

    // And a look-alike inside an injected pod: one argument more is not meshd's.
    let mut altered = injected.clone();
    for c in altered["spec"]["initContainers"]
        .as_array_mut()
        .context("initContainers")?
    {
        if c["name"] == "meshd-init" {
            c["args"]
                .as_array_mut()
                .context("meshd-init args")?
                .push(json!("--verbose"));
        }
    }
    let (code, out, _) = meshctl(
        &["admission", "check", "-f", "-", "--policy", policy],
        &yaml(&[altered])?,
    )?;
    ensure!(
        code == 1 && out.contains("[capabilities_baseline]"),
        "status {code}: {out}"
    );
    Ok(())
}
