//! meshd run outside the cluster it watches, as the README tells a new user to: the
//! README's own commands, run as they are written against a real API server
//! (`../shared/tools/kube-test-apiserver`) with real kubectl, meshd, meshctl and Envoy.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, bail, ensure};
use k8s_openapi::api::core::v1::{Namespace, Secret};
use meshd_integration::init_test_logging;
use meshd_integration::kube_api::{KubeApi, PodSpec};
use meshd_integration::net::{free_port, pod_ip};
use meshd_integration::tools::{envoy_binary, kubectl_binary, meshd_binary, workspace_root};
use meshd_integration::wait::eventually;

const WAIT: Duration = Duration::from_secs(30);

/// The `sh` block that follows `<!-- recipe: NAME -->` in the README.
fn readme_block(name: &str) -> anyhow::Result<String> {
    let readme = std::fs::read_to_string(workspace_root().join("README.md"))?;
    let marker = format!("<!-- recipe: {name} -->\n```sh\n");
    let start = readme
        .find(&marker)
        .with_context(|| format!("README.md has no {marker:?}"))?
        + marker.len();
    let end = readme[start..]
        .find("```\n")
        .context("unterminated block")?;
    Ok(readme[start..start + end].to_string())
}

/// `bash` running `script` in `dir`, with meshd, meshctl and kubectl first on the
/// PATH and the environment that points them at this test's API server and ports.
fn shell(
    dir: &Path,
    script: &str,
    env: &[(&str, String)],
) -> anyhow::Result<tokio::process::Command> {
    let bin = dir.join("bin");
    std::fs::create_dir_all(&bin)?;
    for (name, path) in [
        ("meshd", meshd_binary("meshd")?),
        ("meshctl", meshd_binary("meshctl")?),
        ("kubectl", kubectl_binary()?),
    ] {
        let link = bin.join(name);
        if !link.exists() {
            std::os::unix::fs::symlink(path, link)?;
        }
    }
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let mut cmd = tokio::process::Command::new("bash");
    cmd.args(["-euo", "pipefail", "-c", script])
        .current_dir(dir)
        .env("PATH", path)
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .stdin(Stdio::null())
        .kill_on_drop(true);
    Ok(cmd)
}

/// `meshd --source kubernetes --namespace meshd-system` exited with `namespaces
/// "meshd-system" not found` while creating its CA Secret. It says at start that the
/// namespace is missing, which flag names it and how to fix it, and creates nothing.
#[tokio::test]
async fn a_missing_namespace_is_named_with_the_flag_and_the_fix() -> anyhow::Result<()> {
    init_test_logging();
    let api = KubeApi::start_bare().await?;
    api.install_crds().await?;
    let out = tokio::process::Command::new(meshd_binary("meshd")?)
        .args(["--source", "kubernetes", "--kubeconfig"])
        .arg(api.kubeconfig())
        .args(["--namespace", "mesh-control"])
        .arg("--xds-address")
        .arg(format!("127.0.0.1:{}", free_port()))
        .arg("--admin-address")
        .arg(format!("127.0.0.1:{}", free_port()))
        .arg("--health-address")
        .arg(format!("127.0.0.1:{}", free_port()))
        .output();
    let out = tokio::time::timeout(WAIT, out)
        .await
        .context("meshd kept running without its namespace")??;
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(!out.status.success(), "{stderr}");
    ensure!(
        stderr.contains(
            "namespace \"mesh-control\" does not exist. meshd keeps the mesh root (Secret \
             mesh-control/meshd-ca) and its Lease in the namespace that --namespace \
             (MESHD_NAMESPACE) names, and does not create it: create it (`kubectl create \
             namespace mesh-control`; the Helm chart's `helm install -n mesh-control \
             --create-namespace` does), or give --namespace the namespace meshd should use"
        ),
        "{stderr}"
    );
    let namespaces = kube::Api::<Namespace>::all(api.client.clone());
    ensure!(
        namespaces.get_opt("mesh-control").await?.is_none(),
        "meshd created it"
    );
    Ok(())
}

