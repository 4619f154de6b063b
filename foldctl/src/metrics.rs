//! Reading a node's (or sidecar's) Prometheus `/metrics`: a bounded HTTP/1.0 GET, and a parser
//! for the text format's samples (`name{label="value",…} number`).

use std::collections::BTreeMap;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// GET http://ADDR/metrics (HTTP/1.0, at most 3 s and 32 MiB): the status code and body.
pub async fn get_metrics(addr: &str) -> Result<(u16, String), String> {
    let fut = async {
        let mut s = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| e.to_string())?;
        let req = format!("GET /metrics HTTP/1.0\r\nHost: {addr}\r\nAccept: text/plain\r\n\r\n");
        s.write_all(req.as_bytes())
            .await
            .map_err(|e| e.to_string())?;
        let mut buf = Vec::new();
        // The admin port closes the connection after an HTTP/1.0 response; cap what we read.
        (&mut s)
            .take(32 * 1024 * 1024)
            .read_to_end(&mut buf)
            .await
            .map_err(|e| e.to_string())?;
        let text = String::from_utf8_lossy(&buf).into_owned();
        let code = text
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse::<u16>().ok())
            .ok_or_else(|| "the answer is not HTTP".to_string())?;
        let body = text
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())
            .unwrap_or_default();
        Ok((code, body))
    };
    tokio::time::timeout(Duration::from_secs(3), fut)
        .await
        .map_err(|_| "timed out after 3 s".to_string())?
}

/// One sample of the text format.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// Every sample in a text-format body (comments and malformed lines skipped).
pub fn parse(body: &str) -> Vec<Sample> {
    body.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(parse_line)
        .collect()
}

fn parse_line(line: &str) -> Option<Sample> {
    let line = line.trim();
    let (name, rest) = match line.find(['{', ' ']) {
        Some(i) => line.split_at(i),
        None => return None,
    };
    let mut labels = BTreeMap::new();
    let rest = if let Some(body) = rest.strip_prefix('{') {
        let mut chars = body.char_indices();
        let mut end = None;
        // key="value" pairs; values may hold escaped quotes, commas and braces.
        loop {
            let mut key = String::new();
            for (i, c) in chars.by_ref() {
                match c {
                    '=' => break,
                    '}' if key.trim().is_empty() => {
                        end = Some(i);
                        break;
                    }
                    ',' | ' ' => {}
                    _ => key.push(c),
                }
            }
            if end.is_some() {
                break;
            }
            if chars.next().map(|(_, c)| c) != Some('"') {
                return None;
            }
            let mut value = String::new();
            let mut escaped = false;
            for (_, c) in chars.by_ref() {
                match (escaped, c) {
                    (true, 'n') => {
                        value.push('\n');
                        escaped = false
                    }
                    (true, c) => {
                        value.push(c);
                        escaped = false
                    }
                    (false, '\\') => escaped = true,
                    (false, '"') => break,
                    (false, c) => value.push(c),
                }
            }
            labels.insert(key.trim().to_string(), value);
            match chars.clone().next() {
                Some((i, '}')) => {
                    end = Some(i);
                    break;
                }
                Some(_) => {}
                None => return None,
            }
        }
        &body[end? + 1..]
    } else {
        rest
    };
    let value = rest.split_whitespace().next()?.parse::<f64>().ok()?;
    Some(Sample {
        name: name.to_string(),
        labels,
        value,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_samples() {
        let body =
            "# TYPE x counter\nx_total 3\ny{a=\"1\",b=\"q\\\"uo,te}\"} 2.5 123\nz{} 1\nbad\n";
        let s = parse(body);
        assert_eq!(s.len(), 3, "{s:?}");
        assert_eq!(s[0].name, "x_total");
        assert_eq!(s[0].value, 3.0);
        assert_eq!(s[1].labels["a"], "1");
        assert_eq!(s[1].labels["b"], "q\"uo,te}");
        assert_eq!(s[1].value, 2.5);
        assert_eq!(s[2].name, "z");
    }
}
