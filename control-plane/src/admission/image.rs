//! Image references as the container runtime reads them, normalised the way Docker's
//! reference library does (what `allowedRegistries`, `requireImageDigest`,
//! `forbidLatestTag` and image exemptions match on):
//!
//! - the first path component is the registry if it holds a `.` or a `:`, or is
//!   `localhost`; otherwise the registry is `docker.io` (`index.docker.io` is too);
//! - on `docker.io` a one-component name is an official image: `nginx` is
//!   `docker.io/library/nginx`;
//! - no tag and no digest means the tag `latest`.

use std::fmt;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageRef {
    /// `docker.io`, `registry.example.com:5000`, `localhost`.
    pub registry: String,
    /// `library/nginx`, `team/app`.
    pub path: String,
    pub tag: Option<String>,
    /// `sha256:...`.
    pub digest: Option<String>,
}

impl ImageRef {
    /// Reads `reference`; `None` for one that is empty or malformed (no runtime would
    /// pull it: the caller reports it).
    pub fn parse(reference: &str) -> Option<ImageRef> {
        let reference = reference.trim();
        if reference.is_empty() || reference.chars().any(char::is_whitespace) {
            return None;
        }
        let (rest, digest) = match reference.split_once('@') {
            Some((rest, digest)) if digest.contains(':') => (rest, Some(digest.to_string())),
            Some(_) => return None,
            None => (reference, None),
        };
        let (registry, remainder) = match rest.split_once('/') {
            Some((first, remainder))
                if first.contains('.') || first.contains(':') || first == "localhost" =>
            {
                (first.to_string(), remainder)
            }
            _ => ("docker.io".to_string(), rest),
        };
        let registry = if registry == "index.docker.io" {
            "docker.io".to_string()
        } else {
            registry
        };
        // The tag is after the last ':' of the last component (a registry's port is
        // not in `remainder`).
        let last = remainder.rsplit('/').next().unwrap_or(remainder);
        let (path, tag) = match last.rsplit_once(':') {
            Some((_, tag)) => {
                let cut = remainder.len() - tag.len() - 1;
                (remainder[..cut].to_string(), Some(tag.to_string()))
            }
            None => (remainder.to_string(), None),
        };
        if path.is_empty() || path.split('/').any(str::is_empty) || tag.as_deref() == Some("") {
            return None;
        }
        let path = if registry == "docker.io" && !path.contains('/') {
            format!("library/{path}")
        } else {
            path
        };
        Some(ImageRef {
            registry,
            path,
            tag,
            digest,
        })
    }

    /// `registry/path`, without tag or digest.
    pub fn name(&self) -> String {
        format!("{}/{}", self.registry, self.path)
    }

    /// Whether it means the tag `latest`: named so, or neither tag nor digest.
    pub fn is_latest(&self) -> bool {
        match (&self.tag, &self.digest) {
            (Some(tag), _) => tag == "latest",
            (None, None) => true,
            (None, Some(_)) => false,
        }
    }

    /// Whether `prefix` (from `allowedRegistries`) covers this image: the normalised
    /// name starts with it at a path boundary (`docker.io/library` covers
    /// `docker.io/library/nginx`, not `docker.io/library-x/app`).
    pub fn under(&self, prefix: &str) -> bool {
        let full = self.to_string();
        let Some(rest) = full.strip_prefix(prefix) else {
            return false;
        };
        prefix.ends_with('/') || rest.is_empty() || rest.starts_with(['/', ':', '@'])
    }
}

impl fmt::Display for ImageRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.registry, self.path)?;
        if let Some(tag) = &self.tag {
            write!(f, ":{tag}")?;
        }
        if let Some(digest) = &self.digest {
            write!(f, "@{digest}")?;
        }
        Ok(())
    }
}

/// `pattern` (`*` matches any run of characters, nothing else is special) against `text`.
pub fn matches_pattern(pattern: &str, text: &str) -> bool {
    let parts: Vec<&str> = pattern.split('*').collect();
    if parts.len() == 1 {
        return pattern == text;
    }
    let (first, last) = (parts[0], parts[parts.len() - 1]);
    if !text.starts_with(first) || text.len() < first.len() + last.len() || !text.ends_with(last) {
        return false;
    }
    let mut rest = &text[first.len()..text.len() - last.len()];
    for part in &parts[1..parts.len() - 1] {
        match rest.find(part) {
            Some(i) => rest = &rest[i + part.len()..],
            None => return false,
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_normalise_as_the_runtime_reads_them() {
        for (reference, normalised, latest) in [
            ("nginx", "docker.io/library/nginx", true),
            ("nginx:1.27", "docker.io/library/nginx:1.27", false),
            ("nginx:latest", "docker.io/library/nginx:latest", true),
            ("team/app:v2", "docker.io/team/app:v2", false),
            (
                "index.docker.io/library/nginx",
                "docker.io/library/nginx",
                true,
            ),
            (
                "registry.example.com/shop/web:1.4",
                "registry.example.com/shop/web:1.4",
                false,
            ),
            (
                "registry.example.com:5000/web",
                "registry.example.com:5000/web",
                true,
            ),
            ("localhost/web:dev", "localhost/web:dev", false),
            (
                "ghcr.io/o/app@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
                "ghcr.io/o/app@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
                false,
            ),
            (
                "quay.io/o/app:1@sha256:ab",
                "quay.io/o/app:1@sha256:ab",
                false,
            ),
        ] {
            let image = ImageRef::parse(reference).unwrap_or_else(|| panic!("{reference}"));
            assert_eq!(image.to_string(), normalised, "{reference}");
            assert_eq!(image.is_latest(), latest, "{reference}");
        }
        for bad in [
            "",
            " ",
            "a b",
            "app@nodigest",
            "registry.example.com/",
            "app:",
            "a//b",
        ] {
            assert_eq!(ImageRef::parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn registry_prefixes_end_at_a_path_boundary() {
        let nginx = ImageRef::parse("nginx:1.27").unwrap();
        assert!(nginx.under("docker.io/library"));
        assert!(nginx.under("docker.io/library/"));
        assert!(nginx.under("docker.io/"));
        assert!(nginx.under("docker.io/library/nginx"));
        assert!(!nginx.under("docker.io/lib"));
        assert!(
            !ImageRef::parse("docker.io/library-x/app")
                .unwrap()
                .under("docker.io/library")
        );
        assert!(
            !ImageRef::parse("registry.example.com.evil.io/app")
                .unwrap()
                .under("registry.example.com")
        );
    }

    #[test]
    fn patterns_match_with_stars_only() {
        assert!(matches_pattern(
            "registry.example.com/ops/*",
            "registry.example.com/ops/debug:1"
        ));
        assert!(matches_pattern("*/debug:*", "docker.io/team/debug:2"));
        assert!(matches_pattern(
            "docker.io/library/busybox:1.36",
            "docker.io/library/busybox:1.36"
        ));
        assert!(!matches_pattern(
            "registry.example.com/ops/*",
            "registry.example.com/shop/web"
        ));
        assert!(!matches_pattern("a*b*c", "acb"));
        assert!(matches_pattern("a*b*c", "aXbYc"));
    }
}
