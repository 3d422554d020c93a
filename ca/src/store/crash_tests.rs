//! Every step on the CA directory, interrupted at each of its filesystem steps in turn
//! (as if meshd died there), then recovered: by meshd's next start, and also by the
//! step simply being tried again in the same process, as the rotation timer does.
//! Recovery itself is interrupted at each of its steps too.

use std::collections::BTreeMap;
use std::path::Path;

use super::disk::{Disk, is_temporary};
use super::*;
use crate::SpiffeId;

fn cfg() -> CaConfig {
    CaConfig::default()
}

/// Every file in `dir` and its content.
fn files(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    match std::fs::read_dir(dir) {
        Err(_) => BTreeMap::new(),
        Ok(entries) => entries
            .map(|e| {
                let e = e.unwrap();
                (
                    e.file_name().into_string().unwrap(),
                    std::fs::read(e.path()).unwrap(),
                )
            })
            .collect(),
    }
}

/// A copy of `dir` (flat, modes kept) in a new temporary directory.
fn copy(dir: &Path) -> tempfile::TempDir {
    let to = tempfile::tempdir().unwrap();
    for name in files(dir).keys() {
        std::fs::copy(dir.join(name), to.path().join(name)).unwrap();
    }
    to
}

/// The roots a directory holds, as `meshctl` reads them (without repairing).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Roots {
    root: Option<String>,
    next: Option<String>,
}

fn roots(dir: &Path) -> Roots {
    let root = match open(&CaSource::Directory(dir.into()), cfg()) {
        Ok(a) => Some(signing_root(&a)),
        Err(CaError::Missing(_)) => None,
        Err(e) => panic!("an interrupted step left a CA that cannot be read: {e}"),
    };
    let next = load_next_root(dir, cfg())
        .unwrap()
        .map(|a| signing_root(&a));
    Roots { root, next }
}

/// The root `a` signs with, having checked that a leaf it issues verifies against it.
fn signing_root(a: &Authority) -> String {
    let root = a.trust_bundle().roots()[0].clone();
    let leaf = a
        .issue(&SpiffeId::new("cluster.local", "shop", "web").unwrap())
        .unwrap();
    let leaf = certificate_blocks(&leaf.chain_pem).unwrap();
    let root_der = certificate_blocks(&root).unwrap();
    parse(&leaf[0].1)
        .unwrap()
        .verify_signature(Some(parse(&root_der[0].1).unwrap().public_key()))
        .expect("the leaf is signed by the root");
    root
}

/// What every step leaves when it completes: nothing to repair, certificate copies equal
/// to their key files', keys private, no temporary file, no key of a former root.
fn assert_consistent(dir: &Path, former_keys: &[String]) {
    let layout = layout::read(dir).unwrap();
    assert!(layout.repairs.is_empty(), "{:?}", layout.repairs);
    let files = files(dir);
    assert!(!files.keys().any(|n| is_temporary(n)), "{:?}", files.keys());
    assert!(!files.contains_key("previous-root-key.pem"));
    let root = layout.root.expect("a root");
    assert_eq!(files[ROOT_CERT_FILE], root.cert_pem().as_bytes());
    #[cfg(unix)]
    for name in [ROOT_KEY_FILE, NEXT_ROOT_KEY_FILE] {
        use std::os::unix::fs::PermissionsExt;
        if let Ok(m) = std::fs::metadata(dir.join(name)) {
            assert_eq!(m.permissions().mode() & 0o777, 0o600, "{name}");
        }
    }
    for (name, content) in &files {
        let text = String::from_utf8_lossy(content);
        for key in former_keys {
            assert!(
                !text.contains(key.as_str()),
                "{name} still holds a former root's key"
            );
        }
    }
}

/// The key files' private keys (PEM blocks), to check later that they are gone.
fn keys(dir: &Path) -> Vec<String> {
    [ROOT_KEY_FILE, NEXT_ROOT_KEY_FILE]
        .iter()
        .filter_map(|n| std::fs::read_to_string(dir.join(n)).ok())
        .flat_map(|text| {
            pem::parse_many(&text)
                .unwrap()
                .into_iter()
                .filter(|p| p.tag().ends_with("PRIVATE KEY"))
                .map(|p| pem::encode(&p))
                .collect::<Vec<_>>()
        })
        .collect()
}

