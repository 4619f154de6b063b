//! A minimal HTTP/1.1 GET for admin ports and the Prometheus API (no client library needed).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use anyhow::{Context, bail};

/// GET `http://{addr}{path}`; returns (status, body).
pub fn get(addr: &str, path: &str) -> anyhow::Result<(u16, String)> {
    let mut s = TcpStream::connect(addr).with_context(|| format!("connect {addr}"))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nAccept: */*\r\n\r\n"
    )?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let Some((head, body)) = text.split_once("\r\n\r\n") else {
        bail!("malformed HTTP response from {addr}{path}");
    };
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .context("no status code")?;
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(body)
    } else {
        body.to_string()
    };
    Ok((status, body))
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        s = rest[n..].trim_start_matches("\r\n");
    }
    out
}

/// Percent-encode a query-string value.
pub fn encode(v: &str) -> String {
    v.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// The value of one sample in Prometheus text exposition: the first line of metric `name` whose
/// labels include every `(label, value)` pair given (other labels may be present).
pub fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let wanted: Vec<String> = labels.iter().map(|(k, v)| format!("{k}=\"{v}\"")).collect();
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find(|l| {
            let Some(rest) = l.strip_prefix(name) else {
                return false;
            };
            let set = match rest.strip_prefix('{') {
                Some(r) => r.split_once('}').map_or("", |(set, _)| set),
                None if rest.starts_with(' ') => "",
                None => return false,
            };
            wanted.iter().all(|w| set.split(',').any(|l| l == w))
        })
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[cfg(test)]
mod tests {
    use super::sample;

    const TEXT: &str = "# TYPE x counter\n\
x_total{a=\"1\",b=\"2\"} 3\n\
x_total_more{a=\"1\"} 9\n\
x_total{a=\"1\",b=\"22\"} 4\n\
y 5.5\n";

    #[test]
    fn finds_samples_by_name_and_labels() {
        assert_eq!(sample(TEXT, "x_total", &[("b", "2")]), Some(3.0));
        assert_eq!(
            sample(TEXT, "x_total", &[("a", "1"), ("b", "22")]),
            Some(4.0)
        );
        assert_eq!(sample(TEXT, "x_total", &[("b", "3")]), None);
        assert_eq!(sample(TEXT, "x_total_more", &[]), Some(9.0));
        assert_eq!(sample(TEXT, "y", &[]), Some(5.5));
        assert_eq!(sample(TEXT, "x", &[]), None, "a name is matched whole");
    }
}
