//! Admission of what runs in the mesh (issue #16, being built; nothing calls it yet):
//! [`pss`] decides the Kubernetes Pod Security Standards for one pod spec, [`rules`]
//! the `WorkloadPolicy` rules beyond them, on image references read as the runtime
//! reads them ([`image`]); [`evaluate`] puts one pod against every policy that applies
//! to it, with exemptions, and says which mode decides.

pub mod evaluate;
pub mod image;
pub mod pss;
pub mod rules;
