//! Deployment artefacts: the Kubernetes manifests under deploy/, the systemd
//! unit and the example configuration under systemd/.
//!
//! - Every manifest parses strictly as the Kubernetes type its apiVersion and
//!   kind name: deserialized with k8s-openapi (API of Kubernetes 1.34, the
//!   oldest release the pinned sidecars support) and serialized again, the
//!   result must equal the document, so a misspelt or unknown field fails.
//! - The kustomize overlays are rendered by a small renderer that knows
//!   exactly the subset of kustomize the overlays use (resources, and
//!   strategic-merge patches by path) and rejects everything else; where
//!   `kubectl` is installed its `kubectl kustomize` output must agree.
//! - Driver name, topology key, socket and state paths agree across the
//!   manifests, the systemd unit, the example config and the binary.
//! - `systemd-analyze verify` accepts the unit; the binary accepts the config.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use clap::Parser;
use k8s_openapi::Resource;
use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{Namespace, PersistentVolumeClaim, Pod, Service, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding};
use k8s_openapi::api::storage::v1::{CSIDriver, StorageClass};
use pmem_agent::config::{
    Args, Config, DEFAULT_ADMIN_ENDPOINT, DEFAULT_DRIVER_NAME, DEFAULT_ENDPOINT, DEFAULT_STATE_DIR,
    TOPOLOGY_KEY, socket_path,
};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

/// Label that selects the nodes the DaemonSet runs on.
const PMEM_NODE_LABEL: &str = "pmem-agent.csi/pmem";
/// The overlays and the backend each one must select.
const OVERLAYS: &[&str] = &["sim", "direct", "lvm"];

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn deploy() -> PathBuf {
    repo().join("deploy")
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

fn rel(path: &Path) -> String {
    path.strip_prefix(repo())
        .unwrap_or(path)
        .display()
        .to_string()
}

/// All *.yaml / *.yml files under `dir`, sorted.
fn yaml_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap_or_else(|e| panic!("{}: {e}", d.display())) {
            let p = entry.expect("dir entry").path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|e| e == "yaml" || e == "yml") {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

/// The YAML documents of a file as JSON values (empty documents skipped).
fn yaml_docs(path: &Path) -> Vec<Value> {
    let text = read(path);
    let mut docs = Vec::new();
    for (i, de) in serde_norway::Deserializer::from_str(&text).enumerate() {
        let v = Value::deserialize(de)
            .unwrap_or_else(|e| panic!("{} document {}: {e}", rel(path), i + 1));
        if !v.is_null() {
            docs.push(v);
        }
    }
    docs
}

// ---------------------------------------------------------------------------
// Strict parsing with k8s-openapi.

/// Canonical form for comparison: numbers compared by value (YAML may give
/// 60 where a typed round trip gives 60.0 or the other way round).
fn normalize(v: &Value) -> Value {
    match v {
        Value::Number(n) => match (n.as_i64(), n.as_u64(), n.as_f64()) {
            (Some(i), _, _) => Value::from(i),
            (None, Some(u), _) => Value::from(u),
            (None, None, Some(f)) if f.fract() == 0.0 && f.abs() < 9.0e15 => Value::from(f as i64),
            _ => v.clone(),
        },
        Value::Array(a) => Value::Array(a.iter().map(normalize).collect()),
        Value::Object(m) => Value::Object(
            m.iter()
                .map(|(k, v)| (k.clone(), normalize(v)))
                .collect::<Map<_, _>>(),
        ),
        _ => v.clone(),
    }
}

/// Paths at which `original` and `typed` differ, described for a human.
fn differences(path: &str, original: &Value, typed: &Value, out: &mut Vec<String>) {
    match (original, typed) {
        (Value::Object(a), Value::Object(b)) => {
            for (k, va) in a {
                let p = format!("{path}.{k}");
                match b.get(k) {
                    Some(vb) => differences(&p, va, vb, out),
                    None => out.push(format!(
                        "{p}: not a field of the type (misspelt or unknown)"
                    )),
                }
            }
            for k in b.keys().filter(|k| !a.contains_key(*k)) {
                out.push(format!(
                    "{path}.{k}: added by the typed round trip (missing required field?)"
                ));
            }
        }
        (Value::Array(a), Value::Array(b)) if a.len() == b.len() => {
            for (i, (va, vb)) in a.iter().zip(b).enumerate() {
                differences(&format!("{path}[{i}]"), va, vb, out);
            }
        }
        _ if original == typed => {}
        _ => out.push(format!("{path}: {original} became {typed}")),
    }
}

/// Deserializes `doc` as `T` and requires the re-serialized value to equal it.
fn strict_as<T>(doc: &Value) -> Result<(), String>
where
    T: Resource + DeserializeOwned + serde::Serialize,
{
    let typed: T =
        serde_json::from_value(doc.clone()).map_err(|e| format!("as {}: {e}", T::KIND))?;
    let back = serde_json::to_value(&typed).map_err(|e| e.to_string())?;
    let (a, b) = (normalize(doc), normalize(&back));
    if a == b {
        return Ok(());
    }
    let mut diffs = Vec::new();
    differences("", &a, &b, &mut diffs);
    Err(format!(
        "as {}/{}:\n  {}",
        T::API_VERSION,
        T::KIND,
        diffs.join("\n  ")
    ))
}

/// Checks a document against the type its apiVersion and kind name.
fn strict(doc: &Value) -> Result<(), String> {
    let api = doc["apiVersion"].as_str().unwrap_or("");
    let kind = doc["kind"].as_str().unwrap_or("");
    macro_rules! dispatch {
        ($($t:ty),* $(,)?) => {
            $(if api == <$t>::API_VERSION && kind == <$t>::KIND {
                return strict_as::<$t>(doc);
            })*
        };
    }
    dispatch!(
        Namespace,
        ServiceAccount,
        ClusterRole,
        ClusterRoleBinding,
        Role,
        RoleBinding,
        CSIDriver,
        DaemonSet,
        StorageClass,
        PersistentVolumeClaim,
        Pod,
        Service,
    );
    if api == "monitoring.coreos.com/v1" {
        let r = match kind {
            "ServiceMonitor" => {
                serde_json::from_value::<monitoring::ServiceMonitor>(doc.clone()).map(drop)
            }
            "PrometheusRule" => {
                serde_json::from_value::<monitoring::PrometheusRule>(doc.clone()).map(drop)
            }
            _ => {
                return Err(format!(
                    "monitoring.coreos.com/v1 {kind:?}: not known to this test"
                ));
            }
        };
        return r.map_err(|e| format!("as {kind}: {e}"));
    }
    Err(format!(
        "apiVersion {api:?} kind {kind:?}: no Kubernetes type known to this test (add it to strict())"
    ))
}

fn name_of(doc: &Value) -> String {
    let m = &doc["metadata"];
    match m["namespace"].as_str() {
        Some(ns) => format!(
            "{}/{}/{}",
            doc["kind"].as_str().unwrap_or("?"),
            ns,
            m["name"].as_str().unwrap_or("?")
        ),
        None => format!(
            "{}/{}",
            doc["kind"].as_str().unwrap_or("?"),
            m["name"].as_str().unwrap_or("?")
        ),
    }
}

// ---------------------------------------------------------------------------
// The kustomize subset used by deploy/.

/// A kustomization.yaml; fields outside the subset are rejected, so a new
/// kustomize feature in deploy/ needs this renderer (and test) extended.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Kustomization {
    api_version: Option<String>,
    kind: Option<String>,
    #[serde(default)]
    resources: Vec<String>,
    #[serde(default)]
    patches: Vec<PatchRef>,
}

/// Only `path:` patches whose target is the object the patch names.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PatchRef {
    path: String,
}

