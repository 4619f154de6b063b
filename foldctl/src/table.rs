//! Plain-text tables: columns sized to their content. In a terminal the widest column is
//! shortened (with `…`) until the table fits `$COLUMNS` (default 120); when stdout is not a
//! terminal (a pipe, a file) or with `-o wide`, nothing is shortened, as kubectl does.

use std::io::IsTerminal;
use std::sync::atomic::{AtomicBool, Ordering};

use fold_client::Peer;
use serde_json::Value as Json;

/// `-o wide`: every column, nothing shortened.
static WIDE: AtomicBool = AtomicBool::new(false);

/// Set by `-o wide`.
pub fn set_wide(wide: bool) {
    WIDE.store(wide, Ordering::Relaxed);
}

/// Whether `-o wide` asked for every column.
pub fn wide() -> bool {
    WIDE.load(Ordering::Relaxed)
}

pub struct Table {
    headers: Vec<String>,
    rows: Vec<Vec<String>>,
    /// Columns never shortened (ids people copy).
    keep: Vec<usize>,
}

impl Table {
    pub fn new<I: IntoIterator<Item = S>, S: Into<String>>(headers: I) -> Table {
        Table {
            headers: headers.into_iter().map(Into::into).collect(),
            rows: Vec::new(),
            keep: Vec::new(),
        }
    }

    /// Never shorten column `i` (unless nothing else can shrink).
    pub fn keep(mut self, i: usize) -> Table {
        self.keep.push(i);
        self
    }

    pub fn row<I: IntoIterator<Item = S>, S: Into<String>>(&mut self, cells: I) {
        self.rows.push(cells.into_iter().map(Into::into).collect());
    }

    /// Fitted to the terminal, or whole when stdout is not one (or with `-o wide`).
    pub fn render(&self) -> String {
        if wide() || !std::io::stdout().is_terminal() {
            self.render_width(usize::MAX)
        } else {
            self.render_width(terminal_width())
        }
    }

    pub fn render_width(&self, width: usize) -> String {
        let n = self.headers.len();
        let clean = |s: &str| s.replace(['\n', '\t', '\r'], " ");
        let rows: Vec<Vec<String>> = self
            .rows
            .iter()
            .map(|r| {
                (0..n)
                    .map(|i| clean(r.get(i).map(String::as_str).unwrap_or("")))
                    .collect()
            })
            .collect();
        let mut widths: Vec<usize> = self.headers.iter().map(|h| h.chars().count()).collect();
        for r in &rows {
            for (i, c) in r.iter().enumerate() {
                widths[i] = widths[i].max(c.chars().count());
            }
        }
        let gap = 2;
        let total = |w: &[usize]| {
            w.iter()
                .sum::<usize>()
                .saturating_add(gap * n.saturating_sub(1))
        };
        // Shrink the widest column one character at a time (bounded: each step removes one).
        let mut budget = widths.iter().sum::<usize>();
        while total(&widths) > width && budget > 0 {
            budget -= 1;
            let shrinkable = widths
                .iter()
                .enumerate()
                .filter(|(i, w)| !self.keep.contains(i) && **w > 8)
                .max_by_key(|(_, w)| **w);
            let Some((i, w)) =
                shrinkable.or_else(|| widths.iter().enumerate().max_by_key(|(_, w)| **w))
            else {
                break;
            };
            if *w <= 8 {
                break;
            }
            widths[i] -= 1;
        }
        let mut out = String::new();
        let line = |cells: &[String], out: &mut String| {
            let mut parts = Vec::with_capacity(n);
            for (i, c) in cells.iter().enumerate() {
                let cell = fit(c, widths[i]);
                if i + 1 == n {
                    parts.push(cell);
                } else {
                    parts.push(format!("{cell:<w$}", w = widths[i]));
                }
            }
            out.push_str(parts.join(&" ".repeat(gap)).trim_end());
            out.push('\n');
        };
        line(&self.headers, &mut out);
        for r in &rows {
            line(r, &mut out);
        }
        out
    }
}

fn fit(s: &str, w: usize) -> String {
    if s.chars().count() <= w {
        return s.to_string();
    }
    let mut t: String = s.chars().take(w.saturating_sub(1)).collect();
    t.push('…');
    t
}

fn terminal_width() -> usize {
    std::env::var("COLUMNS")
        .ok()
        .and_then(|c| c.trim().parse::<usize>().ok())
        .filter(|w| *w >= 20)
        .unwrap_or(120)
}

/// A JSON value for a table cell: strings bare, everything else compact JSON.
pub fn cell(v: &Json) -> String {
    match v {
        Json::String(s) => s.clone(),
        Json::Null => "-".into(),
        other => other.to_string(),
    }
}

/// Key/value pairs as a two-column table without a header rule.
pub fn kv(pairs: &[(&str, String)]) -> String {
    let w = pairs.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    pairs
        .iter()
        .map(|(k, v)| format!("{k:<w$}  {v}\n"))
        .collect()
}

/// A peer's trust cell: its distance, or `deny`.
pub fn peer_trust(p: &Peer) -> String {
    match (p.denied, p.trust_distance) {
        (true, _) | (_, None) => "deny".into(),
        (false, Some(d)) => d.to_string(),
    }
}

/// A peer's round-trip cell, in milliseconds (`-` when unknown).
pub fn rtt_text(p: &Peer) -> String {
    p.rtt_micros
        .map(|us| format!("{:.2} ms", us as f64 / 1000.0))
        .unwrap_or_else(|| "-".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fits_width() {
        let mut t = Table::new(["A", "LONG"]);
        t.row(["x", &"y".repeat(200)]);
        let s = t.render_width(40);
        assert!(s.lines().all(|l| l.chars().count() <= 40), "{s}");
        assert!(s.contains('…'));
        let mut t = Table::new(["A", "B"]);
        t.row(["1", "2"]);
        assert_eq!(t.render_width(80), "A  B\n1  2\n");
    }

    #[test]
    fn unbounded_width_keeps_every_character() {
        let mut t = Table::new(["CONNECTED", "ROUTE_EWMA", "VIA"]);
        t.row(["yes", "1.0ms", "direct/tcp"]);
        let s = t.render_width(usize::MAX);
        assert!(!s.contains('…'), "{s}");
        assert!(s.contains("ROUTE_EWMA") && s.contains("direct/tcp"), "{s}");
    }
}
