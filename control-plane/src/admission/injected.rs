//! meshd's own injected containers, told apart from look-alikes.
//!
//! `meshd-init` needs `NET_ADMIN` and `NET_RAW` and runs as root: it breaks `baseline`
//! and `restricted`. Validation runs after mutation, so the pod in front of the
//! validating webhook carries what meshd's injector produced; [`recognise`] renders
//! the template again for that pod (its capture annotations give `meshd-init`'s
//! arguments, its `meshd.io/original-probes` the sidecar's probe table) and names
//! the containers that are exactly that, in a pod that carries the injector's
//! `meshd.io/injected` annotation. Only those are exempt. A container that merely
//! carries the name — another image, another argument, one more capability, a
//! `hostPort` — is judged like any other. (A byte-for-byte copy of what meshd would
//! inject, annotation included, is exempt: it runs meshd's image with meshd's
//! arguments, which is what injection grants any pod anyway.)
//!
//! "Exactly" allows for what the API server adds when it stores a pod: fields the
//! template leaves unset that are defaulted (`terminationMessagePath`,
//! `terminationMessagePolicy`, a probe's `successThreshold`, a field reference's
//! `apiVersion`, ...), each only with its default value, `resources.requests`
//! copied from `limits`, and quantities written in another form (`0.5` as `500m`).

