//! The top-level fields of a JSON request body that routing reads (`model`, and the sticky
//! `user`), found by a streaming tokenizer fed the body's first bytes chunk by chunk.
//!
//! Invariant: a field is what a JSON parser would read — a key matches after its escapes are
//! decoded (`"m\u006fdel"` is `model`), a key inside a nested object or array never matches, and
//! a key that appears twice at the top level is refused (parsers disagree on which one wins, so
//! weir and the backend could read different models). Nothing is copied but the wanted values.

/// Reads a body's `model` and a sticky field from its first `max` bytes, as they arrive.
#[derive(Debug)]
pub struct FieldReader<'w> {
    scanner: Scanner<'w>,
    max: usize,
    read: usize,
}

/// What a [`FieldReader`] found: the fields, or why the body cannot be routed.
pub type Read = Result<BodyFields, String>;

impl<'w> FieldReader<'w> {
    /// `wanted` is `["model"]`, or `["model", sticky_field]`.
    pub fn new(wanted: &'w [&'w str], max: usize) -> FieldReader<'w> {
        FieldReader {
            scanner: Scanner::new(wanted),
            max,
            read: 0,
        }
    }

    /// Feeds the next bytes; `Some` once the fields are known: the object ended, or `max` bytes
    /// were read (a field not found by then is absent).
    pub fn feed(&mut self, chunk: &[u8]) -> Option<Read> {
        let room = self.max - self.read;
        let take = &chunk[..chunk.len().min(room)];
        self.read += take.len();
        match self.scanner.feed(take) {
            Scan::Done => Some(Ok(self.fields())),
            Scan::Invalid(why) => Some(Err(why)),
            Scan::More if self.read >= self.max => Some(Ok(self.fields())),
            Scan::More => None,
        }
    }

    /// The body ended.
    pub fn finish(&mut self) -> Read {
        match self.scanner.finish() {
            Scan::Invalid(why) => Err(why),
            _ => Ok(self.fields()),
        }
    }

    fn fields(&mut self) -> BodyFields {
        BodyFields {
            model: self.scanner.found[0].take(),
            sticky: self.scanner.found.get_mut(1).and_then(Option::take),
        }
    }
}

/// The top-level fields of a request body routing reads.
#[derive(Debug, Default)]
pub struct BodyFields {
    pub model: Option<Field>,
    /// The route's sticky body field.
    pub sticky: Option<Field>,
}

/// `body` with its top-level `model` value replaced by `token` (a JSON string token), when it
/// is a JSON object with one; `None` leaves the body as it is.
pub fn replace_model(body: &[u8], token: &[u8]) -> Option<Vec<u8>> {
    let mut scanner = Scanner::new(&["model"]);
    match scanner.feed(body) {
        Scan::Done => {}
        Scan::More | Scan::Invalid(_) => return None,
    }
    let field = scanner.field(0)?;
    let mut out = Vec::with_capacity(field.renamed_len(body.len() as u64, token) as usize);
    field.splice_into(&mut out, body, token);
    Some(out)
}

impl Field {
    /// Appends `body` to `out` with this field's value token replaced by `token`.
    pub fn splice_into(&self, out: &mut Vec<u8>, body: &[u8], token: &[u8]) {
        out.extend_from_slice(&body[..self.start]);
        out.extend_from_slice(token);
        out.extend_from_slice(&body[self.end..]);
    }

    /// The length of a body of `len` bytes once this field's value is `token`.
    pub fn renamed_len(&self, len: u64, token: &[u8]) -> u64 {
        len - (self.end - self.start) as u64 + token.len() as u64
    }
}

/// A wanted field's value: decoded, with the byte span of its token (quotes included) in the
/// body, so it can be replaced.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Field {
    pub value: String,
    pub start: usize,
    pub end: usize,
}

/// What the scan has found so far.
#[derive(Debug, PartialEq, Eq)]
pub enum Scan {
    /// The object has not ended yet: feed more.
    More,
    /// The top-level object ended; the wanted fields it holds.
    Done,
    /// Not a JSON object, or a wanted field that is not a string or appears twice.
    Invalid(String),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// Before the top-level `{`.
    Start,
    /// In the top-level object, before a key or `}`.
    KeyOrEnd,
    /// After a `,` in the top-level object: a key must follow.
    Key,
    /// In a top-level key string.
    InKey,
    /// After a top-level key, before `:`.
    Colon,
    /// Before a top-level value.
    Value,
    /// In a top-level string value.
    InValue,
    /// In a nested value (object or array) or a top-level scalar; `nest` counts brackets.
    Skip,
    /// In a string inside a nested value.
    SkipString,
    /// After a top-level value, before `,` or `}`.
    Next,
    /// After the top-level object.
    End,
}

