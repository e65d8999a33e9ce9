//! Which of the source server's settings the image keeps.
//!
//! The image runs bakedb's own configuration, never the source's files: they carry paths,
//! TLS keys, replication and archiving commands and credentials (`primary_conninfo`), and
//! some of them stop a read-only replica from starting at all (`archive_mode = on` with
//! `wal_level = minimal`). But a handful of settings change what a query answers (TimeZone,
//! DateStyle, search_path, default_text_search_config, extra_float_digits...) or what the
//! data needs (preload libraries of installed extensions); without them the replica would
//! answer differently from its master. Those are carried over, by PostgreSQL's own grouping
//! of its settings: the categories "Client Connection Defaults" (statement behaviour,
//! locale and formatting, library preloading), "Version and Platform Compatibility" and
//! "Query Tuning" (which changes plans, never results). Everything else (connections and
//! authentication, TLS, resources, WAL, replication, archiving, logging, file locations,
//! and custom `ext.name` settings, which applications use for secrets as often as for
//! anything) stays out and is only named, never printed, in the build's report.

use std::collections::BTreeMap;

/// Categories (pg_settings.category, up to the first " / ") whose settings are carried.
const CARRIED_CATEGORIES: [&str; 3] = [
    "Client Connection Defaults",
    "Version and Platform Compatibility",
    "Query Tuning",
];

/// Settings of the carried categories that are not carried all the same: the profile forces
/// read-only transactions; library paths and JIT providers name files of the source machine.
const NEVER_CARRIED: [&str; 4] = [
    "default_transaction_read_only",
    "transaction_read_only",
    "dynamic_library_path",
    "jit_provider",
];

/// Settings naming libraries that the base image must have (checked at build time).
pub const PRELOAD_SETTINGS: [&str; 3] = [
    "shared_preload_libraries",
    "session_preload_libraries",
    "local_preload_libraries",
];

/// Where a setting's value came from (pg_settings.source) when it is the server's own
/// configuration rather than a default or something of the probing session.
pub fn is_server_source(source: &str) -> bool {
    matches!(
        source,
        "configuration file" | "command line" | "environment variable"
    )
}

/// Whether a setting of category `category` is part of what the image keeps.
pub fn is_carried(name: &str, category: &str) -> bool {
    let top = category.split(" / ").next().unwrap_or(category);
    CARRIED_CATEGORIES.contains(&top)
        && !NEVER_CARRIED.contains(&name.to_ascii_lowercase().as_str())
}

/// The libraries a preload setting lists ("pg_stat_statements, '$libdir/auto_explain'").
pub fn libraries(value: &str) -> Vec<String> {
    value
        .split(',')
        .map(|l| l.trim().trim_matches(['"', '\'']).trim())
        .filter(|l| !l.is_empty())
        .map(str::to_owned)
        .collect()
}

/// A postgresql.conf line: single quotes doubled and backslashes escaped, as the
/// configuration file parser reads them.
pub fn config_line(name: &str, value: &str) -> String {
    let quoted = value.replace('\\', "\\\\").replace('\'', "''");
    format!("{name} = '{quoted}'\n")
}

/// The configuration file the image's postgres reads: bakedb's header and the carried
/// settings, in name order.
pub fn config_file(carried: &BTreeMap<String, String>) -> String {
    let mut text = String::from(
        "# Written by bakedb-init from /etc/bakedb/image.json (profile postgres-readonly).\n\
         # The read-only settings are on postgres's command line, where neither this file nor\n\
         # postgresql.auto.conf can undo them; `postgres -c name=value` in the container's\n\
         # command adds or overrides settings.\n",
    );
    if !carried.is_empty() {
        text.push_str(
            "#\n# The source server's settings that change what queries answer, carried over:\n",
        );
        for (name, value) in carried {
            text.push_str(&config_line(name, value));
        }
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_split() {
        let carried = [
            (
                "TimeZone",
                "Client Connection Defaults / Locale and Formatting",
            ),
            (
                "DateStyle",
                "Client Connection Defaults / Locale and Formatting",
            ),
            (
                "search_path",
                "Client Connection Defaults / Statement Behavior",
            ),
            (
                "shared_preload_libraries",
                "Client Connection Defaults / Shared Library Preloading",
            ),
            (
                "standard_conforming_strings",
                "Version and Platform Compatibility / Previous PostgreSQL Versions",
            ),
            (
                "enable_seqscan",
                "Query Tuning / Planner Method Configuration",
            ),
        ];
        for (name, category) in carried {
            assert!(is_carried(name, category), "{name}");
        }
        let kept_out = [
            ("archive_mode", "Write-Ahead Log / Archiving"),
            ("archive_command", "Write-Ahead Log / Archiving"),
            ("primary_conninfo", "Replication / Standby Servers"),
            ("ssl", "Connections and Authentication / SSL"),
            ("ssl_key_file", "Connections and Authentication / SSL"),
            ("hba_file", "File Locations"),
            ("shared_buffers", "Resource Usage / Memory"),
            ("app.api_key", "Customized Options"),
            (
                "default_transaction_read_only",
                "Client Connection Defaults / Statement Behavior",
            ),
            (
                "dynamic_library_path",
                "Client Connection Defaults / Other Defaults",
            ),
        ];
        for (name, category) in kept_out {
            assert!(!is_carried(name, category), "{name}");
        }
        assert!(is_server_source("configuration file"));
        assert!(!is_server_source("default") && !is_server_source("user"));
    }

    #[test]
    fn config_text() {
        assert_eq!(
            config_line("search_path", "\"$user\", it's, a\\b"),
            "search_path = '\"$user\", it''s, a\\\\b'\n"
        );
        let text = config_file(&BTreeMap::from([(
            "TimeZone".to_owned(),
            "Europe/Berlin".to_owned(),
        )]));
        assert!(text.ends_with("TimeZone = 'Europe/Berlin'\n"), "{text}");
        assert_eq!(
            libraries("pg_stat_statements, '$libdir/auto_explain' ,\"x\""),
            ["pg_stat_statements", "$libdir/auto_explain", "x"]
        );
    }
}
