//! A reader for the literal subset that TinyNAS structure files use: what Python's
//! `ast.literal_eval` accepts for dicts, lists, tuples, strings, numbers, `True`/`False`/`None`,
//! and JSON (`true`/`false`/`null`, double quotes). Whitespace and newlines may stand anywhere
//! between tokens, as may `#` comments and backslash-newline continuations; lists, tuples and
//! dicts may end with a trailing comma. Every value remembers where it starts.

/// A 1-based line and column (columns count characters).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Position {
    pub line: usize,
    pub column: usize,
}

impl std::fmt::Display for Position {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(formatter, "line {}, column {}", self.line, self.column)
    }
}

/// A literal value.
#[derive(Clone, Debug, PartialEq)]
pub(super) enum Value {
    Int(i64),
    Float(f64),
    Str(String),
    Bool(bool),
    None,
    List(Vec<Node>),
    /// Entries in file order; keys are strings (the only keys the format uses).
    Dict(Vec<(String, Node)>),
}

impl Value {
    /// Returns a short description for error messages, e.g. `a list` or `the string 'x'`.
    pub fn describe(&self) -> String {
        match self {
            Value::Int(value) => format!("the integer {value}"),
            Value::Float(value) => format!("the number {value}"),
            Value::Str(text) => format!("the string {text:?}"),
            Value::Bool(value) => format!("the boolean {value}"),
            Value::None => "None".into(),
            Value::List(_) => "a list".into(),
            Value::Dict(_) => "a dict".into(),
        }
    }
}

/// A value and where it starts.
#[derive(Clone, Debug, PartialEq)]
pub(super) struct Node {
    pub value: Value,
    pub at: Position,
}

/// A syntax error and where it is.
#[derive(Clone, Debug, PartialEq)]
pub(super) struct SyntaxError {
    pub at: Position,
    pub reason: String,
}

/// How deeply lists and dicts may nest; the format needs 4, this keeps hostile input from
/// exhausting the stack.
const MAX_NESTING: usize = 32;

/// Parses `text` as one literal followed by nothing but whitespace and comments.
pub(super) fn parse(text: &str) -> Result<Node, SyntaxError> {
    let mut reader = Reader {
        chars: text.chars().collect(),
        offset: 0,
        at: Position { line: 1, column: 1 },
    };
    let node = reader.value(0)?;
    reader.skip_blank()?;
    if let Some(next) = reader.peek() {
        return Err(reader.error(format!("unexpected {next:?} after the end of the literal")));
    }
    Ok(node)
}

struct Reader {
    chars: Vec<char>,
    offset: usize,
    at: Position,
}

impl Reader {
    fn peek(&self) -> Option<char> {
        self.chars.get(self.offset).copied()
    }

    fn bump(&mut self) -> Option<char> {
        let next = self.peek()?;
        self.offset += 1;
        if next == '\n' {
            self.at.line += 1;
            self.at.column = 1;
        } else {
            self.at.column += 1;
        }
        Some(next)
    }

    fn error(&self, reason: String) -> SyntaxError {
        SyntaxError {
            at: self.at,
            reason,
        }
    }

    /// Skips whitespace, `#` comments and backslash-newline continuations.
    fn skip_blank(&mut self) -> Result<(), SyntaxError> {
        while let Some(next) = self.peek() {
            match next {
                ' ' | '\t' | '\n' | '\r' | '\u{c}' => {
                    self.bump();
                }
                '#' => {
                    while self.peek().is_some_and(|c| c != '\n') {
                        self.bump();
                    }
                }
                '\\' => {
                    let after = self.chars.get(self.offset + 1).copied();
                    let after_cr = self.chars.get(self.offset + 2).copied();
                    let continues =
                        after == Some('\n') || (after == Some('\r') && after_cr == Some('\n'));
                    if !continues {
                        return Err(
                            self.error("a backslash outside a string must end the line".into())
                        );
                    }
                    self.bump();
                }
                _ => return Ok(()),
            }
        }
        Ok(())
    }

