//! The image table a test hands the kubelet: what each image reference means here,
//! since no image is pulled or unpacked.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::Context;

/// What an image reference stands for.
#[derive(Debug, Clone)]
pub enum ImageDef {
    /// A program of this machine: the image's ENTRYPOINT and CMD (used as a runtime
    /// does when the container gives no `command` / no `args`) and the directories of
    /// its PATH, where the command is looked up.
    Process {
        entrypoint: Vec<String>,
        cmd: Vec<String>,
        path: Vec<PathBuf>,
    },
    /// An app the test serves itself in the pod's namespace (e.g. an
    /// [`crate::apps::HttpApp`] on a [`crate::netns::Netns::listen`] listener): the
    /// kubelet starts nothing, but resolves its environment and command line and
    /// probes it like any container.
    RunByTest,
}

/// The usual PATH of a container image.
pub const STANDARD_PATH: [&str; 6] = [
    "/usr/local/sbin",
    "/usr/local/bin",
    "/usr/sbin",
    "/usr/bin",
    "/sbin",
    "/bin",
];

impl ImageDef {
    /// A process image with no ENTRYPOINT or CMD (the container's `command` says what
    /// runs) and `path` as its PATH.
    pub fn process<P: Into<PathBuf>>(path: impl IntoIterator<Item = P>) -> ImageDef {
        ImageDef::Process {
            entrypoint: Vec::new(),
            cmd: Vec::new(),
            path: path.into_iter().map(Into::into).collect(),
        }
    }

    /// A process image of this machine's own programs ([`STANDARD_PATH`]).
    pub fn system() -> ImageDef {
        Self::process(STANDARD_PATH)
    }

    /// This image with an ENTRYPOINT.
    pub fn with_entrypoint(mut self, args: &[&str]) -> ImageDef {
        if let ImageDef::Process { entrypoint, .. } = &mut self {
            *entrypoint = args.iter().map(|a| a.to_string()).collect();
        }
        self
    }

    /// This image with a CMD.
    pub fn with_cmd(mut self, args: &[&str]) -> ImageDef {
        if let ImageDef::Process { cmd, .. } = &mut self {
            *cmd = args.iter().map(|a| a.to_string()).collect();
        }
        self
    }
}

/// Image reference → [`ImageDef`].
#[derive(Debug, Clone, Default)]
pub struct Images(BTreeMap<String, ImageDef>);

impl Images {
    pub fn new() -> Images {
        Images::default()
    }

    /// `reference` (exactly as a Pod names it) means `def`.
    pub fn with(mut self, reference: &str, def: ImageDef) -> Images {
        self.0.insert(reference.to_string(), def);
        self
    }

    /// What `reference` is, or an error naming the container and the image.
    pub fn get(&self, container: &str, reference: Option<&str>) -> anyhow::Result<&ImageDef> {
        let reference = reference.with_context(|| format!("container {container} has no image"))?;
        self.0.get(reference).with_context(|| {
            format!(
                "container {container}: image {reference:?} is not in the test's image table \
                 (known: {:?})",
                self.0.keys().collect::<Vec<_>>()
            )
        })
    }
}

/// A directory of programs to put on an image's PATH: each added program is a hard
/// link (a copy across file systems) to a binary of this machine, so a container running
/// as any uid can run it (the cache under /root, where Envoy lives, is closed to others;
/// a symlink would not help).
#[derive(Debug)]
pub struct BinDir {
    dir: tempfile::TempDir,
}

impl BinDir {
    pub fn new() -> anyhow::Result<BinDir> {
        let dir = tempfile::Builder::new()
            .prefix("meshd-kubelet-bin-")
            .tempdir()?;
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))?;
        Ok(BinDir { dir })
    }

    /// `name` in this directory runs `binary`.
    pub fn add(self, name: &str, binary: &Path) -> anyhow::Result<BinDir> {
        let link = self.dir.path().join(name);
        if std::fs::hard_link(binary, &link).is_err() {
            std::fs::copy(binary, &link).with_context(|| {
                format!("cannot copy {} to {}", binary.display(), link.display())
            })?;
        }
        Ok(self)
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}
