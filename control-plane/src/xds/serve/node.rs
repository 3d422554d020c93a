//! Who is on the other end of a stream.
//!
//! The identity is the SPIFFE id in the client certificate the xDS port verified. The
//! node of the first request says which pod the proxy serves (`node.metadata`:
//! [`NAMESPACE_KEY`], [`POD_KEY`], [`SERVICE_ACCOUNT_KEY`], written by
//! `meshctl bootstrap`); a node that claims a namespace or service account other than
//! its certificate's is refused. Whether the named pod really runs as that service
//! account is checked against the mesh on every snapshot (see `server::ProxyConn`).

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::google::protobuf::value::Kind;
use meshd_ca::SpiffeId;
use rustls_pki_types::CertificateDer;

use crate::model::ObjectKey;

pub use meshd_sidecar::{NAMESPACE_KEY, POD_KEY, SERVICE_ACCOUNT_KEY};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxyId {
    pub node_id: String,
    pub workload: ObjectKey,
    /// Verified from the client certificate.
    pub identity: SpiffeId,
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum NodeError {
    #[error("the first request of a stream must carry `node`")]
    MissingNode,
    #[error("node.id must not be empty")]
    MissingId,
    #[error(
        "node.id must be at most {max} bytes without control characters, not {id:?}",
        max = crate::xds::serve::limits::MAX_NAME_BYTES
    )]
    BadId { id: String },
    #[error("node {node_id:?}: node.metadata.pod {pod:?} is not a pod name")]
    BadPod { node_id: String, pod: String },
    #[error(
        "node {node_id:?}: node.metadata.{key} must be a non-empty string \
         (write the bootstrap with `meshctl bootstrap`)"
    )]
    MissingMetadata { node_id: String, key: &'static str },
}

/// Why a verified peer may not speak for the node it claims.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    #[error("no client certificate was presented")]
    NoCertificate,
    #[error("the client certificate carries no workload SPIFFE id: {0}")]
    NoSpiffeId(String),
    #[error("the client certificate is for trust domain {got:?}, this mesh is {want:?}")]
    ForeignTrustDomain { got: String, want: String },
    #[error("node {node_id:?} claims {key} \"{claimed}\" but its client certificate is {identity}")]
    Mismatch {
        node_id: String,
        key: &'static str,
        claimed: String,
        identity: String,
    },
}

/// The workload SPIFFE id of the leaf certificate the peer presented.
pub fn peer_identity(certs: Option<&[CertificateDer<'_>]>) -> Result<SpiffeId, IdentityError> {
    let leaf = certs
        .and_then(|c| c.first())
        .ok_or(IdentityError::NoCertificate)?;
    meshd_ca::leaf_uri(leaf)
        .map_err(IdentityError::NoSpiffeId)?
        .parse()
        .map_err(|e: meshd_ca::SpiffeIdError| IdentityError::NoSpiffeId(e.to_string()))
}

/// Reads the node and checks it against the verified identity.
pub fn identify(
    node: Option<&Node>,
    identity: SpiffeId,
    trust_domain: &str,
) -> Result<ProxyId, IdentifyError> {
    let node = node.ok_or(NodeError::MissingNode)?;
    if node.id.is_empty() {
        return Err(NodeError::MissingId.into());
    }
    // The node id is logged with every line about this stream: it must not be able to
    // break a line or fill one.
    if node.id.len() > crate::xds::serve::limits::MAX_NAME_BYTES
        || node.id.chars().any(char::is_control)
    {
        let id = crate::logging::Escaped(&node.id).to_string();
        return Err(NodeError::BadId { id }.into());
    }
    let field = |key: &'static str| {
        node.metadata
            .as_ref()
            .and_then(|m| m.fields.get(key))
            .and_then(|v| match &v.kind {
                Some(Kind::StringValue(s)) if !s.is_empty() => Some(s.clone()),
                _ => None,
            })
            .ok_or_else(|| NodeError::MissingMetadata {
                node_id: node.id.clone(),
                key,
            })
    };
    let namespace = field(NAMESPACE_KEY)?;
    let pod = field(POD_KEY)?;
    if !is_pod_name(&pod) {
        return Err(NodeError::BadPod {
            node_id: node.id.clone(),
            pod: crate::logging::Escaped(&pod).to_string(),
        }
        .into());
    }
    let service_account = field(SERVICE_ACCOUNT_KEY)?;
    if identity.trust_domain() != trust_domain {
        return Err(IdentityError::ForeignTrustDomain {
            got: identity.trust_domain().to_string(),
            want: trust_domain.to_string(),
        }
        .into());
    }
    for (key, claimed, actual) in [
        (NAMESPACE_KEY, &namespace, identity.namespace()),
        (
            SERVICE_ACCOUNT_KEY,
            &service_account,
            identity.service_account(),
        ),
    ] {
        if claimed != actual {
            return Err(IdentityError::Mismatch {
                node_id: node.id.clone(),
                key,
                // Peer-chosen and echoed in the log and the status: escaped and cut.
                claimed: crate::logging::Escaped(claimed).to_string(),
                identity: identity.to_string(),
            }
            .into());
        }
    }
    Ok(ProxyId {
        node_id: node.id.clone(),
        workload: ObjectKey::new(namespace, pod),
        identity,
    })
}

/// A Kubernetes object name: a DNS subdomain (lowercase letters, digits, `-`, `.`).
fn is_pod_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '-' | '.'))
}

#[derive(Debug, thiserror::Error)]
pub enum IdentifyError {
    #[error(transparent)]
    Node(#[from] NodeError),
    #[error(transparent)]
    Identity(#[from] IdentityError),
}
