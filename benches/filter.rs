//! Content filter: compile an expression, and evaluate it against a record's headers.

use criterion::{criterion_group, criterion_main, Criterion};
use ringmq::filter::{Filter, MapFields};

fn filters(c: &mut Criterion) {
    let src =
        "region == \"eu\" && qty > 100 && tier IN (\"gold\", \"silver\") && NOT EXISTS blocked";
    c.bench_function("filter_compile", |b| {
        b.iter(|| Filter::compile(std::hint::black_box(src)).is_ok())
    });
    let f = Filter::compile(src).expect("valid");
    let m = MapFields {
        key: Some(b"user-1".to_vec()),
        headers: vec![
            ("region".into(), b"eu".to_vec()),
            ("qty".into(), b"150".to_vec()),
            ("tier".into(), b"gold".to_vec()),
            ("source".into(), b"web".to_vec()),
        ],
    };
    c.bench_function("filter_eval_4_terms", |b| {
        b.iter(|| f.matches(std::hint::black_box(&m)))
    });
}

criterion_group!(benches, filters);
criterion_main!(benches);
