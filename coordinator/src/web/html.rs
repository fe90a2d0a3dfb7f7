//! HTML building blocks: escaping, the page layout (inline CSS and script), tables and the
//! number formats the pages share. Every value that reaches the page from the store or the
//! request goes through [`escape`]; the helpers here take text and escape it themselves.

use std::fmt::Write as _;

use axum::response::Html;
use chrono::{DateTime, Utc};
use deepmad_design::digest::sha256;

use crate::store::TrialCounts;

/// The dashboard's style sheet, inlined in every page (the machines have no internet).
const STYLE: &str = include_str!("dashboard.css");

/// The dashboard's one script, inlined in every page: sorting, filtering, live progress.
const SCRIPT: &str = include_str!("dashboard.js");

/// Returns the `Content-Security-Policy` of every response: the only script that runs is the
/// inline [`SCRIPT`] (allowed by its SHA-256), everything else comes from this server, and no
/// other site may frame the pages. A value that escaped [`escape`] still could not run script.
pub fn content_security_policy() -> String {
    let hash = base64(&sha256(SCRIPT));
    format!(
        "default-src 'self'; script-src 'sha256-{hash}'; style-src 'self' 'unsafe-inline'; \
         img-src 'self' data:; frame-ancestors 'none'; form-action 'self'; base-uri 'none'"
    )
}

/// Standard base64 with padding (RFC 4648), as CSP hashes are written.
fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut encoded = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let byte = |index: usize| u32::from(chunk.get(index).copied().unwrap_or(0));
        let group = (byte(0) << 16) | (byte(1) << 8) | byte(2);
        for index in 0..4 {
            if index <= chunk.len() {
                let sextet = (group >> (18 - 6 * index)) & 63;
                encoded.push(char::from(ALPHABET[sextet as usize]));
            } else {
                encoded.push('=');
            }
        }
    }
    encoded
}

/// Returns `text` with `& < > " '` replaced by entities: safe in element content and in
/// quoted attribute values.
pub fn escape(text: &str) -> String {
    let mut escaped = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => escaped.push_str("&amp;"),
            '<' => escaped.push_str("&lt;"),
            '>' => escaped.push_str("&gt;"),
            '"' => escaped.push_str("&quot;"),
            '\'' => escaped.push_str("&#39;"),
            other => escaped.push(other),
        }
    }
    escaped
}

/// What the page header shows on the right.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Session {
    /// Auth is off: nothing to log out of.
    Open,
    /// A client token opened the page: a log-out button.
    SignedIn,
}

/// Returns a whole page: `body` is HTML already escaped by the caller.
pub fn page(title: &str, session: Session, body: &str) -> Html<String> {
    let logout = match session {
        Session::Open => "",
        Session::SignedIn => {
            "<form method=\"post\" action=\"/logout\"><button type=\"submit\">log out</button></form>"
        }
    };
    Html(format!(
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n\
         <title>{title} - deepmad</title>\n<style>{STYLE}</style>\n</head>\n<body>\n\
         <header><a class=\"brand\" href=\"/\">deepmad</a> <nav><a href=\"/\">sweeps</a></nav>\
         {logout}</header>\n<main>\n{body}\n</main>\n<script>{SCRIPT}</script>\n</body>\n</html>\n",
        title = escape(title),
    ))
}

/// A table: `header` cells are text (escaped here); each row's cells are HTML already
/// escaped by the caller. The first `left` columns (text) are aligned left, the rest
/// (numbers) right.
pub fn table(class: &str, header: &[&str], left: usize, rows: &[Vec<String>]) -> String {
    let align = |index: usize| if index < left { " class=\"text\"" } else { "" };
    let mut html = format!("<table class=\"{}\"><thead><tr>", escape(class));
    for (index, cell) in header.iter().enumerate() {
        write!(html, "<th{}>{}</th>", align(index), escape(cell)).expect("writing to a String");
    }
    html.push_str("</tr></thead><tbody>");
    for row in rows {
        html.push_str("<tr>");
        for (index, cell) in row.iter().enumerate() {
            write!(html, "<td{}>{cell}</td>", align(index)).expect("writing to a String");
        }
        html.push_str("</tr>");
    }
    html.push_str("</tbody></table>");
    html
}

/// A definition list of `(term, HTML value)` pairs; terms are escaped here.
pub fn facts(pairs: &[(&str, String)]) -> String {
    let mut html = String::from("<dl class=\"facts\">");
    for (term, value) in pairs {
        write!(html, "<dt>{}</dt><dd>{value}</dd>", escape(term)).expect("writing to a String");
    }
    html.push_str("</dl>");
    html
}

