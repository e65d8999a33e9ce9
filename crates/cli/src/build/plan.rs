//! Phase 1, plan: every flag parsed, the base image read and checked, the engine's own
//! checks of the source (and of the base against it), the output opened. Nothing is copied
//! and nothing visible is written: a build that fails here leaves everything as it was.

use std::collections::BTreeMap;

use anyhow::{Context, Result, anyhow};
use bakedb_engines::{self as engines, BaseImage, Engine, Options};
use bakedb_oci::compress::Compression;
use bakedb_oci::output::{Output, OutputSettings};
use bakedb_oci::reference::ImageRef;
use bakedb_oci::registry::Registries;
use bakedb_oci::source::{ImageSource, ResolvedImage};
use bakedb_oci::time::BuildTime;

use super::bundled::INIT_PATH;
use super::previous::Previous;
use crate::exit::{Code, StageExt, engine_error};
use crate::{BuildArgs, CompressionArg};

/// A build that passed every check, ready to run.
pub struct Plan {
    pub engine_plan: Box<dyn engines::Plan>,
    pub base: Option<(ImageSource, ResolvedImage)>,
    /// `--from`: the previous image of a delta re-bake.
    pub previous: Option<Previous>,
    pub max_patches: u64,
    pub output: Output,
    pub output_ref: ImageRef,
    pub time: BuildTime,
    /// Owner of the data and the image's User.
    pub owner: (u32, u32),
    pub labels: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
    pub cmd: Option<Vec<String>>,
    pub entrypoint: Option<Vec<String>>,
    pub no_init: bool,
}

pub fn threads() -> usize {
    std::thread::available_parallelism().map_or(1, usize::from)
}

fn parse_kv(items: &[String], flag: &str) -> Result<BTreeMap<String, String>> {
    items
        .iter()
        .map(|kv| match kv.split_once('=') {
            Some((k, v)) if !k.is_empty() => Ok((k.to_owned(), v.to_owned())),
            _ => Err(anyhow!("{flag} {kv:?}: expected KEY=VALUE")),
        })
        .collect::<Result<_>>()
        .stage(Code::Usage, || format!("parsing {flag}"))
}

fn parse_command(text: &str, flag: &str) -> Result<Vec<String>> {
    if text.trim_start().starts_with('[') {
        serde_json::from_str(text)
            .with_context(|| format!("{flag} {text:?} is not a JSON array of strings"))
            .stage(Code::Usage, || format!("parsing {flag}"))
    } else {
        Ok(text.split_whitespace().map(str::to_owned).collect())
    }
}

fn parse_user(user: &str) -> Result<(u32, u32)> {
    let parsed = user
        .split_once(':')
        .and_then(|(u, g)| Some((u.parse().ok()?, g.parse().ok()?)));
    parsed
        .ok_or_else(|| anyhow!("--user {user:?}: expected numeric UID:GID, e.g. 65532:65532"))
        .stage(Code::Usage, || "parsing --user".into())
}

/// A base image bakedb built itself is refused: the new image would carry the old data and
/// image.json under the new ones (init finds files image.json does not list and exits 3)
/// and, without --entrypoint, run `/bakedb/init /bakedb/init ...`. Re-baking a bakedb image
/// is what `--from` is for; until it exists, the advice is to build from the original base.
fn refuse_bakedb_base(config: &serde_json::Value) -> Result<(), String> {
    let runtime = &config["config"];
    let mut marks = Vec::new();
    if let Some(engine) = runtime["Labels"]["io.bakedb.engine"].as_str() {
        marks.push(format!("label io.bakedb.engine={engine}"));
    }
    let env = runtime["Env"].as_array().into_iter().flatten();
    if env
        .filter_map(|v| v.as_str())
        .any(|v| v.starts_with("BAKEDB_DATA_DIGEST="))
    {
        marks.push("BAKEDB_DATA_DIGEST in its Env".into());
    }
    if runtime["Entrypoint"][0].as_str() == Some(INIT_PATH) {
        marks.push(format!("ENTRYPOINT {INIT_PATH}"));
    }
    if marks.is_empty() {
        return Ok(());
    }
    // bakedb marks each history entry it adds; an image with nothing else was FROM scratch.
    let history = config["history"].as_array().into_iter().flatten();
    let from_scratch = history
        .clone()
        .all(|h| h["comment"].as_str() == Some("bakedb"));
    let advice = if from_scratch && history.count() > 0 {
        "it was built FROM scratch, so drop --base"
    } else {
        "pass the base image it was built on as --base"
    };
    Err(format!(
        "it is an image bakedb built ({}): building on it would stack new data and a new image.json over the old ones, and the image would never start (init finds files image.json does not list); build from the original base image instead: {advice} (re-baking a bakedb image is what --from will do, in a later version)",
        marks.join(", ")
    ))
}

/// Open, resolve and check the base image.
fn read_base(text: &str, registries: &Registries) -> Result<(ImageSource, ResolvedImage)> {
    let base_ref: ImageRef = text
        .parse()
        .stage(Code::Usage, || "parsing --base".into())?;
    let what = || format!("reading base image {base_ref}");
    let source = ImageSource::open_with(&base_ref, registries).stage(Code::Base, what)?;
    let image = source.resolve().stage(Code::Base, what)?;
    refuse_bakedb_base(&image.config)
        .map_err(|why| anyhow!(why))
        .stage(Code::Base, || format!("checking base image {base_ref}"))?;
    source
        .check_layers_present(&image)
        .stage(Code::Base, what)?;
    Ok((source, image))
}

