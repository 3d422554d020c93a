//! The containers the controls visit: init containers, containers, then ephemeral
//! containers (upstream's `visitContainers`), each with the path to report it by.

use k8s_openapi::api::core::v1::{ContainerPort, PodSpec, SecurityContext};

use super::Violation;

/// One container of any of the three lists, borrowed.
pub(super) struct ContainerRef<'a> {
    /// `initContainers`, `containers` or `ephemeralContainers`.
    list: &'static str,
    index: usize,
    pub name: &'a str,
    pub security_context: Option<&'a SecurityContext>,
    pub ports: &'a [ContainerPort],
}

impl ContainerRef<'_> {
    /// A violation of this container's field `rest` (relative to the container, e.g.
    /// `securityContext.privileged`); `message` is relative to the container too.
    pub fn violation(&self, control: &'static str, rest: &str, message: String) -> Violation {
        Violation {
            control,
            container: Some(self.name.to_owned()),
            field: format!("spec.{}[{}].{rest}", self.list, self.index),
            message,
        }
    }
}

/// Every container of the pod, in upstream's order.
pub(super) fn all(spec: &PodSpec) -> impl Iterator<Item = ContainerRef<'_>> {
    let init = spec.init_containers.iter().flatten().enumerate();
    let init = init.map(|(index, c)| ContainerRef {
        list: "initContainers",
        index,
        name: &c.name,
        security_context: c.security_context.as_ref(),
        ports: c.ports.as_deref().unwrap_or_default(),
    });
    let main = spec
        .containers
        .iter()
        .enumerate()
        .map(|(index, c)| ContainerRef {
            list: "containers",
            index,
            name: &c.name,
            security_context: c.security_context.as_ref(),
            ports: c.ports.as_deref().unwrap_or_default(),
        });
    let ephemeral = spec.ephemeral_containers.iter().flatten().enumerate();
    let ephemeral = ephemeral.map(|(index, c)| ContainerRef {
        list: "ephemeralContainers",
        index,
        name: &c.name,
        security_context: c.security_context.as_ref(),
        ports: c.ports.as_deref().unwrap_or_default(),
    });
    init.chain(main).chain(ephemeral)
}
