//! `foldctl top`: per-method request rate, success rate and p50/p99 latency, computed from two
//! scrapes of the gRPC RED metrics (`grpc_{server,client}_handled_total`,
//! `grpc_{server,client}_handling_seconds`) on the node's and the sidecar's `/metrics`, refreshed
//! live in a terminal.

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::time::{Duration, Instant};

use fold_client::Error;
use serde::Serialize;

use crate::cli::{Global, Output};
use crate::metrics::{Sample, get_metrics, parse};
use crate::table::Table;
use crate::{Failure, Out};

pub(crate) type Key = (String, String, String, String); // source, side, service, method

#[derive(Default, Clone)]
pub(crate) struct Counts {
    handled: f64,
    ok: f64,
    /// (upper bound, cumulative count)
    buckets: Vec<(f64, f64)>,
}

#[derive(Debug, Serialize)]
pub struct Row {
    /// The metrics address the numbers come from.
    pub source: String,
    /// `server` (calls this process answered) or `client` (calls it made).
    pub side: String,
    pub service: String,
    pub method: String,
    /// Requests per second over the interval.
    pub rps: f64,
    /// Fraction of the interval's requests that ended OK (`null` without requests).
    pub success_rate: Option<f64>,
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    /// Requests since the process started.
    pub total: u64,
}

async fn scrape(addrs: &[String]) -> Result<BTreeMap<Key, Counts>, Failure> {
    let mut out: BTreeMap<Key, Counts> = BTreeMap::new();
    for addr in addrs {
        let body = match get_metrics(addr).await {
            Ok((200, body)) => body,
            Ok((code, _)) => {
                return Err(Failure::Local(format!(
                    "http://{addr}/metrics answered HTTP {code}"
                )));
            }
            Err(detail) => {
                return Err(Failure::Client(Error::Connect {
                    addr: format!("http://{addr}/metrics"),
                    detail,
                }));
            }
        };
        for s in parse(&body) {
            add(&mut out, addr, &s);
        }
    }
    for c in out.values_mut() {
        c.buckets
            .sort_by(|a, b| a.0.partial_cmp(&b.0).unwrap_or(std::cmp::Ordering::Equal));
    }
    Ok(out)
}

/// One admin port's gRPC counters (for the dashboard, which reads each process on its own).
pub(crate) async fn scrape_one(addr: &str) -> Result<BTreeMap<Key, Counts>, String> {
    let body = match get_metrics(addr).await {
        Ok((200, body)) => body,
        Ok((code, _)) => return Err(format!("http://{addr}/metrics answered HTTP {code}")),
        Err(e) => return Err(format!("http://{addr}/metrics: {e}")),
    };
    let mut out = BTreeMap::new();
    for s in parse(&body) {
        add(&mut out, addr, &s);
    }
    for c in out.values_mut() {
        c.buckets
            .sort_by(|a, b| a.0.partial_cmp(&b.0).unwrap_or(std::cmp::Ordering::Equal));
    }
    Ok(out)
}

/// Every call a process answered over an interval, together.
#[derive(Debug, Serialize, Clone, PartialEq)]
pub struct Summary {
    pub rps: f64,
    /// `null` without requests.
    pub success_rate: Option<f64>,
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    /// Calls answered since the process started.
    pub total: u64,
}

/// The server side of two scrapes, all methods together (their histograms share bucket bounds).
pub(crate) fn summary(
    before: &BTreeMap<Key, Counts>,
    after: &BTreeMap<Key, Counts>,
    secs: f64,
) -> Summary {
    let (mut n, mut ok, mut total) = (0.0, 0.0, 0.0);
    // Bucket bound (as ordered bits; bounds are positive) -> delta of the cumulative count.
    let mut merged: BTreeMap<u64, (f64, f64)> = BTreeMap::new();
    for (k, c) in after.iter().filter(|(k, _)| k.1 == "server") {
        let b = before.get(k).cloned().unwrap_or_default();
        n += (c.handled - b.handled).max(0.0);
        ok += (c.ok - b.ok).max(0.0);
        total += c.handled;
        for (le, cum) in &c.buckets {
            let was = b
                .buckets
                .iter()
                .find(|(l, _)| l == le)
                .map_or(0.0, |(_, v)| *v);
            let e = merged.entry(le.to_bits()).or_insert((*le, 0.0));
            e.1 += (cum - was).max(0.0);
        }
    }
    let buckets: Vec<(f64, f64)> = merged.into_values().collect();
    Summary {
        rps: if secs > 0.0 { n / secs } else { 0.0 },
        success_rate: (n > 0.0).then(|| ok / n),
        p50_ms: quantile(0.5, &buckets).map(|s| s * 1000.0),
        p99_ms: quantile(0.99, &buckets).map(|s| s * 1000.0),
        total: total as u64,
    }
}

