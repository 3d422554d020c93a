//! A pod's volumes, each a directory of the pod's temp dir, made before any container
//! starts (as the kubelet mounts every volume first).
//!
//! - `emptyDir`: mode 0777, as the kubelet makes it. `medium: Memory` is a plain
//!   directory here (no tmpfs), and `sizeLimit` is not enforced.
//! - `configMap`, `secret`, `downwardAPI`, `projected`: written once in the kubelet's
//!   atomic-writer layout (`..<timestamp>/` holding the files, `..data` → it, each
//!   top-level name → `..data/<name>`), default mode 0644, `items` honoured (a missing
//!   key is an error unless `optional`). A missing ConfigMap or Secret is waited for
//!   (bounded), or an empty volume if `optional`. Later changes of the object are not
//!   synced into the volume.
//! - `projected.serviceAccountToken`: a TokenRequest for the pod's ServiceAccount bound
//!   to this pod (name and uid), with the source's audience (none: the API server's
//!   own) and `expirationSeconds` (default 3600); not refreshed. Its mode is the
//!   kubelet's: 0600 owned by the pod's common `runAsUser` (when every container runs
//!   as the same one) or when `fsGroup` is set, else the volume's default mode.
//! - `fsGroup`: files and directories of every volume group-owned by it, with the
//!   kubelet's masks (read-write 0660, read-only volumes 0440, directories setgid and
//!   searchable).
//!
//! Any other kind of volume (or projection) is an error naming it.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use k8s_openapi::api::authentication::v1::{BoundObjectReference, TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{
    ConfigMap, DownwardAPIVolumeFile, KeyToPath, Secret, ServiceAccount, Volume,
};
use kube::Api;

use super::env::PodFacts;

/// How long a volume waits for its ConfigMap or Secret to exist.
const SOURCE_WAIT: Duration = Duration::from_secs(30);
/// The kubelet's default file mode in configMap, secret, downwardAPI and projected
/// volumes (`defaultMode: 420`).
const DEFAULT_MODE: u32 = 0o644;

/// What the volumes need to know about the pod.
pub struct VolumeContext<'a> {
    pub client: &'a kube::Client,
    pub pod: &'a PodFacts,
    /// The uid every container runs as, if they all run as the same one (the kubelet's
    /// `FsUserFrom`).
    pub fs_user: Option<u32>,
    pub fs_group: Option<u32>,
}

/// One file of an atomic-writer volume.
struct FileSpec {
    path: String,
    data: Vec<u8>,
    mode: u32,
    owner: Option<u32>,
}

/// Makes volume `volume` at `dir`.
pub async fn make(volume: &Volume, dir: &Path, cx: &VolumeContext<'_>) -> anyhow::Result<()> {
    let name = &volume.name;
    let context = || format!("volume {name}");
    if let Some(empty) = &volume.empty_dir {
        let _ = empty; // medium and sizeLimit: see the module doc.
        std::fs::create_dir(dir).with_context(context)?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o777))
            .with_context(context)?;
        return apply_fs_group(dir, cx.fs_group, false).with_context(context);
    }
    let files = if let Some(cm) = &volume.config_map {
        let mode = mode(cm.default_mode, name, "configMap.defaultMode")?;
        config_map_files(cx, &cm.name, cm.items.as_deref(), cm.optional, mode)
            .await
            .with_context(|| format!("volume {name}: configMap {}", cm.name))?
    } else if let Some(secret) = &volume.secret {
        let secret_name = secret
            .secret_name
            .as_deref()
            .with_context(|| format!("volume {name}: secret.secretName is missing"))?;
        let mode = mode(secret.default_mode, name, "secret.defaultMode")?;
        secret_files(
            cx,
            secret_name,
            secret.items.as_deref(),
            secret.optional,
            mode,
        )
        .await
        .with_context(|| format!("volume {name}: secret {secret_name}"))?
    } else if let Some(downward) = &volume.downward_api {
        let mode = mode(downward.default_mode, name, "downwardAPI.defaultMode")?;
        downward_files(cx.pod, downward.items.as_deref(), mode)
            .with_context(|| format!("volume {name}: downwardAPI"))?
    } else if let Some(projected) = &volume.projected {
        let mode = mode(projected.default_mode, name, "projected.defaultMode")?;
        let mut files = Vec::new();
        for (i, source) in projected.sources.iter().flatten().enumerate() {
            let at = || format!("volume {name}: projected.sources[{i}]");
            if let Some(token) = &source.service_account_token {
                let data = token_for_pod(cx, token.audience.as_deref(), token.expiration_seconds)
                    .await
                    .with_context(|| format!("{}.serviceAccountToken", at()))?;
                // The kubelet's rule for token files (projected volume plugin).
                let private = cx.fs_user.is_some() || cx.fs_group.is_some();
                files.push(FileSpec {
                    path: token.path.clone(),
                    data: data.into_bytes(),
                    mode: if private { 0o600 } else { mode },
                    owner: cx.fs_user,
                });
            } else if let Some(cm) = &source.config_map {
                files.extend(
                    config_map_files(cx, &cm.name, cm.items.as_deref(), cm.optional, mode)
                        .await
                        .with_context(|| format!("{}.configMap {}", at(), cm.name))?,
                );
            } else if let Some(secret) = &source.secret {
                files.extend(
                    secret_files(
                        cx,
                        &secret.name,
                        secret.items.as_deref(),
                        secret.optional,
                        mode,
                    )
                    .await
                    .with_context(|| format!("{}.secret {}", at(), secret.name))?,
                );
            } else if let Some(downward) = &source.downward_api {
                files.extend(
                    downward_files(cx.pod, downward.items.as_deref(), mode)
                        .with_context(|| format!("{}.downwardAPI", at()))?,
                );
            } else {
                bail!(
                    "{}: only serviceAccountToken, configMap, secret and downwardAPI \
                     projections are supported by the harness",
                    at()
                );
            }
        }
        files
    } else {
        bail!(
            "volume {name}: only emptyDir, configMap, secret, downwardAPI and projected \
             volumes are supported by the harness"
        );
    };
    write_atomic(dir, &files).with_context(context)?;
    apply_fs_group(dir, cx.fs_group, true).with_context(context)
}

