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
    Pattern(Glob),
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
            Some(range_filter::Filter::KeyPattern(p)) => KeyFilter::Pattern(Glob::new(p)),
        })
    }

    /// Where an ordered scan of keys should begin.
    pub fn scan_start(&self) -> String {
        match self {
            KeyFilter::All | KeyFilter::Keys(_) => String::new(),
            KeyFilter::Key(k) | KeyFilter::Prefix(k) => k.clone(),
            KeyFilter::Range { start, .. } => start.clone(),
            KeyFilter::Pattern(p) => literal_prefix(&p.source).to_string(),
        }
    }

    /// True once an ordered scan has passed every key that could match.
    pub fn past_end(&self, key: &str) -> bool {
        match self {
            KeyFilter::All | KeyFilter::Keys(_) => false,
            KeyFilter::Key(k) => key > k.as_str(),
            KeyFilter::Prefix(p) => !key.starts_with(p.as_str()),
            KeyFilter::Range { end, .. } => !end.is_empty() && key >= end.as_str(),
            KeyFilter::Pattern(p) => !key.starts_with(literal_prefix(&p.source)),
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
            KeyFilter::Pattern(p) => p.matches(key),
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

/// One character of a glob segment: a literal or `?` (any one character).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Tok {
    Any,
    Lit(char),
}

/// A glob compiled once per request: `*` matches any run of characters (including none), `?`
/// exactly one. The pattern is split at its stars into segments; the first must match at the
/// start, the last at the end, and each middle one is taken at its leftmost match (greedy
/// leftmost is exact for globs). Matching reads the key in place, without copying it or the
/// pattern, in at most (key length × pattern length) steps, and pattern length is capped at the
/// edge (bounds.rs: 256 bytes), so each key costs time linear in its length.
#[derive(Clone, PartialEq, Eq)]
pub struct Glob {
    pub source: String,
    segments: Vec<Vec<Tok>>,
    /// Whether the pattern contains a `*` at all (else it must match the whole key).
    star: bool,
}

impl std::fmt::Debug for Glob {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.source.fmt(f)
    }
}

impl Glob {
    pub fn new(pattern: &str) -> Glob {
        let segments = pattern
            .split('*')
            .map(|seg| {
                seg.chars()
                    .map(|c| if c == '?' { Tok::Any } else { Tok::Lit(c) })
                    .collect()
            })
            .collect();
        Glob {
            source: pattern.to_string(),
            segments,
            star: pattern.contains('*'),
        }
    }

    pub fn matches(&self, text: &str) -> bool {
        let Some((first, rest)) = self.segments.split_first() else {
            return text.is_empty();
        };
        if !self.star {
            return seg_at(first, text, 0) == Some(text.len());
        }
        let Some(mut pos) = seg_at(first, text, 0) else {
            return false;
        };
        let Some((last, middle)) = rest.split_last() else {
            return true; // unreachable with a star, kept total
        };
        for seg in middle.iter().filter(|s| !s.is_empty()) {
            match find_seg(seg, text, pos) {
                Some(end) => pos = end,
                None => return false,
            }
        }
        // The last segment ends the key: it starts `last.len()` characters before the end.
        let Some(start) = nth_char_from_end(text, last.len()) else {
            return false;
        };
        start >= pos && seg_at(last, text, start) == Some(text.len())
    }
}

/// Where `seg` ends when it matches `text` at byte `at`.
fn seg_at(seg: &[Tok], text: &str, at: usize) -> Option<usize> {
    let rest = text.get(at..)?;
    let mut chars = rest.char_indices();
    for t in seg {
        let (_, c) = chars.next()?;
        if let Tok::Lit(l) = t
            && *l != c
        {
            return None;
        }
    }
    Some(at + chars.next().map_or(rest.len(), |(i, _)| i))
}

/// The end of the leftmost match of `seg` in `text` at or after byte `from`.
fn find_seg(seg: &[Tok], text: &str, from: usize) -> Option<usize> {
    let rest = text.get(from..)?;
    rest.char_indices()
        .map(|(i, _)| from + i)
        .find_map(|i| seg_at(seg, text, i))
}

/// The byte index `n` characters before the end of `text`.
fn nth_char_from_end(text: &str, n: usize) -> Option<usize> {
    if n == 0 {
        return Some(text.len());
    }
    text.char_indices().rev().nth(n - 1).map(|(i, _)| i)
}

/// Glob match of `pattern` against `text` (see [`Glob`]).
pub fn glob_match(pattern: &str, text: &str) -> bool {
    Glob::new(pattern).matches(text)
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
        assert!(glob_match("a**c", "ac"));
        assert!(glob_match("*a*", "bab"));
        assert!(!glob_match("*a*", "bbb"));
        assert!(glob_match("ab*ab", "abab"));
        assert!(!glob_match("ab*ab", "aba"));
        assert!(glob_match("", ""));
        assert!(!glob_match("", "a"));
        assert!(glob_match("?*?", "ab"));
        assert!(!glob_match("?*?", "a"));
    }

    /// The reference: plain recursive glob semantics (exponential, fine for short inputs).
    fn reference(p: &[char], t: &[char]) -> bool {
        match (p.first(), t.first()) {
            (None, _) => t.is_empty(),
            (Some('*'), _) => reference(&p[1..], t) || (!t.is_empty() && reference(p, &t[1..])),
            (Some(_), None) => false,
            (Some('?'), Some(_)) => reference(&p[1..], &t[1..]),
            (Some(a), Some(b)) => a == b && reference(&p[1..], &t[1..]),
        }
    }

    proptest::proptest! {
        #[test]
        fn glob_agrees_with_the_reference(p in "[ab*?é]{0,8}", t in "[abé]{0,10}") {
            let pc: Vec<char> = p.chars().collect();
            let tc: Vec<char> = t.chars().collect();
            proptest::prop_assert_eq!(glob_match(&p, &t), reference(&pc, &tc));
        }
    }

    #[test]
    fn hostile_patterns_stay_cheap() {
        let p = format!("{}b", "*a".repeat(100));
        let t = "a".repeat(10_000);
        let started = std::time::Instant::now();
        assert!(!glob_match(&p, &t));
        // Fail-fast bound only (a backtracking matcher takes minutes here).
        assert!(started.elapsed() < std::time::Duration::from_secs(20));
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