fn add(out: &mut BTreeMap<Key, Counts>, addr: &str, s: &Sample) {
    let (side, metric) = if let Some(m) = s.name.strip_prefix("grpc_server_") {
        ("server", m)
    } else if let Some(m) = s.name.strip_prefix("grpc_client_") {
        ("client", m)
    } else {
        return;
    };
    let (Some(service), Some(method)) = (s.labels.get("grpc_service"), s.labels.get("grpc_method"))
    else {
        return;
    };
    let key = (
        addr.to_string(),
        side.to_string(),
        service.clone(),
        method.clone(),
    );
    match metric {
        "handled_total" => {
            let c = out.entry(key).or_default();
            c.handled += s.value;
            if s.labels.get("grpc_code").is_some_and(|c| c == "OK") {
                c.ok += s.value;
            }
        }
        "handling_seconds_bucket" => {
            if let Some(le) = s.labels.get("le").and_then(|l| l.parse::<f64>().ok()) {
                out.entry(key).or_default().buckets.push((le, s.value));
            }
        }
        _ => {}
    }
}

/// Prometheus-style quantile over cumulative buckets (linear within a bucket).
fn quantile(q: f64, buckets: &[(f64, f64)]) -> Option<f64> {
    let total = buckets.last()?.1;
    if total <= 0.0 {
        return None;
    }
    let rank = q * total;
    let mut prev = (0.0, 0.0);
    for &(le, cum) in buckets {
        if cum >= rank {
            if le.is_infinite() {
                return Some(prev.0);
            }
            let span = cum - prev.1;
            let frac = if span > 0.0 {
                (rank - prev.1) / span
            } else {
                1.0
            };
            return Some(prev.0 + (le - prev.0) * frac);
        }
        prev = (le, cum);
    }
    Some(prev.0)
}

fn rows(before: &BTreeMap<Key, Counts>, after: &BTreeMap<Key, Counts>, secs: f64) -> Vec<Row> {
    let mut rows: Vec<Row> = after
        .iter()
        .filter(|(_, c)| c.handled > 0.0)
        .map(|(k, c)| {
            let b = before.get(k).cloned().unwrap_or_default();
            let n = (c.handled - b.handled).max(0.0);
            let ok = (c.ok - b.ok).max(0.0);
            let delta: Vec<(f64, f64)> = c
                .buckets
                .iter()
                .map(|(le, cum)| {
                    let was = b
                        .buckets
                        .iter()
                        .find(|(l, _)| l == le)
                        .map(|(_, v)| *v)
                        .unwrap_or(0.0);
                    (*le, (cum - was).max(0.0))
                })
                .collect();
            Row {
                source: k.0.clone(),
                side: k.1.clone(),
                service: k.2.clone(),
                method: k.3.clone(),
                rps: if secs > 0.0 { n / secs } else { 0.0 },
                success_rate: (n > 0.0).then(|| ok / n),
                p50_ms: quantile(0.5, &delta).map(|s| s * 1000.0),
                p99_ms: quantile(0.99, &delta).map(|s| s * 1000.0),
                total: c.handled as u64,
            }
        })
        .collect();
    rows.sort_by(|a, b| {
        b.rps
            .partial_cmp(&a.rps)
            .unwrap_or(std::cmp::Ordering::Equal)
            .then_with(|| a.method.cmp(&b.method))
    });
    rows
}