fn kustomization(dir: &Path) -> Kustomization {
    let path = dir.join("kustomization.yaml");
    let k: Kustomization = serde_norway::from_str(&read(&path)).unwrap_or_else(|e| {
        panic!(
            "{}: {e} (outside the kustomize subset tests/manifests.rs renders)",
            rel(&path)
        )
    });
    assert_eq!(
        k.api_version.as_deref(),
        Some("kustomize.config.k8s.io/v1beta1"),
        "{}",
        rel(&path)
    );
    assert_eq!(k.kind.as_deref(), Some("Kustomization"), "{}", rel(&path));
    k
}

/// Every kustomization directory under deploy/.
fn kustomization_dirs() -> Vec<PathBuf> {
    yaml_files(&deploy())
        .into_iter()
        .filter(|p| p.file_name().is_some_and(|n| n == "kustomization.yaml"))
        .map(|p| p.parent().expect("parent").to_owned())
        .collect()
}

/// The patch files that the kustomizations reference (partial objects).
fn patch_files() -> BTreeSet<PathBuf> {
    kustomization_dirs()
        .iter()
        .flat_map(|d| {
            kustomization(d)
                .patches
                .into_iter()
                .map(move |p| d.join(p.path))
        })
        .map(|p| {
            p.canonicalize()
                .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        })
        .collect()
}

/// Identity of an object as kustomize sees it.
fn object_id(doc: &Value) -> (String, String, String, String) {
    let s = |v: &Value| v.as_str().unwrap_or("").to_owned();
    (
        s(&doc["apiVersion"]),
        s(&doc["kind"]),
        s(&doc["metadata"]["namespace"]),
        s(&doc["metadata"]["name"]),
    )
}

/// The key by which strategic merge matches list items of this field
/// (Kubernetes' patchMergeKey); lists of other fields are replaced.
fn merge_key(field: &str) -> Option<&'static str> {
    match field {
        "containers"
        | "initContainers"
        | "ephemeralContainers"
        | "volumes"
        | "env"
        | "imagePullSecrets" => Some("name"),
        "volumeMounts" => Some("mountPath"),
        "volumeDevices" => Some("devicePath"),
        "ports" => Some("containerPort"),
        _ => None,
    }
}

/// Strategic merge of `patch` into `target` for the fields the overlays use.
fn strategic_merge(target: &mut Value, patch: &Value, field: &str, at: &str) {
    match (target, patch) {
        (Value::Object(t), Value::Object(p)) => {
            for (k, pv) in p {
                assert!(
                    !k.starts_with('$'),
                    "{at}.{k}: patch directives are outside the supported subset"
                );
                if pv.is_null() {
                    t.remove(k);
                } else if let Some(tv) = t.get_mut(k) {
                    strategic_merge(tv, pv, k, &format!("{at}.{k}"));
                } else {
                    t.insert(k.clone(), pv.clone());
                }
            }
        }
        (Value::Array(t), Value::Array(p)) if merge_key(field).is_some() => {
            let key = merge_key(field).expect("merge key");
            let mut added = Vec::new();
            for item in p {
                let id = item
                    .get(key)
                    .unwrap_or_else(|| panic!("{at}: item without {key}"));
                match t.iter_mut().find(|x| x.get(key) == Some(id)) {
                    Some(existing) => {
                        strategic_merge(existing, item, "", &format!("{at}[{key}={id}]"))
                    }
                    None => added.push(item.clone()),
                }
            }
            // New items go first, as kustomize puts them.
            added.append(t);
            *t = added;
        }
        (t, p) => *t = p.clone(),
    }
}

/// Renders a kustomization directory: resources (files or directories with
/// their own kustomization), then patches.
fn render(dir: &Path) -> Vec<Value> {
    let k = kustomization(dir);
    let mut objects: Vec<Value> = Vec::new();
    for r in &k.resources {
        let p = dir.join(r);
        assert!(p.exists(), "{}: resource {r} does not exist", rel(dir));
        if p.is_dir() {
            objects.extend(render(&p));
        } else {
            objects.extend(yaml_docs(&p));
        }
    }
    let mut seen = BTreeSet::new();
    for o in &objects {
        assert!(
            seen.insert(object_id(o)),
            "{}: {} appears twice",
            rel(dir),
            name_of(o)
        );
    }
    for pr in &k.patches {
        let p = dir.join(&pr.path);
        assert!(p.exists(), "{}: patch {} does not exist", rel(dir), pr.path);
        for patch in yaml_docs(&p) {
            let id = object_id(&patch);
            let target = objects
                .iter_mut()
                .find(|o| object_id(o) == id)
                .unwrap_or_else(|| {
                    panic!(
                        "{}: patch {} targets {} which no resource defines",
                        rel(dir),
                        pr.path,
                        name_of(&patch)
                    )
                });
            strategic_merge(target, &patch, "", &pr.path);
        }
    }
    objects
}

/// Lists matched by key compared regardless of order.
fn order_keyed_lists(v: &Value, field: &str) -> Value {
    match v {
        Value::Object(m) => Value::Object(
            m.iter()
                .map(|(k, v)| (k.clone(), order_keyed_lists(v, k)))
                .collect(),
        ),
        Value::Array(a) => {
            let mut items: Vec<Value> = a.iter().map(|x| order_keyed_lists(x, "")).collect();
            if let Some(key) = merge_key(field) {
                items.sort_by_key(|x| x.get(key).map(Value::to_string).unwrap_or_default());
            }
            Value::Array(items)
        }
        _ => normalize(v),
    }
}

