//! A mesh config directory for a test, written as the YAML a user would write.

use std::fmt::Write as _;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;

use tempfile::TempDir;

use crate::net::pod_ip;

/// A temporary config directory. Files are replaced atomically (written under a hidden
/// name, then renamed), as a careful user or a ConfigMap update would.
#[derive(Debug)]
pub struct MeshDir {
    dir: TempDir,
}

impl MeshDir {
    pub fn new() -> anyhow::Result<MeshDir> {
        Ok(MeshDir {
            dir: tempfile::Builder::new().prefix("meshd-mesh-").tempdir()?,
        })
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Writes `docs` as one multi-document YAML file.
    pub fn write(&self, file: &str, docs: &[String]) -> anyhow::Result<()> {
        self.write_raw(file, &docs.join("---\n"))
    }

    pub fn write_raw(&self, file: &str, text: &str) -> anyhow::Result<()> {
        let tmp = self.dir.path().join(format!(".{file}.tmp"));
        std::fs::write(&tmp, text)?;
        std::fs::rename(&tmp, self.dir.path().join(file))?;
        Ok(())
    }

    pub fn remove(&self, file: &str) -> anyhow::Result<()> {
        std::fs::remove_file(self.dir.path().join(file))?;
        Ok(())
    }
}

/// A config directory laid out as the kubelet lays out a ConfigMap volume: the files in
/// a timestamped directory `..<time>`, `..data` a symlink to it, and each file a visible
/// symlink `name -> ..data/name`. An update is atomic as the kubelet's (its
/// `AtomicWriter`): write a new timestamped directory, point a new `..data_tmp` link at
/// it and rename that over `..data`, add links for new names, remove those of names
/// gone, remove the old directory.
#[derive(Debug)]
pub struct ConfigMapDir {
    dir: TempDir,
    updates: usize,
}

impl ConfigMapDir {
    pub fn new() -> anyhow::Result<ConfigMapDir> {
        Ok(ConfigMapDir {
            dir: tempfile::Builder::new()
                .prefix("meshd-configmap-")
                .tempdir()?,
            updates: 0,
        })
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Makes the volume hold exactly `files` (name, text).
    pub fn update(&mut self, files: &[(&str, String)]) -> anyhow::Result<()> {
        use std::os::unix::fs::symlink;
        let root = self.dir.path();
        self.updates += 1;
        let timestamped = format!("..2026_12_01_10_00_00.{:04}", self.updates);
        std::fs::create_dir(root.join(&timestamped))?;
        for (name, text) in files {
            std::fs::write(root.join(&timestamped).join(name), text)?;
        }
        let old = std::fs::read_link(root.join("..data")).ok();
        symlink(&timestamped, root.join("..data_tmp"))?;
        std::fs::rename(root.join("..data_tmp"), root.join("..data"))?;
        for (name, _) in files {
            let link = root.join(name);
            if link.symlink_metadata().is_err() {
                symlink(Path::new("..data").join(name), link)?;
            }
        }
        for entry in std::fs::read_dir(root)? {
            let name = entry?.file_name();
            let visible = !name.to_string_lossy().starts_with('.');
            if visible && !files.iter().any(|(n, _)| name == *n) {
                std::fs::remove_file(root.join(&name))?;
            }
        }
        if let Some(old) = old {
            std::fs::remove_dir_all(root.join(old))?;
        }
        Ok(())
    }
}

#[derive(Debug, Clone)]
pub struct ServicePortDef {
    pub name: String,
    pub port: u16,
    pub target_port: u16,
    pub app_protocol: Option<String>,
}

/// A `v1` Service selecting pods by `app: <selector>`.
#[derive(Debug, Clone)]
pub struct ServiceDef {
    pub namespace: String,
    pub name: String,
    pub selector_app: String,
    pub ports: Vec<ServicePortDef>,
    /// `spec.clusterIP`: a VIP, `None` (headless), or unset.
    pub cluster_ip: Option<String>,
}

impl ServiceDef {
    /// A service whose pods carry `app: <name>`.
    pub fn new(namespace: &str, name: &str) -> ServiceDef {
        ServiceDef {
            namespace: namespace.into(),
            name: name.into(),
            selector_app: name.into(),
            ports: Vec::new(),
            cluster_ip: None,
        }
    }