/// The base image as an engine sees it. Its layers are read (one pass, whiteouts applied)
/// only when the engine asks for files of it.
fn engine_view(
    engine: &dyn Engine,
    source: &ImageSource,
    image: &ResolvedImage,
) -> Result<BaseImage> {
    let env = image.config["config"]["Env"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|v| v.as_str().map(str::to_owned))
        .collect();
    let mut view = BaseImage {
        location: source.location(),
        env,
        ..BaseImage::default()
    };
    if engine.needs_base() {
        let tree = source
            .file_tree(&image.layers, &|path| engine.wants_base_file(path))
            .stage(Code::Base, || {
                format!("reading base image {}", source.location())
            })?;
        view.paths = tree.paths;
        view.files = tree.files;
    }
    Ok(view)
}

/// The engine-specific flags, for the engine to take or refuse.
pub fn engine_options(
    accept: &[String],
    busy_timeout: Option<std::time::Duration>,
    pg_bin: Option<&std::path::Path>,
    pg_lazy_copyup: bool,
) -> Options {
    Options {
        accept: accept.to_vec(),
        busy_timeout,
        pg_bin: pg_bin.map(ToOwned::to_owned),
        pg_lazy_copyup,
        for_snapshot: false,
    }
}

/// The engine named by --engine (clap allows only registered names).
pub fn engine_named(name: &str) -> Result<&'static dyn Engine> {
    engines::engine(name)
        .ok_or_else(|| anyhow!("unknown engine {name:?}"))
        .stage(Code::Usage, || "checking --engine".into())
}

pub fn plan(args: &BuildArgs) -> Result<Plan> {
    let engine = engine_named(&args.engine)?;
    if engine.needs_base() && args.base.is_none() {
        return Err(anyhow!(engine.base_advice())).stage(Code::Usage, || "checking --base".into());
    }
    let compression = match args.compression {
        CompressionArg::Gzip => Compression::Gzip,
        CompressionArg::Zstd => Compression::Zstd,
        CompressionArg::None => Compression::None,
    };
    let time = BuildTime::from_env().stage(Code::Usage, || "reading SOURCE_DATE_EPOCH".into())?;
    let labels = parse_kv(&args.labels, "--label")?;
    let annotations = parse_kv(&args.annotations, "--annotation")?;
    let cmd = args
        .cmd
        .as_deref()
        .map(|c| parse_command(c, "--cmd"))
        .transpose()?;
    let entrypoint = args
        .entrypoint
        .as_deref()
        .map(|c| parse_command(c, "--entrypoint"))
        .transpose()?;
    let output_ref: ImageRef = args
        .output
        .parse()
        .stage(Code::Usage, || "parsing --output".into())?;
    let user = args.user.as_deref().map(parse_user).transpose()?;
    // --creds go to the registry written to, or else the one read from.
    let creds_for = [Some(&args.output), args.from.as_ref(), args.base.as_ref()]
        .into_iter()
        .flatten()
        .filter_map(|text| text.parse::<ImageRef>().ok())
        .find(|r| matches!(r, ImageRef::Docker(_)));
    let registries = args.registry.registries(creds_for.as_ref())?;

    let base = args
        .base
        .as_deref()
        .map(|text| read_base(text, &registries))
        .transpose()?;
    let previous = args
        .from
        .as_deref()
        .map(|text| super::previous::read(text, engine.name(), &registries))
        .transpose()?;
    let view = base
        .as_ref()
        .map(|(source, image)| engine_view(engine, source, image))
        .transpose()?;
    let options = engine_options(
        &args.accept,
        args.busy_timeout,
        args.pg_bin.as_deref(),
        args.pg_lazy_copyup,
    );
    // The engine's errors say what was being done; its blame picks the exit code.
    let engine_plan = engine
        .plan(
            &args.source,
            &options,
            view.as_ref(),
            previous.as_ref().map(|p| &p.image_json),
        )
        .map_err(|e| engine_error(e, ""))?;
    let owner = match user {
        Some(user) => user,
        None => engine_plan.owner().map_err(|e| engine_error(e, ""))?,
    };
    // Last: the output is checked (and locked) only once everything else is known good.
    let output = Output::open(
        &output_ref,
        OutputSettings {
            compression,
            mtime: time.mtime(),
            threads: threads(),
            overwrite: !args.no_overwrite,
        },
        &registries,
    )
    .stage(Code::Output, || format!("opening output {output_ref}"))?;
    for source in base
        .iter()
        .map(|b| &b.0)
        .chain(previous.iter().map(|p| &p.source))
    {
        output.may_mount_from(source);
    }
    Ok(Plan {
        engine_plan,
        base,
        previous,
        max_patches: args.max_patches,
        output,
        output_ref,
        time,
        owner,
        labels,
        annotations,
        cmd,
        entrypoint,
        no_init: args.no_init,
    })
}
