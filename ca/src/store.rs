//! Where the signing CA comes from, checked at start.
//!
//! - [`CaSource::Directory`]: meshd's own root. [`open_or_create`] (meshd) generates it
//!   on first start; [`open`] (meshctl and everything else) only reads it, and fails
//!   naming the directory if there is none. The files, and how every step on them
//!   survives a crash at any point, are described in [`layout`]; root rotation moves
//!   through them with [`stage_next_root`] and [`promote_next_root`].
//! - [`CaSource::PlugIn`]: the user's CA, e.g. from cert-manager: a certificate chain
//!   file (the signing certificate first, the root last) and its key.
//!
//! Every problem — unreadable or non-PEM file, a key that does not match the
//! certificate, an expired CA, a certificate without CA constraints, a chain that does
//! not end in a root — fails with the file's path and what is wrong with it. No error
//! advises removing a root's files: a new root would break every sidecar's trust.

#[cfg(test)]
mod crash_tests;
mod disk;
pub mod layout;

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use zeroize::Zeroizing;

use crate::authority::{Authority, CaConfig, CaError, generate_root};
use crate::pem::{certificate_blocks, not_after, not_before, parse, private_key};
use disk::Disk;

/// The root's key, followed by its certificate (see [`layout`]).
pub const ROOT_KEY_FILE: &str = "root-key.pem";
/// A copy of the root's certificate.
pub const ROOT_CERT_FILE: &str = "root-cert.pem";
/// A root being rotated in (see [`stage_next_root`]), laid out as the root is.
pub const NEXT_ROOT_KEY_FILE: &str = "next-root-key.pem";
pub const NEXT_ROOT_CERT_FILE: &str = "next-root-cert.pem";
/// The certificate of the root most recently rotated out, kept for the record (its key
/// is deleted when it is rotated out).
pub const PREVIOUS_ROOT_CERT_FILE: &str = "previous-root-cert.pem";
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

/// What [`open_or_create`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Opened {
    /// There was no CA: a root was generated.
    Generated,
    /// The CA was there. `repaired` says what a step interrupted earlier had left and
    /// how it was finished or undone, for the log.
    Loaded { repaired: Vec<String> },
}

/// Opens the CA `source` names; never creates or changes anything. A directory without
/// a CA is [`CaError::Missing`].
pub fn open(source: &CaSource, config: CaConfig) -> Result<Authority, CaError> {
    match source {
        CaSource::Directory(dir) => layout::read(dir)?
            .root
            .ok_or_else(|| CaError::Missing(dir.clone()))?
            .load(config),
        CaSource::PlugIn { cert_chain, key } => load(cert_chain, key, config),
        CaSource::Pem {
            origin,
            chain_pem,
            key_pem,
        } => {
            let chain_label = PathBuf::from(format!("{origin} (certificate)"));
            let key_label = PathBuf::from(format!("{origin} (key)"));
            check(
                chain_pem,
                key_pem.secret_pem(),
                &chain_label,
                &key_label,
                config,
            )
        }
    }
}

/// [`open`], except that a directory without a CA gets a new root, and a directory
/// left mid-step by a crash is brought to a consistent state first. For meshd only.
pub fn open_or_create(source: &CaSource, config: CaConfig) -> Result<(Authority, Opened), CaError> {
    match source {
        CaSource::Directory(dir) => open_or_create_dir(&Disk::new(dir), config),
        _ => Ok((
            open(source, config)?,
            Opened::Loaded {
                repaired: Vec::new(),
            },
        )),
    }
}

