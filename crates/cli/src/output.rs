//! Printing listings as aligned tables or JSON, sizes, times and durations
//! for people, colour, and the small parsers of the command line (globs,
//! durations).

/// `println!` that returns the write error instead of panicking: standard
/// output closed early (`runstate ls | head`) is an `io::Error`, which the
/// command line treats as a quiet success.
macro_rules! out {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        writeln!(std::io::stdout().lock(), $($arg)*).map_err($crate::CliError::from)
    }};
}

use std::io::Write;
use std::time::{Duration, SystemTime};

use runstate::time::{Utc, unix_millis};
use serde::Serialize;

use crate::CliError;

/// Prints `value` as pretty JSON on standard output.
pub(crate) fn json<T: Serialize + ?Sized>(value: &T) -> Result<(), CliError> {
    let mut out = std::io::stdout().lock();
    serde_json::to_writer_pretty(&mut out, value).map_err(|e| match e.io_error_kind() {
        Some(kind) => CliError::from(std::io::Error::from(kind)),
        None => CliError::msg(format!("could not encode JSON: {e}")),
    })?;
    writeln!(out)?;
    Ok(())
}

/// Prints `value` as one line of compact JSON on standard output (what
/// `watch --json` streams), flushed at once.
pub(crate) fn json_line<T: Serialize + ?Sized>(value: &T) -> Result<(), CliError> {
    let mut out = std::io::stdout().lock();
    serde_json::to_writer(&mut out, value).map_err(|e| match e.io_error_kind() {
        Some(kind) => CliError::from(std::io::Error::from(kind)),
        None => CliError::msg(format!("could not encode JSON: {e}")),
    })?;
    writeln!(out)?;
    out.flush()?;
    Ok(())
}

/// A colour of [`paint`].
#[derive(Debug, Clone, Copy)]
pub(crate) enum Paint {
    Green,
    Yellow,
    Red,
    Dim,
}

/// `text` in `colour` when `enabled` (standard output is a terminal and
/// colour is wanted), as it is otherwise.
pub(crate) fn paint(text: &str, colour: Paint, enabled: bool) -> String {
    if !enabled {
        return text.to_owned();
    }
    let code = match colour {
        Paint::Green => "32",
        Paint::Yellow => "33",
        Paint::Red => "1;31",
        Paint::Dim => "2",
    };
    format!("\x1b[{code}m{text}\x1b[0m")
}

/// A wall-clock time for people (RFC 3339, UTC), or `-` when unknown.
pub(crate) fn time(at: Option<SystemTime>) -> String {
    at.map_or_else(|| "-".to_owned(), |t| Utc(t).to_string())
}

/// A wall-clock time for JSON (RFC 3339, UTC), or `null`.
pub(crate) fn time_json(at: Option<SystemTime>) -> Option<String> {
    at.map(|t| Utc(t).to_string())
}

/// Milliseconds since the Unix epoch, for JSON.
pub(crate) fn unix_ms(at: Option<SystemTime>) -> Option<u64> {
    at.map(unix_millis)
}

/// Whether a command-line word is a glob rather than a run id or document
/// name: ids never hold `*`, `?` or `[`, so there is no ambiguity.
pub(crate) fn is_glob(word: &str) -> bool {
    word.contains(['*', '?', '['])
}

/// Whether `name` matches the shell-style `pattern`: `*` any run of
/// characters, `?` one, `[abc]`, `[a-z]` and `[!a-z]` one of (or none of)
/// a set. Everything else matches itself.
pub(crate) fn glob_match(pattern: &str, name: &str) -> bool {
    let (p, n): (Vec<char>, Vec<char>) = (pattern.chars().collect(), name.chars().collect());
    // Iterative matching with one backtrack point for the last `*`: linear
    // enough for names of at most 128 bytes.
    let (mut pi, mut ni) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ni < n.len() {
        if pi < p.len() {
            match p[pi] {
                '*' => {
                    star = Some((pi, ni));
                    pi += 1;
                    continue;
                }
                '?' => {
                    pi += 1;
                    ni += 1;
                    continue;
                }
                '[' => match class(&p, pi, n[ni]) {
                    Some((true, next)) => {
                        pi = next;
                        ni += 1;
                        continue;
                    }
                    // An unclosed `[` is itself.
                    None if n[ni] == '[' => {
                        pi += 1;
                        ni += 1;
                        continue;
                    }
                    _ => {}
                },
                c if c == n[ni] => {
                    pi += 1;
                    ni += 1;
                    continue;
                }
                _ => {}
            }
        }
        match star {
            Some((sp, sn)) => {
                pi = sp + 1;
                ni = sn + 1;
                star = Some((sp, sn + 1));
            }
            None => return false,
        }
    }
    p[pi..].iter().all(|c| *c == '*')
}

