//! A small subset of CEL, enough for the `matchConditions` the chart ships
//! and their like: `!`, `&&`, `||`, parentheses, `true`/`false`,
//! `has(object.metadata.labels)`, `'key' in object.metadata.labels`,
//! `object.metadata.labels['key'] == 'value'` (`!=` too), for `labels`,
//! `annotations` and `object.metadata.name`/`namespace`. Anything else is
//! reported as unknown, never guessed.

use std::collections::BTreeMap;

/// The outcome of one expression.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CelOutcome {
    True,
    False,
    /// Outside the subset, or an evaluation error (which the API server
    /// handles by the failurePolicy).
    Unknown(String),
}

/// The parts of the admitted object the subset can read.
#[derive(Debug, Clone, Default)]
pub struct ObjectMeta<'a> {
    pub name: Option<&'a str>,
    pub namespace: Option<&'a str>,
    pub labels: Option<&'a BTreeMap<String, String>>,
    pub annotations: Option<&'a BTreeMap<String, String>>,
}

pub fn evaluate(expression: &str, object: &ObjectMeta<'_>) -> CelOutcome {
    let tokens = match tokenize(expression) {
        Ok(tokens) => tokens,
        Err(reason) => return CelOutcome::Unknown(reason),
    };
    let mut parser = Parser {
        tokens: &tokens,
        at: 0,
        object,
    };
    let value = parser.or();
    let value = match (value, parser.at == tokens.len()) {
        (Ok(value), true) => value,
        (Ok(_), false) => return CelOutcome::Unknown(unsupported(&tokens[parser.at])),
        (Err(Failure::Unsupported(reason)), _) => return CelOutcome::Unknown(reason),
        (Err(Failure::Error(reason)), _) => {
            return CelOutcome::Unknown(format!("evaluation error: {reason}"));
        }
    };
    match value {
        Val::Bool(true) => CelOutcome::True,
        Val::Bool(false) => CelOutcome::False,
        _ => CelOutcome::Unknown("the expression is not a boolean".into()),
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Token {
    Open,
    Close,
    OpenBracket,
    CloseBracket,
    Not,
    And,
    Or,
    Equal,
    NotEqual,
    Str(String),
    /// An identifier or a dotted path.
    Name(String),
}

fn unsupported(token: &Token) -> String {
    format!("unsupported CEL at {token:?}")
}

fn tokenize(text: &str) -> Result<Vec<Token>, String> {
    let mut tokens = Vec::new();
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        let token = match c {
            c if c.is_whitespace() => continue,
            '(' => Token::Open,
            ')' => Token::Close,
            '[' => Token::OpenBracket,
            ']' => Token::CloseBracket,
            '!' if chars.peek() == Some(&'=') => {
                chars.next();
                Token::NotEqual
            }
            '!' => Token::Not,
            '&' if chars.next() == Some('&') => Token::And,
            '|' if chars.next() == Some('|') => Token::Or,
            '=' if chars.next() == Some('=') => Token::Equal,
            '\'' | '"' => {
                let mut literal = String::new();
                loop {
                    match chars.next() {
                        Some(end) if end == c => break,
                        Some('\\') => return Err("escapes in CEL strings are not supported".into()),
                        Some(ch) => literal.push(ch),
                        None => return Err("unterminated string".into()),
                    }
                }
                Token::Str(literal)
            }
            c if c.is_ascii_alphabetic() || c == '_' => {
                let mut name = c.to_string();
                while let Some(&next) = chars.peek() {
                    if next.is_ascii_alphanumeric() || next == '_' || next == '.' {
                        name.push(next);
                        chars.next();
                    } else {
                        break;
                    }
                }
                Token::Name(name)
            }
            other => return Err(format!("unsupported CEL character {other:?}")),
        };
        tokens.push(token);
    }
    Ok(tokens)
}

#[derive(Debug, Clone, PartialEq)]
enum Val<'a> {
    Bool(bool),
    Str(String),
    /// A map field; `None` when the object does not have it.
    Map(&'static str, Option<&'a BTreeMap<String, String>>),
}

enum Failure {
    Unsupported(String),
    /// A CEL runtime error (e.g. a missing key).
    Error(String),
}

type Parsed<'a> = Result<Val<'a>, Failure>;

struct Parser<'t, 'o> {
    tokens: &'t [Token],
    at: usize,
    object: &'t ObjectMeta<'o>,
}

