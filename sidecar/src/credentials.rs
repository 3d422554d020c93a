//! A sidecar's credential directory: its client certificate chain, its key and the
//! trust bundle, as Envoy's file-based SDS reads them.
//!
//! ```text
//! DIR/                         0700 if the sidecar's user owns it (a pod's emptyDir is
//!                              the kubelet's, 0777: left as it is; certs/ is 0700)
//!   sds/xds-client-cert.json   SDS: the TlsCertificate, by file name, watching certs/
//!   sds/xds-trust-bundle.json  SDS: the validation context, by file name, watching certs/
//!   certs/
//!     ..data -> ..<n>          the current set; replaced by one rename
//!     ..<n>/cert-chain.pem     the leaf, then intermediates
//!     ..<n>/key.pem            0600
//!     ..<n>/trust-bundle.pem   the roots
//!     cert-chain.pem -> ..data/cert-chain.pem   (the same for key.pem, trust-bundle.pem)
//! ```
//!
//! A new set is written into a fresh `..<n>` directory, then a symlink to it is renamed
//! over `..data` — the layout Kubernetes uses for projected volumes, and the one
//! Envoy's `watched_directory` is made for: the rename is the one event Envoy reacts
//! to, and it switches certificate, key and bundle at once.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use serde_json::json;

/// The SDS secret names the bootstrap refers to.
pub const CLIENT_CERT_SECRET: &str = "xds-client-cert";
pub const TRUST_BUNDLE_SECRET: &str = "xds-trust-bundle";

pub const CERT_CHAIN_FILE: &str = "cert-chain.pem";
pub const KEY_FILE: &str = "key.pem";
pub const TRUST_BUNDLE_FILE: &str = "trust-bundle.pem";
const DATA_LINK: &str = "..data";

#[derive(Debug, thiserror::Error)]
#[error("{}: {message}", path.display())]
pub struct CredentialError {
    pub path: PathBuf,
    pub message: String,
}

fn io_err(path: &Path) -> impl Fn(std::io::Error) -> CredentialError + '_ {
    move |e| CredentialError {
        path: path.to_path_buf(),
        message: e.to_string(),
    }
}

/// One set of credentials, PEM.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    pub cert_chain_pem: String,
    pub key_pem: zeroize::Zeroizing<String>,
    pub trust_bundle_pem: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials").finish_non_exhaustive()
    }
}

/// A credential directory (see the module doc).
#[derive(Debug, Clone)]
pub struct CredentialDir {
    root: PathBuf,
}

