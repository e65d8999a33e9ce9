//! A bench's section of docs/benchmarks.md: written between its markers
//! (`<!-- bench:NAME:start -->` … `<!-- bench:NAME:end -->`), opened with when, where and on
//! which commit it was measured and the command that reproduces it; and the way numbers are
//! shown in its tables. A bench whose parts run on their own (`bench delta --engines`) writes
//! each part between markers of its own inside its section (`<!-- bench:NAME:PART:start -->`),
//! so a run of one part leaves the others' numbers as they were.

use std::fmt::Write as _;
use std::fs;
use std::io;
use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result};

use super::run_quiet;

/// The section of the bench `name`, up to where its own text starts: the start marker, its
/// heading, "Measured DATE on MACHINE; bakedb at COMMIT. Reproduce with:" and `command`.
pub fn start(name: &str, commit: &str, command: &str) -> String {
    let mut md = String::new();
    let _ = writeln!(md, "{}", marker(name, "start"));
    let _ = writeln!(md, "## {name}\n");
    let _ = writeln!(
        md,
        "Measured {} on {}; bakedb at {commit}. Reproduce with:\n",
        today(),
        machine(),
    );
    let _ = writeln!(md, "    {command}\n");
    md
}

/// The opening of one part of a section: "Measured DATE on MACHINE; bakedb at COMMIT.
/// Reproduce with:" and `command`.
pub fn part_start(commit: &str, command: &str) -> String {
    let mut md = String::new();
    let _ = writeln!(
        md,
        "Measured {} on {}; bakedb at {commit}. Reproduce with:\n",
        today(),
        machine(),
    );
    let _ = writeln!(md, "    {command}\n");
    md
}

/// Print `md`, the part `part` of the section `name`, and write it into docs/benchmarks.md
/// between its own markers, in place of the part's previous text; the section's other parts
/// stay. A part not there yet goes at the end of the section, a section not there yet is
/// started ("## NAME").
pub fn publish_part(root: &Path, name: &str, part: &str, md: &str) -> Result<()> {
    let doc = root.join("docs/benchmarks.md");
    let part_text = format!(
        "{}\n{}\n{}",
        marker(&format!("{name}:{part}"), "start"),
        md.trim_end(),
        marker(&format!("{name}:{part}"), "end")
    );
    println!("{part_text}\n");
    let existing = match fs::read_to_string(&doc) {
        Ok(text) => text,
        Err(e) if e.kind() == io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(e).with_context(|| format!("reading {}", doc.display())),
    };
    let section = with_part(&existing, name, part, &part_text);
    write_marked_section(&doc, &marker(name, "start"), &marker(name, "end"), &section)?;
    eprintln!(
        "xtask: wrote the {part} part of {name} in {}",
        doc.display()
    );
    Ok(())
}

/// The section `name` of `doc` (its markers included) with `part_text` (its markers included)
/// in place of the part's text, or after the section's other parts.
fn with_part(doc: &str, name: &str, part: &str, part_text: &str) -> String {
    let (start, end) = (marker(name, "start"), marker(name, "end"));
    let inner = match (doc.find(&start), doc.find(&end)) {
        (Some(s), Some(e)) if s < e => doc[s + start.len()..e].trim().to_owned(),
        _ => format!("## {name}"),
    };
    let (part_start, part_end) = (
        marker(&format!("{name}:{part}"), "start"),
        marker(&format!("{name}:{part}"), "end"),
    );
    let inner = match (inner.find(&part_start), inner.find(&part_end)) {
        (Some(s), Some(e)) if s < e => {
            format!("{}{part_text}{}", &inner[..s], &inner[e + part_end.len()..])
        }
        _ => format!("{inner}\n\n{part_text}"),
    };
    format!("{start}\n{}\n{end}\n", inner.trim())
}

/// End the section of `name` in `md`, print it and write it into docs/benchmarks.md; then the
/// run's `scratch` directory goes.
pub fn publish(root: &Path, name: &str, mut md: String, scratch: &Path) -> Result<()> {
    let _ = writeln!(md, "{}", marker(name, "end"));
    println!("{md}");
    let doc = root.join("docs/benchmarks.md");
    write_marked_section(&doc, &marker(name, "start"), &marker(name, "end"), &md)?;
    eprintln!("xtask: wrote {}", doc.display());
    let _ = fs::remove_dir_all(scratch);
    Ok(())
}

fn marker(name: &str, which: &str) -> String {
    format!("<!-- bench:{name}:{which} -->")
}