use crate::inject::{INJECTED_ANNOTATION, InjectConfig, template};
use k8s_openapi::api::core::v1::{Container, PodSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use meshd_sidecar::capture;
use meshd_sidecar::probes::{AppProbes, ORIGINAL_PROBES_ANNOTATION};

/// The names of the containers of `spec` that are exactly the ones meshd's template
/// (with `config`) injects into this pod; none unless the pod carries the injector's
/// annotation ([`INJECTED_ANNOTATION`]).
pub fn recognise(meta: &ObjectMeta, spec: &PodSpec, config: &InjectConfig) -> Vec<String> {
    let empty = Default::default();
    let annotations = meta.annotations.as_ref().unwrap_or(&empty);
    if !annotations.contains_key(INJECTED_ANNOTATION) {
        return Vec::new();
    }
    let mut expected: Vec<Container> = Vec::new();
    if let Ok(args) = capture::init_args(annotations) {
        expected.push(template::init_container(config, args));
    }
    let probes = match annotations.get(ORIGINAL_PROBES_ANNOTATION) {
        None => Some(AppProbes::default()),
        Some(json) => AppProbes::from_json(json).ok(),
    };
    if let Some(probes) = probes {
        expected.push(template::sidecar(config, &probes));
    }
    let mut out = Vec::new();
    for actual in spec.init_containers.iter().flatten() {
        if expected
            .iter()
            .any(|want| want.name == actual.name && same(want, actual))
        {
            out.push(actual.name.clone());
        }
    }
    out
}

/// Whether `got` is `want` as the API server stores it: equal once the defaults it
/// adds where `want` leaves a field out are taken away again (see the module doc).
fn same(want: &Container, got: &Container) -> bool {
    let mut got = got.clone();
    undefault(
        &mut got.termination_message_path,
        &want.termination_message_path,
        "/dev/termination-log".to_string(),
    );
    undefault(
        &mut got.termination_message_policy,
        &want.termination_message_policy,
        "File".to_string(),
    );
    for (got, want) in [
        (&mut got.startup_probe, &want.startup_probe),
        (&mut got.readiness_probe, &want.readiness_probe),
        (&mut got.liveness_probe, &want.liveness_probe),
    ] {
        if let (Some(got), Some(want)) = (got.as_mut(), want.as_ref()) {
            undefault(&mut got.success_threshold, &want.success_threshold, 1);
            undefault(&mut got.timeout_seconds, &want.timeout_seconds, 1);
            undefault(&mut got.period_seconds, &want.period_seconds, 10);
            undefault(&mut got.failure_threshold, &want.failure_threshold, 3);
        }
    }
    if let (Some(got), Some(want)) = (got.env.as_mut(), want.env.as_ref()) {
        for (got, want) in got.iter_mut().zip(want) {
            let field_ref = |e: &k8s_openapi::api::core::v1::EnvVar| {
                e.value_from
                    .as_ref()
                    .and_then(|v| v.field_ref.as_ref())
                    .map(|f| f.api_version.clone())
            };
            let want_version = field_ref(want).flatten();
            if let Some(f) = got.value_from.as_mut().and_then(|v| v.field_ref.as_mut()) {
                undefault(&mut f.api_version, &want_version, "v1".to_string());
            }
        }
    }
    // Quantities compare by value; requests default to the limits.
    let (got_resources, want_resources) = (got.resources.take(), want.resources.as_ref());
    let resources_same = match (got_resources.as_ref(), want_resources) {
        (None, None) => true,
        (Some(g), Some(w)) => {
            let requests_same = match (&g.requests, &w.requests) {
                (Some(g), None) => w.limits.as_ref().is_some_and(|l| same_quantities(l, g)),
                (g, w) => same_optional_quantities(g.as_ref(), w.as_ref()),
            };
            requests_same
                && same_optional_quantities(g.limits.as_ref(), w.limits.as_ref())
                && g.claims == w.claims
        }
        _ => false,
    };
    got.resources = want.resources.clone();
    resources_same && got == *want
}

/// Takes the API server's `default` out of `got` where `want` leaves the field out.
fn undefault<T: PartialEq>(got: &mut Option<T>, want: &Option<T>, default: T) {
    if want.is_none() && got.as_ref() == Some(&default) {
        *got = None;
    }
}

type Quantities =
    std::collections::BTreeMap<String, k8s_openapi::apimachinery::pkg::api::resource::Quantity>;

fn same_optional_quantities(got: Option<&Quantities>, want: Option<&Quantities>) -> bool {
    match (got, want) {
        (None, None) => true,
        (Some(g), Some(w)) => same_quantities(w, g),
        _ => false,
    }
}

fn same_quantities(want: &Quantities, got: &Quantities) -> bool {
    want.len() == got.len()
        && want.iter().all(|(k, w)| {
            got.get(k)
                .is_some_and(|g| quantity(&w.0).is_some() && quantity(&w.0) == quantity(&g.0))
        })
}

/// A Kubernetes quantity in thousandths (`500m` = 500, `1` = 1000, `64Mi` =
/// 64 * 2^20 * 1000); `None` if it is not one meshd can read exactly.
fn quantity(text: &str) -> Option<u128> {
    if let Some(milli) = text.strip_suffix('m') {
        return milli.parse().ok();
    }
    const SUFFIXES: [(&str, u128); 12] = [
        ("Ki", 1 << 10),
        ("Mi", 1 << 20),
        ("Gi", 1 << 30),
        ("Ti", 1 << 40),
        ("Pi", 1 << 50),
        ("Ei", 1 << 60),
        ("k", 1_000),
        ("M", 1_000_000),
        ("G", 1_000_000_000),
        ("T", 1_000_000_000_000),
        ("P", 1_000_000_000_000_000),
        ("E", 1_000_000_000_000_000_000),
    ];
    let (number, factor) = SUFFIXES
        .iter()
        .find_map(|(s, f)| text.strip_suffix(s).map(|n| (n, *f)))
        .unwrap_or((text, 1));
    let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
    let digits = |s: &str| s.chars().all(|c| c.is_ascii_digit());
    if whole.is_empty() || !digits(whole) || !digits(fraction) || fraction.len() > 3 {
        return None;
    }
    let milli: u128 = format!("{whole}{fraction:0<3}").parse().ok()?;
    milli.checked_mul(factor)
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::core::v1::Pod;
    use serde_json::{Value, json};

    use super::*;
    use crate::inject;

    fn injected_pod(config: &InjectConfig) -> Pod {
        let mut pod: Pod = serde_json::from_value(json!({
            "metadata": {"name": "web", "namespace": "shop"},
            "spec": {"containers": [{"name": "app", "image": "web:1",
                "readinessProbe": {"httpGet": {"path": "/ready", "port": 8080}}}]},
        }))
        .unwrap();
        let spec = pod.spec.as_mut().unwrap();
        inject::inject(&mut pod.metadata, spec, "shop", config).unwrap();
        pod
    }

    /// What the API server does to a stored pod's containers.
    fn as_stored(pod: &Pod) -> Pod {
        let mut v = serde_json::to_value(pod).unwrap();
        for c in v["spec"]["initContainers"].as_array_mut().unwrap() {
            c["terminationMessagePath"] = json!("/dev/termination-log");
            c["terminationMessagePolicy"] = json!("File");
            if let Some(env) = c.get_mut("env").and_then(Value::as_array_mut) {
                for e in env {
                    if let Some(f) = e.pointer_mut("/valueFrom/fieldRef") {
                        f["apiVersion"] = json!("v1");
                    }
                }
            }
            for probe in ["startupProbe", "readinessProbe"] {
                if let Some(p) = c.get_mut(probe) {
                    p["successThreshold"] = json!(1);
                }
            }
            let r = &mut c["resources"];
            if r.get("requests").is_none() {
                r["requests"] = r["limits"].clone();
            }
        }
        serde_json::from_value(v).unwrap()
    }

    fn names(pod: &Pod, config: &InjectConfig) -> Vec<String> {
        recognise(&pod.metadata, pod.spec.as_ref().unwrap(), config)
    }

    #[test]
    fn the_injected_containers_are_recognised_as_stored() {
        let config = InjectConfig::default();
        let pod = injected_pod(&config);
        assert_eq!(names(&pod, &config), ["meshd-init", "meshd-proxy"]);
        assert_eq!(
            names(&as_stored(&pod), &config),
            ["meshd-init", "meshd-proxy"]
        );

        // Limits only, in another notation: requests copied, quantities rewritten.
        let config =
            InjectConfig::parse("initResources: {limits: {cpu: '0.5', memory: 64Mi}}\n").unwrap();
        let mut stored = serde_json::to_value(as_stored(&injected_pod(&config))).unwrap();
        stored["spec"]["initContainers"][0]["resources"] = json!({"limits": {"cpu": "500m", "memory": "64Mi"}, "requests": {"cpu": "500m", "memory": "64Mi"}});
        let stored: Pod = serde_json::from_value(stored).unwrap();
        assert_eq!(names(&stored, &config), ["meshd-init", "meshd-proxy"]);
    }

    #[test]
    fn a_look_alike_is_not_recognised() {
        let config = InjectConfig::default();
        let pod = as_stored(&injected_pod(&config));
        let changed = |f: &dyn Fn(&mut Value)| {
            let mut v = serde_json::to_value(&pod).unwrap();
            f(&mut v["spec"]["initContainers"][0]);
            let p: Pod = serde_json::from_value(v).unwrap();
            names(&p, &config)
        };
        let proxy_only = ["meshd-proxy"];
        assert_eq!(
            changed(&|c| c["image"] = json!("evil/meshd-proxy:1")),
            proxy_only
        );
        assert_eq!(
            changed(&|c| c["args"].as_array_mut().unwrap().push(json!("--x"))),
            proxy_only
        );
        assert_eq!(
            changed(&|c| c["securityContext"]["capabilities"]["add"]
                .as_array_mut()
                .unwrap()
                .push(json!("SYS_ADMIN"))),
            proxy_only
        );
        assert_eq!(
            changed(&|c| c["ports"] = json!([{"containerPort": 80, "hostPort": 80}])),
            proxy_only
        );
        assert_eq!(
            changed(&|c| c["terminationMessagePath"] = json!("/x")),
            proxy_only
        );
        assert_eq!(
            changed(&|c| c["resources"]["requests"] = json!({"cpu": "4"})),
            proxy_only
        );
        // Another pod's capture annotations make other arguments.
        let mut other = pod.clone();
        other
            .metadata
            .annotations
            .get_or_insert_default()
            .insert("meshd.io/exclude-inbound-ports".into(), "9090".into());
        assert_eq!(names(&other, &config), proxy_only);
        // A hand-made pod with the template's containers but another image setting.
        let other_config =
            InjectConfig::parse("proxyImage: registry.example.com/meshd-proxy:2\n").unwrap();
        assert!(names(&pod, &other_config).is_empty());
        // Without the injector's annotation nothing is meshd's.
        let mut unannotated = pod.clone();
        unannotated
            .metadata
            .annotations
            .as_mut()
            .unwrap()
            .remove(INJECTED_ANNOTATION);
        assert!(names(&unannotated, &config).is_empty());
    }

    #[test]
    fn quantities_read_exactly() {
        assert_eq!(quantity("500m"), Some(500));
        assert_eq!(quantity("0.5"), quantity("500m"));
        assert_eq!(quantity("1"), Some(1000));
        assert_eq!(quantity("64Mi"), Some(64 * (1 << 20) * 1000));
        assert_eq!(quantity("1k"), quantity("1000"));
        assert_eq!(quantity("x"), None);
        assert_eq!(quantity("1.2345"), None);
    }
}
