//! Image config, manifest and index JSON.
//!
//! Digest-bearing JSON is built as `serde_json::Value`, whose maps are ordered (BTreeMap), so
//! keys are always emitted sorted and the bytes depend only on the content. A base image's
//! config is edited as a Value too, which keeps fields this crate does not model
//! (Healthcheck, Shell, OnBuild, …) instead of silently dropping them.

use std::collections::BTreeMap;

use serde_json::{Value, json};

use crate::digest::Digest;
use crate::layer::LayerInfo;

pub const MEDIA_TYPE_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const MEDIA_TYPE_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const MEDIA_TYPE_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub const MEDIA_TYPE_DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const MEDIA_TYPE_DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";
pub const MEDIA_TYPE_DOCKER_LIST: &str =
    "application/vnd.docker.distribution.manifest.list.v2+json";
pub const ANNOTATION_REF_NAME: &str = "org.opencontainers.image.ref.name";
pub const ANNOTATION_CREATED: &str = "org.opencontainers.image.created";

pub fn canonical_json(value: &Value) -> Vec<u8> {
    serde_json::to_vec(value).expect("a Value always serialises")
}

/// What a build changes in the runtime config, like the corresponding Dockerfile instructions.
#[derive(Clone, Debug, Default)]
pub struct ConfigChanges {
    pub user: Option<String>,
    /// `KEY=VALUE`; replaces an inherited variable of the same name.
    pub env: Vec<String>,
    pub entrypoint: Option<Vec<String>>,
    pub cmd: Option<Vec<String>>,
    pub working_dir: Option<String>,
    pub labels: BTreeMap<String, String>,
    pub exposed_ports: Vec<String>,
    pub stop_signal: Option<String>,
    /// Docker's `Healthcheck` object (Test, Interval, Timeout, Retries in nanoseconds).
    pub healthcheck: Option<Value>,
}

/// One layer this build adds, with the history line that explains it.
#[derive(Clone, Debug)]
pub struct NewLayer {
    pub layer: LayerInfo,
    pub created_by: String,
}

fn go_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "x86" => "386",
        other => other,
    }
}

