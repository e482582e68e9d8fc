//! Lexer and recursive-descent parser of the filter language; `Display` prints an expression
//! back in a form `parse` accepts (used by the property test).

use super::{Cmp, Value};

/// A parsed expression.
#[derive(Debug, Clone, PartialEq)]
pub enum Expr {
    Cmp(Operand, Cmp, Operand),
    In(Operand, Vec<Value>),
    StartsWith(Operand, String),
    Exists(Operand),
    Not(Box<Expr>),
    And(Box<Expr>, Box<Expr>),
    Or(Box<Expr>, Box<Expr>),
}

/// A side of a comparison.
#[derive(Debug, Clone, PartialEq)]
pub enum Operand {
    Key,
    Header(String),
    Lit(Value),
}

/// A syntax error at a 1-based character column.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseError {
    pub column: usize,
    pub message: String,
}

impl std::fmt::Display for ParseError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "filter syntax error at column {}: {}",
            self.column, self.message
        )
    }
}

impl std::error::Error for ParseError {}

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Ident(String),
    Key,
    Str(String),
    Num(f64),
    Cmp(Cmp),
    And,
    Or,
    Not,
    In,
    Exists,
    Starts,
    With,
    LParen,
    RParen,
    Comma,
    End,
}

fn describe(t: &Tok) -> String {
    match t {
        Tok::Ident(s) => format!("name {s:?}"),
        Tok::Key => "$key".into(),
        Tok::Str(s) => format!("string {s:?}"),
        Tok::Num(n) => format!("number {n}"),
        Tok::Cmp(c) => format!("'{}'", c.symbol()),
        Tok::And => "AND".into(),
        Tok::Or => "OR".into(),
        Tok::Not => "NOT".into(),
        Tok::In => "IN".into(),
        Tok::Exists => "EXISTS".into(),
        Tok::Starts => "STARTS".into(),
        Tok::With => "WITH".into(),
        Tok::LParen => "'('".into(),
        Tok::RParen => "')'".into(),
        Tok::Comma => "','".into(),
        Tok::End => "end of input".into(),
    }
}

/// Max nesting depth (bounded recursion on untrusted input).
const DEPTH_MAX: usize = 64;
/// Max filter length in characters.
pub const FILTER_CHARS_MAX: usize = 4096;