    /// The service's virtual IP (`spec.clusterIP`).
    pub fn vip(mut self, ip: std::net::Ipv4Addr) -> Self {
        self.cluster_ip = Some(ip.to_string());
        self
    }

    /// A headless service (`clusterIP: None`): clients reach its pods by their
    /// addresses.
    pub fn headless(mut self) -> Self {
        self.cluster_ip = Some("None".into());
        self
    }

    /// An HTTP port (named `http-…`).
    pub fn http_port(mut self, port: u16, target_port: u16) -> Self {
        self.ports.push(ServicePortDef {
            name: format!("http-{port}"),
            port,
            target_port,
            app_protocol: None,
        });
        self
    }

    /// A TCP port.
    pub fn tcp_port(mut self, port: u16, target_port: u16) -> Self {
        self.ports.push(ServicePortDef {
            name: format!("tcp-{port}"),
            port,
            target_port,
            app_protocol: None,
        });
        self
    }

    pub fn yaml(&self) -> String {
        let mut s = format!(
            "apiVersion: v1\nkind: Service\nmetadata:\n  name: {}\n  namespace: {}\nspec:\n  selector:\n    app: {}\n",
            self.name, self.namespace, self.selector_app
        );
        if let Some(ip) = &self.cluster_ip {
            let _ = writeln!(s, "  clusterIP: {ip}");
        }
        s.push_str("  ports:\n");
        for p in &self.ports {
            let _ = writeln!(
                s,
                "    - name: {}\n      port: {}\n      targetPort: {}",
                p.name, p.port, p.target_port
            );
            if let Some(ap) = &p.app_protocol {
                let _ = writeln!(s, "      appProtocol: {ap}");
            }
        }
        s
    }
}

/// A `v1` Pod with its own loopback IP, ports, app ports and upstreams.
#[derive(Debug, Clone)]
pub struct PodDef {
    pub namespace: String,
    pub name: String,
    pub app: String,
    pub ip: Ipv4Addr,
    pub service_account: String,
    pub container_ports: Vec<u16>,
    pub app_ports: Vec<(u16, u16)>,
    /// (service[.namespace], service port, local port)
    pub upstreams: Vec<(String, u16, u16)>,
    /// The egress port and its scope (`None`: meshd's default).
    pub egress: Option<(u16, Option<String>)>,
    /// More annotations, as written (e.g. `meshd.io/capture`).
    pub annotations: Vec<(String, String)>,
}

impl PodDef {
    /// A pod labelled `app: <app>` on a fresh loopback address.
    pub fn new(namespace: &str, name: &str, app: &str) -> PodDef {
        PodDef {
            namespace: namespace.into(),
            name: name.into(),
            app: app.into(),
            ip: pod_ip(),
            service_account: app.into(),
            container_ports: Vec::new(),
            app_ports: Vec::new(),
            upstreams: Vec::new(),
            egress: None,
            annotations: Vec::new(),
        }
    }

    /// Adds the annotation `key: value`.
    pub fn annotate(mut self, key: &str, value: &str) -> Self {
        self.annotations.push((key.into(), value.into()));
        self
    }

    /// Transparent capture (`meshd.io/capture: transparent`): the app calls Service VIPs
    /// and serves `port` itself; its sidecar's virtual listeners take both.
    pub fn transparent(self) -> Self {
        self.annotate("meshd.io/capture", "transparent")
    }