impl CredentialDir {
    /// The directory at `root` (absolute, since Envoy resolves the SDS files' paths
    /// from its own working directory); nothing is written until [`Self::write`].
    pub fn new(root: impl Into<PathBuf>) -> Result<CredentialDir, CredentialError> {
        let root = root.into();
        let root = if root.is_absolute() {
            root
        } else {
            std::env::current_dir().map_err(io_err(&root))?.join(root)
        };
        Ok(CredentialDir { root })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn certs_dir(&self) -> PathBuf {
        self.root.join("certs")
    }

    /// Where Envoy reads `file` (one of the `*_FILE`s), through `..data`.
    pub fn file(&self, file: &str) -> PathBuf {
        self.certs_dir().join(file)
    }

    pub fn client_cert_sds(&self) -> PathBuf {
        self.root
            .join("sds")
            .join(format!("{CLIENT_CERT_SECRET}.json"))
    }

    pub fn trust_bundle_sds(&self) -> PathBuf {
        self.root
            .join("sds")
            .join(format!("{TRUST_BUNDLE_SECRET}.json"))
    }

    /// Replaces the credentials at once (creating the layout the first time). Readers
    /// see either the old set or the new one, never a mix.
    pub fn write(&self, creds: &Credentials) -> Result<(), CredentialError> {
        let certs = self.certs_dir();
        for dir in [&self.root, &certs, &self.root.join("sds")] {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(io_err(dir))?;
        }
        // A directory of the agent's own is closed to everyone else. A pod's emptyDir
        // belongs to the kubelet (root, 0777) and cannot be changed by the proxy's uid:
        // it is mounted into the sidecar alone, and certs/ (which holds the key) is ours
        // and 0700 either way.
        if owner(&self.root)? == owner(&certs)? {
            fs::set_permissions(&self.root, fs::Permissions::from_mode(0o700))
                .map_err(io_err(&self.root))?;
        }
        let generation = self.next_generation()?;
        let data = certs.join(&generation);
        fs::DirBuilder::new()
            .mode(0o700)
            .create(&data)
            .map_err(io_err(&data))?;
        write_new(&data.join(CERT_CHAIN_FILE), &creds.cert_chain_pem, 0o644)?;
        write_new(&data.join(KEY_FILE), &creds.key_pem, 0o600)?;
        write_new(
            &data.join(TRUST_BUNDLE_FILE),
            &creds.trust_bundle_pem,
            0o644,
        )?;
        sync_dir(&data)?;
        // The swap: a new link, renamed over the old one.
        let tmp = certs.join("..data_tmp");
        let _ = fs::remove_file(&tmp);
        std::os::unix::fs::symlink(&generation, &tmp).map_err(io_err(&tmp))?;
        fs::rename(&tmp, certs.join(DATA_LINK)).map_err(io_err(&tmp))?;
        for file in [CERT_CHAIN_FILE, KEY_FILE, TRUST_BUNDLE_FILE] {
            let link = certs.join(file);
            if fs::symlink_metadata(&link).is_err() {
                std::os::unix::fs::symlink(Path::new(DATA_LINK).join(file), &link)
                    .map_err(io_err(&link))?;
            }
        }
        sync_dir(&certs)?;
        self.remove_old_generations(&generation);
        self.write_sds_files()
    }

    /// The credentials in force: all three from the one set `..data` names (read
    /// through the link once, so a swap meanwhile cannot mix two sets).
    pub fn read(&self) -> Result<Credentials, CredentialError> {
        let link = self.certs_dir().join(DATA_LINK);
        let set = match fs::read_link(&link) {
            Ok(target) => self.certs_dir().join(target),
            // Not written by this module (no swap): the files as they are.
            Err(_) => self.certs_dir(),
        };
        let read = |file: &str| {
            let path = set.join(file);
            fs::read_to_string(&path).map_err(io_err(&path))
        };
        Ok(Credentials {
            cert_chain_pem: read(CERT_CHAIN_FILE)?,
            key_pem: zeroize::Zeroizing::new(read(KEY_FILE)?),
            trust_bundle_pem: read(TRUST_BUNDLE_FILE)?,
        })
    }

    /// `..<n>`, one past the highest generation present.
    fn next_generation(&self) -> Result<String, CredentialError> {
        let certs = self.certs_dir();
        let highest = fs::read_dir(&certs)
            .map_err(io_err(&certs))?
            .filter_map(|e| e.ok())
            .filter_map(|e| generation_number(&e.file_name().to_string_lossy()))
            .max()
            .unwrap_or(0);
        Ok(format!("..{}", highest + 1))
    }

    /// Drops every generation but the current one (best effort: a leftover is only
    /// disk space).
    fn remove_old_generations(&self, current: &str) {
        let certs = self.certs_dir();
        let Ok(entries) = fs::read_dir(&certs) else {
            return;
        };
        for entry in entries.filter_map(|e| e.ok()) {
            let name = entry.file_name().to_string_lossy().to_string();
            if name != current && generation_number(&name).is_some() {
                let _ = fs::remove_dir_all(entry.path());
            }
        }
    }

    /// The two SDS files: they name the files under `certs/` and never change.
    fn write_sds_files(&self) -> Result<(), CredentialError> {
        let watched = json!({ "path": self.certs_dir() });
        let secret = |name: &str, body: (&str, serde_json::Value)| {
            let mut secret = json!({
                "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret",
                "name": name,
            });
            secret[body.0] = body.1;
            json!({ "resources": [secret] })
        };
        let client = secret(
            CLIENT_CERT_SECRET,
            (
                "tls_certificate",
                json!({
                    "certificate_chain": { "filename": self.file(CERT_CHAIN_FILE) },
                    "private_key": { "filename": self.file(KEY_FILE) },
                    "watched_directory": watched,
                }),
            ),
        );
        let bundle = secret(
            TRUST_BUNDLE_SECRET,
            (
                "validation_context",
                json!({
                    "trusted_ca": { "filename": self.file(TRUST_BUNDLE_FILE) },
                    "watched_directory": watched,
                }),
            ),
        );
        for (path, value) in [
            (self.client_cert_sds(), client),
            (self.trust_bundle_sds(), bundle),
        ] {
            let text = serde_json::to_string_pretty(&value).expect("JSON") + "\n";
            if fs::read_to_string(&path).ok().as_deref() != Some(text.as_str()) {
                replace_file(&path, &text, 0o644)?;
            }
        }
        Ok(())
    }
}

/// Writes `path` whole through a temporary file and a rename: a reader sees the old
/// text or the new one.
pub(crate) fn replace_file(path: &Path, text: &str, mode: u32) -> Result<(), CredentialError> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let _ = fs::remove_file(&tmp);
    write_new(&tmp, text, mode)?;
    fs::rename(&tmp, path).map_err(io_err(path))
}