fn lex(src: &str) -> Result<Vec<(Tok, usize)>, ParseError> {
    let chars: Vec<char> = src.chars().collect();
    if chars.len() > FILTER_CHARS_MAX {
        return Err(ParseError {
            column: FILTER_CHARS_MAX,
            message: format!("filter longer than {FILTER_CHARS_MAX} characters"),
        });
    }
    let mut out = Vec::new();
    let mut i = 0;
    let err = |i: usize, m: String| ParseError {
        column: i + 1,
        message: m,
    };
    while i < chars.len() {
        let c = chars[i];
        let start = i;
        if c.is_whitespace() {
            i += 1;
            continue;
        }
        let two: String = chars[i..(i + 2).min(chars.len())].iter().collect();
        let tok = match (c, two.as_str()) {
            (_, "==") => {
                i += 2;
                Tok::Cmp(Cmp::Eq)
            }
            (_, "!=") => {
                i += 2;
                Tok::Cmp(Cmp::Ne)
            }
            (_, "<=") => {
                i += 2;
                Tok::Cmp(Cmp::Le)
            }
            (_, ">=") => {
                i += 2;
                Tok::Cmp(Cmp::Ge)
            }
            (_, "&&") => {
                i += 2;
                Tok::And
            }
            (_, "||") => {
                i += 2;
                Tok::Or
            }
            ('<', _) => {
                i += 1;
                Tok::Cmp(Cmp::Lt)
            }
            ('>', _) => {
                i += 1;
                Tok::Cmp(Cmp::Gt)
            }
            ('!', _) => {
                i += 1;
                Tok::Not
            }
            ('(', _) => {
                i += 1;
                Tok::LParen
            }
            (')', _) => {
                i += 1;
                Tok::RParen
            }
            (',', _) => {
                i += 1;
                Tok::Comma
            }
            ('"' | '\'', _) => {
                let quote = c;
                i += 1;
                let mut s = String::new();
                loop {
                    match chars.get(i) {
                        None => return Err(err(start, "unterminated string".into())),
                        Some('\\') => {
                            match chars.get(i + 1) {
                                Some(&e @ ('\\' | '"' | '\'')) => s.push(e),
                                _ => {
                                    return Err(err(i, "bad escape: use \\\\, \\\" or \\'".into()))
                                }
                            }
                            i += 2;
                        }
                        Some(&q) if q == quote => {
                            i += 1;
                            break;
                        }
                        Some(&x) => {
                            s.push(x);
                            i += 1;
                        }
                    }
                }
                Tok::Str(s)
            }
            (d, _)
                if d.is_ascii_digit()
                    || (d == '-' && chars.get(i + 1).is_some_and(|n| n.is_ascii_digit())) =>
            {
                i += 1;
                while i < chars.len()
                    && (chars[i].is_ascii_digit()
                        || matches!(chars[i], '.' | 'e' | 'E' | '+' | '-'))
                {
                    if matches!(chars[i], '+' | '-') && !matches!(chars[i - 1], 'e' | 'E') {
                        break;
                    }
                    i += 1;
                }
                let text: String = chars[start..i].iter().collect();
                let n: f64 = text
                    .parse()
                    .map_err(|_| err(start, format!("bad number {text:?}")))?;
                if !n.is_finite() {
                    return Err(err(start, format!("number {text:?} out of range")));
                }
                Tok::Num(n)
            }
            ('$', _) => {
                let word: String = chars[i..]
                    .iter()
                    .take_while(|c| c.is_alphanumeric() || **c == '$' || **c == '_')
                    .collect();
                if word != "$key" {
                    return Err(err(start, format!("unknown field {word:?} (only $key)")));
                }
                i += word.chars().count();
                Tok::Key
            }
            (a, _) if a.is_alphabetic() || a == '_' => {
                while i < chars.len()
                    && (chars[i].is_alphanumeric() || matches!(chars[i], '_' | '.' | '-'))
                {
                    i += 1;
                }
                let word: String = chars[start..i].iter().collect();
                match word.to_ascii_uppercase().as_str() {
                    "AND" => Tok::And,
                    "OR" => Tok::Or,
                    "NOT" => Tok::Not,
                    "IN" => Tok::In,
                    "EXISTS" => Tok::Exists,
                    "STARTS" => Tok::Starts,
                    "WITH" => Tok::With,
                    _ => Tok::Ident(word),
                }
            }
            _ => return Err(err(start, format!("unexpected character {c:?}"))),
        };
        out.push((tok, start));
    }
    out.push((Tok::End, chars.len()));
    Ok(out)
}

struct Parser {
    toks: Vec<(Tok, usize)>,
    at: usize,
    depth: usize,
}

impl Parser {
    fn peek(&self) -> &Tok {
        &self.toks[self.at.min(self.toks.len() - 1)].0
    }

    fn col(&self) -> usize {
        self.toks[self.at.min(self.toks.len() - 1)].1 + 1
    }

    fn next(&mut self) -> Tok {
        let t = self.peek().clone();
        if self.at < self.toks.len() - 1 {
            self.at += 1;
        }
        t
    }

    /// Consumes `t` or fails naming `what`.
    fn expect(&mut self, t: Tok, what: &str) -> Result<(), ParseError> {
        if *self.peek() == t {
            self.next();
            Ok(())
        } else {
            self.fail(what)
        }
    }

    fn fail<T>(&self, what: &str) -> Result<T, ParseError> {
        Err(ParseError {
            column: self.col(),
            message: format!("expected {what}, found {}", describe(self.peek())),
        })
    }

    fn expr(&mut self) -> Result<Expr, ParseError> {
        self.depth += 1;
        if self.depth > DEPTH_MAX {
            return Err(ParseError {
                column: self.col(),
                message: format!("nested deeper than {DEPTH_MAX}"),
            });
        }
        let mut left = self.and()?;
        while *self.peek() == Tok::Or {
            self.next();
            left = Expr::Or(Box::new(left), Box::new(self.and()?));
        }
        self.depth -= 1;
        Ok(left)
    }

    fn and(&mut self) -> Result<Expr, ParseError> {
        let mut left = self.unary()?;
        while *self.peek() == Tok::And {
            self.next();
            left = Expr::And(Box::new(left), Box::new(self.unary()?));
        }
        Ok(left)
    }

    fn unary(&mut self) -> Result<Expr, ParseError> {
        match self.peek() {
            Tok::Not => {
                self.next();
                self.depth += 1;
                if self.depth > DEPTH_MAX {
                    return Err(ParseError {
                        column: self.col(),
                        message: format!("nested deeper than {DEPTH_MAX}"),
                    });
                }
                let e = self.unary()?;
                self.depth -= 1;
                Ok(Expr::Not(Box::new(e)))
            }
            Tok::LParen => {
                self.next();
                let e = self.expr()?;
                self.expect(Tok::RParen, "')'")?;
                Ok(e)
            }
            Tok::Exists => {
                self.next();
                let f = self.field()?;
                Ok(Expr::Exists(f))
            }
            _ => self.test(),
        }
    }