/// A streaming scanner for the top-level string fields named in `wanted`.
#[derive(Debug)]
pub struct Scanner<'w> {
    wanted: &'w [&'w str],
    state: State,
    /// Bytes fed so far: the offset of the next byte.
    offset: usize,
    /// Bracket depth inside a skipped nested value.
    nest: u32,
    /// Inside a string: the next byte is escaped; `unicode` counts the hex digits left of a `\u`.
    escaped: bool,
    unicode: u8,
    code: u32,
    /// A high surrogate waiting for its low half.
    high: Option<u32>,
    /// The string being read (a key, or a wanted value), escapes decoded; UTF-8 is checked
    /// at its end.
    text: Vec<u8>,
    /// Which wanted field the value being read belongs to, and where its token started.
    capturing: Option<(usize, usize)>,
    /// A scalar top-level value is being skipped (ends at a delimiter, not a bracket).
    scalar: bool,
    found: Vec<Option<Field>>,
}

impl<'w> Scanner<'w> {
    pub fn new(wanted: &'w [&'w str]) -> Scanner<'w> {
        Scanner {
            wanted,
            state: State::Start,
            offset: 0,
            nest: 0,
            escaped: false,
            unicode: 0,
            code: 0,
            high: None,
            text: Vec::new(),
            capturing: None,
            scalar: false,
            found: vec![None; wanted.len()],
        }
    }

    /// The value of `wanted[i]`, once read.
    pub fn field(&self, i: usize) -> Option<&Field> {
        self.found.get(i).and_then(Option::as_ref)
    }

    /// Feeds the next bytes of the body.
    pub fn feed(&mut self, chunk: &[u8]) -> Scan {
        for (i, &b) in chunk.iter().enumerate() {
            let at = self.offset + i;
            if let Err(why) = self.step(b, at) {
                self.offset += i + 1;
                return Scan::Invalid(why);
            }
            if self.state == State::End {
                self.offset += i + 1;
                return Scan::Done;
            }
        }
        self.offset += chunk.len();
        Scan::More
    }

    /// The body ended after what was fed.
    pub fn finish(&self) -> Scan {
        match self.state {
            State::End => Scan::Done,
            State::Start => Scan::Invalid("the body is empty, not a JSON object".into()),
            _ => Scan::Invalid("the body ends before its JSON object does".into()),
        }
    }

    fn step(&mut self, b: u8, at: usize) -> Result<(), String> {
        let ws = matches!(b, b' ' | b'\t' | b'\n' | b'\r');
        match self.state {
            State::Start if ws => {}
            State::Start if b == b'{' => self.state = State::KeyOrEnd,
            State::Start => return Err("the body is not a JSON object".into()),
            State::KeyOrEnd | State::Key if ws => {}
            State::KeyOrEnd if b == b'}' => self.state = State::End,
            State::KeyOrEnd | State::Key if b == b'"' => {
                self.text.clear();
                self.state = State::InKey;
            }
            State::KeyOrEnd | State::Key => return Err(invalid(b, at, "a key")),
            State::InKey => {
                if self.string_byte(b, at)? {
                    self.state = State::Colon;
                }
            }
            State::Colon if ws => {}
            State::Colon if b == b':' => {
                let wanted = self.wanted.iter().position(|w| w.as_bytes() == self.text);
                if let Some(i) = wanted {
                    if self.found[i].is_some() {
                        return Err(format!(
                            "the body names {:?} twice; send it once",
                            self.wanted[i]
                        ));
                    }
                }
                self.capturing = wanted.map(|i| (i, 0));
                self.state = State::Value;
            }
            State::Colon => return Err(invalid(b, at, "':'")),
            State::Value if ws => {}
            State::Value => self.value_start(b, at)?,
            State::InValue => {
                if self.string_byte(b, at)? {
                    if let Some((i, start)) = self.capturing.take() {
                        let value = String::from_utf8(std::mem::take(&mut self.text))
                            .map_err(|_| format!("the body's {:?} is not UTF-8", self.wanted[i]))?;
                        self.found[i] = Some(Field {
                            value,
                            start,
                            end: at + 1,
                        });
                    }
                    self.state = State::Next;
                }
            }
            State::Skip => self.skip_byte(b, at)?,
            State::SkipString => {
                if self.escaped {
                    self.escaped = false;
                } else if b == b'\\' {
                    self.escaped = true;
                } else if b == b'"' {
                    self.state = State::Skip;
                } else if b < 0x20 {
                    return Err(invalid(b, at, "a string character"));
                }
            }
            State::Next if ws => {}
            State::Next if b == b',' => self.state = State::Key,
            State::Next if b == b'}' => self.state = State::End,
            State::Next => return Err(invalid(b, at, "',' or '}'")),
            State::End => {}
        }
        Ok(())
    }

    fn value_start(&mut self, b: u8, at: usize) -> Result<(), String> {
        if let Some((i, _)) = self.capturing {
            if b != b'"' {
                return Err(format!("the body's {:?} is not a string", self.wanted[i]));
            }
            self.capturing = Some((i, at));
            self.text.clear();
            self.state = State::InValue;
            return Ok(());
        }
        match b {
            b'"' => {
                self.nest = 0;
                self.state = State::SkipString;
                // A top-level string: its end is the value's end.
                self.scalar = false;
            }
            b'{' | b'[' => {
                self.nest = 1;
                self.scalar = false;
                self.state = State::Skip;
            }
            b'-' | b'0'..=b'9' | b't' | b'f' | b'n' => {
                self.nest = 0;
                self.scalar = true;
                self.state = State::Skip;
            }
            _ => return Err(invalid(b, at, "a value")),
        }
        Ok(())
    }

    fn skip_byte(&mut self, b: u8, at: usize) -> Result<(), String> {
        if self.scalar {
            match b {
                b'0'..=b'9' | b'a'..=b'z' | b'+' | b'-' | b'.' | b'E' => {}
                _ => {
                    self.scalar = false;
                    self.state = State::Next;
                    return self.step(b, at);
                }
            }
            return Ok(());
        }
        if self.nest == 0 {
            // The end of a top-level string value.
            self.state = State::Next;
            return self.step(b, at);
        }
        match b {
            b'"' => self.state = State::SkipString,
            b'{' | b'[' => self.nest += 1,
            b'}' | b']' => {
                self.nest -= 1;
                if self.nest == 0 {
                    self.state = State::Next;
                }
            }
            _ => {}
        }
        Ok(())
    }

    /// One byte of a key or wanted string value; true at its closing quote.
    fn string_byte(&mut self, b: u8, at: usize) -> Result<bool, String> {
        if self.unicode > 0 {
            let digit = (b as char)
                .to_digit(16)
                .ok_or_else(|| invalid(b, at, "a hex digit of \\u"))?;
            self.code = self.code * 16 + digit;
            self.unicode -= 1;
            if self.unicode == 0 {
                self.push_code(at)?;
            }
            return Ok(false);
        }
        if self.escaped {
            self.escaped = false;
            let c = match b {
                b'"' => '"',
                b'\\' => '\\',
                b'/' => '/',
                b'b' => '\u{8}',
                b'f' => '\u{c}',
                b'n' => '\n',
                b'r' => '\r',
                b't' => '\t',
                b'u' => {
                    self.unicode = 4;
                    self.code = 0;
                    return Ok(false);
                }
                _ => return Err(invalid(b, at, "an escape")),
            };
            self.push_char(c, at)?;
            return Ok(false);
        }
        match b {
            b'\\' => self.escaped = true,
            b'"' => {
                if self.high.is_some() {
                    return Err(format!("a lone surrogate escape before byte {at}"));
                }
                return Ok(true);
            }
            0..=0x1f => return Err(invalid(b, at, "a string character")),
            // UTF-8 is checked when the string ends: bytes go in as they come.
            _ => {
                if self.high.is_some() {
                    return Err(format!("a lone surrogate escape before byte {at}"));
                }
                self.text.push(b);
            }
        }
        Ok(false)
    }

    fn push_code(&mut self, at: usize) -> Result<(), String> {
        let code = self.code;
        match (self.high.take(), code) {
            (None, 0xD800..=0xDBFF) => {
                self.high = Some(code);
                Ok(())
            }
            (Some(high), 0xDC00..=0xDFFF) => {
                let c = 0x10000 + ((high - 0xD800) << 10) + (code - 0xDC00);
                self.push_char(char::from_u32(c).expect("a surrogate pair is a char"), at)
            }
            (None, 0xDC00..=0xDFFF) | (Some(_), _) => {
                Err(format!("a lone surrogate escape before byte {at}"))
            }
            (None, code) => self.push_char(char::from_u32(code).expect("not a surrogate"), at),
        }
    }

    fn push_char(&mut self, c: char, at: usize) -> Result<(), String> {
        if self.high.is_some() {
            return Err(format!("a lone surrogate escape before byte {at}"));
        }
        let mut utf8 = [0; 4];
        self.text
            .extend_from_slice(c.encode_utf8(&mut utf8).as_bytes());
        Ok(())
    }
}

