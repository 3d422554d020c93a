//! The CA directory's files, what each state of them means, and how a step that was
//! interrupted is finished or undone.
//!
//! | file | holds |
//! |---|---|
//! | `root-key.pem` (0600) | the root's key, followed by its certificate |
//! | `root-cert.pem` | a copy of the root's certificate, for readers |
//! | `next-root-key.pem` (0600) | during a rotation: the next root's key and certificate |
//! | `next-root-cert.pem` | a copy of the next root's certificate |
//! | `previous-root-cert.pem` | the root last rotated out, for the record |
//!
//! Because a key file carries its certificate, each step that changes the roots takes
//! effect with one change of one name (the `disk` module makes those atomic):
//! - creating the root: `root-key.pem` linked into place (never over an existing one);
//! - staging the next root: `next-root-key.pem` linked into place;
//! - promoting it: `next-root-key.pem` renamed over `root-key.pem`, which deletes the old
//!   root's key (its certificate is copied to `previous-root-cert.pem` first).
//!
//! The certificate files are copies, written after their key file and rewritten from it
//! when they are missing or stale. `read` works out, from whatever state a crash left,
//! the roots the directory holds and the repairs that bring the copies in line; it
//! writes nothing, so `meshctl` reads the CA as meshd will use it. `repair` makes the
//! repairs; each is itself one atomic step, so an interrupted repair is redone.
//!
//! Older meshd versions kept a key alone in its file and promoted with four renames
//! (`root-*` to `previous-root-*`, `next-root-*` to `root-*`). A key without a
//! certificate takes the certificate file whose public key matches; with that, every
//! state those renames could leave resolves too, and the old `previous-root-key.pem` is
//! deleted. Of those, only the one with `root-key.pem` gone and `next-root-key.pem` there
//! is finished by promoting, and only when it bears a promotion's marks (a next key
//! alone in its file, or `previous-root-cert.pem` already the root's certificate):
//! otherwise that state is operator error or a partial restore, and reading refuses it,
//! saying to restore `root-key.pem` from a backup.

use std::fmt;
use std::path::{Path, PathBuf};

use super::disk::{Disk, is_temporary};
use super::{
    NEXT_ROOT_CERT_FILE, NEXT_ROOT_KEY_FILE, PREVIOUS_ROOT_CERT_FILE, ROOT_CERT_FILE, ROOT_KEY_FILE,
};
use crate::authority::{Authority, CaConfig, CaError, PrivateKeyPem};
use crate::pem::{certificate_blocks, parse, private_key};

/// Where older meshd versions kept the previous root's key.
const OLD_PREVIOUS_ROOT_KEY_FILE: &str = "previous-root-key.pem";

/// The roots a CA directory holds, and what has to be done to its files.
#[derive(Debug)]
pub(crate) struct Layout {
    /// `None`: the directory holds no CA.
    pub root: Option<RootFiles>,
    /// The root being rotated in.
    pub next: Option<RootFiles>,
    /// In order; empty when the files are as the steps leave them.
    pub repairs: Vec<Repair>,
}

/// One root: its certificate and its key file, as read.
#[derive(Debug)]
pub(crate) struct RootFiles {
    cert: Cert,
    cert_path: PathBuf,
    /// The key file's text: the key, maybe followed by its certificate.
    key_text: PrivateKeyPem,
    key_path: PathBuf,
}

impl RootFiles {
    pub fn cert_pem(&self) -> &str {
        &self.cert.pem
    }

    pub fn load(&self, config: CaConfig) -> Result<Authority, CaError> {
        super::check(
            &self.cert.pem,
            self.key_text.secret_pem(),
            &self.cert_path,
            &self.key_path,
            config,
        )
    }
}

/// A change that brings the files in line with the roots they hold.
#[derive(Debug)]
pub(crate) enum Repair {
    Rename {
        from: &'static str,
        to: &'static str,
        why: &'static str,
    },
    /// Writes a certificate copy.
    Write {
        name: &'static str,
        pem: String,
        why: &'static str,
    },
    Remove {
        name: String,
        why: &'static str,
    },
}