fn open_or_create_dir(disk: &Disk<'_>, config: CaConfig) -> Result<(Authority, Opened), CaError> {
    disk.create_dir()?;
    let (layout, repaired) = layout::repair(disk)?;
    if let Some(root) = layout.root {
        return Ok((root.load(config)?, Opened::Loaded { repaired }));
    }
    let (cert_pem, key_pem) = generate_root(&config.trust_domain, ROOT_VALIDITY)?;
    // Linked into place, never over an existing key: a concurrent start that got there
    // first wins, and this one loads its root.
    let generated = disk.write(
        ROOT_KEY_FILE,
        &key_file(key_pem.secret_pem(), &cert_pem),
        0o600,
        false,
    )?;
    let (layout, _) = layout::repair(disk)?;
    let root = layout
        .root
        .ok_or_else(|| CaError::file(disk.path(ROOT_KEY_FILE), "disappeared as it was created"))?;
    let opened = if generated {
        Opened::Generated
    } else {
        Opened::Loaded {
            repaired: Vec::new(),
        }
    };
    Ok((root.load(config)?, opened))
}

/// A key file: the key, then its certificate.
fn key_file(key_pem: &str, cert_pem: &str) -> Zeroizing<String> {
    let mut text = Zeroizing::new(String::with_capacity(key_pem.len() + cert_pem.len() + 1));
    text.push_str(key_pem);
    if !key_pem.ends_with('\n') {
        text.push('\n');
    }
    text.push_str(cert_pem);
    text
}

/// Root rotation, step 1: generates the next root beside the current one. A next root
/// already staged (an earlier attempt failed part-way) is kept, and its files completed.
pub fn stage_next_root(dir: &Path, config: &CaConfig) -> Result<(), CaError> {
    stage(&Disk::new(dir), config)
}

fn stage(disk: &Disk<'_>, config: &CaConfig) -> Result<(), CaError> {
    let (layout, _) = layout::repair(disk)?;
    if layout.root.is_none() {
        return Err(CaError::Missing(disk.dir().to_path_buf()));
    }
    if layout.next.is_some() {
        return Ok(());
    }
    let (cert_pem, key_pem) = generate_root(&config.trust_domain, ROOT_VALIDITY)?;
    disk.write(
        NEXT_ROOT_KEY_FILE,
        &key_file(key_pem.secret_pem(), &cert_pem),
        0o600,
        false,
    )?;
    // Writes next-root-cert.pem from the key file.
    layout::repair(disk).map(|_| ())
}

/// The staged next root, if a rotation is under way. Writes nothing.
pub fn load_next_root(dir: &Path, config: CaConfig) -> Result<Option<Authority>, CaError> {
    layout::read(dir)?
        .next
        .map(|next| next.load(config))
        .transpose()
}

/// Root rotation, last step: the next root becomes the root. The old root's certificate
/// is kept as `previous-root-cert.pem`; its key is deleted. After an interrupted
/// promotion this finishes it; with no next root staged it does nothing.
pub fn promote_next_root(dir: &Path) -> Result<(), CaError> {
    promote(&Disk::new(dir))
}

fn promote(disk: &Disk<'_>) -> Result<(), CaError> {
    let (layout, _) = layout::repair(disk)?;
    let root = layout
        .root
        .ok_or_else(|| CaError::Missing(disk.dir().to_path_buf()))?;
    if layout.next.is_none() {
        return Ok(());
    }
    disk.write(PREVIOUS_ROOT_CERT_FILE, root.cert_pem(), 0o644, true)?;
    // The one step that makes the next root the root.
    disk.rename(NEXT_ROOT_KEY_FILE, ROOT_KEY_FILE)?;
    // Moves next-root-cert.pem over root-cert.pem.
    layout::repair(disk).map(|_| ())
}

/// Writes PEM material with `mode` (0600 for keys), atomically: a reader sees the old
/// content or the new, whole. `replace` allows replacing an existing file (whose mode is
/// then `mode` too); without it an existing file is an error.
pub fn write_file(path: &Path, text: &str, mode: u32, replace: bool) -> Result<(), CaError> {
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| CaError::file(path, "is not a file name"))?;
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    if Disk::new(dir).write(name, text, mode, replace)? {
        Ok(())
    } else {
        Err(CaError::file(path, "already exists"))
    }
}

