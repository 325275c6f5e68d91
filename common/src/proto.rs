//! The line protocol's text forms: request lines, replies, events, and the argument cursor
//! that every verb parses with. docs/protocol.md is the specification.
//!
//! A request is one line: `VERB [positional ...] [key=value ...]`, tokens separated by spaces,
//! every byte printable ASCII. A reply is zero or more `* ` item lines and then one final
//! `+OK ...` or `-ERR CODE message` line. Lines starting with `> ` are events the server pushes
//! (greeting, subscriptions); they may come between replies, never inside one.

use std::fmt::{self, Write as _};
use std::str::FromStr;

/// Longest line either side accepts, terminator included.
pub const MAX_LINE: usize = 16 * 1024;
/// Most tokens on one request line.
pub const MAX_TOKENS: usize = 64;
/// Protocol version announced in the greeting.
pub const PROTO_VERSION: u32 = 1;

/// Error codes of `-ERR CODE message` replies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Code {
    /// The verb is not known.
    UnknownVerb,
    /// Wrong number of arguments, unknown or repeated key, or a malformed value.
    BadArgs,
    /// The line is longer than MAX_LINE (it was discarded).
    LineTooLong,
    /// The line is not printable ASCII.
    BadEncoding,
    /// The command needs AUTH first.
    NoAuth,
    /// The token is not valid.
    AuthFailed,
    /// The role of this connection may not run the command.
    Denied,
    /// The named object does not exist.
    NotFound,
    /// The change would exceed the app's budget.
    Budget,
    /// The digest names no blob in the content repository.
    NoBlob,
    /// The change conflicts with current state.
    Conflict,
    /// Too many connections or subscriptions.
    Limit,
    /// The connection did not read its events fast enough and is being closed.
    SlowConsumer,
    /// The server failed (storage); the command may not have been applied.
    Internal,
}

impl Code {
    pub fn as_str(self) -> &'static str {
        match self {
            Code::UnknownVerb => "UNKNOWN_VERB",
            Code::BadArgs => "BAD_ARGS",
            Code::LineTooLong => "LINE_TOO_LONG",
            Code::BadEncoding => "BAD_ENCODING",
            Code::NoAuth => "NOAUTH",
            Code::AuthFailed => "AUTH_FAILED",
            Code::Denied => "DENIED",
            Code::NotFound => "NOT_FOUND",
            Code::Budget => "BUDGET",
            Code::NoBlob => "NO_BLOB",
            Code::Conflict => "CONFLICT",
            Code::Limit => "LIMIT",
            Code::SlowConsumer => "SLOW_CONSUMER",
            Code::Internal => "INTERNAL",
        }
    }

    pub const ALL: [Code; 14] = [
        Code::UnknownVerb,
        Code::BadArgs,
        Code::LineTooLong,
        Code::BadEncoding,
        Code::NoAuth,
        Code::AuthFailed,
        Code::Denied,
        Code::NotFound,
        Code::Budget,
        Code::NoBlob,
        Code::Conflict,
        Code::Limit,
        Code::SlowConsumer,
        Code::Internal,
    ];
}

impl fmt::Display for Code {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Code {
    type Err = ();
    fn from_str(s: &str) -> Result<Self, ()> {
        Code::ALL.into_iter().find(|c| c.as_str() == s).ok_or(())
    }
}

/// A refusal: the code and a message for humans.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code} {message}")]
pub struct ProtoError {
    pub code: Code,
    pub message: String,
}

impl ProtoError {
    pub fn new(code: Code, message: impl Into<String>) -> Self {
        ProtoError {
            code,
            message: message.into(),
        }
    }

    pub fn bad_args(message: impl Into<String>) -> Self {
        Self::new(Code::BadArgs, message)
    }

    /// The `-ERR CODE message` line (without terminator); newlines in the message are flattened.
    pub fn to_line(&self) -> String {
        let msg: String = self
            .message
            .chars()
            .map(|c| if c.is_control() { ' ' } else { c })
            .collect();
        format!("-ERR {} {msg}", self.code)
    }
}

/// A parsed request line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// Upper-cased verb.
    pub verb: String,
    positional: Vec<String>,
    pairs: Vec<(String, String)>,
}

