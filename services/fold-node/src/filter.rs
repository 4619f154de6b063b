//! Range filters over the keys of a Range schema: Key, KeyPrefix, KeyRange (start inclusive,
//! end exclusive), Keys, and KeyPattern (glob with `*` and `?`).

use fold_proto::v1::{RangeFilter, range_filter};

/// Most keys one `keys` filter may list.
pub const MAX_FILTER_KEYS: usize = 10_000;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyFilter {
    All,
    Key(String),
    Prefix(String),
    /// `[start, end)`; an empty end means no upper bound.
    Range {
        start: String,
        end: String,
    },
    Keys(Vec<String>),
    Pattern(String),
}

impl KeyFilter {
    /// Translate the protobuf filter; errors say what to fix.
    pub fn from_proto(f: Option<&RangeFilter>) -> Result<KeyFilter, String> {
        let Some(f) = f else {
            return Ok(KeyFilter::All);
        };
        Ok(match &f.filter {
            None => KeyFilter::All,
            Some(range_filter::Filter::Key(k)) => KeyFilter::Key(k.clone()),
            Some(range_filter::Filter::KeyPrefix(p)) => KeyFilter::Prefix(p.clone()),
            Some(range_filter::Filter::KeyRange(r)) => {
                if !r.end.is_empty() && r.start > r.end {
                    return Err(format!(
                        "key_range start '{}' is after end '{}'",
                        r.start, r.end
                    ));
                }
                KeyFilter::Range {
                    start: r.start.clone(),
                    end: r.end.clone(),
                }
            }
            Some(range_filter::Filter::Keys(list)) => {
                if list.keys.len() > MAX_FILTER_KEYS {
                    return Err(format!(
                        "keys filter lists {} keys; at most {MAX_FILTER_KEYS}",
                        list.keys.len()
                    ));
                }
                KeyFilter::Keys(list.keys.clone())
            }
            Some(range_filter::Filter::KeyPattern(p)) => KeyFilter::Pattern(p.clone()),
        })
    }

    /// Where an ordered scan of keys should begin.
    pub fn scan_start(&self) -> String {
        match self {
            KeyFilter::All | KeyFilter::Keys(_) => String::new(),
            KeyFilter::Key(k) | KeyFilter::Prefix(k) => k.clone(),
            KeyFilter::Range { start, .. } => start.clone(),
            KeyFilter::Pattern(p) => literal_prefix(p).to_string(),
        }
    }

    /// True once an ordered scan has passed every key that could match.
    pub fn past_end(&self, key: &str) -> bool {
        match self {
            KeyFilter::All | KeyFilter::Keys(_) => false,
            KeyFilter::Key(k) => key > k.as_str(),
            KeyFilter::Prefix(p) => !key.starts_with(p.as_str()),
            KeyFilter::Range { end, .. } => !end.is_empty() && key >= end.as_str(),
            KeyFilter::Pattern(p) => !key.starts_with(literal_prefix(p)),
        }
    }

    pub fn matches(&self, key: &str) -> bool {
        match self {
            KeyFilter::All => true,
            KeyFilter::Key(k) => key == k,
            KeyFilter::Prefix(p) => key.starts_with(p.as_str()),
            KeyFilter::Range { start, end } => {
                key >= start.as_str() && (end.is_empty() || key < end.as_str())
            }
            KeyFilter::Keys(keys) => keys.iter().any(|k| k == key),
            KeyFilter::Pattern(p) => glob_match(p, key),
        }
    }
}

/// The part of a glob before its first wildcard.
fn literal_prefix(pattern: &str) -> &str {
    match pattern.find(['*', '?']) {
        Some(i) => &pattern[..i],
        None => pattern,
    }
}

/// Glob match: `*` matches any run of characters (including none), `?` exactly one.
/// Iterative with single-star backtracking, so hostile patterns stay linear-ish.
pub fn glob_match(pattern: &str, text: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let t: Vec<char> = text.chars().collect();
    let (mut pi, mut ti) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == t[ti]) {
            pi += 1;
            ti += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some((pi, ti));
            pi += 1;
        } else if let Some((sp, st)) = star {
            pi = sp + 1;
            ti = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    while pi < p.len() && p[pi] == '*' {
        pi += 1;
    }
    pi == p.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs() {
        assert!(glob_match("a*", "abc"));
        assert!(glob_match("a?c", "abc"));
        assert!(!glob_match("a?c", "abbc"));
        assert!(glob_match("*c", "abc"));
        assert!(glob_match("*", ""));
        assert!(glob_match("a*b*c", "axxbyyc"));
        assert!(!glob_match("a*b*c", "axxbyy"));
        assert!(glob_match("sensor-??", "sensor-12"));
        assert!(!glob_match("sensor-??", "sensor-123"));
        assert!(glob_match("ü?", "üx"));
    }

    #[test]
    fn range_is_half_open() {
        let f = KeyFilter::Range {
            start: "b".into(),
            end: "d".into(),
        };
        assert!(!f.matches("a"));
        assert!(f.matches("b"));
        assert!(f.matches("c"));
        assert!(!f.matches("d"));
        assert!(f.past_end("d"));
        assert_eq!(literal_prefix("ab*c"), "ab");
        assert_eq!(literal_prefix("ab"), "ab");
    }
}
