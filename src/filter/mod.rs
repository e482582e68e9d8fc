//! Content filters: a small expression language over a message's key and headers, evaluated on
//! the shard that owns the partition so filtered-out messages never leave it.
//!
//! Owns: lexing, parsing (errors name the position), compiling to a stack program, evaluation.
//! Must not touch: I/O. Grammar (keywords case-insensitive):
//!
//! ```text
//! expr    := and (("||" | "OR") and)*
//! and     := unary (("&&" | "AND") unary)*
//! unary   := ("!" | "NOT") unary | "(" expr ")" | "EXISTS" field | test
//! test    := operand cmp operand | field "IN" "(" literal ("," literal)* ")"
//!          | field "STARTS" "WITH" string | field "EXISTS"
//! cmp     := "==" | "!=" | "<" | "<=" | ">" | ">="
//! operand := field | literal;  field := name | "$key";  literal := "string" | 'string' | number
//! ```
//!
//! A `name` is a header (letters, digits, `_`, `.`, `-`; not starting with a digit); `$key` is
//! the message key. Semantics: a missing field makes its comparison false (so `NOT` of it is
//! true). If either side is a number literal, both sides compare as numbers (a side that does
//! not parse as a number makes the comparison false); otherwise as strings (bytewise). `IN` is `==` against
//! any listed literal.

mod parse;

pub use parse::{parse, Expr, Operand, ParseError};

use std::cmp::Ordering;

/// A literal value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Str(String),
    Num(f64),
}

/// A comparison operator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cmp {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
}

impl Cmp {
    pub fn symbol(self) -> &'static str {
        match self {
            Cmp::Eq => "==",
            Cmp::Ne => "!=",
            Cmp::Lt => "<",
            Cmp::Le => "<=",
            Cmp::Gt => ">",
            Cmp::Ge => ">=",
        }
    }

    fn holds(self, o: Ordering) -> bool {
        match self {
            Cmp::Eq => o == Ordering::Equal,
            Cmp::Ne => o != Ordering::Equal,
            Cmp::Lt => o == Ordering::Less,
            Cmp::Le => o != Ordering::Greater,
            Cmp::Gt => o == Ordering::Greater,
            Cmp::Ge => o != Ordering::Less,
        }
    }
}

/// Where an evaluator reads a message's fields.
pub trait Fields {
    fn key(&self) -> Option<&[u8]>;
    fn header(&self, name: &str) -> Option<&[u8]>;
}