/// The README's out-of-cluster recipe, block by block: prepare the cluster and run
/// meshd; copy the root from its Secret into a CA directory with kubectl; `meshctl
/// status` and `meshctl bootstrap` from it; and the bootstrap really connects an Envoy.
#[tokio::test]
async fn the_readmes_out_of_cluster_recipe_works() -> anyhow::Result<()> {
    init_test_logging();
    let api = KubeApi::start_bare().await?;
    let work = tempfile::Builder::new().prefix("meshd-recipe-").tempdir()?;
    let (xds, admin, health) = (free_port(), free_port(), free_port());
    // What the README leaves to defaults, pointed at this test's API server and ports.
    let env = [
        ("KUBECONFIG", api.kubeconfig().display().to_string()),
        ("MESHD_XDS_ADDRESS", format!("127.0.0.1:{xds}")),
        ("MESHD_ADMIN_ADDRESS", format!("127.0.0.1:{admin}")),
        ("MESHD_HEALTH_ADDRESS", format!("127.0.0.1:{health}")),
        ("MESHD_ADMIN", format!("https://127.0.0.1:{admin}")),
    ];

    // Block 1 ends with meshd, which keeps running. The shell becomes meshd (`exec`, by
    // a function of meshd's name), so the test stops it as its own child: no signal to
    // a process group, nothing left running after the test.
    let block = readme_block("out-of-cluster meshd")?;
    ensure!(
        block
            .lines()
            .rfind(|l| !l.trim().is_empty())
            .is_some_and(|l| l.starts_with("meshd ")),
        "the README's first block no longer ends with meshd:\n{block}"
    );
    let log = std::fs::File::create(work.path().join("meshd.log"))?;
    let script = format!("meshd() {{ exec meshd \"$@\"; }}\n{block}");
    let mut cluster = shell(work.path(), &script, &env)?;
    cluster.stdout(log.try_clone()?).stderr(log);
    let mut meshd = cluster
        .spawn()
        .context("cannot run the README's first block")?;
    let meshd_log = || std::fs::read_to_string(work.path().join("meshd.log")).unwrap_or_default();
    let http = reqwest::Client::builder().no_proxy().build()?;
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        if let Some(status) = meshd.try_wait()? {
            bail!("the first block ended ({status}):\n{}", meshd_log());
        }
        let ready = http
            .get(format!("http://127.0.0.1:{health}/readyz"))
            .send()
            .await;
        if ready.is_ok_and(|r| r.status().is_success()) {
            break;
        }
        ensure!(
            tokio::time::Instant::now() < deadline,
            "meshd not ready within {WAIT:?}:\n{}",
            meshd_log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let root = kube::Api::<Secret>::namespaced(api.client.clone(), "meshd-system")
        .get("meshd-ca")
        .await?;
    ensure!(root.data.is_some_and(|d| d.contains_key("root-key.pem")));

    // The pod the README's bootstrap is for, as a kubelet would report it.
    api.create_namespace("shop", &[]).await?;
    let ip = pod_ip().to_string();
    api.pod(
        &PodSpec {
            namespace: "shop",
            name: "web-1",
            app: "web",
            service_account: "web",
            ip: &ip,
            ports: &[],
            annotations: &[],
        },
        true,
    )
    .await?;

    let out = shell(work.path(), &readme_block("out-of-cluster meshctl")?, &env)?
        .output()
        .await?;
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    ensure!(
        out.status.success(),
        "{stdout}{stderr}\nmeshd log:\n{}",
        meshd_log()
    );
    ensure!(stdout.starts_with("snapshot "), "{stdout}");
    let ca = work.path().join("meshd-ca");
    let mut files: Vec<String> = std::fs::read_dir(&ca)?
        .map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned()))
        .collect::<Result<_, _>>()?;
    files.sort();
    ensure!(files == ["root-cert.pem", "root-key.pem"], "{files:?}");
    use std::os::unix::fs::PermissionsExt;
    let mode = |p: &Path| -> anyhow::Result<u32> {
        Ok(std::fs::metadata(p)?.permissions().mode() & 0o777)
    };
    ensure!(mode(&ca)? == 0o700 && mode(&ca.join("root-key.pem"))? == 0o600);

    // The bootstrap connects: Envoy on it (with its admin port moved off the default),
    // and meshd sees the sidecar with the identity of its certificate.
    let bootstrap = work.path().join("web-1").join("envoy-bootstrap.json");
    let mut json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&bootstrap)?)?;
    json["admin"]["address"]["socket_address"]["port_value"] = free_port().into();
    std::fs::write(&bootstrap, serde_json::to_string(&json)?)?;
    let _envoy = tokio::process::Command::new(envoy_binary()?)
        .arg("-c")
        .arg(&bootstrap)
        .args(["--disable-hot-restart", "--concurrency", "1"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()?;
    eventually("the sidecar in meshctl status", WAIT, || async {
        let out = shell(work.path(), "meshctl status --ca-dir meshd-ca", &env)?
            .output()
            .await?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        let row = stdout
            .lines()
            .find(|l| l.starts_with("web-1.shop "))
            .with_context(|| format!("not connected: {stdout}"))?;
        ensure!(
            row.contains("spiffe://cluster.local/ns/shop/sa/web"),
            "{row}"
        );
        Ok(())
    })
    .await?;
    meshd.kill().await?;
    Ok(())
}
