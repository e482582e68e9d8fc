use super::*;
use crate::storage::mem::Rng;

fn msg(key: Option<&str>, headers: &[(&str, &str)]) -> MapFields {
    MapFields {
        key: key.map(|k| k.as_bytes().to_vec()),
        headers: headers
            .iter()
            .map(|(k, v)| (k.to_string(), v.as_bytes().to_vec()))
            .collect(),
    }
}

#[test]
fn table() {
    let m = msg(
        Some("user-7"),
        &[("region", "eu"), ("qty", "150"), ("tier", "gold")],
    );
    let cases = [
        ("region == \"eu\" && qty > 100", true),
        ("region == 'eu' AND qty > 200", false),
        ("region != \"us\"", true),
        ("qty >= 150 and qty <= 150", true),
        ("qty < 99.5 OR tier IN (\"gold\", \"silver\")", true),
        ("tier IN ('bronze')", false),
        ("qty IN (1, 150)", true),
        ("$key STARTS WITH \"user-\"", true),
        ("$key starts with \"admin\"", false),
        ("EXISTS region", true),
        ("missing EXISTS", false),
        ("NOT EXISTS missing", true),
        ("missing == \"x\"", false),
        ("NOT (missing == \"x\")", true),
        ("!(region == \"eu\") || qty > 100", true),
        ("region > 100", false), // not a number: false
        (
            "(region == \"eu\" OR region == \"us\") AND NOT tier == \"gold\"",
            false,
        ),
        ("$key == \"user-7\"", true),
        ("\"eu\" == region", true),
        ("qty == 150.0", true),
        ("region < \"fr\"", true),
    ];
    for (src, want) in cases {
        let f = Filter::compile(src).unwrap_or_else(|e| panic!("{src}: {e}"));
        assert_eq!(f.matches(&m), want, "{src}");
    }
}

#[test]
fn errors_name_the_position() {
    let cases = [
        ("region ==", 10, "expected a header name"),
        ("region == \"eu\" &&", 18, "expected"),
        ("(qty > 1", 9, "expected ')'"),
        ("qty > 1 )", 9, "AND, OR or the end"),
        ("region = \"eu\"", 8, "unexpected character '='"),
        ("\"open", 1, "unterminated string"),
        ("qty IN 1", 8, "'(' after IN"),
        ("$foo == 1", 1, "unknown field"),
        ("", 1, "expected an expression"),
        ("region STARTS \"x\"", 15, "WITH"),
    ];
    for (src, col, text) in cases {
        let e = Filter::compile(src).unwrap_err();
        assert_eq!(e.column, col, "{src}: {e}");
        assert!(e.message.contains(text), "{src}: {e}");
    }
    let deep = "(".repeat(100) + "a == 1" + &")".repeat(100);
    assert!(Filter::compile(&deep)
        .unwrap_err()
        .message
        .contains("nested"));
}

// ---- property test: random expressions, printed, parsed, compiled, against a reference ----

const NAMES: [&str; 4] = ["a", "b", "c.x", "d-y"];
const STRS: [&str; 5] = ["", "eu", "us", "1.5", "e\"q"];

fn gen_value(r: &mut Rng) -> Value {
    if r.below(2) == 0 {
        Value::Num([0.0, 1.5, -3.0, 100.0, 7.0][r.below(5) as usize])
    } else {
        Value::Str(STRS[r.below(STRS.len() as u64) as usize].to_string())
    }
}

fn gen_field(r: &mut Rng) -> Operand {
    if r.below(5) == 0 {
        Operand::Key
    } else {
        Operand::Header(NAMES[r.below(NAMES.len() as u64) as usize].to_string())
    }
}

fn gen_operand(r: &mut Rng) -> Operand {
    if r.below(3) == 0 {
        Operand::Lit(gen_value(r))
    } else {
        gen_field(r)
    }
}

fn gen_expr(r: &mut Rng, depth: u32) -> Expr {
    let leaf = depth == 0 || r.below(3) == 0;
    if leaf {
        let cmps = [Cmp::Eq, Cmp::Ne, Cmp::Lt, Cmp::Le, Cmp::Gt, Cmp::Ge];
        return match r.below(4) {
            0 => Expr::Cmp(gen_operand(r), cmps[r.below(6) as usize], gen_operand(r)),
            1 => Expr::In(
                gen_field(r),
                (0..1 + r.below(3)).map(|_| gen_value(r)).collect(),
            ),
            2 => Expr::StartsWith(
                gen_field(r),
                STRS[r.below(STRS.len() as u64) as usize].to_string(),
            ),
            _ => Expr::Exists(gen_field(r)),
        };
    }
    match r.below(3) {
        0 => Expr::Not(Box::new(gen_expr(r, depth - 1))),
        1 => Expr::And(
            Box::new(gen_expr(r, depth - 1)),
            Box::new(gen_expr(r, depth - 1)),
        ),
        _ => Expr::Or(
            Box::new(gen_expr(r, depth - 1)),
            Box::new(gen_expr(r, depth - 1)),
        ),
    }
}

