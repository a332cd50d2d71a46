//! The JSON body of a proxy's deny answer (`--error-body FILE`; README,
//! "Protect an API without code"): a template with the placeholders
//! `{code}`, `{error}`, `{message}`, `{status}` and `{path}`, each written
//! JSON-escaped (without quotes, so a template puts them inside its own).
//! Any other `{word}` is an error at start; other braces are text.

/// The default: `{"error", "code", "message", "status"}`.
pub const DEFAULT_TEMPLATE: &str =
    r#"{"error": "{error}", "code": "{code}", "message": "{message}", "status": {status}}"#;

/// Largest template accepted.
pub const MAX_TEMPLATE: usize = 16 * 1024;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Text(String),
    Code,
    Error,
    Message,
    Status,
    Path,
}

/// A parsed template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErrorBody(Vec<Part>);

impl Default for ErrorBody {
    fn default() -> Self {
        ErrorBody::parse(DEFAULT_TEMPLATE).expect("the default template parses")
    }
}

/// What a deny answer says.
pub struct Fields<'a> {
    pub code: &'a str,
    pub error: &'a str,
    pub message: &'a str,
    pub status: u16,
    pub path: &'a str,
}

impl ErrorBody {
    /// Parses a template; every unknown placeholder is reported.
    pub fn parse(template: &str) -> Result<ErrorBody, Vec<String>> {
        if template.len() > MAX_TEMPLATE {
            return Err(vec![format!("the error body template is over {MAX_TEMPLATE} bytes")]);
        }
        let mut parts = Vec::new();
        let mut problems = Vec::new();
        let mut text = String::new();
        let mut rest = template;
        while let Some(open) = rest.find('{') {
            text.push_str(&rest[..open]);
            let after = &rest[open + 1..];
            let word_len = after.bytes().take_while(|c| c.is_ascii_alphanumeric() || *c == b'_').count();
            if word_len > 0 && after.as_bytes().get(word_len) == Some(&b'}') {
                let part = match &after[..word_len] {
                    "code" => Some(Part::Code),
                    "error" => Some(Part::Error),
                    "message" => Some(Part::Message),
                    "status" => Some(Part::Status),
                    "path" => Some(Part::Path),
                    other => {
                        problems.push(format!(
                            "unknown placeholder {{{other}}}: use {{code}}, {{error}}, {{message}}, {{status}} or {{path}}"
                        ));
                        None
                    }
                };
                if let Some(p) = part {
                    if !text.is_empty() {
                        parts.push(Part::Text(std::mem::take(&mut text)));
                    }
                    parts.push(p);
                }
                rest = &after[word_len + 1..];
            } else {
                text.push('{');
                rest = after;
            }
        }
        text.push_str(rest);
        if !text.is_empty() {
            parts.push(Part::Text(text));
        }
        if problems.is_empty() { Ok(ErrorBody(parts)) } else { Err(problems) }
    }

    pub fn render(&self, f: &Fields<'_>) -> String {
        let mut out = String::with_capacity(160);
        for part in &self.0 {
            match part {
                Part::Text(t) => out.push_str(t),
                Part::Code => escape_into(&mut out, f.code),
                Part::Error => escape_into(&mut out, f.error),
                Part::Message => escape_into(&mut out, f.message),
                Part::Status => out.push_str(&f.status.to_string()),
                Part::Path => escape_into(&mut out, f.path),
            }
        }
        out
    }
}

/// Writes `s` as the inside of a JSON string, ASCII only (so that the body
/// can also travel in a header for nginx).
fn escape_into(out: &mut String, s: &str) {
    use std::fmt::Write;
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (' '..='~').contains(&c) => out.push(c),
            c => {
                let mut buf = [0u16; 2];
                for unit in c.encode_utf16(&mut buf) {
                    let _ = write!(out, "\\u{unit:04x}");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields() -> Fields<'static> {
        Fields {
            code: "REVOKED",
            error: "expired_api_key",
            message: "The API key has been \"revoked\".",
            status: 401,
            path: "/v1/é\n",
        }
    }

    #[test]
    fn the_default_body_is_json() {
        let body = ErrorBody::default().render(&fields());
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["error"], "expired_api_key");
        assert_eq!(v["code"], "REVOKED");
        assert_eq!(v["status"], 401);
        assert_eq!(v["message"], "The API key has been \"revoked\".");
        assert!(body.is_ascii());
    }

    #[test]
    fn the_nudj_shape_from_a_template() {
        let t =
            r#"{"message": "{message}", "code": "UNAUTHORIZED", "data": {"httpStatus": {status}, "path": "{path}"}}"#;
        let body = ErrorBody::parse(t).unwrap().render(&fields());
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["data"]["httpStatus"], 401);
        assert_eq!(v["data"]["path"], "/v1/é\n");
        assert_eq!(v["code"], "UNAUTHORIZED");
    }

    #[test]
    fn unknown_placeholders_are_named() {
        let errs = ErrorBody::parse(r#"{"a": "{codes}", "b": "{stauts}"}"#).unwrap_err();
        assert_eq!(errs.len(), 2);
        assert!(errs[0].contains("{codes}"));
    }
}
