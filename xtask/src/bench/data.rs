//! The generated event-log database `bench build` bakes and `bench sqlite` serves: seeded, so
//! every machine gets the same rows, generated once under target/bench and reused; and the
//! seeded generator the other benches draw their bytes from.

use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result};
use rusqlite::{Connection, params};

/// Bump when the generated content changes, so cached databases are regenerated.
const GENERATOR_VERSION: u32 = 1;
pub const SEED: u64 = 0x6261_6b65_6462_0001;

/// splitmix64: a seeded generator is all the randomness the benchmark needs.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    /// Small values much more often than large ones, like words in text or users in a log.
    fn skewed(&mut self, n: u64) -> u64 {
        self.below(n).min(self.below(n)).min(self.below(n))
    }

    fn bytes(&mut self, out: &mut Vec<u8>, n: usize) {
        out.extend(
            (0..n.div_ceil(8))
                .flat_map(|_| self.next().to_le_bytes())
                .take(n),
        );
    }
}

const SYLLABLES: [&str; 32] = [
    "ka", "lo", "mi", "ne", "ro", "sa", "ti", "vu", "da", "pe", "qui", "ban", "cor", "del", "fen",
    "gar", "hol", "jin", "ker", "lum", "mar", "nor", "pol", "ras", "sel", "tor", "ul", "ven",
    "wis", "xa", "yor", "zen",
];
const KINDS: [&str; 8] = [
    "page_view",
    "click",
    "signup",
    "purchase",
    "search",
    "logout",
    "share",
    "error",
];

/// A vocabulary of pseudo-words: text that compresses like prose, neither zeros nor noise.
fn vocabulary(rng: &mut Rng) -> Vec<String> {
    (0..2048)
        .map(|_| {
            (0..1 + rng.skewed(4) as usize)
                .map(|_| SYLLABLES[rng.below(32) as usize])
                .collect()
        })
        .collect()
}

fn sentence(rng: &mut Rng, words: &[String], n: u64, out: &mut String) {
    out.clear();
    for i in 0..n {
        if i > 0 {
            out.push(if rng.below(12) == 0 { ',' } else { ' ' });
            if out.ends_with(',') {
                out.push(' ');
            }
        }
        out.push_str(&words[rng.skewed(words.len() as u64) as usize]);
    }
    out.push('.');
}

/// `target/bench/app-<N>mib.db`, at least N MiB, generated once (seeded, so every machine gets
/// the same rows) and reused while its stamp says it is complete and has the recorded size.
pub fn bench_database(bench_dir: &Path, size_mib: u64) -> Result<PathBuf> {
    let path = bench_dir.join(format!("app-{size_mib}mib.db"));
    let stamp_path = bench_dir.join(format!("app-{size_mib}mib.db.stamp"));
    let stamp =
        |bytes: u64| format!("generator {GENERATOR_VERSION} seed {SEED:#x} bytes {bytes}\n");
    if let (Ok(meta), Ok(found)) = (fs::metadata(&path), fs::read_to_string(&stamp_path))
        && meta.len() >= size_mib << 20
        && found == stamp(meta.len())
    {
        eprintln!("xtask: reusing {} ({} bytes)", path.display(), meta.len());
        return Ok(path);
    }
    let _ = fs::remove_file(&stamp_path);
    let partial = bench_dir.join(format!("app-{size_mib}mib.db.partial"));
    let _ = fs::remove_file(&partial);
    eprintln!(
        "xtask: generating {} ({size_mib} MiB, seed {SEED:#x})",
        path.display()
    );
    let started = Instant::now();
    generate(&partial, size_mib << 20)
        .with_context(|| format!("generating {}", partial.display()))?;
    for suffix in ["-wal", "-shm"] {
        let _ = fs::remove_file(path.with_file_name(format!("app-{size_mib}mib.db{suffix}")));
    }
    fs::rename(&partial, &path).with_context(|| format!("renaming to {}", path.display()))?;
    let bytes = fs::metadata(&path)?.len();
    fs::write(&stamp_path, stamp(bytes))
        .with_context(|| format!("writing {}", stamp_path.display()))?;
    eprintln!(
        "xtask: generated {bytes} bytes in {:.0} s",
        started.elapsed().as_secs_f64()
    );
    Ok(path)
}