/// Whether a `kubectl` with kustomize 5 or newer is installed (older ones,
/// like Debian 12's kubernetes-client 1.20, render `patches:` differently).
fn kubectl_available() -> bool {
    let Ok(out) = Command::new("kubectl")
        .args(["version", "--client"])
        .output()
    else {
        return false;
    };
    let text = String::from_utf8_lossy(&out.stdout);
    let major = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("Kustomize Version: v"))
        .and_then(|v| v.split('.').next()?.parse::<u32>().ok());
    out.status.success() && major.is_some_and(|m| m >= 5)
}

/// The rendered objects of an overlay.
fn overlay(name: &str) -> Vec<Value> {
    render(&deploy().join("overlays").join(name))
}

fn find<'a>(objects: &'a [Value], kind: &str) -> Vec<&'a Value> {
    objects.iter().filter(|o| o["kind"] == kind).collect()
}

fn the<'a>(objects: &'a [Value], kind: &str) -> &'a Value {
    let all = find(objects, kind);
    assert_eq!(all.len(), 1, "expected exactly one {kind}");
    all[0]
}

// ---------------------------------------------------------------------------
// Tests: manifests.

#[test]
fn manifests_every_document_parses_strictly_as_its_kind() {
    let patches = patch_files();
    let mut checked = 0;
    let mut failures = Vec::new();
    for path in yaml_files(&deploy()) {
        if path.file_name().is_some_and(|n| n == "kustomization.yaml") {
            kustomization(path.parent().expect("parent"));
            continue;
        }
        if patches.contains(&path.canonicalize().expect("canonical")) {
            continue; // partial objects; checked after rendering
        }
        let docs = yaml_docs(&path);
        assert!(!docs.is_empty(), "{}: no documents", rel(&path));
        for doc in docs {
            checked += 1;
            if let Err(e) = strict(&doc) {
                failures.push(format!("{} {}: {e}", rel(&path), name_of(&doc)));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    assert!(
        checked >= 15,
        "only {checked} documents found under deploy/"
    );
}

#[test]
fn manifests_strict_check_rejects_unknown_and_misspelt_fields() {
    // The checker itself: a misspelt field, an unknown one and a wrong type
    // must each fail, and the correct document must pass.
    let good: Value = serde_norway::from_str(
        "apiVersion: storage.k8s.io/v1\nkind: CSIDriver\nmetadata:\n  name: x\nspec:\n  attachRequired: false\n  podInfoOnMount: true\n",
    )
    .expect("yaml");
    strict(&good).expect("good document");
    for (bad, what) in [
        ("attachRequired: false", "atachRequired: false"),
        (
            "podInfoOnMount: true",
            "podInfoOnMount: true\n  nonsense: 1",
        ),
        ("podInfoOnMount: true", "podInfoOnMount: \"yes\""),
    ] {
        let text = serde_norway::to_string(&good)
            .expect("yaml")
            .replace(bad, what);
        let doc: Value = serde_norway::from_str(&text).expect("yaml");
        assert!(strict(&doc).is_err(), "accepted: {text}");
    }
    let mut wrong_kind = good.clone();
    wrong_kind["kind"] = "CSIDrivers".into();
    assert!(strict(&wrong_kind).is_err());
}

#[test]
fn manifests_overlays_render_and_parse_strictly() {
    let base = render(&deploy().join("base"));
    for o in &base {
        strict(o).unwrap_or_else(|e| panic!("base {}: {e}", name_of(o)));
    }
    let kubectl = kubectl_available();
    if !kubectl {
        eprintln!("no kubectl with kustomize 5+: overlays checked with the built-in renderer only");
    }
    for name in OVERLAYS {
        let dir = deploy().join("overlays").join(name);
        let k = kustomization(&dir);
        assert_eq!(
            k.resources,
            vec!["../../base".to_owned()],
            "overlay {name} builds on the base"
        );
        assert!(!k.patches.is_empty(), "overlay {name} patches nothing");
        let objects = overlay(name);
        for o in &objects {
            strict(o).unwrap_or_else(|e| panic!("overlay {name} {}: {e}", name_of(o)));
        }
        let ids = |v: &[Value]| v.iter().map(object_id).collect::<BTreeSet<_>>();
        assert_eq!(
            ids(&objects),
            ids(&base),
            "overlay {name} adds or drops objects"
        );

        if kubectl {
            let out = Command::new("kubectl")
                .arg("kustomize")
                .arg(&dir)
                .output()
                .expect("run kubectl kustomize");
            assert!(
                out.status.success(),
                "kubectl kustomize {name}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            let text = String::from_utf8(out.stdout).expect("utf-8");
            let theirs: BTreeMap<_, _> = serde_norway::Deserializer::from_str(&text)
                .map(|d| Value::deserialize(d).expect("kubectl output"))
                .filter(|v| !v.is_null())
                .map(|v| (object_id(&v), order_keyed_lists(&v, "")))
                .collect();
            let ours: BTreeMap<_, _> = objects
                .iter()
                .map(|v| (object_id(v), order_keyed_lists(v, "")))
                .collect();
            assert_eq!(
                ours.len(),
                theirs.len(),
                "overlay {name}: object count differs from kubectl kustomize"
            );
            for (id, v) in &ours {
                let mut diffs = Vec::new();
                differences("", v, theirs.get(id).unwrap_or(&Value::Null), &mut diffs);
                assert!(
                    diffs.is_empty(),
                    "overlay {name} {id:?} differs from kubectl kustomize:\n  {}",
                    diffs.join("\n  ")
                );
            }
        }
    }
}

fn args_of(container: &Value) -> Vec<String> {
    container["args"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|x| x.as_str().expect("string arg").to_owned())
                .collect()
        })
        .unwrap_or_default()
}

fn flag<'a>(args: &'a [String], name: &str) -> Option<&'a str> {
    let prefix = format!("{name}=");
    args.iter().find_map(|a| a.strip_prefix(&prefix))
}

fn container<'a>(ds: &'a Value, name: &str) -> &'a Value {
    ds["spec"]["template"]["spec"]["containers"]
        .as_array()
        .expect("containers")
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no container {name}"))
}

fn host_path_of<'a>(ds: &'a Value, volume: &str) -> &'a str {
    ds["spec"]["template"]["spec"]["volumes"]
        .as_array()
        .expect("volumes")
        .iter()
        .find(|v| v["name"] == volume)
        .and_then(|v| v["hostPath"]["path"].as_str())
        .unwrap_or_else(|| panic!("no hostPath volume {volume}"))
}