impl Repair {
    fn apply(&self, disk: &Disk<'_>) -> Result<(), CaError> {
        match self {
            Repair::Rename { from, to, .. } => disk.rename(from, to),
            Repair::Write { name, pem, .. } => disk.write(name, pem, 0o644, true).map(|_| ()),
            Repair::Remove { name, .. } => disk.remove(name),
        }
    }
}

impl fmt::Display for Repair {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Repair::Rename { from, to, why } => write!(f, "renamed {from} to {to}: {why}"),
            Repair::Write { name, why, .. } => write!(f, "wrote {name}: {why}"),
            Repair::Remove { name, why } => write!(f, "removed {name}: {why}"),
        }
    }
}

/// A certificate file's first certificate.
#[derive(Debug, Clone)]
struct Cert {
    pem: String,
    der: Vec<u8>,
    public_key: Vec<u8>,
}

/// A key file: the key's public half and the certificate that follows it, if any.
#[derive(Debug)]
struct KeyFile {
    text: PrivateKeyPem,
    public_key: Vec<u8>,
    cert: Option<Cert>,
}

/// The roots in `dir` and the repairs its files need. Writes nothing.
pub(crate) fn read(dir: &Path) -> Result<Layout, CaError> {
    let path = |name: &str| dir.join(name);
    let key = read_key(&path(ROOT_KEY_FILE))?;
    let next_key = read_key(&path(NEXT_ROOT_KEY_FILE))?;
    let cert = read_cert(&path(ROOT_CERT_FILE))?;
    let next_cert = read_cert(&path(NEXT_ROOT_CERT_FILE))?;
    let previous = read_cert(&path(PREVIOUS_ROOT_CERT_FILE))?;
    let mut repairs = Vec::new();

    // Which key is the root's.
    let (key, key_name, next_key) = match (key, next_key) {
        (Some(key), next_key) => (key, ROOT_KEY_FILE, next_key),
        // Only the old four-rename promotion leaves this by a crash: the old key had
        // been moved away, the next one not yet moved in. Its marks: the next key file
        // holds the key alone (the old layout), or `previous-root-cert.pem` already holds
        // the certificate in `root-cert.pem` (a promotion's first step, done). Anything else is operator
        // error or a partial restore: promoting then would silently make a root that
        // sidecars may not trust yet the one that signs.
        (None, Some(next_key))
            if next_key.cert.is_none() || previous.as_ref().is_some_and(|p| same(&cert, p)) =>
        {
            repairs.push(Repair::Rename {
                from: NEXT_ROOT_KEY_FILE,
                to: ROOT_KEY_FILE,
                why: "finishing a root promotion that was interrupted after the old root's \
                      key was moved away",
            });
            (next_key, NEXT_ROOT_KEY_FILE, None)
        }
        (None, Some(_)) => {
            return Err(CaError::file(
                path(ROOT_KEY_FILE),
                format!(
                    "is missing, but {NEXT_ROOT_KEY_FILE} is there and no root promotion \
                     was in progress: restore {ROOT_KEY_FILE} from a backup. meshd does not \
                     promote the next root on its own: sidecars that do not trust it yet \
                     would refuse the certificates it signs"
                ),
            ));
        }
        (None, None) => {
            if let Some(name) = [(ROOT_CERT_FILE, &cert), (NEXT_ROOT_CERT_FILE, &next_cert)]
                .into_iter()
                .find_map(|(name, c)| c.as_ref().map(|_| name))
            {
                return Err(CaError::file(
                    path(ROOT_KEY_FILE),
                    format!(
                        "is missing, but {name} is there: restore {ROOT_KEY_FILE} from a backup. \
                         meshd does not make a new root beside an existing one: every sidecar \
                         trusts the old root and would refuse certificates from a new one"
                    ),
                ));
            }
            return Ok(Layout {
                root: None,
                next: None,
                repairs,
            });
        }
    };

    // The root's certificate: the one in its key file, else (older versions) the
    // certificate file that matches the key.
    let (root_cert, root_cert_path) = match &key.cert {
        Some(c) => (c.clone(), path(key_name)),
        None => [
            (ROOT_CERT_FILE, &cert),
            (NEXT_ROOT_CERT_FILE, &next_cert),
            (PREVIOUS_ROOT_CERT_FILE, &previous),
        ]
        .into_iter()
        .find_map(|(name, c)| {
            c.as_ref()
                .filter(|c| c.public_key == key.public_key)
                .map(|c| (c.clone(), path(name)))
        })
        .ok_or_else(|| no_certificate_for(&path(key_name), &path(ROOT_CERT_FILE), &cert))?,
    };
    let promoting = next_key.is_none() && same(&next_cert, &root_cert);
    if !same(&cert, &root_cert) {
        repairs.push(if promoting {
            Repair::Rename {
                from: NEXT_ROOT_CERT_FILE,
                to: ROOT_CERT_FILE,
                why: "finishing a root promotion that was interrupted before the \
                      certificate copy was moved into place",
            }
        } else {
            Repair::Write {
                name: ROOT_CERT_FILE,
                pem: root_cert.pem.clone(),
                why: "it was missing or not the root's certificate; it is a copy of the \
                      certificate in root-key.pem",
            }
        });
    }

    let next = match next_key {
        Some(next_key) => {
            let matching = next_cert
                .clone()
                .filter(|c| c.public_key == next_key.public_key);
            match (next_key.cert.clone(), matching) {
                (Some(c), _) => {
                    if !same(&next_cert, &c) {
                        repairs.push(Repair::Write {
                            name: NEXT_ROOT_CERT_FILE,
                            pem: c.pem.clone(),
                            why: "staging the next root was interrupted before its \
                                  certificate copy was written",
                        });
                    }
                    Some(RootFiles {
                        cert: c,
                        cert_path: path(NEXT_ROOT_KEY_FILE),
                        key_text: next_key.text,
                        key_path: path(NEXT_ROOT_KEY_FILE),
                    })
                }
                (None, Some(c)) => Some(RootFiles {
                    cert: c,
                    cert_path: path(NEXT_ROOT_CERT_FILE),
                    key_text: next_key.text,
                    key_path: path(NEXT_ROOT_KEY_FILE),
                }),
                // An older version wrote the key first, alone: without its certificate
                // the next root was never trusted by anyone.
                (None, None) if next_cert.is_none() => {
                    repairs.push(Repair::Remove {
                        name: NEXT_ROOT_KEY_FILE.into(),
                        why: "staging the next root was interrupted before its certificate \
                              was written, so nothing trusts it; a new one is staged on the \
                              next rotation",
                    });
                    None
                }
                (None, None) => {
                    return Err(CaError::file(
                        path(NEXT_ROOT_CERT_FILE),
                        format!(
                            "does not belong to {NEXT_ROOT_KEY_FILE}: restore the matching \
                             file from a backup"
                        ),
                    ));
                }
            }
        }
        None => {
            match &next_cert {
                Some(c) if c.der != root_cert.der => {
                    return Err(CaError::file(
                        path(NEXT_ROOT_CERT_FILE),
                        format!(
                            "has no {NEXT_ROOT_KEY_FILE} beside it and is not the root's \
                             certificate, so meshd cannot tell which root it is: restore \
                             {NEXT_ROOT_KEY_FILE} from a backup, or move this file out of \
                             the directory (the root stays as it is)"
                        ),
                    ));
                }
                Some(_) if same(&cert, &root_cert) => {
                    repairs.push(Repair::Remove {
                        name: NEXT_ROOT_CERT_FILE.into(),
                        why: "a copy of the root's certificate left by a finished promotion",
                    });
                }
                _ => {}
            }
            None
        }
    };

    // The previous root is no longer trusted once it is the previous root.
    if exists(&path(OLD_PREVIOUS_ROOT_KEY_FILE))? {
        repairs.push(Repair::Remove {
            name: OLD_PREVIOUS_ROOT_KEY_FILE.into(),
            why: "the key of a root that is no longer trusted",
        });
    }
    for name in temporary_files(dir)? {
        repairs.push(Repair::Remove {
            name,
            why: "a temporary file of an interrupted write",
        });
    }

    Ok(Layout {
        root: Some(RootFiles {
            cert: root_cert,
            cert_path: root_cert_path,
            key_text: key.text,
            key_path: path(key_name),
        }),
        next,
        repairs,
    })
}

