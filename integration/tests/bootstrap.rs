//! `meshctl bootstrap` only reads the CA meshd made. Where there is none it fails,
//! naming the directory it looked in and how to point it elsewhere, and writes nothing:
//! a root it made itself would be one meshd does not trust, and the sidecar could never
//! connect.

use std::path::Path;
use std::process::Output;

use meshd_integration::tools::meshd_binary;

/// Every path under `dir`, relative to it.
fn tree(dir: &Path) -> Vec<String> {
    let mut found = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for entry in std::fs::read_dir(&d).unwrap() {
            let path = entry.unwrap().path();
            found.push(path.strip_prefix(dir).unwrap().display().to_string());
            if path.is_dir() {
                todo.push(path);
            }
        }
    }
    found.sort();
    found
}

/// Runs `meshctl bootstrap` in `cwd` with `args` and the environment's CA dir `env`.
fn bootstrap(cwd: &Path, env: Option<&Path>, args: &[&str]) -> anyhow::Result<Output> {
    let mut cmd = std::process::Command::new(meshd_binary("meshctl")?);
    cmd.current_dir(cwd)
        .args([
            "bootstrap",
            "-n",
            "shop",
            "--pod",
            "web-1",
            "-o",
            "web-1.json",
        ])
        .args(args)
        .env_remove("MESHD_CA_DIR");
    if let Some(dir) = env {
        cmd.env("MESHD_CA_DIR", dir);
    }
    Ok(cmd.output()?)
}

fn assert_refused(out: &Output, names: &[&str]) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!out.status.success(), "meshctl succeeded: {stderr}");
    for name in names {
        assert!(stderr.contains(name), "{name:?} is not named in: {stderr}");
    }
    stderr
}

#[test]
fn bootstrap_in_an_empty_directory_names_the_ca_dir_and_writes_nothing() -> anyhow::Result<()> {
    let cwd = tempfile::tempdir()?;
    let out = bootstrap(cwd.path(), None, &[])?;
    let expected = cwd.path().join(".meshd").join("ca");
    assert_refused(
        &out,
        &[
            "no mesh CA in .meshd/ca",
            &expected.display().to_string(),
            "--ca-dir",
            "MESHD_CA_DIR",
        ],
    );
    assert_eq!(
        tree(cwd.path()),
        Vec::<String>::new(),
        "meshctl wrote files"
    );

    // The same from the environment, and from the flag.
    let elsewhere = cwd.path().join("meshd-state").join("ca");
    let out = bootstrap(cwd.path(), Some(&elsewhere), &[])?;
    assert_refused(&out, &[&elsewhere.display().to_string(), "--ca-dir"]);
    let flag = elsewhere.display().to_string();
    let out = bootstrap(cwd.path(), None, &["--ca-dir", &flag])?;
    assert_refused(&out, &[&format!("no mesh CA in {flag}")]);
    assert_eq!(
        tree(cwd.path()),
        Vec::<String>::new(),
        "meshctl wrote files"
    );
    Ok(())
}

#[test]
fn bootstrap_never_replaces_a_root_it_cannot_read() -> anyhow::Result<()> {
    // A CA directory whose key is gone: making a new root here would break every
    // sidecar that trusts the old one.
    let cwd = tempfile::tempdir()?;
    let ca = cwd.path().join("ca");
    meshd_ca::store::open_or_create(
        &meshd_ca::store::CaSource::Directory(ca.clone()),
        meshd_ca::CaConfig::default(),
    )?;
    std::fs::remove_file(ca.join(meshd_ca::store::ROOT_KEY_FILE))?;
    let before = tree(cwd.path());
    let flag = ca.display().to_string();
    let out = bootstrap(cwd.path(), None, &["--ca-dir", &flag])?;
    let stderr = assert_refused(&out, &["root-key.pem: is missing", "restore root-key.pem"]);
    assert!(!stderr.contains("remove"), "{stderr}");
    assert_eq!(tree(cwd.path()), before, "meshctl wrote files");
    Ok(())
}
