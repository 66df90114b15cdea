//! A small typed reader over a parsed TOML document that records every problem (with its byte
//! span) instead of stopping at the first one, and reports keys it does not know.

use toml_edit::{Item, Table, Value};

/// One problem found in the config, located by byte span.
#[derive(Debug, Clone)]
pub struct Problem {
    pub span: Option<std::ops::Range<usize>>,
    pub key: String,
    pub message: String,
}

#[derive(Default)]
pub struct Problems(pub Vec<Problem>);

impl Problems {
    pub fn push(
        &mut self,
        span: Option<std::ops::Range<usize>>,
        key: &str,
        message: impl Into<String>,
    ) {
        self.0.push(Problem {
            span,
            key: key.to_string(),
            message: message.into(),
        });
    }
}

/// A view of one TOML table with a dotted path for messages, tracking which keys were read.
pub struct Section<'a> {
    pub table: &'a Table,
    pub path: String,
    seen: Vec<&'static str>,
}

fn type_name(item: &Item) -> &'static str {
    match item {
        Item::None => "nothing",
        Item::Table(_) => "a table",
        Item::ArrayOfTables(_) => "an array of tables",
        Item::Value(v) => match v {
            Value::String(_) => "a string",
            Value::Integer(_) => "an integer",
            Value::Float(_) => "a float",
            Value::Boolean(_) => "a boolean",
            Value::Datetime(_) => "a datetime",
            Value::Array(_) => "an array",
            Value::InlineTable(_) => "an inline table",
        },
    }
}

impl<'a> Section<'a> {
    pub fn new(table: &'a Table, path: impl Into<String>) -> Self {
        Section {
            table,
            path: path.into(),
            seen: Vec::new(),
        }
    }

    pub fn key_path(&self, key: &str) -> String {
        if self.path.is_empty() {
            key.to_string()
        } else {
            format!("{}.{}", self.path, key)
        }
    }

    pub fn span_of(&self, key: &str) -> Option<std::ops::Range<usize>> {
        self.table
            .get_key_value(key)
            .and_then(|(k, v)| v.span().or_else(|| k.span()))
    }

    /// Span to blame for a missing key: the table itself.
    pub fn own_span(&self) -> Option<std::ops::Range<usize>> {
        self.table
            .span()
            .or_else(|| self.table.iter().next().and_then(|(k, _)| self.span_of(k)))
    }

