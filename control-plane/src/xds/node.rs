//! Who is on the other end of a stream, from the `Node` of its first request.
//!
//! `meshctl bootstrap` writes `node.id = <pod>.<namespace>` and the metadata keys
//! [`NAMESPACE_KEY`] and [`POD_KEY`]. (Once the xDS port requires client certificates,
//! the certificate's identity must agree with these; until then they are trusted.)

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::google::protobuf::value::Kind;

use crate::model::ObjectKey;

pub const NAMESPACE_KEY: &str = "namespace";
pub const POD_KEY: &str = "pod";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxyId {
    pub node_id: String,
    pub workload: ObjectKey,
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum NodeError {
    #[error("the first request of a stream must carry `node`")]
    MissingNode,
    #[error("node.id must not be empty")]
    MissingId,
    #[error(
        "node {node_id:?}: node.metadata.{key} must be a non-empty string \
         (write the bootstrap with `meshctl bootstrap`)"
    )]
    MissingMetadata { node_id: String, key: &'static str },
}

pub fn identify(node: Option<&Node>) -> Result<ProxyId, NodeError> {
    let node = node.ok_or(NodeError::MissingNode)?;
    if node.id.is_empty() {
        return Err(NodeError::MissingId);
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
    Ok(ProxyId {
        node_id: node.id.clone(),
        workload: ObjectKey::new(field(NAMESPACE_KEY)?, field(POD_KEY)?),
    })
}
