//! Where the signing CA comes from, checked at start.
//!
//! - [`CaSource::Directory`]: meshd's own root. On first start a root is generated and
//!   written as `root-cert.pem` and `root-key.pem` (mode 0600, created exclusively, so a
//!   concurrent start never overwrites a root); later starts load it.
//! - [`CaSource::PlugIn`]: the user's CA, e.g. from cert-manager: a certificate chain
//!   file (the signing certificate first, the root last) and its key.
//!
//! Every problem — unreadable or non-PEM file, a key that does not match the
//! certificate, an expired CA, a certificate without CA constraints, a chain that does
//! not end in a root — fails with the file's path and what is wrong with it.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use rcgen::KeyPair;

use crate::authority::{Authority, CaConfig, CaError, generate_root};
use crate::pem::{certificate_blocks, not_after, not_before, parse};

pub const ROOT_CERT_FILE: &str = "root-cert.pem";
pub const ROOT_KEY_FILE: &str = "root-key.pem";
/// A root being rotated in (see [`stage_next_root`]).
pub const NEXT_ROOT_CERT_FILE: &str = "next-root-cert.pem";
pub const NEXT_ROOT_KEY_FILE: &str = "next-root-key.pem";
/// The root most recently rotated out, kept for the record.
pub const PREVIOUS_ROOT_CERT_FILE: &str = "previous-root-cert.pem";
pub const PREVIOUS_ROOT_KEY_FILE: &str = "previous-root-key.pem";
/// Lifetime of a root meshd generates.
pub const ROOT_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

#[derive(Debug, Clone)]
pub enum CaSource {
    Directory(PathBuf),
    PlugIn {
        cert_chain: PathBuf,
        key: PathBuf,
    },
    /// PEM text from elsewhere (a Kubernetes Secret); `origin` names it in errors.
    Pem {
        origin: String,
        chain_pem: String,
        key_pem: std::sync::Arc<crate::PrivateKeyPem>,
    },
}

impl std::fmt::Display for CaSource {
    /// Where the CA comes from, without its content.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CaSource::Directory(dir) => write!(f, "directory {}", dir.display()),
            CaSource::PlugIn { cert_chain, key } => write!(
                f,
                "plug-in {} (key {})",
                cert_chain.display(),
                key.display()
            ),
            CaSource::Pem { origin, .. } => f.write_str(origin),
        }
    }
}

/// What [`open`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Opened {
    Generated,
    Loaded,
}

pub fn open(source: &CaSource, config: CaConfig) -> Result<(Authority, Opened), CaError> {
    match source {
        CaSource::Directory(dir) => open_dir(dir, config),
        CaSource::PlugIn { cert_chain, key } => {
            Ok((load(cert_chain, key, config)?, Opened::Loaded))
        }
        CaSource::Pem {
            origin,
            chain_pem,
            key_pem,
        } => {
            let chain_label = PathBuf::from(format!("{origin} (certificate)"));
            let key_label = PathBuf::from(format!("{origin} (key)"));
            let authority = check(
                chain_pem,
                key_pem.secret_pem(),
                &chain_label,
                &key_label,
                config,
            )?;
            Ok((authority, Opened::Loaded))
        }
    }
}

fn open_dir(dir: &Path, config: CaConfig) -> Result<(Authority, Opened), CaError> {
    std::fs::create_dir_all(dir)
        .map_err(|e| CaError::file(dir, format!("cannot create the CA directory: {e}")))?;
    let cert = dir.join(ROOT_CERT_FILE);
    let key = dir.join(ROOT_KEY_FILE);
    match (cert.exists(), key.exists()) {
        (true, true) => Ok((load(&cert, &key, config)?, Opened::Loaded)),
        (false, false) => {
            let (cert_pem, key_pem) = generate_root(&config.trust_domain, ROOT_VALIDITY)?;
            write_new(&key, key_pem.secret_pem(), 0o600)?;
            write_new(&cert, &cert_pem, 0o644)?;
            Ok((load(&cert, &key, config)?, Opened::Generated))
        }
        (true, false) => Err(CaError::file(
            &key,
            format!(
                "is missing, but {} exists: restore the key or remove both",
                cert.display()
            ),
        )),
        (false, true) => Err(CaError::file(
            &cert,
            format!(
                "is missing, but {} exists: restore the certificate or remove both",
                key.display()
            ),
        )),
    }
}

