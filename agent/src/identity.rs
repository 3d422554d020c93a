//! Who the pod is, and what proves it to meshd at each call.
//!
//! - Token mode: the identity is what the pod-bound token's claims say
//!   (`spiffe://<--trust-domain>/ns/<namespace>/sa/<serviceaccount>`, pod
//!   `kubernetes.io.pod.name`). Each call reads the token file again (the kubelet
//!   rotates it); a token that names another pod or identity than the one the agent
//!   started with is refused, not followed.
//! - Local mode: the identity is the SPIFFE id of the certificate in `--cert-dir`
//!   (`meshctl bootstrap -o DIR`), the pod `--pod`. Each call presents, over mutual
//!   TLS, the valid certificate of that identity that expires last: normally the
//!   agent's own (renewed with itself), else the one in `--cert-dir` (read again, so a
//!   fresh `meshctl bootstrap` recovers an agent whose certificate ran out). The agent's
//!   own directory counts from its previous run too, so a restart does not need the
//!   bootstrap certificate still to be valid.

use std::path::{Path, PathBuf};
use std::time::SystemTime;

use anyhow::{Context, bail};
use meshd_ca::SpiffeId;
use meshd_sidecar::credentials::{CredentialDir, Credentials};
use zeroize::Zeroizing;

use crate::ca_client::Credential;
use crate::certs;
use crate::cli::RunArgs;

/// The pod the agent serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pod {
    pub id: SpiffeId,
    pub name: String,
}

#[derive(Debug)]
pub enum Mode {
    Token { file: PathBuf },
    Local { cert_dir: CredentialDir },
}

/// What proves the pod in one call, owned.
pub enum Proof {
    Token(Zeroizing<String>),
    Certificate(Credentials),
}

impl Proof {
    pub fn credential(&self) -> Credential<'_> {
        match self {
            Proof::Token(t) => Credential::Token(t),
            Proof::Certificate(c) => Credential::Certificate {
                chain_pem: &c.cert_chain_pem,
                key_pem: &c.key_pem,
            },
        }
    }
}

/// The mode, the pod and the roots to trust meshd with at first, from the flags.
pub fn resolve(args: &RunArgs) -> anyhow::Result<(Mode, Pod, String)> {
    match &args.cert_dir {
        Some(dir) => {
            let cert_dir = CredentialDir::new(dir)?;
            let creds = cert_dir.read().with_context(|| {
                format!(
                    "--cert-dir {}: not a directory `meshctl bootstrap -o DIR` wrote",
                    dir.display()
                )
            })?;
            let leaf = certs::leaf(&creds.cert_chain_pem).map_err(|e| {
                anyhow::anyhow!(
                    "--cert-dir {}: {}: {e}",
                    dir.display(),
                    cert_dir
                        .file(meshd_sidecar::credentials::CERT_CHAIN_FILE)
                        .display()
                )
            })?;
            let Some(name) = args.pod.clone() else {
                bail!(
                    "--pod (or POD_NAME) is required with --cert-dir: the certificate names \
                     {} but not the pod",
                    leaf.id
                );
            };
            let pod = Pod { id: leaf.id, name };
            Ok((Mode::Local { cert_dir }, pod, creds.trust_bundle_pem))
        }
        None => {
            let (_, claims) = crate::token::read(&args.token_file)?;
            let id = SpiffeId::new(
                &args.trust_domain,
                &claims.namespace,
                &claims.service_account,
            )
            .with_context(|| {
                format!(
                    "the token file {}: its namespace and service account with --trust-domain",
                    args.token_file.display()
                )
            })?;
            if let Some(given) = &args.pod
                && *given != claims.pod
            {
                bail!(
                    "--pod (POD_NAME) is {given:?} but the token file {} is bound to pod {:?}",
                    args.token_file.display(),
                    claims.pod
                );
            }
            let roots = std::fs::read_to_string(&args.trust_bundle).with_context(|| {
                format!(
                    "--trust-bundle {}: the roots to trust meshd with",
                    args.trust_bundle.display()
                )
            })?;
            let pod = Pod {
                id,
                name: claims.pod,
            };
            Ok((
                Mode::Token {
                    file: args.token_file.clone(),
                },
                pod,
                roots,
            ))
        }
    }
}

impl Mode {
    /// The proof for a call now. `held` is what the agent holds (its own directory's
    /// set at start, then each set it wrote).
    pub fn proof(&self, pod: &Pod, held: Option<&Credentials>) -> anyhow::Result<Proof> {
        match self {
            Mode::Token { file } => {
                let (token, claims) = crate::token::read(file)?;
                if claims.pod != pod.name
                    || claims.namespace != pod.id.namespace()
                    || claims.service_account != pod.id.service_account()
                {
                    bail!(
                        "the token file {} now names pod {}/{} of service account {:?}; the \
                         agent serves {}/{} as {}",
                        file.display(),
                        claims.namespace,
                        claims.pod,
                        claims.service_account,
                        pod.id.namespace(),
                        pod.name,
                        pod.id
                    );
                }
                Ok(Proof::Token(token))
            }
            Mode::Local { cert_dir } => {
                let bootstrap = cert_dir.read();
                let now = SystemTime::now();
                let candidates = held.into_iter().chain(bootstrap.as_ref().ok());
                let best = candidates
                    .filter_map(|c| Some((certs::leaf(&c.cert_chain_pem).ok()?, c)))
                    .filter(|(leaf, _)| leaf.id == pod.id && leaf.valid_at(now))
                    .max_by_key(|(leaf, _)| leaf.not_after);
                match best {
                    Some((_, creds)) => Ok(Proof::Certificate(creds.clone())),
                    None => bail!(
                        "no valid certificate for {} to renew with: the agent's own has \
                         expired (or there is none) and so has {}{}; write a fresh one with \
                         `meshctl bootstrap -o {}`",
                        pod.id,
                        cert_file(cert_dir.root()).display(),
                        bootstrap
                            .as_ref()
                            .err()
                            .map(|e| format!(" ({e})"))
                            .unwrap_or_default(),
                        cert_dir.root().display()
                    ),
                }
            }
        }
    }
}