impl<'o> Parser<'_, 'o> {
    fn peek(&self) -> Option<&Token> {
        self.tokens.get(self.at)
    }

    fn next(&mut self) -> Result<Token, Failure> {
        let token = self
            .peek()
            .cloned()
            .ok_or_else(|| Failure::Unsupported("unexpected end of expression".into()))?;
        self.at += 1;
        Ok(token)
    }

    fn expect(&mut self, wanted: Token) -> Result<(), Failure> {
        match self.next()? {
            token if token == wanted => Ok(()),
            other => Err(Failure::Unsupported(unsupported(&other))),
        }
    }

    /// CEL's `||` and `&&` are commutative over errors: `true || error` is true.
    fn or(&mut self) -> Parsed<'o> {
        let mut left = self.and();
        while self.peek() == Some(&Token::Or) {
            self.at += 1;
            let right = self.and();
            left = logic(left, right, true);
        }
        left
    }

    fn and(&mut self) -> Parsed<'o> {
        let mut left = self.comparison();
        while self.peek() == Some(&Token::And) {
            self.at += 1;
            let right = self.comparison();
            left = logic(left, right, false);
        }
        left
    }

    fn comparison(&mut self) -> Parsed<'o> {
        let left = self.unary();
        let equal = match self.peek() {
            Some(Token::Equal) => true,
            Some(Token::NotEqual) => false,
            Some(Token::Name(name)) if name == "in" => {
                self.at += 1;
                let map = self.unary()?;
                return match (left?, map) {
                    (Val::Str(key), Val::Map(_, Some(map))) => {
                        Ok(Val::Bool(map.contains_key(&key)))
                    }
                    (Val::Str(_), Val::Map(field, None)) => {
                        Err(Failure::Error(format!("no such key: {field}")))
                    }
                    _ => Err(Failure::Unsupported("`in` needs a string and a map".into())),
                };
            }
            _ => return left,
        };
        self.at += 1;
        let right = self.unary()?;
        match (left?, right) {
            (Val::Str(a), Val::Str(b)) => Ok(Val::Bool((a == b) == equal)),
            (Val::Bool(a), Val::Bool(b)) => Ok(Val::Bool((a == b) == equal)),
            _ => Err(Failure::Unsupported("comparison of different types".into())),
        }
    }

    fn unary(&mut self) -> Parsed<'o> {
        if self.peek() == Some(&Token::Not) {
            self.at += 1;
            return match self.unary()? {
                Val::Bool(b) => Ok(Val::Bool(!b)),
                _ => Err(Failure::Unsupported("`!` needs a boolean".into())),
            };
        }
        self.primary()
    }

    fn primary(&mut self) -> Parsed<'o> {
        match self.next()? {
            Token::Open => {
                let value = self.or();
                self.expect(Token::Close)?;
                value
            }
            Token::Str(s) => Ok(Val::Str(s)),
            Token::Name(name) if name == "true" => Ok(Val::Bool(true)),
            Token::Name(name) if name == "false" => Ok(Val::Bool(false)),
            Token::Name(name) if name == "has" => {
                self.expect(Token::Open)?;
                let path = match self.next()? {
                    Token::Name(path) => path,
                    other => return Err(Failure::Unsupported(unsupported(&other))),
                };
                self.expect(Token::Close)?;
                let present = match path.as_str() {
                    "object.metadata.labels" => self.object.labels.is_some(),
                    "object.metadata.annotations" => self.object.annotations.is_some(),
                    "object.metadata.name" => self.object.name.is_some(),
                    "object.metadata.namespace" => self.object.namespace.is_some(),
                    other => return Err(Failure::Unsupported(format!("has({other})"))),
                };
                Ok(Val::Bool(present))
            }
            Token::Name(path) => {
                let value = self.field(&path)?;
                if self.peek() != Some(&Token::OpenBracket) {
                    return Ok(value);
                }
                self.at += 1;
                let key = match self.next()? {
                    Token::Str(key) => key,
                    other => return Err(Failure::Unsupported(unsupported(&other))),
                };
                self.expect(Token::CloseBracket)?;
                match value {
                    Val::Map(_, Some(map)) => map
                        .get(&key)
                        .map(|v| Val::Str(v.clone()))
                        .ok_or_else(|| Failure::Error(format!("no such key: {key}"))),
                    Val::Map(field, None) => Err(Failure::Error(format!("no such key: {field}"))),
                    _ => Err(Failure::Unsupported(format!("{path}[...]"))),
                }
            }
            other => Err(Failure::Unsupported(unsupported(&other))),
        }
    }

    fn field(&self, path: &str) -> Parsed<'o> {
        let text = |value: Option<&str>, field: &str| {
            value
                .map(|v| Val::Str(v.to_string()))
                .ok_or_else(|| Failure::Error(format!("no such key: {field}")))
        };
        match path {
            "object.metadata.labels" => Ok(Val::Map("labels", self.object.labels)),
            "object.metadata.annotations" => Ok(Val::Map("annotations", self.object.annotations)),
            "object.metadata.name" => text(self.object.name, "name"),
            "object.metadata.namespace" => text(self.object.namespace, "namespace"),
            other => Err(Failure::Unsupported(format!(
                "unsupported CEL name {other}"
            ))),
        }
    }
}

