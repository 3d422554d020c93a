//! Finding the config files: a walk of the directory that follows symlinks but reads
//! every directory at most once, so its cost is linear in the directories, whatever the
//! links.
//!
//! - Names starting with `.` are skipped: editors' swap files, and a ConfigMap volume's
//!   `..data` and `..<timestamp>` directories, whose files are read through the visible
//!   `x.yaml -> ..data/x.yaml` links (so an atomic swap of `..data` is one change).
//! - File symlinks are followed; a dangling one is skipped (a ConfigMap key that is going
//!   away dangles for a moment).
//! - Directory symlinks are followed, and every directory is known by its canonical path.
//!   A link to a directory that contains it (`ln -s . mesh/loop`) is a loop: it is
//!   reported once, naming the link, and not followed. A link to a directory already read
//!   elsewhere is not read again: its files are already in.
//! - Only regular files are listed: a FIFO or a device named `x.yaml` would block the
//!   reader or never end. The reader checks again what it opened (non-blocking), since
//!   a FIFO may take the name between the walk and the read.
//! - Entries are walked in name order, so which name a directory is read under does not
//!   depend on the order the system lists them in.

use std::collections::HashSet;
use std::io;
use std::path::{Path, PathBuf};

/// What a walk found.
#[derive(Debug, Default)]
pub struct Listing {
    /// Every `*.yaml`/`*.yml` file, in walk order.
    pub files: Vec<PathBuf>,
    /// Entries not followed, and why: (the entry's path, message).
    pub problems: Vec<(PathBuf, String)>,
}

/// Walks `root`. Fails if a directory cannot be listed: the caller then keeps what it
/// had rather than take that directory's files as deleted.
pub fn yaml_files(root: &Path) -> io::Result<Listing> {
    let mut walk = Walk {
        listing: Listing::default(),
        read: HashSet::new(),
        open: Vec::new(),
    };
    let canonical = root.canonicalize()?;
    walk.dir(root, canonical)?;
    Ok(walk.listing)
}

struct Walk {
    listing: Listing,
    /// Canonical paths of the directories read so far.
    read: HashSet<PathBuf>,
    /// Canonical paths of the directories being read (the current one and its parents).
    open: Vec<PathBuf>,
}

impl Walk {
    fn dir(&mut self, path: &Path, canonical: PathBuf) -> io::Result<()> {
        self.read.insert(canonical.clone());
        self.open.push(canonical);
        let mut entries = std::fs::read_dir(path)?
            .map(|e| e.map(|e| e.file_name()))
            .collect::<io::Result<Vec<_>>>()?;
        entries.sort();
        for name in entries {
            if name.to_string_lossy().starts_with('.') {
                continue;
            }
            self.entry(path.join(name))?;
        }
        self.open.pop();
        Ok(())
    }

    fn entry(&mut self, path: PathBuf) -> io::Result<()> {
        let is_yaml = matches!(
            path.extension().and_then(|e| e.to_str()),
            Some("yaml" | "yml")
        );
        // `metadata` follows symlinks.
        let meta = match std::fs::metadata(&path) {
            Ok(m) => m,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            // Reading it will fail and say why, and its last good content stays.
            Err(_) if is_yaml => {
                self.listing.files.push(path);
                return Ok(());
            }
            Err(e) => {
                self.problem(path, format!("cannot follow: {e}"));
                return Ok(());
            }
        };
        if meta.is_dir() {
            let canonical = match path.canonicalize() {
                Ok(c) => c,
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
                Err(e) => return Err(e),
            };
            if self.open.contains(&canonical) {
                let message = format!(
                    "a symlink to {}, which contains it: a loop, not followed",
                    canonical.display()
                );
                self.problem(path, message);
            } else if !self.read.contains(&canonical) {
                self.dir(&path, canonical)?;
            }
        } else if is_yaml {
            if meta.is_file() {
                self.listing.files.push(path);
            } else {
                self.problem(path, "not a regular file: not read".to_string());
            }
        }
        Ok(())
    }

    fn problem(&mut self, path: PathBuf, message: String) {
        self.listing.problems.push((path, message));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn names(root: &Path, paths: &[PathBuf]) -> Vec<String> {
        paths
            .iter()
            .map(|p| p.strip_prefix(root).unwrap().display().to_string())
            .collect()
    }

    /// `ln -s . mesh/loop; ln -s . mesh/loop2` made the walk try every path through the
    /// two links (mesh/loop/loop2/loop/…) until paths grew too long: it never ended.
    #[test]
    fn symlink_loops_are_reported_once_each_and_not_followed() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::write(root.join("a.yaml"), "").unwrap();
        std::fs::create_dir(root.join("sub")).unwrap();
        std::fs::write(root.join("sub/b.yaml"), "").unwrap();
        symlink(".", root.join("loop")).unwrap();
        symlink(".", root.join("loop2")).unwrap();
        symlink("..", root.join("sub/up")).unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let walked = root.to_path_buf();
        std::thread::spawn(move || tx.send(yaml_files(&walked).unwrap()));
        let listing = rx
            .recv_timeout(std::time::Duration::from_secs(10))
            .expect("the walk ends");
        assert_eq!(names(root, &listing.files), ["a.yaml", "sub/b.yaml"]);
        let problems: Vec<_> = listing.problems.iter().map(|(p, _)| p.clone()).collect();
        assert_eq!(names(root, &problems), ["loop", "loop2", "sub/up"]);
        for (_, message) in &listing.problems {
            assert!(message.contains("a loop, not followed"), "{message}");
        }
    }

    #[test]
    fn file_and_directory_symlinks_are_followed_and_each_directory_read_once() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let elsewhere = tempfile::tempdir().unwrap();
        std::fs::write(elsewhere.path().join("x.yaml"), "").unwrap();
        std::fs::create_dir(root.join("a")).unwrap();
        std::fs::write(root.join("a/y.yaml"), "").unwrap();
        symlink(elsewhere.path(), root.join("shared")).unwrap();
        symlink("a", root.join("b")).unwrap();
        symlink("a/y.yaml", root.join("z.yaml")).unwrap();
        symlink("gone.yaml", root.join("dangling.yaml")).unwrap();
        let listing = yaml_files(root).unwrap();
        assert_eq!(
            names(root, &listing.files),
            ["a/y.yaml", "shared/x.yaml", "z.yaml"]
        );
        assert!(listing.problems.is_empty(), "{:?}", listing.problems);
    }

    /// A FIFO named like a config file would block the reader until someone writes.
    #[test]
    fn only_regular_files_are_read() {
        let dir = tempfile::tempdir().unwrap();
        let status = std::process::Command::new("mkfifo")
            .arg(dir.path().join("pipe.yaml"))
            .status()
            .unwrap();
        assert!(status.success());
        let listing = yaml_files(dir.path()).unwrap();
        assert!(listing.files.is_empty());
        assert_eq!(listing.problems.len(), 1);
        assert!(listing.problems[0].1.contains("not a regular file"));
    }
}