/// The hostPath a container sees at `path`: the mount whose mountPath is
/// the longest prefix of `path`, plus the rest of `path`.
fn host_path_at(ds: &Value, c: &Value, path: &str) -> Option<String> {
    c["volumeMounts"]
        .as_array()?
        .iter()
        .filter_map(|m| {
            let mp = m["mountPath"].as_str()?;
            let rest = Path::new(path).strip_prefix(mp).ok()?;
            let mut host = PathBuf::from(host_path_of(ds, m["name"].as_str()?));
            if !rest.as_os_str().is_empty() {
                host.push(rest);
            }
            Some((mp.len(), host.display().to_string()))
        })
        .max()
        .map(|(_, h)| h)
}

fn env_field_ref(c: &Value, name: &str) -> Option<String> {
    c["env"]
        .as_array()?
        .iter()
        .find(|e| e["name"] == name)
        .and_then(|e| e["valueFrom"]["fieldRef"]["fieldPath"].as_str())
        .map(str::to_owned)
}

fn path_of(endpoint: &str) -> PathBuf {
    socket_path("endpoint", endpoint).unwrap_or_else(|e| panic!("{endpoint}: {e}"))
}

#[test]
fn manifests_driver_name_sockets_and_paths_agree_with_the_binary() {
    let base = render(&deploy().join("base"));
    let driver = the(&base, "CSIDriver");
    assert_eq!(driver["metadata"]["name"], DEFAULT_DRIVER_NAME);
    for sc in find(&base, "StorageClass") {
        assert_eq!(sc["provisioner"], DEFAULT_DRIVER_NAME, "{}", name_of(sc));
    }
    let plugin_dir = format!("/var/lib/kubelet/plugins/{DEFAULT_DRIVER_NAME}");
    let base_ds = the(&base, "DaemonSet");
    let base_args = args_of(container(base_ds, "pmem-agent"));

    for name in OVERLAYS {
        let objects = overlay(name);
        let ds = the(&objects, "DaemonSet");
        let agent = container(ds, "pmem-agent");
        let args = args_of(agent);
        let ctx = format!("overlay {name}");

        // The overlay keeps every base flag and selects its backend.
        for a in &base_args {
            assert!(args.contains(a), "{ctx}: drops base flag {a}");
        }
        assert_eq!(flag(&args, "--backend"), Some(*name), "{ctx}: --backend");

        // The binary accepts the args as given ($(NODE_NAME) and $(POD_IP)
        // expanded by kubelet) and they keep the driver name and paths we
        // expect.
        let expanded: Vec<String> = args
            .iter()
            .map(|a| {
                a.replace("$(NODE_NAME)", "node-1")
                    .replace("$(POD_IP)", "10.0.0.7")
            })
            .collect();
        let cfg = Config::load(
            Args::try_parse_from(std::iter::once("pmem-agent".to_owned()).chain(expanded))
                .unwrap_or_else(|e| panic!("{ctx}: pmem-agent rejects its args: {e}")),
        )
        .unwrap_or_else(|e| panic!("{ctx}: pmem-agent rejects its args: {e}"));
        assert_eq!(cfg.driver_name, DEFAULT_DRIVER_NAME, "{ctx}");
        assert_eq!(
            cfg.node_id, "node-1",
            "{ctx}: node id must be the node name"
        );
        assert_eq!(
            env_field_ref(agent, "NODE_NAME").as_deref(),
            Some("spec.nodeName"),
            "{ctx}"
        );

        // CSI socket: pmem-agent's endpoint is the registered host path.
        let sock = cfg.endpoint.display().to_string();
        let host_sock = host_path_at(ds, agent, &sock)
            .unwrap_or_else(|| panic!("{ctx}: {sock} is not on a volume"));
        assert_eq!(
            host_sock,
            format!("{plugin_dir}/csi.sock"),
            "{ctx}: CSI socket on the host"
        );
        for c in ds["spec"]["template"]["spec"]["containers"]
            .as_array()
            .expect("containers")
        {
            let cargs = args_of(c);
            if let Some(addr) = flag(&cargs, "--csi-address") {
                let addr = addr.strip_prefix("unix://").unwrap_or(addr);
                assert_eq!(
                    host_path_at(ds, c, addr).as_deref(),
                    Some(host_sock.as_str()),
                    "{ctx}: {} --csi-address",
                    c["name"]
                );
            }
            if let Some(reg) = flag(&cargs, "--kubelet-registration-path") {
                assert_eq!(reg, host_sock, "{ctx}: registration path");
                assert_eq!(
                    host_path_at(ds, c, "/registration").as_deref(),
                    Some("/var/lib/kubelet/plugins_registry"),
                    "{ctx}: registrar's registration dir"
                );
            }
        }
        assert!(
            flag(
                &args_of(container(ds, "node-driver-registrar")),
                "--kubelet-registration-path"
            )
            .is_some()
        );

        // Admin socket and state directory: the binary's defaults, on the
        // same host paths, so pmemctl on the node finds the daemon.
        assert_eq!(cfg.admin_endpoint, path_of(DEFAULT_ADMIN_ENDPOINT), "{ctx}");
        let admin = cfg.admin_endpoint.display().to_string();
        assert_eq!(
            host_path_at(ds, agent, &admin),
            Some(admin.clone()),
            "{ctx}: admin socket"
        );
        assert_eq!(cfg.state_dir, PathBuf::from(DEFAULT_STATE_DIR), "{ctx}");
        assert_eq!(
            host_path_at(ds, agent, DEFAULT_STATE_DIR).as_deref(),
            Some(DEFAULT_STATE_DIR),
            "{ctx}: state dir"
        );

        // Mounts made by pmem-agent under the kubelet root reach the host.
        let root = cfg.kubelet_root.clone();
        for sub in ["pods", "plugins"] {
            let p = root.join(sub).display().to_string();
            let m = agent["volumeMounts"]
                .as_array()
                .expect("mounts")
                .iter()
                .find(|m| m["mountPath"] == p.as_str())
                .unwrap_or_else(|| panic!("{ctx}: {p} not mounted"));
            assert_eq!(m["mountPropagation"], "Bidirectional", "{ctx}: {p}");
            assert_eq!(host_path_at(ds, agent, &p), Some(p.clone()), "{ctx}: {p}");
        }
        assert_eq!(agent["securityContext"]["privileged"], true, "{ctx}");

        // Distributed provisioning with capacity tracking.
        let prov = container(ds, "csi-provisioner");
        let pargs = args_of(prov);
        for f in [
            "--node-deployment",
            "--enable-capacity",
            "--strict-topology",
            "--extra-create-metadata",
        ] {
            assert!(pargs.iter().any(|a| a == f), "{ctx}: provisioner lacks {f}");
        }
        assert_eq!(
            flag(&pargs, "--capacity-ownerref-level"),
            Some("1"),
            "{ctx}: owner is the DaemonSet"
        );
        for (var, field) in [
            ("NODE_NAME", "spec.nodeName"),
            ("NAMESPACE", "metadata.namespace"),
            ("POD_NAME", "metadata.name"),
        ] {
            assert_eq!(
                env_field_ref(prov, var).as_deref(),
                Some(field),
                "{ctx}: provisioner {var}"
            );
        }
        let spec = &ds["spec"]["template"]["spec"];
        assert_eq!(spec["priorityClassName"], "system-node-critical", "{ctx}");
        assert_eq!(spec["nodeSelector"][PMEM_NODE_LABEL], "true", "{ctx}");
        assert!(
            agent["livenessProbe"].is_object(),
            "{ctx}: pmem-agent liveness probe"
        );
    }
}