/// Replace the text from `start_marker` to `end_marker` (both included; `section` carries
/// them) in `doc`, creating the file or appending the section when it is not there yet.
fn write_marked_section(
    doc: &Path,
    start_marker: &str,
    end_marker: &str,
    section: &str,
) -> Result<()> {
    let section = section.trim_end();
    let text = match fs::read_to_string(doc) {
        Ok(text) => match (text.find(start_marker), text.find(end_marker)) {
            (Some(start), Some(end)) if start < end => format!(
                "{}{section}{}",
                &text[..start],
                &text[end + end_marker.len()..]
            ),
            _ => format!("{}\n\n{section}\n", text.trim_end()),
        },
        Err(e) if e.kind() == io::ErrorKind::NotFound => format!(
            "# Benchmarks\n\nGenerated by `cargo xtask bench`: each section is rewritten between its markers by the \
             command it shows, so edit the text outside the markers only.\n\n{section}\n"
        ),
        Err(e) => return Err(e).with_context(|| format!("reading {}", doc.display())),
    };
    if let Some(dir) = doc.parent() {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    fs::write(doc, text).with_context(|| format!("writing {}", doc.display()))
}

/// A number with `decimals`, or "—" when it is not known.
pub fn fmt(value: Option<f64>, decimals: usize) -> String {
    value.map_or_else(|| "—".into(), |v| format!("{v:.decimals$}"))
}

pub fn fmt_pct(value: Option<f64>) -> String {
    value.map_or_else(|| "—".into(), |v| format!("{:.0} %", v * 100.0))
}

/// "1.250–3.500", or "—".
pub fn fmt_range(range: Option<(f64, f64)>, decimals: usize) -> String {
    range.map_or("—".into(), |(a, b)| {
        format!("{a:.decimals$}–{b:.decimals$}")
    })
}

/// A ratio: "2.50×", or "—".
pub fn times(value: Option<f64>, decimals: usize) -> String {
    value.map_or_else(|| "—".into(), |v| format!("{v:.decimals$}×"))
}

/// Bytes as MB (10^6) with one decimal.
pub fn mb(bytes: u64) -> String {
    format!("{:.1}", bytes as f64 / 1e6)
}

pub fn yes_no(met: Option<bool>) -> &'static str {
    match met {
        Some(true) => "yes",
        Some(false) => "**no**",
        None => "not measured",
    }
}

/// "2 × AMD EPYC, Linux 6.1.0, 23.5 GiB RAM": cores, CPU model, kernel and memory.
pub fn machine() -> String {
    let nproc = super::timing::nproc();
    let cpu = fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let kernel = fs::read_to_string("/proc/sys/kernel/osrelease")
        .map_or_else(|_| "unknown".into(), |s| s.trim().to_owned());
    let mem_gib = fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .next()
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|k| k.parse::<f64>().ok())
        })
        .map_or_else(|| "?".into(), |kib| format!("{:.1}", kib / 1024.0 / 1024.0));
    format!("{nproc} × {cpu}, Linux {kernel}, {mem_gib} GiB RAM")
}

/// Today's date (UTC) as YYYY-MM-DD, from `date` rather than a second civil-date routine.
pub fn today() -> String {
    run_quiet(Command::new("date").args(["-u", "+%F"]))
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "unknown date".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaces_only_the_marked_section() {
        let dir = std::env::temp_dir().join(format!("xtask-bench-test.{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let doc = dir.join("benchmarks.md");
        let _ = fs::remove_file(&doc);
        let (start, end) = (marker("build", "start"), marker("build", "end"));
        write_marked_section(&doc, &start, &end, &format!("{start}\nfirst\n{end}\n")).unwrap();
        let created = fs::read_to_string(&doc).unwrap();
        assert!(created.starts_with("# Benchmarks"));
        fs::write(&doc, format!("{created}\n## other\nkept\n")).unwrap();
        write_marked_section(&doc, &start, &end, &format!("{start}\nsecond\n{end}")).unwrap();
        let text = fs::read_to_string(&doc).unwrap();
        assert!(
            text.contains("second") && !text.contains("first") && text.contains("kept"),
            "{text}"
        );
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn replaces_only_the_part_that_ran() {
        let doc = "# Benchmarks\n\n<!-- bench:delta:start -->\n## delta\n\n<!-- bench:delta:sqlite:start -->\nsqlite 1\n<!-- bench:delta:sqlite:end -->\n<!-- bench:delta:end -->\n\nprose\n";
        let pg = "<!-- bench:delta:postgres:start -->\npg 1\n<!-- bench:delta:postgres:end -->";
        let section = with_part(doc, "delta", "postgres", pg);
        assert_eq!(
            section,
            "<!-- bench:delta:start -->\n## delta\n\n<!-- bench:delta:sqlite:start -->\nsqlite 1\n<!-- bench:delta:sqlite:end -->\n\n<!-- bench:delta:postgres:start -->\npg 1\n<!-- bench:delta:postgres:end -->\n<!-- bench:delta:end -->\n"
        );
        let doc = doc.replace(
            "<!-- bench:delta:start -->\n## delta\n\n<!-- bench:delta:sqlite:start -->\nsqlite 1\n<!-- bench:delta:sqlite:end -->\n<!-- bench:delta:end -->\n",
            &section,
        );
        let sqlite = "<!-- bench:delta:sqlite:start -->\nsqlite 2\n<!-- bench:delta:sqlite:end -->";
        let again = with_part(&doc, "delta", "sqlite", sqlite);
        assert!(
            again.contains("sqlite 2") && !again.contains("sqlite 1") && again.contains("pg 1"),
            "{again}"
        );
        assert!(again.find("sqlite 2") < again.find("pg 1"), "{again}");
        // No section yet: one is started.
        assert_eq!(
            with_part("# Benchmarks\n", "delta", "postgres", pg),
            format!("<!-- bench:delta:start -->\n## delta\n\n{pg}\n<!-- bench:delta:end -->\n")
        );
    }

    #[test]
    fn starts_a_section_as_every_bench_did() {
        let md = start("init", "abc", "cargo xtask bench init --runs 1");
        assert!(md.starts_with("<!-- bench:init:start -->\n## init\n\nMeasured "));
        assert!(md.ends_with(
            "; bakedb at abc. Reproduce with:\n\n    cargo xtask bench init --runs 1\n\n"
        ));
    }
}