fn gen_msg(r: &mut Rng) -> MapFields {
    let vals = ["", "eu", "us", "1.5", "100", "7", "-3", "e\"q", "eux"];
    let mut m = MapFields::default();
    if r.below(3) != 0 {
        m.key = Some(
            vals[r.below(vals.len() as u64) as usize]
                .as_bytes()
                .to_vec(),
        );
    }
    for n in NAMES {
        if r.below(3) != 0 {
            m.headers.push((
                n.to_string(),
                vals[r.below(vals.len() as u64) as usize]
                    .as_bytes()
                    .to_vec(),
            ));
        }
    }
    m
}

/// The reference: a direct, independent reading of the semantics in the module doc.
fn reference(e: &Expr, m: &MapFields) -> bool {
    #[derive(Clone)]
    enum R {
        Text(Vec<u8>),
        Num(f64),
    }
    let get = |o: &Operand| -> Option<R> {
        match o {
            Operand::Key => m.key.clone().map(R::Text),
            Operand::Header(h) => m
                .headers
                .iter()
                .find(|(k, _)| k == h)
                .map(|(_, v)| R::Text(v.clone())),
            Operand::Lit(Value::Num(n)) => Some(R::Num(*n)),
            Operand::Lit(Value::Str(s)) => Some(R::Text(s.as_bytes().to_vec())),
        }
    };
    let num = |r: &R| -> Option<f64> {
        match r {
            R::Num(n) => Some(*n),
            R::Text(t) => String::from_utf8(t.clone()).ok()?.trim().parse().ok(),
        }
    };
    let cmp = |a: &Operand, c: Cmp, b: &Operand| -> bool {
        let (Some(x), Some(y)) = (get(a), get(b)) else {
            return false;
        };
        let numeric = matches!(x, R::Num(_)) || matches!(y, R::Num(_));
        let ord = if numeric {
            match (num(&x), num(&y)) {
                (Some(p), Some(q)) => p.partial_cmp(&q),
                _ => None,
            }
        } else {
            match (&x, &y) {
                (R::Text(p), R::Text(q)) => Some(p.cmp(q)),
                _ => None,
            }
        };
        let Some(o) = ord else { return false };
        match c {
            Cmp::Eq => o.is_eq(),
            Cmp::Ne => o.is_ne(),
            Cmp::Lt => o.is_lt(),
            Cmp::Le => o.is_le(),
            Cmp::Gt => o.is_gt(),
            Cmp::Ge => o.is_ge(),
        }
    };
    match e {
        Expr::Cmp(a, c, b) => cmp(a, *c, b),
        Expr::In(a, l) => l.iter().any(|v| cmp(a, Cmp::Eq, &Operand::Lit(v.clone()))),
        Expr::StartsWith(a, p) => {
            matches!(get(a), Some(R::Text(t)) if t.starts_with(p.as_bytes()) && !matches!(a, Operand::Lit(_)))
        }
        Expr::Exists(a) => get(a).is_some(),
        Expr::Not(x) => !reference(x, m),
        Expr::And(x, y) => reference(x, m) && reference(y, m),
        Expr::Or(x, y) => reference(x, m) || reference(y, m),
    }
}

#[test]
fn property_compiled_filter_agrees_with_the_reference() {
    let seed: u64 = std::env::var("RINGMQ_FILTER_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5EED);
    let mut r = Rng::new(seed);
    for case in 0..3000 {
        let e = gen_expr(&mut r, 4);
        let text = e.to_string();
        let parsed =
            parse(&text).unwrap_or_else(|err| panic!("seed {seed} case {case}: {text}: {err}"));
        assert_eq!(
            parsed, e,
            "seed {seed} case {case}: print/parse round trip of {text}"
        );
        let f = Filter::compile(&text).unwrap();
        for _ in 0..8 {
            let m = gen_msg(&mut r);
            assert_eq!(
                f.matches(&m),
                reference(&e, &m),
                "seed {seed} case {case}: {text} on {m:?}"
            );
        }
    }
}