#[test]
fn manifests_use_only_the_binary_topology_key_and_known_driver_keys() {
    // Every key or value under the driver's domain is the driver name, the
    // topology key or the node-selection label.
    let prefix = format!("{DEFAULT_DRIVER_NAME}/");
    let allowed = [TOPOLOGY_KEY, PMEM_NODE_LABEL];
    fn strings(v: &Value, out: &mut Vec<String>) {
        match v {
            Value::String(s) => out.push(s.clone()),
            Value::Array(a) => a.iter().for_each(|x| strings(x, out)),
            Value::Object(m) => m.iter().for_each(|(k, x)| {
                out.push(k.clone());
                strings(x, out);
            }),
            _ => {}
        }
    }
    assert!(
        TOPOLOGY_KEY.starts_with(&prefix),
        "topology key {TOPOLOGY_KEY} outside the driver's domain"
    );
    for path in yaml_files(&deploy()) {
        for doc in yaml_docs(&path) {
            let mut all = Vec::new();
            strings(&doc, &mut all);
            for s in all {
                for word in s.split(|c: char| c.is_whitespace() || c == '=' || c == ',') {
                    if word.starts_with(&prefix) {
                        assert!(
                            allowed.contains(&word),
                            "{}: unexpected key {word}",
                            rel(&path)
                        );
                    } else if word.contains(DEFAULT_DRIVER_NAME) {
                        let ok = word == DEFAULT_DRIVER_NAME
                            || word.ends_with(&format!("/{DEFAULT_DRIVER_NAME}"))
                            || word.contains(&format!("/{DEFAULT_DRIVER_NAME}/"));
                        assert!(
                            ok,
                            "{}: {word} looks like a different driver name",
                            rel(&path)
                        );
                    }
                }
            }
        }
    }
    // Inline volumes name the driver; claims name a class that exists.
    let base = render(&deploy().join("base"));
    let classes: BTreeSet<&str> = find(&base, "StorageClass")
        .iter()
        .filter_map(|s| s["metadata"]["name"].as_str())
        .collect();
    for path in yaml_files(&deploy().join("examples")) {
        for doc in yaml_docs(&path) {
            let mut sc: Vec<String> = Vec::new();
            collect_field(&doc, "storageClassName", &mut sc);
            for s in sc {
                assert!(
                    classes.contains(s.as_str()),
                    "{}: unknown StorageClass {s}",
                    rel(&path)
                );
            }
            let mut csi: Vec<Value> = Vec::new();
            collect_field(&doc, "csi", &mut csi);
            for c in &csi {
                assert_eq!(c["driver"], DEFAULT_DRIVER_NAME, "{}", rel(&path));
            }
        }
    }
    let readme = read(&deploy().join("README.md"));
    assert!(
        readme.contains(TOPOLOGY_KEY),
        "deploy/README.md does not show the topology key {TOPOLOGY_KEY}"
    );
    assert!(
        readme.contains(PMEM_NODE_LABEL),
        "deploy/README.md does not say how to label nodes"
    );
}

/// Values of every field called `name`, anywhere in `v`.
fn collect_field<T: DeserializeOwned>(v: &Value, name: &str, out: &mut Vec<T>) {
    match v {
        Value::Object(m) => {
            for (k, x) in m {
                if k == name
                    && let Ok(t) = serde_json::from_value(x.clone())
                {
                    out.push(t);
                }
                collect_field(x, name, out);
            }
        }
        Value::Array(a) => a.iter().for_each(|x| collect_field(x, name, out)),
        _ => {}
    }
}

#[test]
fn manifests_storage_classes_wait_for_the_consumer_and_use_known_parameters() {
    let base = render(&deploy().join("base"));
    let classes = find(&base, "StorageClass");
    let mut fs = BTreeSet::new();
    let mut usages = BTreeSet::new();
    for sc in &classes {
        let n = name_of(sc);
        assert_eq!(sc["volumeBindingMode"], "WaitForFirstConsumer", "{n}");
        assert_eq!(sc["allowVolumeExpansion"], true, "{n}");
        let params: BTreeMap<String, String> =
            serde_json::from_value(sc["parameters"].clone()).unwrap_or_else(|e| panic!("{n}: {e}"));
        for (k, v) in &params {
            match k.as_str() {
                "usage" => {
                    assert!(v == "AppDirect" || v == "FileIO", "{n}: usage {v}");
                    usages.insert(v.clone());
                }
                "eraseAfter" => assert!(v == "true" || v == "false", "{n}: eraseAfter {v}"),
                "csi.storage.k8s.io/fstype" => {
                    assert!(v == "xfs" || v == "ext4", "{n}: fstype {v}");
                    fs.insert(v.clone());
                }
                _ => panic!("{n}: parameter {k} is not one pmem-agent accepts"),
            }
        }
    }
    assert_eq!(fs, BTreeSet::from(["ext4".to_owned(), "xfs".to_owned()]));
    assert_eq!(
        usages,
        BTreeSet::from(["AppDirect".to_owned(), "FileIO".to_owned()])
    );
    let driver = the(&base, "CSIDriver");
    let spec = &driver["spec"];
    assert_eq!(spec["attachRequired"], false);
    assert_eq!(spec["podInfoOnMount"], true);
    assert_eq!(spec["storageCapacity"], true);
    assert_eq!(spec["fsGroupPolicy"], "File");
    assert_eq!(
        spec["volumeLifecycleModes"],
        serde_json::json!(["Persistent", "Ephemeral"])
    );
}

// ---------------------------------------------------------------------------
// Tests: systemd unit and example config.