fn invalid(b: u8, at: usize, expected: &str) -> String {
    let shown = if b.is_ascii_graphic() {
        format!("{:?}", b as char)
    } else {
        format!("byte 0x{b:02x}")
    };
    format!("the body is not valid JSON: {shown} at byte {at} where {expected} was expected")
}

#[cfg(test)]
mod tests {
    use super::*;

    const WANTED: &[&str] = &["model", "user"];

    /// Scans `body` fed in chunks of `step` bytes.
    fn scan(body: &str, step: usize) -> (Scan, Scanner<'static>) {
        let mut s = Scanner::new(WANTED);
        for chunk in body.as_bytes().chunks(step.max(1)) {
            match s.feed(chunk) {
                Scan::More => {}
                done => return (done, s),
            }
        }
        let end = s.finish();
        (end, s)
    }

    fn model(body: &str) -> Result<Option<String>, String> {
        let mut last = None;
        for step in [1, 2, 3, 7, body.len()] {
            let (scan, s) = scan(body, step);
            let got = match scan {
                Scan::Done => Ok(s.field(0).map(|f| f.value.clone())),
                Scan::Invalid(why) => Err(why),
                Scan::More => unreachable!(),
            };
            if let Some(prev) = &last {
                assert_eq!(prev, &got, "chunking changed the result for {body}");
            }
            last = Some(got);
        }
        last.unwrap()
    }