    fn value(&mut self, depth: usize) -> Result<Node, SyntaxError> {
        self.skip_blank()?;
        let at = self.at;
        let Some(next) = self.peek() else {
            return Err(self.error("the text ends where a value should start".into()));
        };
        if depth >= MAX_NESTING && matches!(next, '[' | '(' | '{') {
            return Err(self.error(format!("lists and dicts nest more than {MAX_NESTING} deep")));
        }
        let value = match next {
            '[' => Value::List(self.sequence(']', depth)?),
            '(' => Value::List(self.sequence(')', depth)?),
            '{' => Value::Dict(self.dict(depth)?),
            '\'' | '"' => Value::Str(self.string()?),
            '-' | '+' | '.' | '0'..='9' => self.number()?,
            c if c.is_ascii_alphabetic() || c == '_' => self.word()?,
            other => {
                return Err(self.error(format!("unexpected {other:?} where a value should start")))
            }
        };
        Ok(Node { value, at })
    }

    /// Reads `[a, b, ...]` or `(a, b, ...)` after checking the opening bracket.
    fn sequence(&mut self, close: char, depth: usize) -> Result<Vec<Node>, SyntaxError> {
        self.bump();
        let mut items = Vec::new();
        loop {
            self.skip_blank()?;
            if self.peek() == Some(close) {
                self.bump();
                return Ok(items);
            }
            items.push(self.value(depth + 1)?);
            self.skip_blank()?;
            match self.peek() {
                Some(',') => {
                    self.bump();
                }
                Some(c) if c == close => {}
                Some(other) => {
                    return Err(self.error(format!("expected ',' or {close:?} but found {other:?}")))
                }
                None => {
                    return Err(self.error(format!("the text ends before the closing {close:?}")))
                }
            }
        }
    }

    /// Reads `{'key': value, ...}`; keys must be strings and unique.
    fn dict(&mut self, depth: usize) -> Result<Vec<(String, Node)>, SyntaxError> {
        self.bump();
        let mut entries: Vec<(String, Node)> = Vec::new();
        loop {
            self.skip_blank()?;
            match self.peek() {
                Some('}') => {
                    self.bump();
                    return Ok(entries);
                }
                Some('\'' | '"') => {}
                Some(other) => {
                    return Err(
                        self.error(format!("expected a quoted key or '}}' but found {other:?}"))
                    )
                }
                None => return Err(self.error("the text ends before the closing '}'".into())),
            }
            let key_at = self.at;
            let key = self.string()?;
            if entries.iter().any(|(seen, _)| *seen == key) {
                return Err(SyntaxError {
                    at: key_at,
                    reason: format!("the key {key:?} appears twice in one dict"),
                });
            }
            self.skip_blank()?;
            if self.bump() != Some(':') {
                return Err(SyntaxError {
                    at: self.at,
                    reason: format!("expected ':' after the key {key:?}"),
                });
            }
            let value = self.value(depth + 1)?;
            entries.push((key, value));
            self.skip_blank()?;
            match self.peek() {
                Some(',') => {
                    self.bump();
                }
                Some('}') => {}
                Some(other) => {
                    return Err(self.error(format!("expected ',' or '}}' but found {other:?}")))
                }
                None => return Err(self.error("the text ends before the closing '}'".into())),
            }
        }
    }

    /// Reads a single- or double-quoted string with the common backslash escapes.
    fn string(&mut self) -> Result<String, SyntaxError> {
        let start = self.at;
        let quote = self.bump().expect("called at a quote");
        let mut text = String::new();
        loop {
            match self.bump() {
                None | Some('\n') => {
                    return Err(SyntaxError {
                        at: start,
                        reason: "this string is not closed on its line".into(),
                    })
                }
                Some(c) if c == quote => return Ok(text),
                Some('\\') => text.push(self.escape()?),
                Some(c) => text.push(c),
            }
        }
    }

    fn escape(&mut self) -> Result<char, SyntaxError> {
        match self.bump() {
            Some('n') => Ok('\n'),
            Some('t') => Ok('\t'),
            Some('r') => Ok('\r'),
            Some(c @ ('\\' | '\'' | '"' | '/')) => Ok(c),
            Some(other) => Err(self.error(format!("unsupported escape \\{other} in a string"))),
            None => Err(self.error("the text ends inside a string".into())),
        }
    }