impl Request {
    /// Parses one line (terminator already removed). Empty lines are `Ok(None)`.
    pub fn parse(line: &[u8]) -> Result<Option<Request>, ProtoError> {
        if line.len() >= MAX_LINE {
            return Err(ProtoError::new(
                Code::LineTooLong,
                format!("line exceeds {MAX_LINE} bytes"),
            ));
        }
        if let Some(b) = line.iter().find(|&&b| !(b == b' ' || b.is_ascii_graphic())) {
            return Err(ProtoError::new(
                Code::BadEncoding,
                format!(
                    "byte 0x{b:02x} is not printable ASCII; lines are printable ASCII separated by spaces"
                ),
            ));
        }
        // Checked above: every byte is ASCII, so this cannot fail.
        let text = std::str::from_utf8(line)
            .map_err(|_| ProtoError::new(Code::BadEncoding, "not UTF-8"))?;
        let mut tokens = text.split(' ').filter(|t| !t.is_empty());
        let Some(verb) = tokens.next() else {
            return Ok(None);
        };
        let mut req = Request {
            verb: verb.to_ascii_uppercase(),
            positional: Vec::new(),
            pairs: Vec::new(),
        };
        for (i, t) in tokens.enumerate() {
            if i + 1 >= MAX_TOKENS {
                return Err(ProtoError::bad_args(format!(
                    "more than {MAX_TOKENS} tokens on one line"
                )));
            }
            match t.split_once('=') {
                Some((k, v)) => {
                    if k.is_empty()
                        || !k
                            .bytes()
                            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
                    {
                        return Err(ProtoError::bad_args(format!(
                            "{k:?} is not a key (a-z, 0-9, _)"
                        )));
                    }
                    if req.pairs.iter().any(|(seen, _)| seen == k) {
                        return Err(ProtoError::bad_args(format!("{k}= given twice")));
                    }
                    req.pairs.push((k.to_string(), v.to_string()));
                }
                None => req.positional.push(t.to_string()),
            }
        }
        Ok(Some(req))
    }

    /// A cursor over the arguments, for a verb's parser.
    pub fn args(&self) -> Args<'_> {
        Args {
            verb: &self.verb,
            positional: self.positional.iter().map(String::as_str).collect(),
            next: 0,
            pairs: self
                .pairs
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str(), false))
                .collect(),
        }
    }
}

/// Takes a verb's arguments one by one; `finish` refuses anything left over, so a malformed
/// command can never be half understood.
pub struct Args<'a> {
    verb: &'a str,
    positional: Vec<&'a str>,
    next: usize,
    pairs: Vec<(&'a str, &'a str, bool)>,
}

impl<'a> Args<'a> {
    /// The next positional argument, required.
    pub fn positional(&mut self, name: &str) -> Result<&'a str, ProtoError> {
        let v = self
            .positional
            .get(self.next)
            .copied()
            .ok_or_else(|| ProtoError::bad_args(format!("{} needs <{name}>", self.verb)))?;
        self.next += 1;
        Ok(v)
    }

    /// The next positional argument if there is one.
    pub fn optional_positional(&mut self) -> Option<&'a str> {
        let v = self.positional.get(self.next).copied();
        if v.is_some() {
            self.next += 1;
        }
        v
    }

    /// The value of `key=`, if given.
    pub fn get(&mut self, key: &str) -> Option<&'a str> {
        self.pairs
            .iter_mut()
            .find(|(k, _, _)| *k == key)
            .map(|(_, v, used)| {
                *used = true;
                *v
            })
    }

    /// The value of `key=`, required.
    pub fn require(&mut self, key: &str) -> Result<&'a str, ProtoError> {
        self.get(key)
            .ok_or_else(|| ProtoError::bad_args(format!("{} needs {key}=", self.verb)))
    }

    /// `key=` parsed as a number within `range`, if given.
    pub fn number<T>(
        &mut self,
        key: &str,
        range: std::ops::RangeInclusive<T>,
    ) -> Result<Option<T>, ProtoError>
    where
        T: FromStr + PartialOrd + fmt::Display + Copy,
    {
        let Some(raw) = self.get(key) else {
            return Ok(None);
        };
        let v: T = raw
            .parse()
            .map_err(|_| ProtoError::bad_args(format!("{key}={raw} is not a number")))?;
        if !range.contains(&v) {
            return Err(ProtoError::bad_args(format!(
                "{key}={raw} is outside {}..={}",
                range.start(),
                range.end()
            )));
        }
        Ok(Some(v))
    }

    /// Refuses positional arguments and keys nobody took.
    pub fn finish(self) -> Result<(), ProtoError> {
        if let Some(extra) = self.positional.get(self.next) {
            return Err(ProtoError::bad_args(format!(
                "{} got an unexpected argument {extra:?}",
                self.verb
            )));
        }
        if let Some((k, _, _)) = self.pairs.iter().find(|(_, _, used)| !used) {
            return Err(ProtoError::bad_args(format!(
                "{} does not take {k}=",
                self.verb
            )));
        }
        Ok(())
    }
}