    /// Every annotation the pod's YAML carries, by key.
    pub fn annotation_map(&self) -> std::collections::BTreeMap<String, String> {
        let mut all = std::collections::BTreeMap::new();
        if !self.upstreams.is_empty() {
            let ups: Vec<String> = self
                .upstreams
                .iter()
                .map(|(svc, port, local)| format!("{svc}:{port}={local}"))
                .collect();
            all.insert("meshd.io/upstreams".to_string(), ups.join(", "));
        }
        if !self.app_ports.is_empty() {
            let ports: Vec<String> = self
                .app_ports
                .iter()
                .map(|(p, a)| format!("{p}={a}"))
                .collect();
            all.insert("meshd.io/app-ports".to_string(), ports.join(", "));
        }
        if let Some((port, scope)) = &self.egress {
            all.insert("meshd.io/egress-port".to_string(), port.to_string());
            if let Some(scope) = scope {
                all.insert("meshd.io/scope".to_string(), scope.clone());
            }
        }
        all.extend(self.annotations.iter().cloned());
        all
    }

    /// Receives mesh traffic on `<pod IP>:port` and hands it to the app at
    /// 127.0.0.1:app_port.
    pub fn serves(mut self, port: u16, app_port: u16) -> Self {
        self.container_ports.push(port);
        self.app_ports.push((port, app_port));
        self
    }

    /// Calls `service:port` through the sidecar at 127.0.0.1:local_port.
    pub fn calls(mut self, service: &str, port: u16, local_port: u16) -> Self {
        self.upstreams.push((service.into(), port, local_port));
        self
    }

    /// Reaches the HTTP services of `scope` (or meshd's default scope) by Host header
    /// through the sidecar at 127.0.0.1:port.
    pub fn egress(mut self, port: u16, scope: Option<&str>) -> Self {
        self.egress = Some((port, scope.map(str::to_string)));
        self
    }

    pub fn node_id(&self) -> String {
        format!("{}.{}", self.name, self.namespace)
    }

    /// Where the sidecar listens for this pod's calls to its `i`-th upstream.
    pub fn outbound(&self, i: usize) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.upstreams[i].2))
    }

    /// The pod's inbound address for `port`, as a peer sidecar would reach it.
    pub fn inbound(&self, port: u16) -> SocketAddr {
        SocketAddr::from((self.ip, port))
    }

    pub fn yaml(&self) -> String {
        let mut s = format!(
            "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {}\n  namespace: {}\n  labels:\n    app: {}\n",
            self.name, self.namespace, self.app
        );
        let annotations = self.annotation_map();
        if !annotations.is_empty() {
            s.push_str("  annotations:\n");
            for (key, value) in annotations {
                // JSON strings are YAML double-quoted scalars.
                let _ = writeln!(s, "    {key}: {}", serde_json::Value::from(value));
            }
        }
        let _ = writeln!(
            s,
            "spec:\n  serviceAccountName: {}\n  containers:\n    - name: app\n      image: test/{}",
            self.service_account, self.app
        );
        if !self.container_ports.is_empty() {
            s.push_str("      ports:\n");
            for p in &self.container_ports {
                let _ = writeln!(s, "        - containerPort: {p}");
            }
        }
        let _ = writeln!(s, "status:\n  podIP: {}", self.ip);
        s
    }
}

/// The smallest mesh with traffic: Service `web` (port 80 → 8080) with pod web-1, whose
/// application listens on `app_port`, and pod client-1 calling `web:80` through its
/// sidecar at [`PodDef::outbound`]`(0)`; written into a new mesh directory.
pub fn web_and_client(namespace: &str, app_port: u16) -> anyhow::Result<(MeshDir, PodDef, PodDef)> {
    let web = PodDef::new(namespace, "web-1", "web").serves(8080, app_port);
    let client =
        PodDef::new(namespace, "client-1", "client").calls("web", 80, crate::net::free_port());
    let mesh = MeshDir::new()?;
    mesh.write(
        "mesh.yaml",
        &[
            ServiceDef::new(namespace, "web").http_port(80, 8080).yaml(),
            web.yaml(),
            client.yaml(),
        ],
    )?;
    Ok((mesh, web, client))
}
