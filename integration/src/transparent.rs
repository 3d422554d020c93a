//! Transparent capture in a lab pod ([`crate::netns`]), as a cluster sets a pod up:
//! `meshd-agent init` as root in the pod's namespace, with the arguments the injector
//! makes of the pod's annotations (`meshd_sidecar::capture::init_args`), then the
//! sidecar (`meshd-agent run` as uid 1337, [`crate::envoy::SidecarOptions::netns`]).
//! Also the pod's nat rules as `iptables-save` prints them, to compare runs.

use std::time::Duration;

use anyhow::{Context, bail};

use crate::envoy::{Sidecar, SidecarOptions};
use crate::mesh::PodDef;
use crate::meshd::{Meshd, XdsFlavor};
use crate::netns::LabPod;
use crate::tools::meshd_binary;

/// `meshd-agent init` in `pod` with the arguments `def`'s annotations give, and
/// `extra` (e.g. `--cleanup`); its output.
pub async fn init(pod: &LabPod, def: &PodDef, extra: &[&str]) -> anyhow::Result<String> {
    let mut args = meshd_sidecar::capture::init_args(&def.annotation_map())
        .with_context(|| format!("pod {}", def.node_id()))?;
    args.extend(extra.iter().map(|a| a.to_string()));
    let out = tokio::time::timeout(
        Duration::from_secs(30),
        pod.netns
            .command(meshd_binary("meshd-agent")?)
            .arg("init")
            .args(&args)
            .kill_on_drop(true)
            .output(),
    )
    .await
    .with_context(|| format!("meshd-agent init {args:?} in {} took over 30s", pod.name))?
    .context("cannot run meshd-agent init")?;
    if !out.status.success() {
        bail!(
            "meshd-agent init {args:?} in {} failed ({}): {}",
            pod.name,
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The sidecar of `def` in `pod`: capture first if the pod asks for it
/// (`meshd.io/capture: transparent`), then the agent and Envoy as the proxy's uid
/// (explicit pods get the sidecar alone).
pub async fn mesh_pod(meshd: &Meshd, pod: &LabPod, def: &PodDef) -> anyhow::Result<Sidecar> {
    let transparent = def
        .annotation_map()
        .get("meshd.io/capture")
        .map(String::as_str)
        == Some("transparent");
    if transparent {
        init(pod, def, &[]).await?;
    }
    let options = SidecarOptions {
        netns: Some(pod.netns.clone()),
        // Envoy writes its access log every 10 s by default; tests read it.
        envoy_args: ["--file-flush-interval-msec", "100"]
            .map(String::from)
            .to_vec(),
        ..SidecarOptions::default()
    };
    Sidecar::start_with(
        meshd,
        &def.namespace,
        &def.name,
        &def.service_account,
        XdsFlavor::Delta,
        options,
    )
    .await
}

/// What netfilter holds in `pod`: `iptables-save` of both families and both backends
/// (nft and legacy: init picks one), without comments and counters, so two readings of
/// the same rules are equal.
pub async fn rules(pod: &LabPod) -> anyhow::Result<String> {
    let mut all = String::new();
    for save in [
        "iptables-nft-save",
        "iptables-legacy-save",
        "ip6tables-nft-save",
        "ip6tables-legacy-save",
    ] {
        let out = pod
            .netns
            .command(save)
            .output()
            .await
            .with_context(|| format!("cannot run {save} (apt-get install -y iptables)"))?;
        if !out.status.success() {
            bail!(
                "{save} in {} failed: {}",
                pod.name,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        all.push_str(&format!("== {save}\n"));
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            if !line.starts_with('#') {
                all.push_str(&without_counters(line));
                all.push('\n');
            }
        }
    }
    Ok(all)
}

/// `:CHAIN POLICY [packets:bytes]` → `:CHAIN POLICY`.
fn without_counters(line: &str) -> String {
    match line.rfind(" [") {
        Some(i) if line.starts_with(':') && line.ends_with(']') => line[..i].to_string(),
        _ => line.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_are_left_out_of_chain_lines_only() {
        assert_eq!(
            without_counters(":PREROUTING ACCEPT [12:720]"),
            ":PREROUTING ACCEPT"
        );
        assert_eq!(without_counters(":MESHD_OUTPUT - [0:0]"), ":MESHD_OUTPUT -");
        let rule = "-A MESHD_OUTPUT -d 10.0.0.0/8 -m comment --comment \"a [b]\"";
        assert_eq!(without_counters(rule), rule);
    }
}