/// Resolves an operand to bytes or a literal.
enum Resolved<'a> {
    Bytes(&'a [u8]),
    Lit(&'a Value),
}

fn resolve<'a, F: Fields>(op: &'a Operand, f: &'a F) -> Option<Resolved<'a>> {
    match op {
        Operand::Key => f.key().map(Resolved::Bytes),
        Operand::Header(h) => f.header(h).map(Resolved::Bytes),
        Operand::Lit(v) => Some(Resolved::Lit(v)),
    }
}

fn as_num(r: &Resolved<'_>) -> Option<f64> {
    match r {
        Resolved::Lit(Value::Num(n)) => Some(*n),
        Resolved::Lit(Value::Str(s)) => s.trim().parse().ok(),
        Resolved::Bytes(b) => std::str::from_utf8(b).ok()?.trim().parse().ok(),
    }
}

fn as_bytes<'a>(r: &'a Resolved<'a>) -> Option<&'a [u8]> {
    match r {
        Resolved::Bytes(b) => Some(b),
        Resolved::Lit(Value::Str(s)) => Some(s.as_bytes()),
        Resolved::Lit(Value::Num(_)) => None,
    }
}

fn is_num_lit(r: &Resolved<'_>) -> bool {
    matches!(r, Resolved::Lit(Value::Num(_)))
}

/// `a op b` under the semantics in the module doc.
pub fn compare<F: Fields>(a: &Operand, op: Cmp, b: &Operand, f: &F) -> bool {
    let (Some(x), Some(y)) = (resolve(a, f), resolve(b, f)) else {
        return false;
    };
    let ord = if is_num_lit(&x) || is_num_lit(&y) {
        match (as_num(&x), as_num(&y)) {
            (Some(p), Some(q)) => p.partial_cmp(&q),
            _ => None,
        }
    } else {
        match (as_bytes(&x), as_bytes(&y)) {
            (Some(p), Some(q)) => Some(p.cmp(q)),
            _ => None,
        }
    };
    ord.is_some_and(|o| op.holds(o))
}

/// One instruction of a compiled filter (postfix).
#[derive(Debug, Clone)]
enum Op {
    Cmp(Operand, Cmp, Operand),
    In(Operand, Vec<Value>),
    StartsWith(Operand, String),
    Exists(Operand),
    Not,
    And,
    Or,
}

/// A compiled filter.
#[derive(Debug, Clone)]
pub struct Filter {
    program: Vec<Op>,
    source: String,
}

impl Filter {
    /// Parses and compiles `src`.
    pub fn compile(src: &str) -> Result<Self, ParseError> {
        let ast = parse(src)?;
        let mut program = Vec::new();
        emit(&ast, &mut program);
        Ok(Self {
            program,
            source: src.to_string(),
        })
    }

    pub fn source(&self) -> &str {
        &self.source
    }

    /// Whether the message matches.
    pub fn matches<F: Fields>(&self, f: &F) -> bool {
        let mut stack: Vec<bool> = Vec::with_capacity(8);
        for op in &self.program {
            let v = match op {
                Op::Cmp(a, c, b) => compare(a, *c, b, f),
                Op::In(a, list) => list
                    .iter()
                    .any(|v| compare(a, Cmp::Eq, &Operand::Lit(v.clone()), f)),
                Op::StartsWith(a, p) => match resolve(a, f) {
                    Some(Resolved::Bytes(b)) => b.starts_with(p.as_bytes()),
                    _ => false,
                },
                Op::Exists(a) => resolve(a, f).is_some(),
                Op::Not => {
                    let x = stack.pop().unwrap_or(false);
                    !x
                }
                Op::And | Op::Or => {
                    let y = stack.pop().unwrap_or(false);
                    let x = stack.pop().unwrap_or(false);
                    if matches!(op, Op::And) {
                        x && y
                    } else {
                        x || y
                    }
                }
            };
            stack.push(v);
        }
        stack.pop().unwrap_or(false)
    }
}

fn emit(e: &Expr, out: &mut Vec<Op>) {
    match e {
        Expr::Cmp(a, c, b) => out.push(Op::Cmp(a.clone(), *c, b.clone())),
        Expr::In(a, l) => out.push(Op::In(a.clone(), l.clone())),
        Expr::StartsWith(a, p) => out.push(Op::StartsWith(a.clone(), p.clone())),
        Expr::Exists(a) => out.push(Op::Exists(a.clone())),
        Expr::Not(x) => {
            emit(x, out);
            out.push(Op::Not);
        }
        Expr::And(x, y) => {
            emit(x, out);
            emit(y, out);
            out.push(Op::And);
        }
        Expr::Or(x, y) => {
            emit(x, out);
            emit(y, out);
            out.push(Op::Or);
        }
    }
}

/// Fields of a flatbuffers record.
pub struct RecordFields<'a>(pub crate::protocol::fb::Record<'a>);

impl Fields for RecordFields<'_> {
    fn key(&self) -> Option<&[u8]> {
        self.0.key().map(|k| k.bytes())
    }
    fn header(&self, name: &str) -> Option<&[u8]> {
        self.0
            .headers()?
            .iter()
            .find(|h| h.key() == name)
            .map(|h| h.value().map(|v| v.bytes()).unwrap_or(&[]))
    }
}

/// Fields from owned pairs (tests, the reference evaluator).
#[derive(Debug, Clone, Default)]
pub struct MapFields {
    pub key: Option<Vec<u8>>,
    pub headers: Vec<(String, Vec<u8>)>,
}

impl Fields for MapFields {
    fn key(&self) -> Option<&[u8]> {
        self.key.as_deref()
    }
    fn header(&self, name: &str) -> Option<&[u8]> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_slice())
    }
}

#[cfg(test)]
mod tests;