fn logic<'o>(left: Parsed<'o>, right: Parsed<'o>, or: bool) -> Parsed<'o> {
    let as_bool = |v: Parsed<'o>| match v {
        Ok(Val::Bool(b)) => Ok(b),
        Ok(_) => Err(Failure::Unsupported("`&&`/`||` need booleans".into())),
        Err(failure) => Err(failure),
    };
    match (as_bool(left), as_bool(right)) {
        // An unsupported part is never overruled: the whole stays unknown.
        (Err(Failure::Unsupported(r)), _) | (_, Err(Failure::Unsupported(r))) => {
            Err(Failure::Unsupported(r))
        }
        (Ok(a), Ok(b)) => Ok(Val::Bool(if or { a || b } else { a && b })),
        (Ok(decisive), Err(_)) | (Err(_), Ok(decisive)) if decisive == or => Ok(Val::Bool(or)),
        (Err(e), _) | (_, Err(e)) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CHART: &str = "!has(object.metadata.labels) || !('metrics.chiller.io/injected' in object.metadata.labels)";

    fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn the_charts_condition() {
        let none = ObjectMeta::default();
        assert_eq!(evaluate(CHART, &none), CelOutcome::True);
        let other = map(&[("app", "api")]);
        let object = ObjectMeta {
            labels: Some(&other),
            ..Default::default()
        };
        assert_eq!(evaluate(CHART, &object), CelOutcome::True);
        let injected = map(&[("app", "api"), ("metrics.chiller.io/injected", "true")]);
        let object = ObjectMeta {
            labels: Some(&injected),
            ..Default::default()
        };
        assert_eq!(evaluate(CHART, &object), CelOutcome::False);
    }

    #[test]
    fn indexing_comparisons_and_precedence() {
        let labels = map(&[("app", "api"), ("tier", "web")]);
        let annotations = map(&[("x", "1")]);
        let object = ObjectMeta {
            name: Some("api-0"),
            labels: Some(&labels),
            annotations: Some(&annotations),
            ..Default::default()
        };
        for (expression, expected) in [
            ("object.metadata.labels['app'] == 'api'", true),
            ("object.metadata.labels[\"app\"] != 'api'", false),
            ("false || true && false", false),
            ("(false || true) && true", true),
            ("!('x' in object.metadata.annotations)", false),
            (
                "object.metadata.name == 'api-0' && has(object.metadata.annotations)",
                true,
            ),
            ("!has(object.metadata.namespace)", true),
        ] {
            let outcome = evaluate(expression, &object);
            let expected = if expected {
                CelOutcome::True
            } else {
                CelOutcome::False
            };
            assert_eq!(outcome, expected, "{expression}");
        }
    }

    #[test]
    fn errors_follow_cel_commutative_logic() {
        let object = ObjectMeta::default();
        // Unguarded access to missing labels is an error...
        assert!(matches!(
            evaluate("'a' in object.metadata.labels", &object),
            CelOutcome::Unknown(reason) if reason.contains("evaluation error")
        ));
        // ...unless the other side of || is true, on either side.
        assert_eq!(
            evaluate("'a' in object.metadata.labels || true", &object),
            CelOutcome::True
        );
        assert_eq!(
            evaluate("false && object.metadata.labels['a'] == 'b'", &object),
            CelOutcome::False
        );
    }

    #[test]
    fn anything_else_is_unknown() {
        let object = ObjectMeta::default();
        for expression in [
            "object.spec.containers.size() > 1",
            "request.userInfo.username == 'admin'",
            "has(object.spec)",
            "object.metadata.labels.exists(k, k == 'a')",
            "true true",
            "'a' + 'b' == 'ab'",
            "authorizer.requestResource.check('x').allowed()",
            "true || object.spec.x == 'y'",
        ] {
            assert!(
                matches!(evaluate(expression, &object), CelOutcome::Unknown(_)),
                "{expression}"
            );
        }
    }
}
