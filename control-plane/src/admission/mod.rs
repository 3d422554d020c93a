//! Pod security admission that knows the mesh (issue #16, being built): image
//! references as the runtime reads them (`image`).

pub mod image;