fn render(rows: &[Row], interval: Duration) -> String {
    let opt = |v: Option<f64>, f: &dyn Fn(f64) -> String| v.map(f).unwrap_or_else(|| "-".into());
    let mut t = Table::new([
        "SOURCE", "SIDE", "METHOD", "RPS", "SUCCESS", "P50", "P99", "TOTAL",
    ]);
    for r in rows {
        t.row([
            r.source.clone(),
            r.side.clone(),
            format!("{}/{}", r.service, r.method),
            format!("{:.1}", r.rps),
            opt(r.success_rate, &|s| format!("{:.1}%", s * 100.0)),
            opt(r.p50_ms, &|v| format!("{v:.2} ms")),
            opt(r.p99_ms, &|v| format!("{v:.2} ms")),
            r.total.to_string(),
        ]);
    }
    format!(
        "per-method gRPC traffic over the last {:.1} s\n{}",
        interval.as_secs_f64(),
        if rows.is_empty() {
            "no gRPC requests recorded yet\n".to_string()
        } else {
            t.render()
        }
    )
}

pub async fn run(
    g: &Global,
    addrs: &[String],
    interval: Duration,
    iterations: Option<u32>,
) -> Result<Out, Failure> {
    let live = g.output != Output::Json && std::io::stdout().is_terminal();
    // Live in a terminal until Ctrl-C (or --iterations); one sample otherwise.
    let n = iterations.unwrap_or(if live { u32::MAX } else { 1 }).max(1);
    let mut before = scrape(addrs).await?;
    let mut at = Instant::now();
    for i in 1..=n {
        tokio::time::sleep(interval).await;
        let after = scrape(addrs).await?;
        let now = Instant::now();
        let rows = rows(&before, &after, (now - at).as_secs_f64());
        let text = render(&rows, now - at);
        let json = serde_json::to_value(&rows)
            .map_err(|e| Failure::Local(format!("cannot render JSON: {e}")))?;
        if i == n {
            return Ok(Out { json, text });
        }
        match g.output {
            Output::Json => println!("{json}"),
            Output::Table if live => print!("\x1b[2J\x1b[H{text}"),
            Output::Table | Output::Wide => println!("{text}"),
        }
        before = after;
        at = now;
    }
    Err(Failure::Local("no sample taken".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_interpolate() {
        let b = [(0.001, 50.0), (0.01, 100.0), (f64::INFINITY, 100.0)];
        assert!((quantile(0.5, &b).unwrap() - 0.001).abs() < 1e-9);
        let p99 = quantile(0.99, &b).unwrap();
        assert!(p99 > 0.009 && p99 <= 0.01, "{p99}");
        assert_eq!(quantile(0.5, &[(1.0, 0.0)]), None);
    }

    #[test]
    fn rates_from_two_scrapes() {
        let body = |n: u32, ok: u32| {
            format!(
                "grpc_server_handled_total{{grpc_type=\"unary\",grpc_service=\"fold.v1.FoldNode\",grpc_method=\"Query\",grpc_code=\"OK\"}} {ok}\n\
                 grpc_server_handled_total{{grpc_type=\"unary\",grpc_service=\"fold.v1.FoldNode\",grpc_method=\"Query\",grpc_code=\"NotFound\"}} {}\n\
                 grpc_server_handling_seconds_bucket{{grpc_type=\"unary\",grpc_service=\"fold.v1.FoldNode\",grpc_method=\"Query\",le=\"0.001\"}} {n}\n\
                 grpc_server_handling_seconds_bucket{{grpc_type=\"unary\",grpc_service=\"fold.v1.FoldNode\",grpc_method=\"Query\",le=\"+Inf\"}} {n}\n",
                n - ok
            )
        };
        let mk = |b: String| {
            let mut m = BTreeMap::new();
            for s in parse(&b) {
                add(&mut m, "n", &s);
            }
            m
        };
        let r = rows(&mk(body(10, 10)), &mk(body(30, 25)), 2.0);
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].rps, 10.0);
        assert_eq!(r[0].success_rate, Some(0.75));
        assert_eq!(r[0].total, 30);
        assert!(r[0].p50_ms.unwrap() <= 1.0);
        let sum = summary(&mk(body(10, 10)), &mk(body(30, 25)), 2.0);
        assert_eq!(sum.rps, 10.0);
        assert_eq!(sum.success_rate, Some(0.75));
        assert_eq!(sum.total, 30);
        assert!(sum.p99_ms.unwrap() <= 1.0);
    }
}