/// Runs `step` on a directory prepared by `setup`, failing at its 0th, 1st, … filesystem
/// step until it completes. After each failure: `meshctl` reads the roots meshd will use
/// and writes nothing; meshd's start recovers them (also when interrupted itself) to a
/// consistent directory, which `allowed(before, after)` accepts; and the step, tried
/// again, completes with `done(before, from, after)`, `from` being the roots it was
/// tried from. Returns how many steps `step` takes.
fn interrupt_everywhere(
    setup: impl Fn(&Path),
    step: impl Fn(&Disk<'_>) -> Result<(), CaError>,
    allowed: impl Fn(&Roots, &Roots) -> bool,
    done: impl Fn(&Roots, &Roots, &Roots) -> bool,
) -> usize {
    for n in 0.. {
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca");
        setup(&ca);
        let before = roots(&ca);
        let former_keys = keys(&ca);
        match step(&Disk::failing_after(&ca, n)) {
            Ok(()) => {
                assert_consistent(&ca, &[]);
                assert!(
                    done(&before, &before, &roots(&ca)),
                    "{before:?} → {:?}",
                    roots(&ca)
                );
                return n;
            }
            Err(e) => assert!(e.to_string().contains("injected failure"), "{e}"),
        }

        // meshctl reads what meshd will use, and writes nothing.
        let left = files(&ca);
        let read = roots(&ca);
        assert_eq!(files(&ca), left, "reading the CA wrote to it (step {n})");

        // The same process tries the step again (the rotation timer does).
        let retry = copy(&ca);
        step(&Disk::new(retry.path())).unwrap_or_else(|e| panic!("retry after step {n}: {e}"));
        assert_consistent(retry.path(), &[]);
        let retried = roots(retry.path());
        assert!(
            done(&before, &read, &retried),
            "step {n}: {before:?} → {read:?} → {retried:?}"
        );

        // meshd starts, and is interrupted while it recovers, at every step of that.
        for m in 0.. {
            let again = copy(&ca);
            match open_or_create_dir(&Disk::failing_after(again.path(), m), cfg()) {
                Ok(_) => break,
                Err(e) => assert!(e.to_string().contains("injected failure"), "{e}"),
            }
            if read.root.is_some() {
                assert_eq!(
                    roots(again.path()),
                    read,
                    "recovery interrupted at {m} of step {n}"
                );
            }
        }
        let (authority, opened) = open_or_create_dir(&Disk::new(&ca), cfg()).unwrap();
        let recovered = roots(&ca);
        assert_consistent(&ca, &[]);
        if read.root.is_some() {
            assert_eq!(recovered, read, "step {n}");
            assert!(matches!(opened, Opened::Loaded { .. }));
        } else {
            assert_eq!(opened, Opened::Generated);
        }
        assert_eq!(Some(signing_root(&authority)), recovered.root);
        assert!(
            allowed(&before, &recovered),
            "step {n}: {before:?} → {recovered:?}"
        );

        // …and then the step completes.
        step(&Disk::new(&ca)).unwrap_or_else(|e| panic!("after recovering from {n}: {e}"));
        let after = roots(&ca);
        assert!(
            done(&before, &recovered, &after),
            "step {n}: {before:?} → {recovered:?} → {after:?}"
        );
        let gone: Vec<_> = former_keys
            .iter()
            .filter(|k| !keys(&ca).contains(k))
            .cloned()
            .collect();
        assert_consistent(&ca, &gone);
    }
    unreachable!()
}

fn create(dir: &Path) {
    open_or_create_dir(&Disk::new(dir), cfg()).unwrap();
}

fn create_and_stage(dir: &Path) {
    create(dir);
    stage(&Disk::new(dir), &cfg()).unwrap();
}

#[test]
fn creating_the_root_is_recovered_from_any_step() {
    let steps = interrupt_everywhere(
        |_| {},
        |disk| open_or_create_dir(disk, cfg()).map(|_| ()),
        |_, after| after.root.is_some() && after.next.is_none(),
        |_, _, after| after.root.is_some() && after.next.is_none(),
    );
    assert!(steps >= 6, "only {steps} steps");
}

#[test]
fn staging_the_next_root_is_recovered_from_any_step() {
    let steps = interrupt_everywhere(
        create,
        |disk| stage(disk, &cfg()),
        // Not yet staged, or staged whole; the root is untouched.
        |before, after| after.root == before.root && after.next != before.root,
        // A next root staged whole before the interruption is kept.
        |before, from, after| {
            after.root == before.root
                && after.next.is_some()
                && after.next != before.root
                && (from.next.is_none() || after.next == from.next)
        },
    );
    assert!(steps >= 6, "only {steps} steps");
}

#[test]
fn promoting_the_next_root_is_recovered_from_any_step() {
    let steps = interrupt_everywhere(
        create_and_stage,
        promote,
        // Still the old root with the next one staged, or the next root alone.
        |before, after| *after == *before || (after.root == before.next && after.next.is_none()),
        |before, _, after| after.root == before.next && after.next.is_none(),
    );
    assert!(steps >= 6, "only {steps} steps");
}

#[test]
fn a_promotion_keeps_the_old_certificate_and_deletes_its_key() {
    let dir = tempfile::tempdir().unwrap();
    create_and_stage(dir.path());
    let old = roots(dir.path());
    let old_keys = keys(dir.path());
    promote_next_root(dir.path()).unwrap();
    assert_eq!(
        std::fs::read_to_string(dir.path().join(PREVIOUS_ROOT_CERT_FILE)).unwrap(),
        old.root.clone().unwrap()
    );
    // A second rotation: the previous root is now the one before.
    stage_next_root(dir.path(), &cfg()).unwrap();
    let middle = roots(dir.path());
    promote_next_root(dir.path()).unwrap();
    assert_eq!(
        std::fs::read_to_string(dir.path().join(PREVIOUS_ROOT_CERT_FILE)).unwrap(),
        middle.root.unwrap()
    );
    assert_consistent(dir.path(), &old_keys);
    // Promoting with nothing staged changes nothing.
    let now = files(dir.path());
    promote_next_root(dir.path()).unwrap();
    assert_eq!(files(dir.path()), now);
}

/// Writes a file as older versions did (keys 0600).
fn put(dir: &Path, name: &str, text: &str) {
    let mode = if name.contains("key") { 0o600 } else { 0o644 };
    write_file(&dir.join(name), text, mode, true).unwrap();
}

/// What the four renames of older meshd versions' promotion left after each of them,
/// with the key files holding the key alone.
#[test]
fn every_state_older_versions_left_is_recovered() {
    let renames = [
        (ROOT_CERT_FILE, PREVIOUS_ROOT_CERT_FILE),
        (ROOT_KEY_FILE, "previous-root-key.pem"),
        (NEXT_ROOT_KEY_FILE, ROOT_KEY_FILE),
        (NEXT_ROOT_CERT_FILE, ROOT_CERT_FILE),
    ];
    let (old_cert, old_key) = generate_root("cluster.local", ROOT_VALIDITY).unwrap();
    let (new_cert, new_key) = generate_root("cluster.local", ROOT_VALIDITY).unwrap();
    for done in 0..=renames.len() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        put(d, ROOT_CERT_FILE, &old_cert);
        put(d, ROOT_KEY_FILE, old_key.secret_pem());
        put(d, NEXT_ROOT_CERT_FILE, &new_cert);
        put(d, NEXT_ROOT_KEY_FILE, new_key.secret_pem());
        for (from, to) in &renames[..done] {
            std::fs::rename(d.join(from), d.join(to)).unwrap();
        }
        let read = roots(d);
        let expected = if done < 2 {
            (Some(old_cert.clone()), Some(new_cert.clone()))
        } else {
            (Some(new_cert.clone()), None)
        };
        assert_eq!(
            (read.root.clone(), read.next.clone()),
            expected,
            "after {done} renames"
        );
        let (_, opened) = open_or_create(&CaSource::Directory(d.into()), cfg()).unwrap();
        assert_eq!(roots(d), read, "after {done} renames: {opened:?}");
        assert_consistent(
            d,
            &[old_key.secret_pem().to_string()][..if done < 2 { 0 } else { 1 }],
        );
        promote_next_root(d).unwrap();
        assert_eq!(roots(d).root, Some(new_cert.clone()));
        assert_consistent(d, &[old_key.secret_pem().to_string()]);
    }

    // Older versions staged the key first: interrupted there, `rotate-root` failed
    // with "next-root-key.pem: File exists". The key was never trusted.
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    put(d, ROOT_CERT_FILE, &old_cert);
    put(d, ROOT_KEY_FILE, old_key.secret_pem());
    put(d, NEXT_ROOT_KEY_FILE, new_key.secret_pem());
    assert_eq!(roots(d).next, None);
    stage_next_root(d, &cfg()).unwrap();
    let staged = roots(d);
    assert_eq!(staged.root, Some(old_cert.clone()));
    assert!(staged.next.is_some() && staged.next != Some(new_cert));
    assert_consistent(d, &[new_key.secret_pem().to_string()]);
}