    #[test]
    fn the_top_level_model_is_found_wherever_it_is() {
        assert_eq!(model(r#"{"model":"chat"}"#), Ok(Some("chat".into())));
        assert_eq!(
            model(
                r#" { "stream" : true, "n": -1.5e3, "x": null, "messages": [{"model": "no"}], "model" : "chat" } "#
            ),
            Ok(Some("chat".into()))
        );
        assert_eq!(
            model(r#"{"m\u006fdel":"ch\"at\u00e9"}"#),
            Ok(Some("ch\"até".into()))
        );
        assert_eq!(
            model(r#"{"emoji":"\ud83d\ude00","model":"\ud83d\ude00"}"#),
            Ok(Some("😀".into()))
        );
    }

    #[test]
    fn a_nested_or_quoted_model_never_matches() {
        assert_eq!(
            model(r#"{"meta":{"model":"x"},"a":"\"model\": \"y\""}"#),
            Ok(None)
        );
        assert_eq!(
            model(r#"{"list":[{"model":"x"}],"s":"{\"model\":1}"}"#),
            Ok(None)
        );
        assert_eq!(model(r#"{}"#), Ok(None));
    }

    #[test]
    fn spans_cover_the_value_token() {
        let body = r#"{"a": [1, {"b": "}"}], "model" : "chat", "user": "u\u0031"}"#;
        let (scan, s) = scan(body, 5);
        assert_eq!(scan, Scan::Done);
        let m = s.field(0).unwrap();
        assert_eq!(&body[m.start..m.end], "\"chat\"");
        let u = s.field(1).unwrap();
        assert_eq!(u.value, "u1");
        assert_eq!(&body[u.start..u.end], r#""u\u0031""#);
    }

    #[test]
    fn what_two_parsers_could_read_differently_is_refused() {
        assert!(model(r#"{"model":"a","m\u006fdel":"b"}"#)
            .unwrap_err()
            .contains("twice"));
        assert!(model(r#"{"model":7}"#)
            .unwrap_err()
            .contains("not a string"));
        assert!(model(r#"["model","chat"]"#)
            .unwrap_err()
            .contains("not a JSON object"));
        assert!(model("").unwrap_err().contains("empty"));
        assert!(model(r#"{"model":"chat""#)
            .unwrap_err()
            .contains("ends before"));
        assert!(model(r#"{"model" "chat"}"#).unwrap_err().contains("':'"));
        assert!(model(r#"{"model":"\ud83d"}"#)
            .unwrap_err()
            .contains("surrogate"));
        assert!(model("{\"model\":\"a\nb\"}")
            .unwrap_err()
            .contains("string character"));
        assert!(model(r#"{"model":"\x"}"#).unwrap_err().contains("escape"));
        assert!(model(r#"{"a":1 "model":"x"}"#)
            .unwrap_err()
            .contains("',' or '}'"));
    }

    #[test]
    fn invalid_utf8_in_a_wanted_value_is_refused() {
        let mut s = Scanner::new(WANTED);
        assert_eq!(
            s.feed(b"{\"model\":\"\xff\"}"),
            Scan::Invalid("the body's \"model\" is not UTF-8".into())
        );
    }

    #[test]
    fn a_partial_body_asks_for_more() {
        let mut s = Scanner::new(WANTED);
        assert_eq!(s.feed(br#"{"model":"chat","messages":[{"#), Scan::More);
        assert_eq!(s.field(0).unwrap().value, "chat");
    }
}