/// Root rotation, step 1: generates the next root beside the current one. Fails if a
/// rotation is already staged.
pub fn stage_next_root(dir: &Path, config: &CaConfig) -> Result<(), CaError> {
    let (cert_pem, key_pem) = generate_root(&config.trust_domain, ROOT_VALIDITY)?;
    write_new(&dir.join(NEXT_ROOT_KEY_FILE), key_pem.secret_pem(), 0o600)?;
    write_new(&dir.join(NEXT_ROOT_CERT_FILE), &cert_pem, 0o644)
}

/// The staged next root, if a rotation is under way.
pub fn load_next_root(dir: &Path, config: CaConfig) -> Result<Option<Authority>, CaError> {
    let (cert, key) = (dir.join(NEXT_ROOT_CERT_FILE), dir.join(NEXT_ROOT_KEY_FILE));
    if !cert.exists() {
        return Ok(None);
    }
    load(&cert, &key, config).map(Some)
}

/// Root rotation, last step: the next root becomes the root; the old one is kept as
/// `previous-root-*.pem`.
pub fn promote_next_root(dir: &Path) -> Result<(), CaError> {
    let mv = |from: &str, to: &str| {
        std::fs::rename(dir.join(from), dir.join(to))
            .map_err(|e| CaError::file(dir.join(from), format!("cannot rename to {to}: {e}")))
    };
    mv(ROOT_CERT_FILE, PREVIOUS_ROOT_CERT_FILE)?;
    mv(ROOT_KEY_FILE, PREVIOUS_ROOT_KEY_FILE)?;
    mv(NEXT_ROOT_KEY_FILE, ROOT_KEY_FILE)?;
    mv(NEXT_ROOT_CERT_FILE, ROOT_CERT_FILE)
}

fn write_new(path: &Path, text: &str, mode: u32) -> Result<(), CaError> {
    write_file(path, text, mode, false)
}

/// Writes PEM material with `mode` (0600 for keys). `replace` allows overwriting an
/// existing file, whose mode is then reset too; without it an existing file is an error
/// (two processes racing to create a root must not overwrite each other).
pub fn write_file(path: &Path, text: &str, mode: u32, replace: bool) -> Result<(), CaError> {
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true);
    if replace {
        opts.create(true).truncate(true);
    } else {
        opts.create_new(true);
    }
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut opts, mode);
    #[cfg(not(unix))]
    let _ = mode;
    let mut f = opts
        .open(path)
        .map_err(|e| CaError::file(path, format!("cannot create: {e}")))?;
    // An existing file keeps its old mode on open; make sure a key stays private.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        f.set_permissions(std::fs::Permissions::from_mode(mode))
            .map_err(|e| CaError::file(path, format!("cannot set mode {mode:o}: {e}")))?;
    }
    f.write_all(text.as_bytes())
        .and_then(|_| f.sync_all())
        .map_err(|e| CaError::file(path, format!("cannot write: {e}")))
}

/// Loads and checks a CA: `chain_path` holds the signing certificate first and the root
/// last (one certificate if the signer is the root); `key_path` the signer's key.
pub fn load(chain_path: &Path, key_path: &Path, config: CaConfig) -> Result<Authority, CaError> {
    let chain_text = std::fs::read_to_string(chain_path)
        .map_err(|e| CaError::file(chain_path, format!("cannot read: {e}")))?;
    let key_text = zeroize::Zeroizing::new(
        std::fs::read_to_string(key_path)
            .map_err(|e| CaError::file(key_path, format!("cannot read: {e}")))?,
    );
    check(&chain_text, &key_text, chain_path, key_path, config)
}