/// Makes the repairs [`read`] finds; returns the roots as the files now hold them and
/// what was done.
pub(crate) fn repair(disk: &Disk<'_>) -> Result<(Layout, Vec<String>), CaError> {
    let layout = read(disk.dir())?;
    if layout.repairs.is_empty() {
        return Ok((layout, Vec::new()));
    }
    let mut done = Vec::new();
    for repair in &layout.repairs {
        repair.apply(disk)?;
        done.push(repair.to_string());
    }
    Ok((read(disk.dir())?, done))
}

/// Whether `c` is `cert`.
fn same(c: &Option<Cert>, cert: &Cert) -> bool {
    c.as_ref().is_some_and(|c| c.der == cert.der)
}

fn no_certificate_for(key_path: &Path, cert_path: &Path, cert: &Option<Cert>) -> CaError {
    // The root certificate is also in every trust bundle meshd handed out.
    let where_else = "every sidecar's trust bundle, such as the -ca.pem beside a bootstrap, \
                      holds the root certificate";
    match cert {
        Some(_) => CaError::file(
            key_path,
            format!(
                "does not belong to the certificate in {}: restore the matching one from a \
                 backup; {where_else}",
                cert_path.display()
            ),
        ),
        None => CaError::file(
            cert_path,
            format!(
                "is missing and {} holds no certificate: restore it from a backup; \
                 {where_else}",
                key_path.display()
            ),
        ),
    }
}