/// A link whose text and target are escaped here.
pub fn link(href: &str, text: &str) -> String {
    format!("<a href=\"{}\">{}</a>", escape(href), escape(text))
}

/// An accuracy in [0, 1] as a percentage with two decimals.
pub fn percent(value: f64) -> String {
    format!("{:.2}", value * 100.0)
}

/// An optional accuracy, `-` when absent.
pub fn percent_or_dash(value: Option<f64>) -> String {
    value.map_or_else(|| "-".to_string(), percent)
}

/// A time as people read it, to the minute.
pub fn time(value: DateTime<Utc>) -> String {
    value.format("%Y-%m-%d %H:%M UTC").to_string()
}

/// Trials that no longer wait: succeeded, failed or dead.
pub fn finished(counts: &TrialCounts) -> u32 {
    counts.succeeded + counts.failed + counts.dead
}

/// Every trial of a sweep.
pub fn total(counts: &TrialCounts) -> u32 {
    finished(counts) + counts.queued + counts.running
}

/// A sweep's progress: a bar and the counts by state, each in an element the script updates
/// (`data-count`), inside an element marked `data-progress="SWEEP_ID"`.
pub fn progress(sweep: &str, state: &str, counts: &TrialCounts) -> String {
    let total = total(counts);
    let done = finished(counts);
    let width = if total == 0 {
        0.0
    } else {
        100.0 * f64::from(done) / f64::from(total)
    };
    let mut html = format!(
        "<div class=\"progress\" data-progress=\"{sweep}\">\
         <span class=\"state\" data-field=\"state\">{state}</span> \
         <span class=\"bar\"><span style=\"width: {width:.1}%\"></span></span> \
         <span data-field=\"done\">{done}</span>/<span data-field=\"total\">{total}</span>\
         <span class=\"counts\">",
        sweep = escape(sweep),
        state = escape(state),
    );
    let states = [
        ("queued", counts.queued),
        ("running", counts.running),
        ("succeeded", counts.succeeded),
        ("failed", counts.failed),
        ("dead", counts.dead),
    ];
    for (name, value) in states {
        write!(
            html,
            " <span class=\"count {name}\">{name} <b data-count=\"{name}\">{value}</b></span>"
        )
        .expect("writing to a String");
    }
    html.push_str("</span></div>");
    html
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escaping_covers_markup_and_both_quotes() {
        assert_eq!(
            escape("<script>alert('x') & \"y\"</script>"),
            "&lt;script&gt;alert(&#39;x&#39;) &amp; &quot;y&quot;&lt;/script&gt;"
        );
        assert_eq!(escape("plain rho 0.3"), "plain rho 0.3");
    }

    #[test]
    fn pages_escape_their_title_and_inline_style_and_script() {
        let Html(html) = page("<b>sweep</b>", Session::Open, "<p>body</p>");
        assert!(html.contains("<title>&lt;b&gt;sweep&lt;/b&gt; - deepmad</title>"));
        assert!(html.contains("<style>") && html.contains("<script>"));
        assert!(!html.contains("log out"));
        assert!(
            !html.contains("src=\"http"),
            "nothing is fetched from elsewhere"
        );
        let Html(html) = page("t", Session::SignedIn, "");
        assert!(html.contains("action=\"/logout\""));
    }

    #[test]
    fn the_inline_style_and_script_cannot_end_their_element_early() {
        assert!(!SCRIPT.contains("</"), "a `</` would end the inline script");
        assert!(!STYLE.contains("</"), "a `</` would end the inline style");
    }

    #[test]
    fn base64_matches_rfc_4648() {
        let cases = [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foobar", "Zm9vYmFy"),
        ];
        for (text, encoded) in cases {
            assert_eq!(base64(text.as_bytes()), encoded, "{text}");
        }
        let policy = content_security_policy();
        assert!(policy.contains("script-src 'sha256-"), "{policy}");
        assert_eq!(
            policy
                .split("'sha256-")
                .nth(1)
                .unwrap()
                .split('\'')
                .next()
                .unwrap()
                .len(),
            44
        );
    }

    #[test]
    fn progress_counts_every_state() {
        let counts = TrialCounts {
            queued: 1,
            running: 2,
            succeeded: 3,
            failed: 1,
            dead: 1,
        };
        let html = progress("id", "active", &counts);
        assert!(
            html.contains("<span data-field=\"done\">5</span>/<span data-field=\"total\">8</span>")
        );
        assert!(html.contains("width: 62.5%"), "{html}");
        assert!(html.contains("<b data-count=\"running\">2</b>"));
    }
}
