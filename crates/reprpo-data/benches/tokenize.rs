//! Criterion benches of the data path: tokenising + collating preference pairs (classic and
//! trl-current) with the built-in byte-level tokenizer on the embedded default data, and with the
//! trained metaspace fixture tokenizer. The side-by-side comparison with TRL is
//! `tests/reference/bench_tokenize.sh` (docs/perf.md).

use std::hint::black_box;
use std::path::Path;

use criterion::{Criterion, criterion_group, criterion_main};
use reprpo_data::tokenize::{self, Layout, TokenizeConfig};
use reprpo_data::{Tok, default_data};

fn bench(c: &mut Criterion) {
    let Ok(data) = default_data::embedded() else {
        return;
    };
    let fixture =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/tokenize/metaspace");
    let toks = [
        ("bytelevel", Tok::byte_level()),
        ("metaspace", Tok::from_dir(&fixture)),
    ];
    for (name, tok) in toks {
        let Ok(tok) = tok else { continue };
        for (mode, cfg) in [
            ("classic", TokenizeConfig::default()),
            ("trl-current", TokenizeConfig::trl_current()),
        ] {
            c.bench_function(
                &format!("cpu_tokenize_collate_{name}_{mode}_500_pairs"),
                |b| {
                    b.iter(|| {
                        let Ok(t) = tokenize::tokenize_pairs(&tok, black_box(&data.train), &cfg)
                        else {
                            return 0;
                        };
                        let mut n = 0;
                        for chunk in t.pairs.chunks(8) {
                            let refs: Vec<_> = chunk.iter().collect();
                            if let Ok(batch) =
                                tokenize::collate_pairs(&refs, tok.pad, Layout::PromptLeft)
                            {
                                n += batch.input_ids.len();
                            }
                        }
                        n
                    })
                },
            );
        }
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
