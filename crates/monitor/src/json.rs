//! A minimal JSON object writer for the records the tools print (`--json`).
//! Output only: nothing here parses JSON.

use std::fmt::Write as _;

/// Builds one JSON object, field by field, in insertion order.
#[derive(Debug, Default)]
pub struct Obj {
    buf: String,
}

/// Appends `s` as a JSON string literal.
pub fn quote_into(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// `s` as a JSON string literal.
pub fn quote(s: &str) -> String {
    let mut out = String::new();
    quote_into(&mut out, s);
    out
}

impl Obj {
    /// An empty object.
    pub fn new() -> Obj {
        Obj::default()
    }

    fn key(&mut self, k: &str) {
        self.buf.push(if self.buf.is_empty() { '{' } else { ',' });
        quote_into(&mut self.buf, k);
        self.buf.push(':');
    }

    /// A string field.
    pub fn str(mut self, k: &str, v: &str) -> Obj {
        self.key(k);
        quote_into(&mut self.buf, v);
        self
    }

    /// An unsigned number field.
    pub fn num(mut self, k: &str, v: u64) -> Obj {
        self.key(k);
        let _ = write!(self.buf, "{v}");
        self
    }

    /// A signed number field.
    pub fn int(mut self, k: &str, v: i64) -> Obj {
        self.key(k);
        let _ = write!(self.buf, "{v}");
        self
    }

    /// An address, written as a `"0x…"` string (JSON numbers lose precision
    /// above 2^53 in many readers).
    pub fn hex(self, k: &str, v: u64) -> Obj {
        self.str(k, &format!("{v:#x}"))
    }

    /// A boolean field.
    pub fn bool(mut self, k: &str, v: bool) -> Obj {
        self.key(k);
        self.buf.push_str(if v { "true" } else { "false" });
        self
    }

    /// A field whose value is already JSON (an array or object).
    pub fn raw(mut self, k: &str, json: &str) -> Obj {
        self.key(k);
        self.buf.push_str(json);
        self
    }

    /// The finished object.
    pub fn build(mut self) -> String {
        if self.buf.is_empty() {
            self.buf.push('{');
        }
        self.buf.push('}');
        self.buf
    }
}

/// A JSON array of already-encoded values.
pub fn array<I: IntoIterator<Item = String>>(items: I) -> String {
    let mut out = String::from("[");
    for (i, item) in items.into_iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str(&item);
    }
    out.push(']');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_and_orders_fields() {
        let o = Obj::new().str("s", "a\"b\\c\n\u{1}").num("n", 7).hex("a", 255).bool("b", false).int("i", -3);
        assert_eq!(o.build(), r#"{"s":"a\"b\\c\n\u0001","n":7,"a":"0xff","b":false,"i":-3}"#);
        assert_eq!(Obj::new().build(), "{}");
        assert_eq!(array(vec!["1".to_string(), "{}".to_string()]), "[1,{}]");
    }
}