    fn get(&mut self, key: &'static str) -> Option<&'a Item> {
        self.seen.push(key);
        self.table.get(key).filter(|i| !i.is_none())
    }

    pub fn item(&mut self, key: &'static str) -> Option<&'a Item> {
        self.get(key)
    }

    pub fn string(&mut self, p: &mut Problems, key: &'static str) -> Option<String> {
        let item = self.get(key)?;
        match item.as_str() {
            Some(s) => Some(s.to_string()),
            None => {
                p.push(
                    self.span_of(key),
                    &self.key_path(key),
                    format!("expected a string, found {}", type_name(item)),
                );
                None
            }
        }
    }

    pub fn required_string(&mut self, p: &mut Problems, key: &'static str) -> Option<String> {
        if self.table.get(key).is_none() {
            self.seen.push(key);
            p.push(
                self.own_span(),
                &self.key_path(key),
                "is required but missing",
            );
            return None;
        }
        let s = self.string(p, key)?;
        if s.trim().is_empty() {
            p.push(self.span_of(key), &self.key_path(key), "must not be empty");
            return None;
        }
        Some(s)
    }

    pub fn integer(
        &mut self,
        p: &mut Problems,
        key: &'static str,
        min: i64,
        max: i64,
    ) -> Option<i64> {
        let item = self.get(key)?;
        match item.as_integer() {
            Some(v) if v >= min && v <= max => Some(v),
            Some(v) => {
                p.push(
                    self.span_of(key),
                    &self.key_path(key),
                    format!("{v} is out of range ({min} to {max})"),
                );
                None
            }
            None => {
                p.push(
                    self.span_of(key),
                    &self.key_path(key),
                    format!("expected an integer, found {}", type_name(item)),
                );
                None
            }
        }
    }

    pub fn float(
        &mut self,
        p: &mut Problems,
        key: &'static str,
        min: f64,
        max: f64,
    ) -> Option<f64> {
        let item = self.get(key)?;
        let v = item
            .as_float()
            .or_else(|| item.as_integer().map(|i| i as f64));
        match v {
            Some(v) if v >= min && v <= max => Some(v),
            Some(v) => {
                p.push(
                    self.span_of(key),
                    &self.key_path(key),
                    format!("{v} is out of range ({min} to {max})"),
                );
                None
            }
            None => {
                p.push(
                    self.span_of(key),
                    &self.key_path(key),
                    format!("expected a number, found {}", type_name(item)),
                );
                None
            }
        }
    }

    /// A string that must be one of `choices`.
    pub fn choice(
        &mut self,
        p: &mut Problems,
        key: &'static str,
        choices: &[&'static str],
    ) -> Option<&'static str> {
        let s = self.string(p, key)?;
        match choices.iter().find(|c| **c == s) {
            Some(c) => Some(c),
            None => {
                let list: Vec<String> = choices.iter().map(|c| format!("\"{c}\"")).collect();
                p.push(
                    self.span_of(key),
                    &self.key_path(key),
                    format!("\"{s}\" is not one of {}", list.join(", ")),
                );
                None
            }
        }
    }

    /// A size: an integer number of bytes, or a string such as "512MiB", "64 MB", "1G".
    pub fn size(&mut self, p: &mut Problems, key: &'static str, min: u64) -> Option<u64> {
        let item = self.get(key)?;
        let parsed = if let Some(i) = item.as_integer() {
            u64::try_from(i).ok()
        } else if let Some(s) = item.as_str() {
            parse_size(s)
        } else {
            None
        };
        match parsed {
            Some(v) if v >= min => Some(v),
            Some(v) => {
                p.push(
                    self.span_of(key),
                    &self.key_path(key),
                    format!("{v} bytes is too small (at least {min})"),
                );
                None
            }
            None => {
                p.push(
                    self.span_of(key),
                    &self.key_path(key),
                    "expected a size such as 536870912 or \"512MiB\"",
                );
                None
            }
        }
    }

    pub fn string_array(&mut self, p: &mut Problems, key: &'static str) -> Option<Vec<String>> {
        let item = self.get(key)?;
        let Some(arr) = item.as_array() else {
            p.push(
                self.span_of(key),
                &self.key_path(key),
                format!("expected an array of strings, found {}", type_name(item)),
            );
            return None;
        };
        let mut out = Vec::new();
        for v in arr.iter() {
            match v.as_str() {
                Some(s) => out.push(s.to_string()),
                None => p.push(
                    v.span(),
                    &self.key_path(key),
                    "every element must be a string",
                ),
            }
        }
        Some(out)
    }

    /// A sub-table (either `[a.b]` or an inline table), as key → string pairs.
    pub fn string_map(&mut self, p: &mut Problems, key: &'static str) -> Vec<(String, String)> {
        let mut out = Vec::new();
        let Some(item) = self.get(key) else {
            return out;
        };
        let Some(t) = item.as_table_like() else {
            p.push(
                self.span_of(key),
                &self.key_path(key),
                format!("expected a table, found {}", type_name(item)),
            );
            return out;
        };
        for (k, v) in t.iter() {
            match v.as_str() {
                Some(s) => out.push((k.to_string(), s.to_string())),
                None => p.push(
                    v.span(),
                    &format!("{}.{}", self.key_path(key), k),
                    "expected a string",
                ),
            }
        }
        out
    }

    /// A sub-table as a Section (missing → None).
    pub fn table(&mut self, p: &mut Problems, key: &'static str) -> Option<Section<'a>> {
        let item = self.get(key)?;
        match item.as_table() {
            Some(t) => Some(Section::new(t, self.key_path(key))),
            None => {
                p.push(
                    self.span_of(key),
                    &self.key_path(key),
                    format!("expected a table, found {}", type_name(item)),
                );
                None
            }
        }
    }

    /// Report every key that no getter asked for.
    pub fn finish(self, p: &mut Problems) {
        for (k, _) in self.table.iter() {
            if !self.seen.contains(&k) {
                let known: Vec<&str> = self.seen.clone();
                let hint = closest(k, &known)
                    .map(|c| format!(" (did you mean \"{c}\"?)"))
                    .unwrap_or_default();
                p.push(
                    self.span_of(k),
                    &self.key_path(k),
                    format!("unknown key{hint}"),
                );
            }
        }
    }
}

/// "512MiB", "64 MB", "1g", "1000" → bytes.
pub fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let split = s
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let num: f64 = num.parse().ok()?;
    let mult: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kb" => 1e3,
        "kib" => 1024.0,
        "m" | "mb" => 1e6,
        "mib" => 1024.0 * 1024.0,
        "g" | "gb" => 1e9,
        "gib" => 1024.0 * 1024.0 * 1024.0,
        _ => return None,
    };
    let v = num * mult;
    (v.is_finite() && v >= 0.0).then_some(v as u64)
}

fn closest<'k>(key: &str, known: &[&'k str]) -> Option<&'k str> {
    known
        .iter()
        .map(|k| (edit_distance(key, k), *k))
        .filter(|(d, _)| *d <= 2)
        .min_by_key(|(d, _)| *d)
        .map(|(_, k)| k)
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1];
        for (j, cb) in b.iter().enumerate() {
            let sub = prev[j] + usize::from(ca != *cb);
            cur.push(sub.min(prev[j + 1] + 1).min(cur[j] + 1));
        }
        prev = cur;
    }
    prev[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("512MiB"), Some(512 * 1024 * 1024));
        assert_eq!(parse_size("64 MB"), Some(64_000_000));
        assert_eq!(parse_size("1000"), Some(1000));
        assert_eq!(parse_size("12 parsecs"), None);
    }
}
