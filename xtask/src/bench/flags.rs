//! A bench's flags: `--name N`, `--name=N` and switches, each value a positive integer (or a
//! comma-separated list of them, or of names).

use anyhow::{Result, anyhow, bail};

/// Parse `flags`: `apply` gets each flag's name and value and says whether it knows the flag;
/// an unknown one fails with `bench` (`bench build`) and the flags it `expects`.
pub fn parse<'a>(
    bench: &str,
    expects: &str,
    flags: &[&'a str],
    mut apply: impl FnMut(&str, &mut Value<'a, '_>) -> Result<bool>,
) -> Result<()> {
    let mut rest = flags.iter().copied();
    while let Some(flag) = rest.next() {
        let (name, inline) = match flag.split_once('=') {
            Some((n, v)) => (n, Some(v)),
            None => (flag, None),
        };
        let mut value = Value {
            name,
            inline,
            rest: &mut rest,
        };
        if !apply(name, &mut value)? {
            bail!("{bench}: unknown flag {flag:?} (expected {expects})");
        }
    }
    Ok(())
}

/// The value of one flag: after `=`, else the next argument.
pub struct Value<'a, 'r> {
    name: &'a str,
    inline: Option<&'a str>,
    rest: &'r mut dyn Iterator<Item = &'a str>,
}

impl<'a> Value<'a, '_> {
    /// Given without `=value`: a switch.
    pub fn is_switch(&self) -> bool {
        self.inline.is_none()
    }

    fn text(&mut self, what: &str) -> Result<&'a str> {
        self.inline
            .or_else(|| self.rest.next())
            .ok_or_else(|| anyhow!("{} needs a value ({what})", self.name))
    }

    /// A positive integer; `what` says what it means when it is missing.
    pub fn positive(&mut self, what: &str) -> Result<u64> {
        let text = self.text(what)?;
        positive(self.name, text)
    }

    pub fn count(&mut self, what: &str) -> Result<usize> {
        Ok(self.positive(what)? as usize)
    }

    /// Comma-separated positive integers.
    pub fn positive_list(&mut self, what: &str) -> Result<Vec<u64>> {
        let name = self.name;
        self.text(what)?
            .split(',')
            .map(|s| positive(name, s))
            .collect()
    }

    /// Comma-separated names, each one of `known`.
    pub fn names(&mut self, what: &str, known: &[&str]) -> Result<Vec<&'a str>> {
        let name = self.name;
        self.text(what)?
            .split(',')
            .map(|s| {
                let s = s.trim();
                if known.contains(&s) {
                    Ok(s)
                } else {
                    Err(anyhow!("{name}: {s:?} is not one of {}", known.join(", ")))
                }
            })
            .collect()
    }
}

fn positive(name: &str, text: &str) -> Result<u64> {
    text.trim()
        .parse::<u64>()
        .ok()
        .filter(|n| *n > 0)
        .ok_or_else(|| anyhow!("{name} {text:?}: expected a positive integer"))
}
