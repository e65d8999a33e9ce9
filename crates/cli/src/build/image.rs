//! Phases 4 and 5, the image and its tag: the config (the base's, with the engine's image
//! spec, the user's flags and bakedb's labels applied), the manifest, and the tag (the last
//! write: index.json, or the archive renamed into place).

use anyhow::Result;
use bakedb_oci::image::{ConfigChanges, derive_config};
use bakedb_oci::output::Written;

use super::bundled::INIT_PATH;
use super::data::Data;
use super::layers::Layers;
use super::plan::Plan;
use crate::exit::{Code, StageExt};
use crate::progress::Progress;

/// ENTRYPOINT and CMD as Docker would combine them, with init in front: the user's
/// --entrypoint or else the base's runs after /bakedb/init; a new entrypoint drops the base's
/// CMD unless --cmd is given. `inherit` false ignores the base's entrypoint (the official
/// postgres image's docker-entrypoint.sh would initialise a database, not serve the baked one).
fn init_command(
    base_config: Option<&serde_json::Value>,
    entrypoint: Option<Vec<String>>,
    cmd: Option<Vec<String>>,
    inherit: bool,
) -> (Vec<String>, Option<Vec<String>>) {
    let inherited = |key: &str| -> Option<Vec<String>> {
        if !inherit {
            return None;
        }
        serde_json::from_value(base_config?.get("config")?.get(key)?.clone()).ok()
    };
    let user_gave_entrypoint = entrypoint.is_some();
    let mut full = vec![INIT_PATH.to_owned()];
    full.extend(
        entrypoint
            .or_else(|| inherited("Entrypoint"))
            .unwrap_or_default(),
    );
    let cmd = match cmd {
        Some(cmd) => Some(cmd),
        None if user_gave_entrypoint => None,
        None => inherited("Cmd"),
    };
    (full, cmd)
}

fn config_changes(plan: &Plan, data: &Data, layers: &Layers) -> ConfigChanges {
    let spec = &data.spec;
    if layers.on_previous {
        // A re-bake on the previous image keeps its config (init in front, the command, the
        // user, the engine's settings) but for the flags given again and the new data digest.
        return ConfigChanges {
            env: vec![format!("BAKEDB_DATA_DIGEST={}", layers.data_digest)],
            labels: {
                let mut labels = plan.labels.clone();
                labels.insert(
                    "io.bakedb.data-digest".into(),
                    layers.data_digest.to_string(),
                );
                labels
            },
            entrypoint: plan.entrypoint.clone().map(|e| {
                let mut full = vec![INIT_PATH.to_owned()];
                if !plan.no_init {
                    full.extend(e);
                    full
                } else {
                    e
                }
            }),
            cmd: plan.cmd.clone(),
            ..Default::default()
        };
    }
    let from_scratch = plan.base.is_none();
    let cmd = match &plan.cmd {
        None if plan.entrypoint.is_none() => spec.cmd.clone(),
        cmd => cmd.clone(),
    };
    let (entrypoint, cmd) = if plan.no_init {
        let entrypoint = plan
            .entrypoint
            .clone()
            .or_else(|| spec.clear_entrypoint_without_init.then(Vec::new));
        (entrypoint, cmd)
    } else {
        let (entrypoint, cmd) = init_command(
            plan.base.as_ref().map(|(_, i)| &i.config),
            plan.entrypoint.clone(),
            cmd,
            spec.inherit_entrypoint,
        );
        (Some(entrypoint), cmd)
    };
    let mut env = vec![format!("BAKEDB_DATA_DIGEST={}", layers.data_digest)];
    env.extend(spec.env.iter().cloned());
    // FROM scratch there is no PATH at all: first, as any image's; on a base, it replaces
    // the base's.
    if let Some(path) = &spec.path {
        if from_scratch {
            env.insert(0, format!("PATH={path}"));
        } else {
            env.push(format!("PATH={path}"));
        }
    }
    let mut labels = plan.labels.clone();
    labels
        .entry("io.bakedb.engine".into())
        .or_insert_with(|| data.snapshot.engine.into());
    labels.insert(
        "io.bakedb.data-digest".into(),
        layers.data_digest.to_string(),
    );
    let (uid, gid) = plan.owner;
    ConfigChanges {
        user: Some(format!("{uid}:{gid}")),
        env,
        exposed_ports: spec.exposed_ports.clone(),
        stop_signal: spec.stop_signal.clone(),
        healthcheck: spec.healthcheck.clone(),
        entrypoint,
        cmd,
        labels,
        ..Default::default()
    }
}

pub fn finish(plan: Plan, data: &Data, layers: Layers, progress: &mut Progress) -> Result<Written> {
    let created = plan.time.created();
    let on = match &plan.previous {
        Some(previous) if layers.on_previous => Some(&previous.image.config),
        _ => plan.base.as_ref().map(|(_, image)| &image.config),
    };
    let config = derive_config(
        on,
        &config_changes(&plan, data, &layers),
        &layers.new,
        &created,
    );
    let mut annotations = plan.annotations;
    annotations
        .entry("org.opencontainers.image.created".into())
        .or_insert_with(|| created.clone());
    if let Some(tag) = plan.output_ref.tag() {
        annotations
            .entry("org.opencontainers.image.version".into())
            .or_insert_with(|| tag.rsplit(':').next().unwrap_or(tag).to_owned());
    }
    if let Some(src) = data.snapshot.provenance["source"].as_str() {
        annotations
            .entry("org.opencontainers.image.source".into())
            .or_insert_with(|| src.to_owned());
    }
    let pushing = matches!(plan.output_ref, bakedb_oci::reference::ImageRef::Docker(_));
    let total: u64 = layers.all.iter().map(|l| l.size).sum();
    progress.phase(
        if pushing { "push" } else { "manifest" },
        if pushing { total } else { 0 },
    );
    let output_ref = plan.output_ref;
    let started = std::time::Instant::now();
    let written = plan
        .output
        .finish(&config, layers.all, &annotations, &mut |n| progress.inc(n))
        .stage(Code::Output, || format!("writing {output_ref}"))?;
    if let Some(push) = &written.push {
        progress.done(&format!(
            "pushed {} {}: {} blobs sent ({}), {} already there, {} mounted, in {:.1} s",
            written.reference,
            written.manifest_digest,
            push.uploaded,
            crate::progress::human_bytes(push.uploaded_bytes),
            push.already_there,
            push.mounted,
            started.elapsed().as_secs_f64()
        ));
    } else {
        progress.done(&format!(
            "wrote {} {}",
            written.reference, written.manifest_digest
        ));
    }
    Ok(written)
}