/// `[Section] Key=value` pairs of a unit file (comments skipped).
fn unit_entries(text: &str) -> Vec<(String, String, String)> {
    let mut section = String::new();
    let mut out = Vec::new();
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(s) = line.strip_prefix('[').and_then(|s| s.strip_suffix(']')) {
            section = s.to_owned();
            continue;
        }
        let (k, v) = line
            .split_once('=')
            .unwrap_or_else(|| panic!("unit line {line:?}"));
        out.push((section.clone(), k.trim().to_owned(), v.trim().to_owned()));
    }
    out
}

fn unit_value<'a>(
    entries: &'a [(String, String, String)],
    section: &str,
    key: &str,
) -> Option<&'a str> {
    entries
        .iter()
        .rfind(|(s, k, _)| s == section && k == key)
        .map(|(_, _, v)| v.as_str())
}

#[test]
fn systemd_unit_agrees_with_the_binary_and_keeps_mounts_visible() {
    let unit = read(&repo().join("systemd/pmem-agent.service"));
    let e = unit_entries(&unit);
    let svc = |k: &str| unit_value(&e, "Service", k);
    assert_eq!(svc("Type"), Some("notify"));
    assert_eq!(
        svc("ExecStart"),
        Some("/usr/local/bin/pmem-agent --config /etc/pmem-agent/config.toml")
    );
    assert_eq!(svc("NoNewPrivileges"), Some("yes"));
    // RuntimeDirectory=NAME is /run/NAME: both sockets' directory.
    let run = PathBuf::from("/run").join(svc("RuntimeDirectory").expect("RuntimeDirectory"));
    assert_eq!(path_of(DEFAULT_ENDPOINT).parent(), Some(run.as_path()));
    assert_eq!(
        path_of(DEFAULT_ADMIN_ENDPOINT).parent(),
        Some(run.as_path())
    );
    let state = PathBuf::from("/var/lib").join(svc("StateDirectory").expect("StateDirectory"));
    assert_eq!(state, PathBuf::from(DEFAULT_STATE_DIR));
    assert_eq!(svc("ConfigurationDirectory"), Some("pmem-agent"));

    // Only the capabilities the comment justifies.
    let caps: BTreeSet<&str> = svc("CapabilityBoundingSet")
        .expect("CapabilityBoundingSet")
        .split_whitespace()
        .collect();
    assert_eq!(caps, BTreeSet::from(["CAP_SYS_ADMIN", "CAP_MKNOD"]));
    for c in &caps {
        assert!(
            unit.contains(&format!("#   {c}")),
            "{c} granted without a justifying comment"
        );
    }

    // Settings that put the service in its own mount namespace would hide
    // its staging and publish mounts from the host (systemd.exec(5)).
    for key in [
        "ProtectHome",
        "PrivateTmp",
        "ProtectSystem",
        "PrivateDevices",
        "PrivateMounts",
        "ReadWritePaths",
        "ReadOnlyPaths",
        "InaccessiblePaths",
        "BindPaths",
        "BindReadOnlyPaths",
        "TemporaryFileSystem",
        "ProtectKernelTunables",
        "ProtectKernelModules",
        "ProtectKernelLogs",
        "ProtectControlGroups",
        "ProtectProc",
        "ProcSubset",
        "ProtectHostname",
        "ProtectClock",
        "MountFlags",
        "RootDirectory",
        "DynamicUser",
    ] {
        if let Some(v) = svc(key) {
            panic!(
                "{key}={v}: creates a mount namespace; pmem-agent's mounts would not reach the host"
            );
        }
    }
    // TimeoutStopSec leaves the daemon's shutdown-timeout room to finish.
    let stop: u64 = svc("TimeoutStopSec")
        .and_then(|s| s.strip_suffix('s'))
        .and_then(|s| s.parse().ok())
        .expect("TimeoutStopSec=Ns");
    let cfg = load_example_config(&repo().join("systemd/config.toml"));
    assert!(
        stop > cfg.shutdown_timeout.as_secs(),
        "TimeoutStopSec {stop}s <= shutdown-timeout"
    );
    assert!(
        unit.contains("#WatchdogSec="),
        "commented WatchdogSec example missing"
    );
}

fn load_example_config(path: &Path) -> Config {
    let args = Args::try_parse_from(["pmem-agent", "--config", path.to_str().expect("utf-8 path")])
        .expect("args");
    Config::load(args).unwrap_or_else(|e| panic!("{}: {e}", rel(path)))
}

/// `pub NAME:` fields of a struct in agent/src/config.rs, kebab-cased.
fn struct_keys(source: &str, name: &str) -> Vec<String> {
    let start = source
        .find(&format!("pub struct {name} {{"))
        .unwrap_or_else(|| panic!("struct {name} not in config.rs"));
    let body = &source[start..];
    let body = &body[..body.find("\n}").expect("end of struct")];
    body.lines()
        .filter_map(|l| l.trim().strip_prefix("pub ")?.split_once(':'))
        .map(|(f, _)| f.trim().replace('_', "-"))
        .collect()
}