fn mode(mode: Option<i32>, volume: &str, field: &str) -> anyhow::Result<u32> {
    match mode {
        None => Ok(DEFAULT_MODE),
        Some(m) if (0..=0o777).contains(&m) => Ok(m as u32),
        Some(m) => bail!("volume {volume}: {field} {m} is not a file mode (0 to 0777)"),
    }
}

/// The files of a ConfigMap (data and binaryData), waiting for it to exist.
async fn config_map_files(
    cx: &VolumeContext<'_>,
    name: &str,
    items: Option<&[KeyToPath]>,
    optional: Option<bool>,
    mode: u32,
) -> anyhow::Result<Vec<FileSpec>> {
    let api = Api::<ConfigMap>::namespaced(cx.client.clone(), &cx.pod.namespace);
    let Some(cm) = wait_for(&api, name, optional.unwrap_or(false)).await? else {
        return Ok(Vec::new());
    };
    let mut data: BTreeMap<String, Vec<u8>> = cm
        .data
        .unwrap_or_default()
        .into_iter()
        .map(|(k, v)| (k, v.into_bytes()))
        .collect();
    data.extend(
        cm.binary_data
            .unwrap_or_default()
            .into_iter()
            .map(|(k, v)| (k, v.0)),
    );
    key_files(data, items, optional.unwrap_or(false), mode)
}

async fn secret_files(
    cx: &VolumeContext<'_>,
    name: &str,
    items: Option<&[KeyToPath]>,
    optional: Option<bool>,
    mode: u32,
) -> anyhow::Result<Vec<FileSpec>> {
    let api = Api::<Secret>::namespaced(cx.client.clone(), &cx.pod.namespace);
    let Some(secret) = wait_for(&api, name, optional.unwrap_or(false)).await? else {
        return Ok(Vec::new());
    };
    let mut data: BTreeMap<String, Vec<u8>> = secret
        .data
        .unwrap_or_default()
        .into_iter()
        .map(|(k, v)| (k, v.0))
        .collect();
    data.extend(
        secret
            .string_data
            .unwrap_or_default()
            .into_iter()
            .map(|(k, v)| (k, v.into_bytes())),
    );
    key_files(data, items, optional.unwrap_or(false), mode)
}

