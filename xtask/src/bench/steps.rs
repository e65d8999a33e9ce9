//! When a container reached each step of its start, from docker's log timestamps: what the
//! benches that time `docker run` to a first answer share, whatever the engine.

use std::time::{SystemTime, UNIX_EPOCH};

use bakedb_testkit::containers::Container;

/// `docker logs -t`: every line with docker's RFC 3339 timestamp in front.
pub fn logs(container: &Container) -> String {
    container
        .cmd(&["logs", "-t", &container.name])
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr)
        })
        .unwrap_or_default()
}

/// Seconds since midnight UTC, the clock docker's log timestamps are read on.
pub fn time_of_day(t: SystemTime) -> f64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64() % 86_400.0)
}

/// "2026-11-25T10:11:12.123456789Z text" → seconds since midnight UTC and the text.
fn timestamped(line: &str) -> Option<(f64, &str)> {
    let (stamp, text) = line.split_once(' ')?;
    let time = stamp.split_once('T')?.1.strip_suffix('Z')?;
    let mut parts = time.split(':');
    let h: f64 = parts.next()?.parse().ok()?;
    let m: f64 = parts.next()?.parse().ok()?;
    let s: f64 = parts.next()?.parse().ok()?;
    Some((h * 3600.0 + m * 60.0 + s, text))
}

pub fn strip_timestamp(line: &str) -> Option<&str> {
    timestamped(line).map(|(_, text)| text)
}

/// A log line that marks a step of a start: the first line containing `text` (after the
/// first line containing `after`, when given).
pub struct Mark {
    pub label: &'static str,
    pub text: &'static str,
    pub after: Option<&'static str>,
}

impl Mark {
    pub const fn at(label: &'static str, text: &'static str) -> Mark {
        Mark {
            label,
            text,
            after: None,
        }
    }
}

/// When the container's log lines that mark a step were written, in seconds after `docker
/// run` was spawned (at `spawned_tod`); a step that did not happen is left out.
pub fn marks(logs: &str, spawned_tod: f64, steps: &[Mark]) -> Vec<(&'static str, f64)> {
    let lines: Vec<(f64, &str)> = logs.lines().filter_map(timestamped).collect();
    let mut out = Vec::new();
    for step in steps {
        let from = match step.after {
            Some(after) => lines.iter().position(|(_, t)| t.contains(after)),
            None => Some(0),
        };
        let found = from.and_then(|i| lines[i..].iter().find(|(_, t)| t.contains(step.text)));
        if let Some((tod, _)) = found {
            let mut at = tod - spawned_tod;
            if at < -43_200.0 {
                at += 86_400.0;
            }
            out.push((step.label, at));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_docker_log_timestamps() {
        const RESTORE: [Mark; 3] = [
            Mark::at("initdb", "restore: initdb"),
            Mark::at("pg_restore", "restore: pg_restore"),
            Mark {
                label: "postgres ready",
                text: "ready to accept connections",
                after: Some("restore: exec postgres"),
            },
        ];
        let logs = "2026-11-25T10:00:01.500000000Z restore: initdb\n\
                    2026-11-25T10:00:03.000000000Z restore: start\n\
                    2026-11-25T10:00:03.200000000Z 2026-11-25 10:00:03.200 UTC [9] LOG:  database system is ready to accept connections\n\
                    2026-11-25T10:00:09.000000000Z restore: exec postgres\n\
                    2026-11-25T10:00:09.400000000Z 2026-11-25 10:00:09.400 UTC [1] LOG:  database system is ready to accept connections\n";
        let m = marks(logs, 36_000.0, &RESTORE);
        let get = |label: &str| m.iter().find(|(l, _)| *l == label).map(|(_, at)| *at);
        assert!((get("initdb").unwrap() - 1.5).abs() < 1e-6);
        assert!((get("postgres ready").unwrap() - 9.4).abs() < 1e-6);
        assert_eq!(get("pg_restore"), None);
        // Around midnight: the log line is on the next day.
        let m = marks(
            "2026-11-26T00:00:00.250000000Z restore: initdb\n",
            86_399.5,
            &RESTORE,
        );
        assert!((m[0].1 - 0.75).abs() < 1e-6);
    }
}