fn generation_number(name: &str) -> Option<u64> {
    name.strip_prefix("..")?.parse().ok()
}

/// Creates `path` (which must not exist) with `mode` from the start, so a key is never
/// readable by others even for an instant.
fn owner(path: &Path) -> Result<u32, CredentialError> {
    use std::os::unix::fs::MetadataExt;
    Ok(fs::metadata(path).map_err(io_err(path))?.uid())
}

fn write_new(path: &Path, text: &str, mode: u32) -> Result<(), CredentialError> {
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(io_err(path))?;
    file.write_all(text.as_bytes()).map_err(io_err(path))?;
    file.sync_all().map_err(io_err(path))
}

fn sync_dir(dir: &Path) -> Result<(), CredentialError> {
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err(dir))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn creds(n: u32) -> Credentials {
        Credentials {
            cert_chain_pem: format!("chain {n}\n"),
            key_pem: format!("key {n}\n").into(),
            trust_bundle_pem: format!("bundle {n}\n"),
        }
    }

    #[test]
    fn a_directory_of_someone_elses_is_left_open_and_the_keys_is_closed() {
        // A pod's emptyDir: the kubelet's (here another uid), 0777.
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("emptydir");
        fs::create_dir(&root).unwrap();
        fs::set_permissions(&root, fs::Permissions::from_mode(0o777)).unwrap();
        let mine = owner(tmp.path()).unwrap();
        std::os::unix::fs::chown(&root, Some(mine + 4242), None).unwrap();
        let dir = CredentialDir::new(&root).unwrap();
        dir.write(&creds(1)).unwrap();
        assert_eq!(dir.read().unwrap(), creds(1));
        assert_eq!(
            fs::metadata(&root).unwrap().permissions().mode() & 0o777,
            0o777
        );
        let certs = fs::metadata(dir.certs_dir()).unwrap();
        assert_eq!(certs.permissions().mode() & 0o777, 0o700);
    }

    #[test]
    fn a_rewrite_swaps_the_whole_set_and_keeps_the_key_private() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = CredentialDir::new(tmp.path().join("creds")).unwrap();
        dir.write(&creds(1)).unwrap();
        assert_eq!(dir.read().unwrap(), creds(1));
        dir.write(&creds(2)).unwrap();
        assert_eq!(dir.read().unwrap(), creds(2));
        let key = fs::metadata(dir.file(KEY_FILE)).unwrap();
        assert_eq!(key.permissions().mode() & 0o777, 0o600);
        let root = fs::metadata(dir.root()).unwrap();
        assert_eq!(root.permissions().mode() & 0o777, 0o700);
        // Only the current generation is left.
        let generations: Vec<_> = fs::read_dir(dir.certs_dir())
            .unwrap()
            .filter_map(|e| generation_number(&e.unwrap().file_name().to_string_lossy()))
            .collect();
        assert_eq!(generations, vec![2]);
        let sds: serde_json::Value =
            serde_json::from_str(&fs::read_to_string(dir.client_cert_sds()).unwrap()).unwrap();
        assert_eq!(
            sds["resources"][0]["tls_certificate"]["private_key"]["filename"],
            json!(dir.file(KEY_FILE))
        );
    }
}