/// An event log: integer keys, a skewed user id, short and long text, a blob with a random
/// (incompressible) part and a structured part, and a secondary index.
fn generate(path: &Path, target_bytes: u64) -> Result<()> {
    let conn = Connection::open(path)?;
    conn.execute_batch(
        "PRAGMA page_size=4096; PRAGMA journal_mode=OFF; PRAGMA synchronous=OFF; PRAGMA cache_size=-262144;
         CREATE TABLE events(
             id INTEGER PRIMARY KEY,
             user_id INTEGER NOT NULL,
             kind TEXT NOT NULL,
             created_at INTEGER NOT NULL,
             title TEXT NOT NULL,
             body TEXT NOT NULL,
             payload BLOB NOT NULL);
         CREATE INDEX events_by_user ON events(user_id, created_at);",
    )?;
    let mut rng = Rng(SEED);
    let words = vocabulary(&mut rng);
    let (mut title, mut body, mut payload) = (String::new(), String::new(), Vec::new());
    let mut created_at = 1_600_000_000u64;
    loop {
        let tx = conn.unchecked_transaction()?;
        {
            let mut insert = tx.prepare_cached(
                "INSERT INTO events(user_id, kind, created_at, title, body, payload) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            )?;
            for _ in 0..20_000 {
                created_at += rng.below(20);
                let user_id = rng.skewed(200_000);
                let (title_words, body_words) = (3 + rng.below(6), 10 + rng.below(110));
                sentence(&mut rng, &words, title_words, &mut title);
                sentence(&mut rng, &words, body_words, &mut body);
                payload.clear();
                rng.bytes(&mut payload, 32); // a content hash
                let score = rng.below(1_000_000);
                let _ = write!(
                    StringSink(&mut payload),
                    r#"{{"v":2,"ip":"10.{}.{}.{}","session":{},"score":0.{score:06},"tags":["{}","{}"],"ok":{}}}"#,
                    rng.below(256),
                    rng.below(256),
                    rng.below(256),
                    rng.below(1 << 40),
                    words[rng.skewed(64) as usize],
                    words[rng.skewed(64) as usize],
                    rng.below(10) != 0,
                );
                let thumbnail = if rng.below(4) == 0 {
                    64 + rng.below(448) as usize
                } else {
                    0
                }; // already compressed
                rng.bytes(&mut payload, thumbnail);
                insert.execute(params![
                    user_id as i64,
                    KINDS[rng.skewed(8) as usize],
                    created_at as i64,
                    title,
                    body,
                    payload
                ])?;
            }
        }
        tx.commit()?;
        let bytes: i64 = conn.query_row(
            "SELECT page_count * page_size FROM pragma_page_count, pragma_page_size",
            [],
            |r| r.get(0),
        )?;
        if bytes as u64 >= target_bytes {
            break;
        }
    }
    // A live application's database is usually in WAL mode; closing checkpoints it.
    conn.execute_batch("PRAGMA journal_mode=WAL;")?;
    conn.close().map_err(|(_, e)| e)?;
    Ok(())
}

/// `write!` into a byte vector.
struct StringSink<'a>(&'a mut Vec<u8>);

impl std::fmt::Write for StringSink<'_> {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        self.0.extend_from_slice(s.as_bytes());
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_rows_are_deterministic() {
        let mut a = Rng(SEED);
        let mut b = Rng(SEED);
        assert_eq!(vocabulary(&mut a), vocabulary(&mut b));
        let (mut x, mut y) = (Vec::new(), Vec::new());
        a.bytes(&mut x, 13);
        b.bytes(&mut y, 13);
        assert_eq!((x.len(), &x), (13, &y));
    }
}