#[test]
fn systemd_example_config_loads_and_covers_every_option() {
    let path = repo().join("systemd/config.toml");
    let cfg = load_example_config(&path);
    assert_eq!(cfg.endpoint, path_of(DEFAULT_ENDPOINT));
    assert_eq!(cfg.admin_endpoint, path_of(DEFAULT_ADMIN_ENDPOINT));
    assert_eq!(cfg.state_dir, PathBuf::from(DEFAULT_STATE_DIR));
    assert_eq!(cfg.driver_name, DEFAULT_DRIVER_NAME);

    // With every "# key = value" example uncommented the file still loads,
    // and every key the binary reads appears (commented or not).
    let text = read(&path);
    let mut uncommented = String::new();
    let mut keys: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut table = String::new();
    for line in text.lines() {
        let body = line.strip_prefix("# ").unwrap_or(line).trim();
        let is_setting = body.split_once(" = ").is_some_and(|(k, _)| {
            !k.is_empty() && k.chars().all(|c| c.is_ascii_lowercase() || c == '-')
        });
        let table_name = body
            .strip_prefix('[')
            .and_then(|t| t.strip_suffix(']'))
            .filter(|t| !t.is_empty() && t.chars().all(|c| c.is_ascii_lowercase() || c == '-'));
        if let Some(t) = table_name {
            table = t.to_owned();
            uncommented.push_str(body);
        } else if is_setting {
            let key = body.split_once(" = ").expect("setting").0;
            let fresh = keys
                .entry(table.clone())
                .or_default()
                .insert(key.to_owned());
            assert!(fresh, "{key} appears twice in [{table}]");
            uncommented.push_str(body);
        }
        uncommented.push('\n');
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let all = dir.path().join("all.toml");
    std::fs::write(&all, &uncommented).expect("write");
    let full = load_example_config(&all);
    assert_eq!(full.driver_name, DEFAULT_DRIVER_NAME);

    let source = read(&repo().join("agent/src/config.rs"));
    let tables = [
        ("sim", "SimFileConfig"),
        ("lvm", "LvmFileConfig"),
        ("direct", "DirectFileConfig"),
    ];
    for key in struct_keys(&source, "FileConfig") {
        if tables.iter().any(|(t, _)| *t == key) {
            continue;
        }
        assert!(
            keys.get("").is_some_and(|k| k.contains(&key)),
            "systemd/config.toml lacks `{key}`"
        );
    }
    for (table, name) in tables {
        for key in struct_keys(&source, name) {
            assert!(
                keys.get(table).is_some_and(|k| k.contains(&key)),
                "systemd/config.toml lacks [{table}] `{key}`"
            );
        }
    }
}

/// The unit files under systemd/.
/// (unit, binary its ExecStart runs)
const UNITS: &[(&str, &str)] = &[
    ("pmem-agent.service", "pmem-agent"),
    ("pmem-allocd.service", "pmem-allocd"),
];

#[test]
fn systemd_units_verify() {
    let Ok(out) = Command::new("systemd-analyze").arg("--version").output() else {
        panic!(
            "systemd-analyze not found: install Debian's `systemd` package (scripts/setup-debian)"
        );
    };
    assert!(out.status.success());
    let dir = tempfile::tempdir().expect("tempdir");
    for (unit, binary) in UNITS {
        let agent = common::bin(binary);
        assert!(agent.exists(), "{} not built", agent.display());
        let text = read(&repo().join("systemd").join(unit));
        let exec = format!("ExecStart=/usr/local/bin/{binary} ");
        assert!(
            text.contains(&exec),
            "{unit}: ExecStart does not run /usr/local/bin/{binary}"
        );
        let copy = dir.path().join(unit);
        std::fs::write(
            &copy,
            text.replace(&exec, &format!("ExecStart={} ", agent.display())),
        )
        .expect("write unit");
        let out = Command::new("systemd-analyze")
            .arg("verify")
            .arg(&copy)
            .output()
            .expect("run systemd-analyze");
        let stderr = String::from_utf8_lossy(&out.stderr);
        // Warnings (unknown keys, bad values) only go to stderr; the exit
        // status alone would accept them.
        assert!(
            out.status.success() && stderr.trim().is_empty(),
            "systemd-analyze verify {unit}: {}\n{stderr}",
            out.status
        );
    }
}

/// A Kubernetes quantity in bytes (the binary suffixes the examples use).
fn quantity(q: &str) -> u64 {
    let (num, mult) = [
        ("Ki", 1u64 << 10),
        ("Mi", 1 << 20),
        ("Gi", 1 << 30),
        ("Ti", 1 << 40),
    ]
    .iter()
    .find_map(|(suf, m)| q.strip_suffix(suf).map(|n| (n, *m)))
    .unwrap_or((q, 1));
    num.parse::<u64>()
        .unwrap_or_else(|e| panic!("quantity {q}: {e}"))
        * mult
}

#[test]
fn manifests_tolerate_every_taint_and_serve_metrics_on_the_pod_ip_only() {
    for name in OVERLAYS {
        let objects = overlay(name);
        let ds = the(&objects, "DaemonSet");
        let spec = &ds["spec"]["template"]["spec"];
        // Unpublish and unstage must still happen on a tainted node.
        assert_eq!(
            spec["tolerations"],
            serde_json::json!([{"operator": "Exists"}]),
            "overlay {name}"
        );
        let agent = container(ds, "pmem-agent");
        let args = args_of(agent);
        assert_eq!(
            flag(&args, "--metrics-address"),
            Some("$(POD_IP):9810"),
            "overlay {name}: metrics on the pod IP"
        );
        assert_eq!(
            env_field_ref(agent, "POD_IP").as_deref(),
            Some("status.podIP"),
            "overlay {name}"
        );
    }
}

#[test]
fn manifests_examples_fit_the_sim_overlay() {
    let ds = overlay("sim");
    let args = args_of(container(the(&ds, "DaemonSet"), "pmem-agent"));
    let regions: u64 = flag(&args, "--sim-regions")
        .expect("--sim-regions")
        .parse()
        .unwrap();
    let region = pmem_allocator::units::parse_size(flag(&args, "--sim-region-size").expect("size"))
        .expect("region size")
        .0;
    let mut sizes = Vec::new();
    for path in yaml_files(&deploy().join("examples")) {
        for doc in yaml_docs(&path) {
            // PVC requests, generic ephemeral templates, inline `size`.
            let mut stack = vec![&doc];
            while let Some(v) = stack.pop() {
                match v {
                    Value::Object(m) => {
                        if let Some(Value::String(q)) = m.get("storage")
                            && m.len() == 1
                        {
                            sizes.push((rel(&path), quantity(q)));
                        }
                        if let Some(Value::String(q)) = m.get("size") {
                            sizes.push((rel(&path), quantity(q)));
                        }
                        stack.extend(m.values());
                    }
                    Value::Array(a) => stack.extend(a),
                    _ => {}
                }
            }
        }
    }
    assert!(sizes.len() >= 4, "{sizes:?}");
    let total: u64 = sizes.iter().map(|(_, b)| b).sum();
    for (p, b) in &sizes {
        assert!(
            *b <= region,
            "{p}: {b} bytes exceed one sim region of {region}"
        );
    }
    // Every example at once, with a region's worth of slack for placement
    // (each volume lies within one region).
    assert!(
        total + region / 2 <= regions * region,
        "the examples need {total} bytes, the sim overlay gives {regions} x {region}: {sizes:?}"
    );
}

#[test]
fn manifests_images_are_the_built_image_or_upstream_sidecars() {
    let version = env!("CARGO_PKG_VERSION");
    let ours = format!("ghcr.io/pmem-agent/pmem-agent:v{version}");
    let script = read(&repo().join("scripts/image"));
    assert!(
        script.contains("TAG=v$VERSION"),
        "scripts/image tags v<version>"
    );
    for name in OVERLAYS {
        for o in overlay(name) {
            let spec = &o["spec"]["template"]["spec"];
            for list in ["containers", "initContainers"] {
                for c in spec[list].as_array().into_iter().flatten() {
                    let image = c["image"].as_str().expect("image");
                    let upstream = image.starts_with("registry.k8s.io/sig-storage/csi-")
                        || image.starts_with("registry.k8s.io/sig-storage/livenessprobe:");
                    assert!(
                        image == ours || upstream,
                        "overlay {name} {}: image {image} is neither {ours} nor an upstream sidecar",
                        name_of(&o)
                    );
                    assert!(
                        image
                            .rsplit_once(':')
                            .is_some_and(|(_, t)| t.starts_with('v')),
                        "{image}: pinned tag"
                    );
                }
            }
        }
    }
}

/// The Prometheus Operator's CRDs, as far as deploy/monitoring uses them:
/// unknown or misspelt fields are rejected as the operator's schema would.
// Fields are declared to be checked by deserialization, not read.
#[allow(dead_code)]
mod monitoring {
    use std::collections::BTreeMap;

    use serde::Deserialize;

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields, rename_all = "camelCase")]
    pub struct Meta {
        pub name: String,
        pub namespace: String,
        #[serde(default)]
        pub labels: BTreeMap<String, String>,
    }

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields, rename_all = "camelCase")]
    pub struct ServiceMonitor {
        pub api_version: String,
        pub kind: String,
        pub metadata: Meta,
        pub spec: ServiceMonitorSpec,
    }

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields, rename_all = "camelCase")]
    pub struct ServiceMonitorSpec {
        pub selector: Selector,
        pub endpoints: Vec<Endpoint>,
    }

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields, rename_all = "camelCase")]
    pub struct Selector {
        pub match_labels: BTreeMap<String, String>,
    }

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields, rename_all = "camelCase")]
    pub struct Endpoint {
        pub port: String,
        pub path: String,
        pub interval: String,
        #[serde(default)]
        pub relabelings: Vec<Relabel>,
    }

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields, rename_all = "camelCase")]
    pub struct Relabel {
        pub source_labels: Vec<String>,
        pub target_label: String,
        pub action: String,
    }

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields, rename_all = "camelCase")]
    pub struct PrometheusRule {
        pub api_version: String,
        pub kind: String,
        pub metadata: Meta,
        pub spec: RuleSpec,
    }

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct RuleSpec {
        pub groups: Vec<Group>,
    }

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct Group {
        pub name: String,
        pub rules: Vec<Rule>,
    }

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct Rule {
        pub alert: String,
        pub expr: String,
        #[serde(rename = "for")]
        pub for_: String,
        pub labels: BTreeMap<String, String>,
        pub annotations: BTreeMap<String, String>,
    }
}