    fn field(&mut self) -> Result<Operand, ParseError> {
        match self.peek().clone() {
            Tok::Ident(n) => {
                self.next();
                Ok(Operand::Header(n))
            }
            Tok::Key => {
                self.next();
                Ok(Operand::Key)
            }
            _ => self.fail("a header name or $key"),
        }
    }

    fn operand(&mut self) -> Result<Operand, ParseError> {
        match self.peek().clone() {
            Tok::Str(s) => {
                self.next();
                Ok(Operand::Lit(Value::Str(s)))
            }
            Tok::Num(n) => {
                self.next();
                Ok(Operand::Lit(Value::Num(n)))
            }
            Tok::Ident(_) | Tok::Key => self.field(),
            _ => self.fail("a header name, $key, a string or a number"),
        }
    }

    fn literal(&mut self) -> Result<Value, ParseError> {
        let v = match self.peek() {
            Tok::Str(s) => Value::Str(s.clone()),
            Tok::Num(n) => Value::Num(*n),
            _ => return self.fail("a string or a number"),
        };
        self.next();
        Ok(v)
    }

    fn test(&mut self) -> Result<Expr, ParseError> {
        let left = self.operand()?;
        let is_field = !matches!(left, Operand::Lit(_));
        match self.peek().clone() {
            Tok::Cmp(c) => {
                self.next();
                let right = self.operand()?;
                Ok(Expr::Cmp(left, c, right))
            }
            Tok::In if is_field => {
                self.next();
                self.expect(Tok::LParen, "'(' after IN")?;
                let mut list = vec![self.literal()?];
                while *self.peek() == Tok::Comma {
                    self.next();
                    list.push(self.literal()?);
                }
                self.expect(Tok::RParen, "',' or ')'")?;
                Ok(Expr::In(left, list))
            }
            Tok::Starts if is_field => {
                self.next();
                self.expect(Tok::With, "WITH after STARTS")?;
                match self.peek().clone() {
                    Tok::Str(s) => {
                        self.next();
                        Ok(Expr::StartsWith(left, s))
                    }
                    _ => self.fail("a string after STARTS WITH"),
                }
            }
            Tok::Exists if is_field => {
                self.next();
                Ok(Expr::Exists(left))
            }
            _ => self.fail("a comparison (==, !=, <, <=, >, >=), IN, STARTS WITH or EXISTS"),
        }
    }
}

/// Parses a filter expression.
pub fn parse(src: &str) -> Result<Expr, ParseError> {
    let toks = lex(src)?;
    let mut p = Parser {
        toks,
        at: 0,
        depth: 0,
    };
    if *p.peek() == Tok::End {
        return p.fail("an expression");
    }
    let e = p.expr()?;
    if *p.peek() != Tok::End {
        return p.fail("AND, OR or the end");
    }
    Ok(e)
}

fn fmt_value(v: &Value, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
    match v {
        Value::Num(n) => write!(f, "{n:?}"),
        Value::Str(s) => write!(f, "\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\"")),
    }
}

impl std::fmt::Display for Operand {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Operand::Key => write!(f, "$key"),
            Operand::Header(h) => write!(f, "{h}"),
            Operand::Lit(v) => fmt_value(v, f),
        }
    }
}

impl std::fmt::Display for Expr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Expr::Cmp(a, c, b) => write!(f, "{a} {} {b}", c.symbol()),
            Expr::In(a, l) => {
                write!(f, "{a} IN (")?;
                for (i, v) in l.iter().enumerate() {
                    if i > 0 {
                        write!(f, ", ")?;
                    }
                    fmt_value(v, f)?;
                }
                write!(f, ")")
            }
            Expr::StartsWith(a, p) => write!(
                f,
                "{a} STARTS WITH \"{}\"",
                p.replace('\\', "\\\\").replace('"', "\\\"")
            ),
            Expr::Exists(a) => write!(f, "EXISTS {a}"),
            Expr::Not(x) => write!(f, "NOT ({x})"),
            Expr::And(x, y) => write!(f, "({x}) AND ({y})"),
            Expr::Or(x, y) => write!(f, "({x}) OR ({y})"),
        }
    }
}