    /// Reads an integer or a decimal number.
    fn number(&mut self) -> Result<Value, SyntaxError> {
        let start = self.at;
        let mut text = String::new();
        while let Some(c) = self
            .peek()
            .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '+' | '.'))
        {
            // A sign is part of the number only at its start or right after an exponent.
            if matches!(c, '-' | '+') && !(text.is_empty() || text.ends_with(['e', 'E'])) {
                break;
            }
            text.push(c);
            self.bump();
        }
        let bad = |reason: String| SyntaxError { at: start, reason };
        if text
            .chars()
            .all(|c| c.is_ascii_digit() || c == '-' || c == '+')
        {
            return text
                .parse::<i64>()
                .map(Value::Int)
                .map_err(|_| bad(format!("{text:?} is not an integer that fits in 64 bits")));
        }
        match text.parse::<f64>() {
            Ok(value) if value.is_finite() => Ok(Value::Float(value)),
            _ => Err(bad(format!("{text:?} is not a number"))),
        }
    }

    /// Reads `True`, `False`, `None` or their JSON spellings.
    fn word(&mut self) -> Result<Value, SyntaxError> {
        let start = self.at;
        let mut word = String::new();
        while let Some(c) = self
            .peek()
            .filter(|c| c.is_ascii_alphanumeric() || *c == '_')
        {
            word.push(c);
            self.bump();
        }
        match word.as_str() {
            "True" | "true" => Ok(Value::Bool(true)),
            "False" | "false" => Ok(Value::Bool(false)),
            "None" | "null" => Ok(Value::None),
            _ => Err(SyntaxError {
                at: start,
                reason: format!("{word:?} is not a literal (names and calls are not allowed)"),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn int(node: &Node) -> i64 {
        match node.value {
            Value::Int(value) => value,
            ref other => panic!("not an int: {other:?}"),
        }
    }

    #[test]
    fn reads_python_quirks() {
        let text = "{ 'a': [1, -2, (3,),],  # a comment\n 'b' : \\\n  \"x\\'y\", 'c': True, 'd': None, 'e': 2.5, }";
        let node = parse(text).unwrap();
        let Value::Dict(entries) = &node.value else {
            panic!("not a dict")
        };
        assert_eq!(entries.len(), 5);
        let Value::List(items) = &entries[0].1.value else {
            panic!("not a list")
        };
        assert_eq!(int(&items[0]), 1);
        assert_eq!(int(&items[1]), -2);
        assert_eq!(
            items[2].value,
            Value::List(vec![Node {
                value: Value::Int(3),
                at: Position {
                    line: 1,
                    column: 17
                }
            }])
        );
        assert_eq!(entries[1].1.value, Value::Str("x'y".into()));
        assert_eq!(entries[1].1.at, Position { line: 3, column: 3 });
        assert_eq!(entries[2].1.value, Value::Bool(true));
        assert_eq!(entries[3].1.value, Value::None);
        assert_eq!(entries[4].1.value, Value::Float(2.5));
    }

    #[test]
    fn errors_say_where() {
        let cases = [
            ("[1, 2", Position { line: 1, column: 6 }, "closing ']'"),
            (
                "{'a': 1\n 'b': 2}",
                Position { line: 2, column: 2 },
                "expected ','",
            ),
            (
                "{'a': 1, 'a': 2}",
                Position {
                    line: 1,
                    column: 10,
                },
                "twice",
            ),
            ("[1] x", Position { line: 1, column: 5 }, "after the end"),
            (
                "{'a': open('f')}",
                Position { line: 1, column: 7 },
                "not a literal",
            ),
            ("{1: 2}", Position { line: 1, column: 2 }, "quoted key"),
            ("['abc\n]", Position { line: 1, column: 2 }, "not closed"),
            ("[1, \\ 2]", Position { line: 1, column: 5 }, "backslash"),
            (
                "[99999999999999999999]",
                Position { line: 1, column: 2 },
                "64 bits",
            ),
        ];
        for (text, at, words) in cases {
            let error = parse(text).unwrap_err();
            assert_eq!(error.at, at, "{text:?}: {error:?}");
            assert!(error.reason.contains(words), "{text:?}: {error:?}");
        }
    }

    #[test]
    fn deep_nesting_is_an_error_not_a_crash() {
        let text = "[".repeat(10_000);
        let error = parse(&text).unwrap_err();
        assert!(error.reason.contains("nest"), "{error:?}");
    }
}