/// The object `name`, once it exists (None at once if it is optional and missing).
async fn wait_for<K>(api: &Api<K>, name: &str, optional: bool) -> anyhow::Result<Option<K>>
where
    K: Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let deadline = tokio::time::Instant::now() + SOURCE_WAIT;
    loop {
        match api.get_opt(name).await? {
            Some(object) => return Ok(Some(object)),
            None if optional => return Ok(None),
            None if tokio::time::Instant::now() >= deadline => {
                bail!("does not exist (waited {SOURCE_WAIT:?})")
            }
            None => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

/// Every key as a file of its name, or only `items` (key → path, with its mode).
fn key_files(
    data: BTreeMap<String, Vec<u8>>,
    items: Option<&[KeyToPath]>,
    optional: bool,
    mode: u32,
) -> anyhow::Result<Vec<FileSpec>> {
    let Some(items) = items.filter(|i| !i.is_empty()) else {
        return Ok(data
            .into_iter()
            .map(|(path, data)| FileSpec {
                path,
                data,
                mode,
                owner: None,
            })
            .collect());
    };
    let mut files = Vec::new();
    for item in items {
        let Some(value) = data.get(&item.key) else {
            if optional {
                continue;
            }
            bail!("items: key {:?} is not in it", item.key);
        };
        files.push(FileSpec {
            path: item.path.clone(),
            data: value.clone(),
            mode: match item.mode {
                Some(m) => self::mode(Some(m), "", "items.mode")?,
                None => mode,
            },
            owner: None,
        });
    }
    Ok(files)
}

fn downward_files(
    pod: &PodFacts,
    items: Option<&[DownwardAPIVolumeFile]>,
    mode: u32,
) -> anyhow::Result<Vec<FileSpec>> {
    let mut files = Vec::new();
    for item in items.unwrap_or_default() {
        let field = item.field_ref.as_ref().with_context(|| {
            format!(
                "items {}: only fieldRef is supported by the harness",
                item.path
            )
        })?;
        files.push(FileSpec {
            path: item.path.clone(),
            data: pod
                .field(field, true)
                .with_context(|| format!("items {}", item.path))?
                .into_bytes(),
            mode: match item.mode {
                Some(m) => self::mode(Some(m), "", "items.mode")?,
                None => mode,
            },
            owner: None,
        });
    }
    Ok(files)
}

/// A token of the pod's ServiceAccount bound to the pod, as the kubelet requests it.
async fn token_for_pod(
    cx: &VolumeContext<'_>,
    audience: Option<&str>,
    expiration_seconds: Option<i64>,
) -> anyhow::Result<String> {
    let pod = cx.pod;
    let request = TokenRequest {
        spec: TokenRequestSpec {
            // None: the API server's own audiences.
            audiences: audience
                .filter(|a| !a.is_empty())
                .map(|a| vec![a.to_string()])
                .unwrap_or_default(),
            bound_object_ref: Some(BoundObjectReference {
                api_version: Some("v1".into()),
                kind: Some("Pod".into()),
                name: Some(pod.name.clone()),
                uid: Some(pod.uid.clone()),
            }),
            expiration_seconds: Some(expiration_seconds.unwrap_or(3600)),
        },
        ..Default::default()
    };
    let answer = Api::<ServiceAccount>::namespaced(cx.client.clone(), &pod.namespace)
        .create_token_request(&pod.service_account, &Default::default(), &request)
        .await
        .with_context(|| {
            format!(
                "TokenRequest for ServiceAccount {}/{}",
                pod.namespace, pod.service_account
            )
        })?;
    Ok(answer.status.context("no token in the answer")?.token)
}

/// Writes `files` the way the kubelet's atomic writer does.
fn write_atomic(dir: &Path, files: &[FileSpec]) -> anyhow::Result<()> {
    std::fs::create_dir(dir)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))?;
    let stamp = format!(
        "..{}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_nanos()
    );
    let data_dir = dir.join(&stamp);
    std::fs::create_dir(&data_dir)?;
    std::fs::set_permissions(&data_dir, std::fs::Permissions::from_mode(0o755))?;
    let mut top = std::collections::BTreeSet::new();
    for file in files {
        let relative = checked_path(&file.path)?;
        let path = data_dir.join(&relative);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::write(&path, &file.data)
            .with_context(|| format!("cannot write {}", path.display()))?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(file.mode))?;
        if let Some(uid) = file.owner {
            std::os::unix::fs::chown(&path, Some(uid), None)?;
        }
        top.insert(
            relative
                .components()
                .next()
                .context("empty path")?
                .as_os_str()
                .to_owned(),
        );
    }
    std::os::unix::fs::symlink(&stamp, dir.join("..data"))?;
    for name in top {
        std::os::unix::fs::symlink(Path::new("..data").join(&name), dir.join(&name))?;
    }
    Ok(())
}

/// A volume file's path: relative, without `..`, not starting with `..` (the API
/// server's validation, repeated since this one does not validate built-in types).
fn checked_path(path: &str) -> anyhow::Result<PathBuf> {
    let p = Path::new(path);
    let ok = !path.is_empty()
        && !path.starts_with("..")
        && p.components()
            .all(|c| matches!(c, std::path::Component::Normal(_)));
    anyhow::ensure!(
        ok,
        "file path {path:?} must be relative and must not contain '..'"
    );
    Ok(p.to_path_buf())
}

/// The kubelet's `SetVolumeOwnership` for `fsGroup`.
fn apply_fs_group(root: &Path, fs_group: Option<u32>, read_only: bool) -> anyhow::Result<()> {
    let Some(gid) = fs_group else {
        return Ok(());
    };
    let meta = std::fs::symlink_metadata(root)?;
    if meta.file_type().is_symlink() {
        return Ok(());
    }
    std::os::unix::fs::lchown(root, None, Some(gid))?;
    let mut mask = if read_only { 0o440 } else { 0o660 };
    if meta.is_dir() {
        mask |= 0o2000 | 0o110;
    }
    let mode = meta.permissions().mode() & 0o7777;
    std::fs::set_permissions(root, std::fs::Permissions::from_mode(mode | mask))?;
    if meta.is_dir() {
        for entry in std::fs::read_dir(root)? {
            apply_fs_group(&entry?.path(), Some(gid), read_only)?;
        }
    }
    Ok(())
}