#[tokio::test]
async fn manifests_monitoring_scrapes_the_node_pods_and_alerts_on_real_metrics() {
    let objects = render(&deploy().join("monitoring"));
    let ds_objects = overlay("sim");
    let ds = the(&ds_objects, "DaemonSet");
    let pod_labels = &ds["spec"]["template"]["metadata"]["labels"];
    let svc = the(&objects, "Service");
    assert_eq!(svc["metadata"]["namespace"], ds["metadata"]["namespace"]);
    assert_eq!(
        svc["spec"]["clusterIP"], "None",
        "headless: one target per pod"
    );
    for (k, v) in svc["spec"]["selector"].as_object().expect("selector") {
        assert_eq!(
            &pod_labels[k], v,
            "the Service selects the node pods by {k}"
        );
    }
    let port = &svc["spec"]["ports"][0];
    let agent = container(ds, "pmem-agent");
    let named = agent["ports"]
        .as_array()
        .expect("ports")
        .iter()
        .find(|p| p["name"] == port["targetPort"])
        .expect("the Service's targetPort is a named port of pmem-agent");
    assert_eq!(named["containerPort"], port["port"]);
    let metrics_port = flag(&args_of(agent), "--metrics-address")
        .and_then(|a| a.rsplit_once(':'))
        .map(|(_, p)| p.to_owned())
        .expect("metrics port");
    assert_eq!(named["containerPort"].to_string(), metrics_port);

    let sm: monitoring::ServiceMonitor =
        serde_json::from_value(the(&objects, "ServiceMonitor").clone()).unwrap();
    for (k, v) in &sm.spec.selector.match_labels {
        assert_eq!(
            svc["metadata"]["labels"][k],
            v.as_str(),
            "ServiceMonitor selects the Service"
        );
    }
    assert_eq!(sm.spec.endpoints.len(), 1);
    let ep = &sm.spec.endpoints[0];
    assert_eq!(Some(ep.port.as_str()), port["name"].as_str());
    assert_eq!(ep.path, "/metrics");
    assert!(
        ep.relabelings.iter().any(|r| r.target_label == "node"
            && r.source_labels == ["__meta_kubernetes_pod_node_name"]
            && r.action == "replace"),
        "every series gets the node label"
    );

    // The alerts use only metrics (and label values) the agent exports.
    let rule: monitoring::PrometheusRule =
        serde_json::from_value(the(&objects, "PrometheusRule").clone()).unwrap();
    let alerts: Vec<&monitoring::Rule> = rule.spec.groups.iter().flat_map(|g| &g.rules).collect();
    let names: BTreeSet<&str> = alerts.iter().map(|r| r.alert.as_str()).collect();
    for a in [
        "PmemAgentCapacityNearlyExhausted",
        "PmemAgentOrphanDevices",
        "PmemAgentCallErrors",
    ] {
        assert!(names.contains(a), "alert {a} missing: {names:?}");
    }
    let port = common::util::free_port();
    let mut d = common::Daemon::start(&["--metrics-address", &format!("127.0.0.1:{port}")]).await;
    let page = common::util::scrape(port).await;
    d.stop();
    let exported: BTreeSet<String> = page
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| l.split(['{', ' ']).next())
        .map(str::to_owned)
        .collect();
    for r in &alerts {
        let mut used = Vec::new();
        let e = &r.expr;
        let mut i = 0;
        while let Some(at) = e[i..].find(|c: char| c.is_ascii_lowercase()) {
            let start = i + at;
            let len = e[start..]
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(e.len() - start);
            let word = &e[start..start + len];
            if word.starts_with("pmem_agent_") || word.starts_with("csi_plugin_") {
                used.push(word.to_owned());
            }
            i = start + len.max(1);
        }
        assert!(!used.is_empty(), "{}: no pmem-agent metric in {e}", r.alert);
        for m in used {
            assert!(
                exported.contains(&m),
                "{}: {m} is not exported; exported: {exported:?}",
                r.alert
            );
        }
        if e.contains("grpc_status_code") {
            assert!(
                page.contains("grpc_status_code=\"Ok\""),
                "status codes are spelt as in {page}"
            );
            for code in [
                "Internal",
                "Unknown",
                "Unavailable",
                "DataLoss",
                "DeadlineExceeded",
            ] {
                assert!(e.contains(code), "{}: {code}", r.alert);
            }
        }
    }
    assert!(
        page.contains("pmem_agent_devices{kind=\"orphan\"}"),
        "{page}"
    );
}