/// Whether `c` is in the bracket class starting at `p[start]` (`[`), and
/// the index after the class; `None` for an unclosed `[` (a literal).
fn class(p: &[char], start: usize, c: char) -> Option<(bool, usize)> {
    let mut i = start + 1;
    let negated = matches!(p.get(i), Some('!' | '^'));
    if negated {
        i += 1;
    }
    let mut matched = false;
    let mut first = true;
    while i < p.len() {
        if p[i] == ']' && !first {
            return Some((matched != negated, i + 1));
        }
        first = false;
        if i + 2 < p.len() && p[i + 1] == '-' && p[i + 2] != ']' {
            matched |= p[i] <= c && c <= p[i + 2];
            i += 3;
        } else {
            matched |= p[i] == c;
            i += 1;
        }
    }
    None
}

/// Parses a duration: `500ms`, `5s`, `2m`, `1h`, or a bare number of
/// seconds (`1.5`).
pub(crate) fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let (number, unit) = match text.find(|c: char| !(c.is_ascii_digit() || c == '.')) {
        Some(at) => text.split_at(at),
        None => (text, "s"),
    };
    let value: f64 = number
        .parse()
        .map_err(|_| format!("`{text}` is not a duration (for example 500ms, 5s, 2m, 1h)"))?;
    let seconds = match unit.trim() {
        "ms" => value / 1000.0,
        "s" | "sec" | "secs" => value,
        "m" | "min" => value * 60.0,
        "h" => value * 3600.0,
        other => return Err(format!("unknown unit `{other}` (use ms, s, m or h)")),
    };
    Duration::try_from_secs_f64(seconds)
        .ok()
        .filter(|d| *d <= Duration::from_secs(366 * 24 * 3600))
        .ok_or_else(|| format!("`{text}` is not a duration of at most a year"))
}

/// `json` (valid JSON text) indented by two spaces, every key in its
/// place and every number and string exactly as written: only the white
/// space between tokens changes.
pub(crate) fn pretty_json(json: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(json.len() * 2);
    let mut depth = 0usize;
    let mut in_string = false;
    let mut escaped = false;
    // Set after `{` or `[`: a newline is due unless the container is empty.
    let mut opened = false;
    let newline = |out: &mut Vec<u8>, depth: usize| {
        out.push(b'\n');
        out.extend(std::iter::repeat_n(b' ', depth * 2));
    };
    for &byte in json {
        if in_string {
            out.push(byte);
            match (escaped, byte) {
                (true, _) => escaped = false,
                (false, b'\\') => escaped = true,
                (false, b'"') => in_string = false,
                _ => {}
            }
            continue;
        }
        if byte.is_ascii_whitespace() {
            continue;
        }
        if opened {
            opened = false;
            if byte == b'}' || byte == b']' {
                depth -= 1;
                out.push(byte);
                continue;
            }
            newline(&mut out, depth);
        }
        match byte {
            b'{' | b'[' => {
                out.push(byte);
                depth += 1;
                opened = true;
            }
            b'}' | b']' => {
                depth = depth.saturating_sub(1);
                newline(&mut out, depth);
                out.push(byte);
            }
            b',' => {
                out.push(byte);
                newline(&mut out, depth);
            }
            b':' => out.extend_from_slice(b": "),
            b'"' => {
                in_string = true;
                out.push(byte);
            }
            _ => out.push(byte),
        }
    }
    out.push(b'\n');
    out
}