/// [`load`]'s checks on PEM text; the paths only name the material in errors.
fn check(
    chain_text: &str,
    key_text: &str,
    chain_path: &Path,
    key_path: &Path,
    config: CaConfig,
) -> Result<Authority, CaError> {
    let chain = certificate_blocks(chain_text).map_err(|m| CaError::file(chain_path, m))?;
    if chain.is_empty() {
        return Err(CaError::file(chain_path, "holds no CERTIFICATE block"));
    }
    let key = KeyPair::from_pem(key_text).map_err(|e| {
        CaError::file(
            key_path,
            format!("is not a PEM private key meshd can sign with ({e})"),
        )
    })?;

    let now = SystemTime::now();
    for (i, (_, der)) in chain.iter().enumerate() {
        let which = if i == 0 {
            "the signing certificate".to_string()
        } else {
            format!("certificate {} of the chain", i + 1)
        };
        let cert = parse(der).map_err(|m| CaError::file(chain_path, format!("{which}: {m}")))?;
        if now > not_after(&cert) {
            return Err(CaError::file(
                chain_path,
                format!("{which} expired on {}", cert.validity().not_after),
            ));
        }
        if now < not_before(&cert) {
            return Err(CaError::file(
                chain_path,
                format!("{which} is not valid before {}", cert.validity().not_before),
            ));
        }
        let is_ca = cert
            .basic_constraints()
            .ok()
            .flatten()
            .is_some_and(|bc| bc.value.ca);
        if !is_ca {
            return Err(CaError::file(
                chain_path,
                format!("{which} is not a CA certificate (basicConstraints CA:TRUE is missing)"),
            ));
        }
        if let Ok(Some(ku)) = cert.key_usage()
            && !ku.value.key_cert_sign()
        {
            return Err(CaError::file(
                chain_path,
                format!("{which} may not sign certificates (keyUsage lacks keyCertSign)"),
            ));
        }
    }
    let signer = parse(&chain[0].1).map_err(|m| CaError::file(chain_path, m))?;
    if signer.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
        return Err(CaError::file(
            key_path,
            format!(
                "does not belong to the signing certificate in {}",
                chain_path.display()
            ),
        ));
    }
    let root =
        parse(&chain.last().expect("non-empty").1).map_err(|m| CaError::file(chain_path, m))?;
    if root.issuer().as_raw() != root.subject().as_raw() {
        return Err(CaError::file(
            chain_path,
            "must end with the root certificate (self-signed); append the root to the chain",
        ));
    }
    Authority::from_parts(config, &chain, key, Vec::new(), chain_path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::SpiffeId;

    fn cfg() -> CaConfig {
        CaConfig::default()
    }

    fn err_of(r: Result<Authority, CaError>) -> String {
        r.map(|_| ()).unwrap_err().to_string()
    }

    #[test]
    fn a_root_is_generated_once_and_reloaded() {
        let dir = tempfile::tempdir().unwrap();
        let ca_dir = dir.path().join("ca");
        let (a, opened) = open(&CaSource::Directory(ca_dir.clone()), cfg()).unwrap();
        assert_eq!(opened, Opened::Generated);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(ca_dir.join(ROOT_KEY_FILE))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        let (b, opened) = open(&CaSource::Directory(ca_dir), cfg()).unwrap();
        assert_eq!(opened, Opened::Loaded);
        assert_eq!(a.trust_bundle(), b.trust_bundle());
    }

    #[test]
    fn a_missing_half_is_not_silently_replaced() {
        let dir = tempfile::tempdir().unwrap();
        open(&CaSource::Directory(dir.path().into()), cfg()).unwrap();
        std::fs::remove_file(dir.path().join(ROOT_KEY_FILE)).unwrap();
        let err = open(&CaSource::Directory(dir.path().into()), cfg())
            .unwrap_err()
            .to_string();
        assert!(err.contains("root-key.pem: is missing"), "{err}");
    }

    #[test]
    fn a_key_that_does_not_match_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, _) = generate_root("cluster.local", ROOT_VALIDITY).unwrap();
        let (_, other_key) = generate_root("cluster.local", ROOT_VALIDITY).unwrap();
        std::fs::write(dir.path().join("c.pem"), cert).unwrap();
        std::fs::write(dir.path().join("k.pem"), other_key.secret_pem()).unwrap();
        let err = err_of(load(
            &dir.path().join("c.pem"),
            &dir.path().join("k.pem"),
            cfg(),
        ));
        assert!(
            err.contains("k.pem: does not belong to the signing certificate in"),
            "{err}"
        );
    }

    #[test]
    fn bad_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let c = dir.path().join("c.pem");
        let k = dir.path().join("k.pem");
        std::fs::write(&c, "hello").unwrap();
        std::fs::write(&k, "hello").unwrap();
        let err = err_of(load(&c, &k, cfg()));
        assert!(
            err.contains("c.pem: ") && err.contains("CERTIFICATE"),
            "{err}"
        );
        let (cert, key) = generate_root("cluster.local", ROOT_VALIDITY).unwrap();
        std::fs::write(&c, cert).unwrap();
        let err = err_of(load(&c, &k, cfg()));
        assert!(err.contains("k.pem: is not a PEM private key"), "{err}");
        std::fs::write(&k, key.secret_pem()).unwrap();
        assert!(load(&c, &k, cfg()).is_ok());
        let err = err_of(load(&dir.path().join("missing.pem"), &k, cfg()));
        assert!(err.contains("missing.pem: cannot read"), "{err}");
    }

    #[test]
    fn a_leaf_is_not_a_ca() {
        let dir = tempfile::tempdir().unwrap();
        let (a, _) = open(&CaSource::Directory(dir.path().join("ca")), cfg()).unwrap();
        let leaf = a
            .issue(&SpiffeId::new("cluster.local", "ns", "sa").unwrap())
            .unwrap();
        let c = dir.path().join("leaf.pem");
        let k = dir.path().join("leaf-key.pem");
        std::fs::write(&c, &leaf.chain_pem).unwrap();
        std::fs::write(&k, leaf.key.secret_pem()).unwrap();
        let err = err_of(load(&c, &k, cfg()));
        assert!(err.contains("is not a CA certificate"), "{err}");
    }

    /// A CA certificate signed by `issuer` (or self-signed), valid from `from` to `to`.
    fn ca_cert(
        name: &str,
        issuer: Option<&rcgen::Issuer<'_, KeyPair>>,
        from: std::time::SystemTime,
        to: std::time::SystemTime,
    ) -> (String, KeyPair) {
        use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyUsagePurpose};
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let secs = |t: std::time::SystemTime| {
            time::OffsetDateTime::from_unix_timestamp(
                t.duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64,
            )
            .unwrap()
        };
        params.not_before = secs(from);
        params.not_after = secs(to);
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let cert = match issuer {
            Some(i) => params.signed_by(&key, i).unwrap(),
            None => params.self_signed(&key).unwrap(),
        };
        (cert.pem(), key)
    }

    #[test]
    fn a_plug_in_intermediate_signs_leaves_that_chain_to_the_users_root() {
        let now = SystemTime::now();
        let year = Duration::from_secs(365 * 24 * 3600);
        let (root_pem, root_key) = ca_cert("corp root", None, now - year, now + year);
        let root_issuer = rcgen::Issuer::from_ca_cert_pem(&root_pem, root_key).unwrap();
        let (int_pem, int_key) = ca_cert(
            "mesh intermediate",
            Some(&root_issuer),
            now - year,
            now + year,
        );
        let dir = tempfile::tempdir().unwrap();
        let chain = dir.path().join("chain.pem");
        let key = dir.path().join("key.pem");
        std::fs::write(&chain, format!("{int_pem}{root_pem}")).unwrap();
        std::fs::write(&key, int_key.serialize_pem()).unwrap();
        let source = CaSource::PlugIn {
            cert_chain: chain.clone(),
            key: key.clone(),
        };
        let (ca, _) = open(&source, cfg()).unwrap();
        assert_eq!(ca.trust_bundle().roots().len(), 1);
        let leaf = ca
            .issue(&SpiffeId::new("cluster.local", "shop", "web").unwrap())
            .unwrap();
        let blocks = certificate_blocks(&leaf.chain_pem).unwrap();
        assert_eq!(blocks.len(), 2, "leaf followed by the intermediate");
        let leaf_cert = parse(&blocks[0].1).unwrap();
        let int_cert = parse(&blocks[1].1).unwrap();
        leaf_cert
            .verify_signature(Some(int_cert.public_key()))
            .unwrap();

        // Without the root at the end, the chain is refused, naming the file.
        std::fs::write(&chain, &int_pem).unwrap();
        let err = err_of(load(&chain, &key, cfg()));
        assert!(err.contains("chain.pem: must end with the root"), "{err}");
    }

    #[test]
    fn an_expired_root_is_refused_at_start() {
        let now = SystemTime::now();
        let day = Duration::from_secs(24 * 3600);
        let (pem, key) = ca_cert("old root", None, now - 10 * day, now - day);
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("root-cert.pem"), pem).unwrap();
        std::fs::write(dir.path().join("root-key.pem"), key.serialize_pem()).unwrap();
        let err = open(&CaSource::Directory(dir.path().into()), cfg())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("root-cert.pem: the signing certificate expired on"),
            "{err}"
        );
    }
}