fn cert_file(dir: &Path) -> PathBuf {
    CredentialDir::new(dir)
        .map(|d| d.file(meshd_sidecar::credentials::CERT_CHAIN_FILE))
        .unwrap_or_else(|_| dir.to_path_buf())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::certs::test_ca;
    use crate::keys::new_key_and_csr;

    fn creds(ca: &meshd_ca::Authority, id: &SpiffeId, ttl: Duration) -> Credentials {
        let made = new_key_and_csr(id).unwrap();
        Credentials {
            cert_chain_pem: test_ca::sign(ca, &made.csr_pem, id, ttl),
            key_pem: made.key_pem,
            trust_bundle_pem: ca.trust_bundle().pem(),
        }
    }

    #[test]
    fn local_mode_renews_with_the_valid_certificate_that_lasts_longest() {
        let tmp = tempfile::tempdir().unwrap();
        let ca = test_ca::authority(&tmp.path().join("ca"));
        let id: SpiffeId = "spiffe://cluster.local/ns/shop/sa/web".parse().unwrap();
        let pod = Pod {
            id: id.clone(),
            name: "web-1".into(),
        };
        let cert_dir = CredentialDir::new(tmp.path().join("web-1")).unwrap();
        let bootstrap = creds(&ca, &id, Duration::from_secs(86_400));
        cert_dir.write(&bootstrap).unwrap();
        let mode = Mode::Local { cert_dir };
        let chain_of = |p: Proof| match p {
            Proof::Certificate(c) => c.cert_chain_pem,
            Proof::Token(_) => panic!("a token in local mode"),
        };
        // Nothing held yet: the bootstrap certificate.
        let first = chain_of(mode.proof(&pod, None).unwrap());
        assert_eq!(first, bootstrap.cert_chain_pem);
        // The agent's own, once it outlasts the bootstrap one.
        let own = creds(&ca, &id, Duration::from_secs(2 * 86_400));
        assert_eq!(
            chain_of(mode.proof(&pod, Some(&own)).unwrap()),
            own.cert_chain_pem
        );
        // Another identity's certificate never counts.
        let other: SpiffeId = "spiffe://cluster.local/ns/shop/sa/db".parse().unwrap();
        let foreign = creds(&ca, &other, Duration::from_secs(3 * 86_400));
        assert_eq!(
            chain_of(mode.proof(&pod, Some(&foreign)).unwrap()),
            bootstrap.cert_chain_pem
        );
    }

    #[test]
    fn local_mode_with_only_expired_certificates_says_what_to_do() {
        let tmp = tempfile::tempdir().unwrap();
        let ca = test_ca::authority(&tmp.path().join("ca"));
        let id: SpiffeId = "spiffe://cluster.local/ns/shop/sa/web".parse().unwrap();
        let pod = Pod {
            id: id.clone(),
            name: "web-1".into(),
        };
        let cert_dir = CredentialDir::new(tmp.path().join("web-1")).unwrap();
        cert_dir
            .write(&creds(&ca, &id, Duration::from_secs(1)))
            .unwrap();
        let mode = Mode::Local {
            cert_dir: cert_dir.clone(),
        };
        std::thread::sleep(Duration::from_millis(1100));
        let err = mode.proof(&pod, None).err().unwrap().to_string();
        assert!(
            err.contains("no valid certificate for spiffe://cluster.local/ns/shop/sa/web"),
            "{err}"
        );
        assert!(err.contains("meshctl bootstrap -o"), "{err}");
    }

    #[test]
    fn token_mode_takes_the_identity_from_the_token_and_refuses_a_changed_one() {
        let tmp = tempfile::tempdir().unwrap();
        let file = tmp.path().join("meshd-token");
        let token = |pod: &str, sa: &str| {
            crate::token::fake_token(&serde_json::json!({
                "kubernetes.io": {
                    "namespace": "shop",
                    "pod": { "name": pod },
                    "serviceaccount": { "name": sa },
                }
            }))
        };
        std::fs::write(&file, token("web-0", "web")).unwrap();
        let bundle = tmp.path().join("bundle.pem");
        std::fs::write(&bundle, "roots").unwrap();
        let parse = |extra: &[&str]| {
            let mut argv = vec![
                "meshd-agent",
                "run",
                "--xds-address",
                "meshd:15012",
                "--token-file",
                file.to_str().unwrap(),
                "--trust-bundle",
                bundle.to_str().unwrap(),
            ];
            argv.extend(extra);
            let cli = <crate::cli::Cli as clap::Parser>::try_parse_from(argv).unwrap();
            let crate::cli::Command::Run(args) = cli.command else {
                panic!("not run")
            };
            args
        };
        let (mode, pod, roots) = resolve(&parse(&["--trust-domain", "example.org"])).unwrap();
        assert_eq!(pod.id.to_string(), "spiffe://example.org/ns/shop/sa/web");
        assert_eq!(pod.name, "web-0");
        assert_eq!(roots, "roots");
        assert!(matches!(mode.proof(&pod, None).unwrap(), Proof::Token(_)));

        let err = resolve(&parse(&["--pod", "web-1"]))
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("bound to pod \"web-0\""), "{err}");

        std::fs::write(&file, token("web-0", "admin")).unwrap();
        let err = mode.proof(&pod, None).err().unwrap().to_string();
        assert!(err.contains("service account \"admin\""), "{err}");
    }
}