/// Standard base64 (RFC 4648, with padding), for binary documents in JSON.
pub(crate) fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// The width of a cell as shown: its characters, not counting colour
/// escape sequences.
fn visible_width(cell: &str) -> usize {
    let mut width = 0;
    let mut in_escape = false;
    for c in cell.chars() {
        match (in_escape, c) {
            (false, '\x1b') => in_escape = true,
            (false, _) => width += 1,
            (true, 'm') => in_escape = false,
            (true, _) => {}
        }
    }
    width
}

/// Prints rows under a header, each column as wide as its widest cell;
/// the last column is not padded.
pub(crate) fn table(header: &[&str], rows: &[Vec<String>]) -> Result<(), CliError> {
    let mut widths: Vec<usize> = header.iter().map(|h| visible_width(h)).collect();
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(visible_width(cell));
        }
    }
    let mut out = std::io::stdout().lock();
    let header: Vec<String> = header.iter().map(|h| (*h).to_owned()).collect();
    for row in std::iter::once(&header).chain(rows) {
        let mut line = String::new();
        for (i, (cell, width)) in row.iter().zip(&widths).enumerate() {
            line.push_str(cell);
            if i + 1 < row.len() {
                let pad = width.saturating_sub(visible_width(cell)) + 2;
                line.extend(std::iter::repeat_n(' ', pad));
            }
        }
        writeln!(out, "{}", line.trim_end())?;
    }
    Ok(())
}

/// A byte count for people: `812 B`, `16.0 KiB`, `3.2 MiB`.
pub(crate) fn size(bytes: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut value = bytes as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_read_well() {
        assert_eq!(size(0), "0 B");
        assert_eq!(size(1023), "1023 B");
        assert_eq!(size(16 * 1024), "16.0 KiB");
        assert_eq!(size(41_581), "40.6 KiB");
        assert_eq!(size(3 * 1024 * 1024 + 200 * 1024), "3.2 MiB");
    }

    #[test]
    fn globs_match_like_a_shell() {
        for (pattern, name, expected) in [
            ("*", "Mica_flume1", true),
            ("Mica*", "Mica_flume1", true),
            ("*flume?", "Mica_flume1", true),
            ("*flume?", "Mica_flume12", false),
            ("M*a*1", "Mica_flume1", true),
            ("[A-M]ica*", "Mica_flume1", true),
            ("[!M]ica*", "Mica_flume1", false),
            ("c*e", "climate", true),
            ("c*e", "climates", false),
            ("ron", "ron", true),
            ("r?n", "ron", true),
            ("", "", true),
            ("[x", "[x", true),
        ] {
            assert_eq!(glob_match(pattern, name), expected, "{pattern} {name}");
        }
        assert!(is_glob("Mica*") && !is_glob("Mica_flume1"));
    }

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("5s"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1.5"), Ok(Duration::from_millis(1500)));
        assert!(parse_duration("soon").is_err());
        assert!(parse_duration("5y").is_err());
        assert!(parse_duration("-1s").is_err());
    }

    #[test]
    fn pretty_json_keeps_order_and_numbers() {
        let pretty = pretty_json(br#" {"b":[1, 2.50,{}],"a" :"x,\"y\" [z]","c":{"d":[]}}"#);
        assert_eq!(
            String::from_utf8_lossy(&pretty),
            "{\n  \"b\": [\n    1,\n    2.50,\n    {}\n  ],\n  \"a\": \"x,\\\"y\\\" [z]\",\n  \"c\": {\n    \"d\": []\n  }\n}\n"
        );
        assert_eq!(pretty_json(b"3"), b"3\n");
    }

    #[test]
    fn base64_is_standard() {
        assert_eq!(base64(b""), "");
        assert_eq!(base64(b"f"), "Zg==");
        assert_eq!(base64(b"fo"), "Zm8=");
        assert_eq!(base64(b"foo"), "Zm9v");
        assert_eq!(base64(b"\x00\x01binary\xff"), "AAFiaW5hcnn/");
    }
}