#[test]
fn a_next_certificate_without_its_key_is_refused_without_advice_to_remove_the_root() {
    let dir = tempfile::tempdir().unwrap();
    create(dir.path());
    let (stray, _) = generate_root("cluster.local", ROOT_VALIDITY).unwrap();
    std::fs::write(dir.path().join(NEXT_ROOT_CERT_FILE), stray).unwrap();
    let err = open_or_create(&CaSource::Directory(dir.path().into()), cfg())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("next-root-cert.pem: has no next-root-key.pem"),
        "{err}"
    );
    assert!(err.contains("the root stays as it is"), "{err}");
}

/// With `root-key.pem` gone and the next root staged (operator error, a partial
/// restore: no crash leaves this with key files that carry their certificates), meshd
/// promoted the next root on its own, which sidecars may not trust yet. It refuses,
/// saying to restore the root key, and touches nothing.
#[test]
fn a_missing_root_key_beside_a_staged_next_root_is_refused_not_promoted() {
    let dir = tempfile::tempdir().unwrap();
    create_and_stage(dir.path());
    std::fs::remove_file(dir.path().join(ROOT_KEY_FILE)).unwrap();
    let before = files(dir.path());
    let err = open_or_create(&CaSource::Directory(dir.path().into()), cfg())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("root-key.pem: is missing, but next-root-key.pem is there")
            && err.contains("restore root-key.pem from a backup"),
        "{err}"
    );
    for advice in ["delete", "remove", "move"] {
        assert!(!err.contains(advice), "{err}");
    }
    assert_eq!(files(dir.path()), before, "nothing was changed");

    // Also with a previous-root-cert.pem from an earlier rotation.
    let (earlier, _) = generate_root("cluster.local", ROOT_VALIDITY).unwrap();
    put(dir.path(), PREVIOUS_ROOT_CERT_FILE, &earlier);
    let err = open_or_create(&CaSource::Directory(dir.path().into()), cfg()).unwrap_err();
    assert!(err.to_string().contains("restore root-key.pem"), "{err}");
}

/// A promotion whose first step (the root's certificate copied to
/// `previous-root-cert.pem`) is done, and then `root-key.pem` gone: the promotion was
/// under way, so it is finished.
#[test]
fn a_missing_root_key_during_a_promotion_finishes_it() {
    let dir = tempfile::tempdir().unwrap();
    create_and_stage(dir.path());
    let staged = roots(dir.path());
    let root_cert = std::fs::read_to_string(dir.path().join(ROOT_CERT_FILE)).unwrap();
    put(dir.path(), PREVIOUS_ROOT_CERT_FILE, &root_cert);
    std::fs::remove_file(dir.path().join(ROOT_KEY_FILE)).unwrap();
    open_or_create(&CaSource::Directory(dir.path().into()), cfg()).unwrap();
    assert_eq!(roots(dir.path()).root, staged.next);
    assert_consistent(dir.path(), &[]);
}
