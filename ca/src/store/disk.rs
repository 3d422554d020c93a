//! The filesystem steps the CA directory is changed with, each durable before the next.
//!
//! A file is written as a temporary file beside it (`.<name>.tmp-<pid>`), synced, then
//! renamed over its name — or hard-linked to it where nothing may be replaced, so two
//! processes creating a root cannot overwrite each other. Every change of a name is
//! followed by a sync of the directory. After a crash a name therefore holds its old
//! content or its new content, whole, and the changes reached the disk in the order
//! they were made; what is left is at most a temporary file, which [`super::layout`]
//! removes.
//!
//! Every step goes through [`Disk::step`], so a test can make the N-th step fail, and
//! every one after it, as if the process had died there ([`Disk::failing_after`]).

use std::cell::Cell;
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::authority::CaError;

/// One directory and the steps taken in it.
#[derive(Debug)]
pub(crate) struct Disk<'a> {
    dir: &'a Path,
    /// Steps left before the injected failure; `None`: no failure is injected.
    budget: Option<Cell<usize>>,
}

impl<'a> Disk<'a> {
    pub(crate) fn new(dir: &'a Path) -> Self {
        Disk { dir, budget: None }
    }

    /// A disk on which step `n` (counting from 0) and every later step fail.
    #[cfg(test)]
    pub(crate) fn failing_after(dir: &'a Path, n: usize) -> Self {
        Disk {
            dir,
            budget: Some(Cell::new(n)),
        }
    }

    pub(crate) fn dir(&self) -> &Path {
        self.dir
    }

    pub(crate) fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// Counts a step; fails once the injected budget is spent.
    fn step(&self, path: &Path, what: &str) -> Result<(), CaError> {
        if let Some(budget) = &self.budget {
            if budget.get() == 0 {
                return Err(CaError::file(
                    path,
                    format!("cannot {what}: injected failure"),
                ));
            }
            budget.set(budget.get() - 1);
        }
        Ok(())
    }

    /// Creates the directory (and its parents) if it is missing, durably.
    pub(crate) fn create_dir(&self) -> Result<(), CaError> {
        if self.dir.is_dir() {
            return Ok(());
        }
        self.step(self.dir, "create the CA directory")?;
        std::fs::create_dir_all(self.dir)
            .map_err(|e| CaError::file(self.dir, format!("cannot create the CA directory: {e}")))?;
        // The directory's own name must last too, or a crash could lose the new root.
        match self.dir.parent() {
            Some(parent) if !parent.as_os_str().is_empty() => self.sync(parent),
            _ => Ok(()),
        }
    }

    /// Writes `text` as `name` with `mode` (0600 for keys). With `replace`, an existing
    /// file is replaced; without, an existing file is left alone and `Ok(false)` says
    /// so.
    pub(crate) fn write(
        &self,
        name: &str,
        text: &str,
        mode: u32,
        replace: bool,
    ) -> Result<bool, CaError> {
        let path = self.path(name);
        let tmp = self.path(&format!(".{name}.tmp-{}", std::process::id()));
        self.step(&tmp, "create")?;
        let mut opts = std::fs::OpenOptions::new();
        // A temporary file of this pid can only be left by a process that died.
        opts.write(true).create(true).truncate(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut opts, mode);
        #[cfg(not(unix))]
        let _ = mode;
        let mut f = opts
            .open(&tmp)
            .map_err(|e| CaError::file(&tmp, format!("cannot create: {e}")))?;
        // A file that existed keeps its old mode on open; a key must stay private.
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            f.set_permissions(std::fs::Permissions::from_mode(mode))
                .map_err(|e| CaError::file(&tmp, format!("cannot set mode {mode:o}: {e}")))?;
        }
        self.step(&tmp, "write")?;
        f.write_all(text.as_bytes())
            .and_then(|_| f.sync_all())
            .map_err(|e| CaError::file(&tmp, format!("cannot write: {e}")))?;
        drop(f);
        if replace {
            self.step(&path, "rename into place")?;
            std::fs::rename(&tmp, &path)
                .map_err(|e| CaError::file(&path, format!("cannot create: {e}")))?;
        } else {
            self.step(&path, "link into place")?;
            let linked = match std::fs::hard_link(&tmp, &path) {
                Ok(()) => true,
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => false,
                Err(e) => return Err(CaError::file(&path, format!("cannot create: {e}"))),
            };
            self.remove_path(&tmp)?;
            if !linked {
                return Ok(false);
            }
        }
        self.sync_dir()?;
        Ok(true)
    }

    /// Renames `from` to `to`, replacing `to`.
    pub(crate) fn rename(&self, from: &str, to: &str) -> Result<(), CaError> {
        let from_path = self.path(from);
        self.step(&from_path, &format!("rename to {to}"))?;
        std::fs::rename(&from_path, self.path(to))
            .map_err(|e| CaError::file(&from_path, format!("cannot rename to {to}: {e}")))?;
        self.sync_dir()
    }

    /// Removes `name`; a file already gone is not an error.
    pub(crate) fn remove(&self, name: &str) -> Result<(), CaError> {
        self.remove_path(&self.path(name))?;
        self.sync_dir()
    }

    fn remove_path(&self, path: &Path) -> Result<(), CaError> {
        self.step(path, "remove")?;
        match std::fs::remove_file(path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                Err(CaError::file(path, format!("cannot remove: {e}")))
            }
            _ => Ok(()),
        }
    }

    /// Makes the names changed so far durable, in the order they were changed.
    fn sync_dir(&self) -> Result<(), CaError> {
        self.sync(self.dir)
    }

    fn sync(&self, dir: &Path) -> Result<(), CaError> {
        self.step(dir, "sync the directory")?;
        // Windows cannot open a directory as a file; its renames are journaled.
        #[cfg(unix)]
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| CaError::file(dir, format!("cannot sync the directory: {e}")))?;
        Ok(())
    }
}

/// Whether `name` is a temporary file [`Disk::write`] leaves when it is interrupted.
pub(crate) fn is_temporary(name: &str) -> bool {
    name.starts_with('.')
        && name
            .rsplit_once(".tmp-")
            .is_some_and(|(_, pid)| !pid.is_empty() && pid.bytes().all(|b| b.is_ascii_digit()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_write_replaces_whole_or_links_only_a_new_name() {
        let dir = tempfile::tempdir().unwrap();
        let disk = Disk::new(dir.path());
        assert!(disk.write("a.pem", "one", 0o600, false).unwrap());
        assert!(!disk.write("a.pem", "two", 0o600, false).unwrap());
        assert_eq!(
            std::fs::read_to_string(dir.path().join("a.pem")).unwrap(),
            "one"
        );
        assert!(disk.write("a.pem", "three", 0o644, true).unwrap());
        assert_eq!(
            std::fs::read_to_string(dir.path().join("a.pem")).unwrap(),
            "three"
        );
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names, ["a.pem"], "no temporary file is left");
    }

    #[test]
    fn an_interrupted_write_leaves_the_old_content_and_a_temporary_file() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.pem"), "old").unwrap();
        for n in 0..3 {
            let err = Disk::failing_after(dir.path(), n)
                .write("a.pem", "new", 0o600, true)
                .unwrap_err();
            assert!(err.to_string().contains("injected failure"), "{err}");
            assert_eq!(
                std::fs::read_to_string(dir.path().join("a.pem")).unwrap(),
                "old"
            );
        }
        let temporary: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| is_temporary(n))
            .collect();
        assert_eq!(temporary.len(), 1, "{temporary:?}");
        assert!(!is_temporary("root-key.pem") && !is_temporary(".root-key.pem.tmp-"));
    }
}