/// Builds `key=value` lists for replies, items and events.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Fields(String);

impl Fields {
    pub fn new() -> Self {
        Fields(String::new())
    }

    /// Appends `key=value`. Values are printable ASCII without spaces by construction of
    /// everything the server stores; anything else is replaced so a line can never break.
    pub fn add(mut self, key: &str, value: impl fmt::Display) -> Self {
        if !self.0.is_empty() {
            self.0.push(' ');
        }
        let _ = write!(self.0, "{key}=");
        let start = self.0.len();
        let _ = write!(self.0, "{value}");
        // Replace bytes that would break framing.
        let tail: String = self.0[start..]
            .chars()
            .map(|c| if c.is_ascii_graphic() { c } else { '_' })
            .collect();
        self.0.truncate(start);
        self.0.push_str(&tail);
        self
    }

    pub fn add_opt(self, key: &str, value: Option<impl fmt::Display>) -> Self {
        match value {
            Some(v) => self.add(key, v),
            None => self,
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Fields {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A line from the server, classified by its first bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerLine {
    /// `+OK fields` (the fields), or `+WORD ...` (all of it, e.g. `PONG`).
    Ok(String),
    /// `-ERR CODE message`
    Err(ProtoError),
    /// `* fields`
    Item(String),
    /// `> kind fields`
    Event { kind: String, fields: String },
}

impl ServerLine {
    pub fn parse(line: &str) -> Result<ServerLine, String> {
        // `+OK fields` carries fields; other success words (`+PONG`) are kept whole.
        if let Some(rest) = line.strip_prefix('+') {
            let rest = rest.strip_prefix("OK").map(str::trim_start).unwrap_or(rest);
            return Ok(ServerLine::Ok(rest.to_string()));
        }
        if let Some(rest) = line.strip_prefix("-ERR ") {
            let (code, msg) = rest.split_once(' ').unwrap_or((rest, ""));
            let code = code
                .parse()
                .map_err(|_| format!("unknown error code in {line:?}"))?;
            return Ok(ServerLine::Err(ProtoError::new(code, msg)));
        }
        if let Some(rest) = line.strip_prefix("* ") {
            return Ok(ServerLine::Item(rest.to_string()));
        }
        if let Some(rest) = line.strip_prefix("> ") {
            let (kind, fields) = rest.split_once(' ').unwrap_or((rest, ""));
            return Ok(ServerLine::Event {
                kind: kind.to_string(),
                fields: fields.to_string(),
            });
        }
        Err(format!("not a protocol line: {line:?}"))
    }
}

/// Free text as one field value: `%`, spaces and anything not printable ASCII are
/// percent-encoded (UTF-8 bytes), so the value holds no space and never breaks a line.
pub fn encode_text(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_graphic() && b != b'%' {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The inverse of [`encode_text`]; malformed escapes are kept as they are.
pub fn decode_text(s: &str) -> String {
    fn hex(b: u8) -> Option<u8> {
        (b as char).to_digit(16).map(|d| d as u8)
    }
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && i + 2 < b.len()
            && let (Some(h), Some(l)) = (hex(b[i + 1]), hex(b[i + 2]))
        {
            out.push(h << 4 | l);
            i += 3;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Parses `key=value key=value` into pairs (the inverse of [`Fields`]).
pub fn parse_fields(s: &str) -> Vec<(&str, &str)> {
    s.split(' ')
        .filter(|t| !t.is_empty())
        .filter_map(|t| t.split_once('='))
        .collect()
}

/// Looks a key up in parsed fields.
pub fn field<'a>(fields: &[(&'a str, &'a str)], key: &str) -> Option<&'a str> {
    fields.iter().find(|(k, _)| *k == key).map(|(_, v)| *v)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<Option<Request>, ProtoError> {
        Request::parse(s.as_bytes())
    }

    #[test]
    fn parses_verb_positionals_and_pairs() {
        let r = parse("plan.set  hello digest=sha256:ab min=2")
            .unwrap()
            .unwrap();
        assert_eq!(r.verb, "PLAN.SET");
        let mut a = r.args();
        assert_eq!(a.positional("app").unwrap(), "hello");
        assert_eq!(a.require("digest").unwrap(), "sha256:ab");
        assert_eq!(a.number("min", 0u32..=10).unwrap(), Some(2));
        assert_eq!(a.number("max", 0u32..=10).unwrap(), None);
        a.finish().unwrap();
        assert_eq!(parse("   ").unwrap(), None);
    }

    #[test]
    fn leftovers_and_bad_values_are_refused() {
        let r = parse("PING a b").unwrap().unwrap();
        let mut a = r.args();
        a.optional_positional();
        assert!(
            a.finish()
                .unwrap_err()
                .message
                .contains("unexpected argument \"b\"")
        );
        let r = parse("X k=1").unwrap().unwrap();
        assert!(
            r.args()
                .finish()
                .unwrap_err()
                .message
                .contains("does not take k=")
        );
        let r = parse("X n=-1 m=99999999999999999999").unwrap().unwrap();
        let mut a = r.args();
        assert!(
            a.number("n", 0u32..=10)
                .unwrap_err()
                .message
                .contains("not a number")
        );
        let r = parse("X n=11").unwrap().unwrap();
        assert!(
            r.args()
                .number("n", 0u32..=10)
                .unwrap_err()
                .message
                .contains("outside 0..=10")
        );
        assert_eq!(parse("X a=1 a=2").unwrap_err().code, Code::BadArgs);
        assert_eq!(parse("X A=1").unwrap_err().code, Code::BadArgs);
        assert_eq!(parse("X =1").unwrap_err().code, Code::BadArgs);
    }

    #[test]
    fn garbage_and_long_lines_are_refused() {
        assert_eq!(
            Request::parse(b"PING \xff\x00").unwrap_err().code,
            Code::BadEncoding
        );
        assert_eq!(
            Request::parse(b"PING\ta").unwrap_err().code,
            Code::BadEncoding
        );
        let long = vec![b'a'; MAX_LINE];
        assert_eq!(Request::parse(&long).unwrap_err().code, Code::LineTooLong);
        let many = format!("X {}", "a ".repeat(MAX_TOKENS));
        assert_eq!(parse(&many).unwrap_err().code, Code::BadArgs);
    }

    #[test]
    fn server_lines_round_trip() {
        let e = ProtoError::new(Code::NotFound, "plan hello\nis missing");
        assert_eq!(e.to_line(), "-ERR NOT_FOUND plan hello is missing");
        assert_eq!(
            ServerLine::parse(&e.to_line()).unwrap(),
            ServerLine::Err(ProtoError::new(Code::NotFound, "plan hello is missing"))
        );
        let f = Fields::new().add("rev", 3).add("app", "hel lo");
        assert_eq!(f.as_str(), "rev=3 app=hel_lo");
        assert_eq!(
            ServerLine::parse(&format!("+OK {f}")).unwrap(),
            ServerLine::Ok(f.to_string())
        );
        assert_eq!(
            ServerLine::parse("> plan sub=1 rev=2").unwrap(),
            ServerLine::Event {
                kind: "plan".into(),
                fields: "sub=1 rev=2".into()
            }
        );
        assert_eq!(parse_fields("a=1 b=x=y"), vec![("a", "1"), ("b", "x=y")]);
        for t in [
            "plain",
            "two words",
            "100% sure",
            "é ü \n tab\t",
            "%zz%",
            "%aé",
        ] {
            let e = encode_text(t);
            assert!(e.bytes().all(|b| b.is_ascii_graphic()), "{e}");
            assert_eq!(decode_text(&e), t);
        }
        assert_eq!(
            decode_text("%aé%4"),
            "%aé%4",
            "malformed escapes survive, no panic"
        );
        for c in Code::ALL {
            assert_eq!(c.as_str().parse::<Code>(), Ok(c));
        }
    }
}