/// Loads and checks a CA: `chain_path` holds the signing certificate first and the root
/// last (one certificate if the signer is the root); `key_path` the signer's key.
fn load(chain_path: &Path, key_path: &Path, config: CaConfig) -> Result<Authority, CaError> {
    let chain_text = std::fs::read_to_string(chain_path)
        .map_err(|e| CaError::file(chain_path, format!("cannot read: {e}")))?;
    let key_text = zeroize::Zeroizing::new(
        std::fs::read_to_string(key_path)
            .map_err(|e| CaError::file(key_path, format!("cannot read: {e}")))?,
    );
    check(&chain_text, &key_text, chain_path, key_path, config)
}

/// [`load`]'s checks on PEM text; the paths only name the material in errors.
pub(crate) fn check(
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
    let key = private_key(key_text).map_err(|e| {
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
    use rcgen::KeyPair;

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
        let source = CaSource::Directory(ca_dir.clone());
        let (a, opened) = open_or_create(&source, cfg()).unwrap();
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
        let (b, opened) = open_or_create(&source, cfg()).unwrap();
        assert_eq!(opened, Opened::Loaded { repaired: vec![] });
        assert_eq!(a.trust_bundle(), b.trust_bundle());
        assert_eq!(
            open(&source, cfg()).unwrap().trust_bundle(),
            a.trust_bundle()
        );
        let cert = std::fs::read_to_string(ca_dir.join(ROOT_CERT_FILE)).unwrap();
        assert_eq!(a.trust_bundle().roots(), [cert]);
    }

    #[test]
    fn open_never_creates_a_ca() {
        let dir = tempfile::tempdir().unwrap();
        for ca_dir in [dir.path().join("ca"), dir.path().to_path_buf()] {
            let err = open(&CaSource::Directory(ca_dir.clone()), cfg())
                .map(|_| ())
                .unwrap_err();
            assert!(matches!(&err, CaError::Missing(d) if *d == ca_dir), "{err}");
            assert!(err.to_string().contains("no CA here"), "{err}");
        }
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            0,
            "nothing written"
        );
    }

    #[test]
    fn a_missing_key_is_never_replaced_and_a_missing_certificate_is_restored() {
        let dir = tempfile::tempdir().unwrap();
        let source = CaSource::Directory(dir.path().into());
        let (a, _) = open_or_create(&source, cfg()).unwrap();
        // The certificate is a copy of the one in the key file.
        std::fs::remove_file(dir.path().join(ROOT_CERT_FILE)).unwrap();
        assert_eq!(
            open(&source, cfg()).unwrap().trust_bundle(),
            a.trust_bundle()
        );
        let (b, opened) = open_or_create(&source, cfg()).unwrap();
        assert_eq!(a.trust_bundle(), b.trust_bundle());
        assert!(
            matches!(&opened, Opened::Loaded { repaired } if repaired.len() == 1
                && repaired[0].starts_with("wrote root-cert.pem")),
            "{opened:?}"
        );
        assert_eq!(
            std::fs::read_to_string(dir.path().join(ROOT_CERT_FILE)).unwrap(),
            a.trust_bundle().roots()[0]
        );

        std::fs::remove_file(dir.path().join(ROOT_KEY_FILE)).unwrap();
        let err = open_or_create(&source, cfg()).unwrap_err().to_string();
        assert!(err.contains("root-key.pem: is missing"), "{err}");
        assert!(err.contains("restore root-key.pem from a backup"), "{err}");
        assert!(
            !err.contains("remove"),
            "advice that would change the root: {err}"
        );
        assert!(!dir.path().join(ROOT_KEY_FILE).exists(), "no new root");
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
        let (a, _) = open_or_create(&CaSource::Directory(dir.path().join("ca")), cfg()).unwrap();
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
        let ca = open(&source, cfg()).unwrap();
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