/// The image config: the base's (if any) with `changes` applied and `layers` appended.
pub fn derive_config(
    base: Option<&Value>,
    changes: &ConfigChanges,
    layers: &[NewLayer],
    created: &str,
) -> Value {
    let mut config = base.cloned().unwrap_or_else(|| {
        json!({
            "architecture": go_arch(),
            "os": "linux",
            "rootfs": {"type": "layers", "diff_ids": []},
            "history": [],
        })
    });
    let obj = config.as_object_mut().expect("config is an object");
    obj.insert("created".into(), json!(created));
    // Docker-era fields describe the base's build container, not this image.
    obj.remove("container");
    obj.remove("container_config");
    obj.remove("docker_version");
    let runtime = obj.entry("config").or_insert_with(|| json!({}));
    if !runtime.is_object() {
        *runtime = json!({});
    }
    let rt = runtime.as_object_mut().expect("object");
    if let Some(user) = &changes.user {
        rt.insert("User".into(), json!(user));
    }
    if !changes.env.is_empty() {
        let mut env: Vec<String> = rt
            .get("Env")
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(|v| v.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default();
        for kv in &changes.env {
            let key = kv.split('=').next().unwrap_or(kv);
            env.retain(|e| e.split('=').next() != Some(key));
            env.push(kv.clone());
        }
        rt.insert("Env".into(), json!(env));
    }
    if let Some(ep) = &changes.entrypoint {
        rt.insert("Entrypoint".into(), json!(ep));
        // As in a Dockerfile, a new ENTRYPOINT drops the inherited CMD.
        if changes.cmd.is_none() {
            rt.remove("Cmd");
        }
    }
    if let Some(cmd) = &changes.cmd {
        rt.insert("Cmd".into(), json!(cmd));
    }
    if let Some(wd) = &changes.working_dir {
        rt.insert("WorkingDir".into(), json!(wd));
    }
    if !changes.labels.is_empty() {
        let labels = rt.entry("Labels").or_insert_with(|| json!({}));
        if !labels.is_object() {
            *labels = json!({});
        }
        for (k, v) in &changes.labels {
            labels
                .as_object_mut()
                .expect("object")
                .insert(k.clone(), json!(v));
        }
    }
    if !changes.exposed_ports.is_empty() {
        let ports = rt.entry("ExposedPorts").or_insert_with(|| json!({}));
        if !ports.is_object() {
            *ports = json!({});
        }
        for p in &changes.exposed_ports {
            ports
                .as_object_mut()
                .expect("object")
                .insert(p.clone(), json!({}));
        }
    }
    if let Some(sig) = &changes.stop_signal {
        rt.insert("StopSignal".into(), json!(sig));
    }
    if let Some(hc) = &changes.healthcheck {
        rt.insert("Healthcheck".into(), hc.clone());
    }
    let rootfs = obj
        .entry("rootfs")
        .or_insert_with(|| json!({"type": "layers", "diff_ids": []}));
    let diff_ids = rootfs
        .as_object_mut()
        .expect("rootfs is an object")
        .entry("diff_ids")
        .or_insert_with(|| json!([]));
    for l in layers {
        diff_ids
            .as_array_mut()
            .expect("diff_ids is an array")
            .push(json!(l.layer.diff_id.to_string()));
    }
    let history = obj.entry("history").or_insert_with(|| json!([]));
    for l in layers {
        history
            .as_array_mut()
            .expect("history is an array")
            .push(json!({"created": created, "created_by": l.created_by, "comment": "bakedb"}));
    }
    config
}

pub fn descriptor(media_type: &str, digest: &Digest, size: u64) -> Value {
    json!({"mediaType": media_type, "digest": digest.to_string(), "size": size})
}

pub fn manifest(
    config_digest: &Digest,
    config_size: u64,
    layers: &[LayerInfo],
    annotations: &BTreeMap<String, String>,
) -> Value {
    let mut m = json!({
        "schemaVersion": 2,
        "mediaType": MEDIA_TYPE_MANIFEST,
        "config": descriptor(MEDIA_TYPE_CONFIG, config_digest, config_size),
        "layers": layers.iter().map(|l| descriptor(&l.media_type, &l.digest, l.size)).collect::<Vec<_>>(),
    });
    if !annotations.is_empty() {
        m.as_object_mut()
            .expect("object")
            .insert("annotations".into(), json!(annotations));
    }
    m
}

pub fn empty_index() -> Value {
    json!({"schemaVersion": 2, "mediaType": MEDIA_TYPE_INDEX, "manifests": []})
}

pub fn ref_name(entry: &Value) -> Option<&str> {
    entry.get("annotations")?.get(ANNOTATION_REF_NAME)?.as_str()
}

/// Point `tag` at a manifest: replaces an entry with the same tag in place, else appends.
pub fn set_tag(index: &mut Value, tag: &str, manifest_digest: &Digest, manifest_size: u64) {
    let mut entry = descriptor(MEDIA_TYPE_MANIFEST, manifest_digest, manifest_size);
    entry
        .as_object_mut()
        .expect("object")
        .insert("annotations".into(), json!({ ANNOTATION_REF_NAME: tag }));
    let obj = index.as_object_mut().expect("index is an object");
    let manifests = obj.entry("manifests").or_insert_with(|| json!([]));
    let list = manifests.as_array_mut().expect("manifests is an array");
    match list.iter().position(|e| ref_name(e) == Some(tag)) {
        Some(i) => list[i] = entry,
        None => list.push(entry),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layer(n: u8) -> NewLayer {
        NewLayer {
            layer: LayerInfo {
                digest: Digest::of(&[n]),
                size: 10,
                diff_id: Digest::of(&[n, n]),
                media_type: crate::compress::MEDIA_TYPE_LAYER_GZIP.into(),
            },
            created_by: format!("layer {n}"),
        }
    }

    #[test]
    fn config_from_scratch_is_canonical() {
        let changes = ConfigChanges {
            user: Some("65532:65532".into()),
            env: vec!["A=1".into()],
            cmd: Some(vec!["/bin/sh".into()]),
            labels: BTreeMap::from([("b".into(), "2".into()), ("a".into(), "1".into())]),
            exposed_ports: vec!["8080/tcp".into()],
            stop_signal: Some("SIGTERM".into()),
            ..Default::default()
        };
        let config = derive_config(None, &changes, &[layer(1)], "1970-01-01T00:00:00Z");
        let text = String::from_utf8(canonical_json(&config)).unwrap();
        let expected = format!(
            r#"{{"architecture":"{}","config":{{"Cmd":["/bin/sh"],"Env":["A=1"],"ExposedPorts":{{"8080/tcp":{{}}}},"Labels":{{"a":"1","b":"2"}},"StopSignal":"SIGTERM","User":"65532:65532"}},"created":"1970-01-01T00:00:00Z","history":[{{"comment":"bakedb","created":"1970-01-01T00:00:00Z","created_by":"layer 1"}}],"os":"linux","rootfs":{{"diff_ids":["{}"],"type":"layers"}}}}"#,
            go_arch(),
            Digest::of(&[1, 1])
        );
        assert_eq!(text, expected);
        // And oci-spec accepts it as a configuration.
        let parsed: oci_spec::image::ImageConfiguration = serde_json::from_str(&text).unwrap();
        assert_eq!(parsed.rootfs().diff_ids().len(), 1);
    }

    #[test]
    fn base_config_keeps_unknown_fields_and_appends() {
        let base = json!({
            "architecture": "amd64", "os": "linux",
            "config": {"Env": ["PATH=/bin", "A=0"], "Cmd": ["sh"], "Healthcheck": {"Test": ["NONE"]}},
            "rootfs": {"type": "layers", "diff_ids": ["sha256:00"]},
            "history": [{"created_by": "base"}],
            "container_config": {}
        });
        let changes = ConfigChanges {
            env: vec!["A=1".into()],
            entrypoint: Some(vec!["/bakedb/init".into()]),
            ..Default::default()
        };
        let c = derive_config(Some(&base), &changes, &[layer(2)], "t");
        assert_eq!(c["config"]["Env"], json!(["PATH=/bin", "A=1"]));
        assert_eq!(c["config"]["Healthcheck"], json!({"Test": ["NONE"]}));
        assert!(
            c["config"].get("Cmd").is_none(),
            "new entrypoint resets inherited cmd"
        );
        assert_eq!(c["rootfs"]["diff_ids"].as_array().unwrap().len(), 2);
        assert_eq!(c["history"].as_array().unwrap().len(), 2);
        assert!(c.get("container_config").is_none());
    }

    #[test]
    fn set_tag_replaces_in_place_and_keeps_others() {
        let mut index = empty_index();
        set_tag(&mut index, "a", &Digest::of(b"1"), 1);
        set_tag(&mut index, "b", &Digest::of(b"2"), 2);
        set_tag(&mut index, "a", &Digest::of(b"3"), 3);
        let list = index["manifests"].as_array().unwrap();
        assert_eq!(list.len(), 2);
        assert_eq!(ref_name(&list[0]), Some("a"));
        assert_eq!(list[0]["size"], 3);
        assert_eq!(ref_name(&list[1]), Some("b"));
    }
}