/// A file's text; `None` if there is no such file.
fn read_text(path: &Path) -> Result<Option<String>, CaError> {
    match std::fs::read_to_string(path) {
        Ok(text) => Ok(Some(text)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(CaError::file(path, format!("cannot read: {e}"))),
    }
}

fn read_cert(path: &Path) -> Result<Option<Cert>, CaError> {
    let Some(text) = read_text(path)? else {
        return Ok(None);
    };
    first_certificate(&text, path)?
        .ok_or_else(|| CaError::file(path, "holds no CERTIFICATE block"))
        .map(Some)
}

fn read_key(path: &Path) -> Result<Option<KeyFile>, CaError> {
    let Some(text) = read_text(path)?.map(PrivateKeyPem::new) else {
        return Ok(None);
    };
    let key = private_key(text.secret_pem()).map_err(|m| {
        CaError::file(
            path,
            format!("is not a PEM private key meshd can sign with ({m})"),
        )
    })?;
    Ok(Some(KeyFile {
        public_key: key.public_key_raw().to_vec(),
        cert: first_certificate(text.secret_pem(), path)?,
        text,
    }))
}

fn first_certificate(text: &str, path: &Path) -> Result<Option<Cert>, CaError> {
    let Some((pem, der)) = certificate_blocks(text)
        .map_err(|m| CaError::file(path, m))?
        .into_iter()
        .next()
    else {
        return Ok(None);
    };
    let public_key = parse(&der)
        .map_err(|m| CaError::file(path, m))?
        .public_key()
        .subject_public_key
        .data
        .to_vec();
    Ok(Some(Cert {
        pem,
        der,
        public_key,
    }))
}

fn exists(path: &Path) -> Result<bool, CaError> {
    std::fs::symlink_metadata(path)
        .map(|_| true)
        .or_else(|e| match e.kind() {
            std::io::ErrorKind::NotFound => Ok(false),
            _ => Err(CaError::file(path, format!("cannot read: {e}"))),
        })
}

fn temporary_files(dir: &Path) -> Result<Vec<String>, CaError> {
    let entries = std::fs::read_dir(dir)
        .map_err(|e| CaError::file(dir, format!("cannot list the CA directory: {e}")))?;
    let mut names = Vec::new();
    for entry in entries {
        let entry =
            entry.map_err(|e| CaError::file(dir, format!("cannot list the CA directory: {e}")))?;
        if let Some(name) = entry.file_name().to_str().filter(|n| is_temporary(n)) {
            names.push(name.to_string());
        }
    }
    names.sort();
    Ok(names)
}
