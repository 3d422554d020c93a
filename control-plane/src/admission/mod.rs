//! Admission of what runs in the mesh: [`pss`] decides the Kubernetes Pod Security
//! Standards for one pod spec, in-process.

pub mod pss;
