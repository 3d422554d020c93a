//! meshd's own injected containers, told apart from look-alikes.
//!
//! `meshd-init` needs `NET_ADMIN` and `NET_RAW` and runs as root: it breaks `baseline`
//! and `restricted`. Validation runs after mutation, so the pod in front of the
//! validating webhook carries what meshd's injector produced; [`recognise`] renders
//! the template again for that pod (its capture annotations give `meshd-init`'s
//! arguments, its `meshd.io/original-probes` the sidecar's probe table) and names
//! the containers that are exactly that. Only those are exempt. A container that
//! merely carries the name — another image, another argument, one more capability, a
//! `hostPort` — is judged like any other.
//!
//! "Exactly" allows for what the API server adds when it stores a pod: fields the
//! template leaves unset that are defaulted (`terminationMessagePath`,
//! `terminationMessagePolicy`, a probe's `successThreshold`, a field reference's
//! `apiVersion`, ...), each only with its default value, `resources.requests`
//! copied from `limits`, and quantities written in another form (`0.5` as `500m`).

use k8s_openapi::api::core::v1::{Container, PodSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use meshd_sidecar::capture;
use meshd_sidecar::probes::{AppProbes, ORIGINAL_PROBES_ANNOTATION};
use serde_json::Value;

use crate::inject::InjectConfig;
use crate::inject::template;

/// The names of the containers of `spec` that are exactly the ones meshd's template
/// (with `config`) injects into this pod.
pub fn recognise(meta: &ObjectMeta, spec: &PodSpec, config: &InjectConfig) -> Vec<String> {
    let empty = Default::default();
    let annotations = meta.annotations.as_ref().unwrap_or(&empty);
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
        let Some(want) = expected.iter().find(|c| c.name == actual.name) else {
            continue;
        };
        let (Ok(want), Ok(got)) = (serde_json::to_value(want), serde_json::to_value(actual)) else {
            continue;
        };
        if same(&want, &got, "") {
            out.push(actual.name.clone());
        }
    }
    out
}

/// Fields the API server sets when a stored pod leaves them out, with their value.
const DEFAULTED: [(&str, &str); 7] = [
    ("terminationMessagePath", "\"/dev/termination-log\""),
    ("terminationMessagePolicy", "\"File\""),
    ("successThreshold", "1"),
    ("timeoutSeconds", "1"),
    ("periodSeconds", "10"),
    ("failureThreshold", "3"),
    ("apiVersion", "\"v1\""),
];

/// Whether `got` is `want` as the API server stores it (see the module doc). `at` is
/// the key `got` is under.
fn same(want: &Value, got: &Value, at: &str) -> bool {
    match (want, got) {
        (Value::Object(_), Value::Object(_)) if matches!(at, "limits" | "requests") => {
            same_quantities(want, got)
        }
        (Value::Object(w), Value::Object(g)) => {
            // Requests default to the limits when only limits are written.
            if at == "resources" && !w.contains_key("requests") && g.contains_key("requests") {
                let limits = w.get("limits").cloned().unwrap_or_default();
                if !same_quantities(&limits, &g["requests"]) {
                    return false;
                }
            }
            w.iter()
                .all(|(k, v)| g.get(k).is_some_and(|gv| same(v, gv, k)))
                && g.iter().all(|(k, v)| {
                    w.contains_key(k)
                        || (at == "resources" && k == "requests")
                        || DEFAULTED.iter().any(|(name, default)| {
                            k == name
                                && *v == serde_json::from_str::<Value>(default).unwrap_or_default()
                        })
                })
        }
        (Value::Array(w), Value::Array(g)) => {
            w.len() == g.len() && w.iter().zip(g).all(|(w, g)| same(w, g, at))
        }
        _ => want == got,
    }
}

fn same_quantities(want: &Value, got: &Value) -> bool {
    match (want.as_object(), got.as_object()) {
        (Some(w), Some(g)) => {
            w.len() == g.len()
                && w.iter().all(|(k, v)| {
                    g.get(k).is_some_and(|gv| match (v.as_str(), gv.as_str()) {
                        (Some(a), Some(b)) => quantity(a).is_some() && quantity(a) == quantity(b),
                        _ => false,
                    })
                })
        }
        _ => false,
    }
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
    use serde_json::json;

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
