//! Tests of the llama2.c converter on the real `stories260K.bin` + `tok512.bin`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use reprpo_models::ModelError;
use reprpo_models::llama2c::{Llama2c, convert, read_checkpoint, read_tokenizer};
use safetensors::SafeTensors;

/// The stories260K folder, or `None` (after saying so) when the shared data is absent.
fn data_dir() -> Option<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/data/stories260K");
    if dir.join("stories260K.bin").is_file() && dir.join("tok512.bin").is_file() {
        return Some(dir);
    }
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("{} missing on CI", dir.display());
    }
    println!("skipped: ../shared/data not present");
    None
}

fn f32s(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

/// Layer `i` of a stacked llama2.c array.
fn layer<'a>(ckpt: &'a Llama2c, name: &str, i: usize) -> &'a [f32] {
    let t = ckpt.tensor(name).unwrap();
    let n: usize = t.shape[1..].iter().product();
    &t.data[i * n..(i + 1) * n]
}

fn files_in(dir: &Path) -> Vec<String> {
    if !dir.exists() {
        return Vec::new();
    }
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

#[test]
fn header_config_and_tensors() {
    let Some(data) = data_dir() else { return };
    let ckpt = read_checkpoint(&data.join("stories260K.bin")).unwrap();
    let h = ckpt.header;
    assert_eq!(
        (
            h.dim,
            h.hidden_dim,
            h.n_layers,
            h.n_heads,
            h.n_kv_heads,
            h.vocab_size,
            h.seq_len
        ),
        (64, 172, 5, 8, 4, 512, 512)
    );
    assert!(h.shared_classifier);
    assert_eq!(h.head_dim(), 8);
    assert!(ckpt.tensor("wcls").is_none());
    assert_eq!(ckpt.tensor("wk").unwrap().shape, vec![5, 32, 64]);

    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("hf"); // does not exist yet: convert creates it
    let report = convert(
        &data.join("stories260K.bin"),
        &data.join("tok512.bin"),
        &out,
    )
    .unwrap();
    println!("{report}");
    assert_eq!(report.n_tensors, 1 + 5 * 9 + 1);
    assert!(report.tie_word_embeddings);
    assert_eq!((report.hidden_size, report.vocab_size), (64, 512));
    assert_eq!(
        files_in(&out),
        vec![
            "config.json",
            "model.safetensors",
            "tokenizer.json",
            "tokenizer_config.json"
        ]
    );

    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("config.json")).unwrap()).unwrap();
    let expect = serde_json::json!({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64,
        "intermediate_size": 172, "num_hidden_layers": 5, "num_attention_heads": 8,
        "num_key_value_heads": 4, "vocab_size": 512, "max_position_embeddings": 512,
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": true,
        "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu", "torch_dtype": "float32",
    });
    for (key, value) in expect.as_object().unwrap() {
        assert_eq!(&config[key], value, "config.json key {key}");
    }
    let tok_config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("tokenizer_config.json")).unwrap()).unwrap();
    assert_eq!(tok_config["tokenizer_class"], "LlamaTokenizerFast");
    assert_eq!(tok_config["bos_token"], "<s>");
    assert_eq!(tok_config["eos_token"], "</s>");
    assert_eq!(tok_config["unk_token"], "<unk>");
    assert_eq!(tok_config["add_bos_token"], true);

    let bytes = std::fs::read(out.join("model.safetensors")).unwrap();
    let (_, meta) = SafeTensors::read_metadata(&bytes).unwrap();
    assert_eq!(
        meta.metadata()
            .as_ref()
            .unwrap()
            .get("format")
            .map(String::as_str),
        Some("pt")
    );
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut expected: HashMap<String, Vec<usize>> = HashMap::new();
    expected.insert("model.embed_tokens.weight".into(), vec![512, 64]);
    expected.insert("model.norm.weight".into(), vec![64]);
    for i in 0..5 {
        let p = format!("model.layers.{i}");
        expected.insert(format!("{p}.input_layernorm.weight"), vec![64]);
        expected.insert(format!("{p}.post_attention_layernorm.weight"), vec![64]);
        expected.insert(format!("{p}.self_attn.q_proj.weight"), vec![64, 64]);
        expected.insert(format!("{p}.self_attn.k_proj.weight"), vec![32, 64]);
        expected.insert(format!("{p}.self_attn.v_proj.weight"), vec![32, 64]);
        expected.insert(format!("{p}.self_attn.o_proj.weight"), vec![64, 64]);
        expected.insert(format!("{p}.mlp.gate_proj.weight"), vec![172, 64]);
        expected.insert(format!("{p}.mlp.up_proj.weight"), vec![172, 64]);
        expected.insert(format!("{p}.mlp.down_proj.weight"), vec![64, 172]);
    }
    let mut names: Vec<&str> = st.names();
    names.sort_unstable();
    let mut want: Vec<&str> = expected.keys().map(String::as_str).collect();
    want.sort_unstable();
    assert_eq!(
        names, want,
        "tensor names (no lm_head.weight: classifier is shared)"
    );
    for (name, shape) in &expected {
        let t = st.tensor(name).unwrap();
        assert_eq!(t.dtype(), safetensors::Dtype::F32, "{name}");
        assert_eq!(t.shape(), shape.as_slice(), "{name}");
    }

    // Everything but q/k is copied verbatim; q/k hold the same rows, reordered.
    let hf = |name: &str| f32s(st.tensor(name).unwrap().data());
    assert_eq!(
        hf("model.embed_tokens.weight"),
        ckpt.tensor("token_embedding_table").unwrap().data
    );
    assert_eq!(
        hf("model.norm.weight"),
        ckpt.tensor("rms_final_weight").unwrap().data
    );
    for i in 0..5 {
        let p = format!("model.layers.{i}");
        for (ours, theirs) in [
            ("input_layernorm", "rms_att_weight"),
            ("post_attention_layernorm", "rms_ffn_weight"),
            ("self_attn.v_proj", "wv"),
            ("self_attn.o_proj", "wo"),
            ("mlp.gate_proj", "w1"),
            ("mlp.down_proj", "w2"),
            ("mlp.up_proj", "w3"),
        ] {
            assert_eq!(
                hf(&format!("{p}.{ours}.weight")),
                layer(&ckpt, theirs, i),
                "{p}.{ours}"
            );
        }
        for (ours, theirs) in [("q_proj", "wq"), ("k_proj", "wk")] {
            let permuted = hf(&format!("{p}.self_attn.{ours}.weight"));
            let original = layer(&ckpt, theirs, i);
            assert_ne!(permuted.as_slice(), original, "{p}.{ours} must be permuted");
            let mut a: Vec<u32> = permuted.iter().map(|x| x.to_bits()).collect();
            let mut b: Vec<u32> = original.iter().map(|x| x.to_bits()).collect();
            a.sort_unstable();
            b.sort_unstable();
            assert_eq!(a, b, "{p}.{ours} holds the same values");
        }
    }
}

/// `y = W x` for a row-major `[rows, cols]` matrix.
fn matvec(w: &[f32], x: &[f32]) -> Vec<f64> {
    w.chunks_exact(x.len())
        .map(|row| {
            row.iter()
                .zip(x)
                .map(|(a, b)| f64::from(*a) * f64::from(*b))
                .sum()
        })
        .collect()
}

/// llama2.c's RoPE: per head, rotate `(v[2i], v[2i+1])` by `pos * 10000^(-2i/head_dim)`.
fn rope_llama2c(v: &[f64], head_dim: usize, pos: usize) -> Vec<f64> {
    let mut out = v.to_vec();
    for head in out.chunks_exact_mut(head_dim) {
        for i in 0..head_dim / 2 {
            let angle = pos as f64 * 10000f64.powf(-((2 * i) as f64) / head_dim as f64);
            let (s, c) = angle.sin_cos();
            let (a, b) = (head[2 * i], head[2 * i + 1]);
            head[2 * i] = a * c - b * s;
            head[2 * i + 1] = a * s + b * c;
        }
    }
    out
}

/// Hugging Face's RoPE (`q * cos + rotate_half(q) * sin`): per head, rotate
/// `(v[i], v[i + head_dim/2])` by `pos * 10000^(-2i/head_dim)`.
fn rope_hf(v: &[f64], head_dim: usize, pos: usize) -> Vec<f64> {
    let half = head_dim / 2;
    let mut out = v.to_vec();
    for head in out.chunks_exact_mut(head_dim) {
        for i in 0..half {
            let angle = pos as f64 * 10000f64.powf(-((2 * i) as f64) / head_dim as f64);
            let (s, c) = angle.sin_cos();
            let (a, b) = (head[i], head[i + half]);
            head[i] = a * c - b * s;
            head[i + half] = b * c + a * s;
        }
    }
    out
}

/// Deterministic pseudo-random values in [-1, 1) (xorshift64).
fn random_vec(n: usize, mut seed: u64) -> Vec<f32> {
    (0..n)
        .map(|_| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        })
        .collect()
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-9 * (1.0 + a.abs().max(b.abs()))
}

#[test]
fn qk_permutation_reconciles_rope_conventions() {
    let Some(data) = data_dir() else { return };
    let ckpt = read_checkpoint(&data.join("stories260K.bin")).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    convert(
        &data.join("stories260K.bin"),
        &data.join("tok512.bin"),
        tmp.path(),
    )
    .unwrap();
    let bytes = std::fs::read(tmp.path().join("model.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let wq_hf = f32s(
        st.tensor("model.layers.0.self_attn.q_proj.weight")
            .unwrap()
            .data(),
    );
    let wk_hf = f32s(
        st.tensor("model.layers.0.self_attn.k_proj.weight")
            .unwrap()
            .data(),
    );
    let (wq, wk) = (layer(&ckpt, "wq", 0), layer(&ckpt, "wk", 0));
    let (hd, half, n_heads, n_kv) = (8, 4, 8, 4);

    let (x_q, x_k) = (random_vec(64, 0x9E37_79B9_7F4A_7C15), random_vec(64, 12345));
    let (pos_q, pos_k) = (37, 11);
    // llama2.c: interleaved RoPE of the original projections.
    let q_ll = rope_llama2c(&matvec(wq, &x_q), hd, pos_q);
    let k_ll = rope_llama2c(&matvec(wk, &x_k), hd, pos_k);
    // HF: rotate_half RoPE of the permuted projections.
    let q_hf = rope_hf(&matvec(&wq_hf, &x_q), hd, pos_q);
    let k_hf = rope_hf(&matvec(&wk_hf, &x_k), hd, pos_k);

    // Elementwise: HF's rotated output is llama2.c's, with row 2i+t of a head at t*half+i.
    for (ll, hf, heads) in [(&q_ll, &q_hf, n_heads), (&k_ll, &k_hf, n_kv)] {
        for h in 0..heads {
            for i in 0..half {
                for t in 0..2 {
                    let (a, b) = (ll[h * hd + 2 * i + t], hf[h * hd + t * half + i]);
                    assert!(close(a, b), "head {h} pair {i} part {t}: {a} vs {b}");
                }
            }
        }
    }
    // Hence every attention score (q_h . k_{h / group}) is the same in both conventions.
    let group = n_heads / n_kv;
    let score = |q: &[f64], k: &[f64], h: usize| -> f64 {
        let g = h / group;
        (0..hd).map(|d| q[h * hd + d] * k[g * hd + d]).sum()
    };
    let mut max_diff = 0f64;
    for h in 0..n_heads {
        let (a, b) = (score(&q_ll, &k_ll, h), score(&q_hf, &k_hf, h));
        assert!(close(a, b), "head {h} score {a} vs {b}");
        max_diff = max_diff.max((a - b).abs());
    }
    // Control: without the permutation, HF's RoPE gives different scores.
    let q_raw = rope_hf(&matvec(wq, &x_q), hd, pos_q);
    let k_raw = rope_hf(&matvec(wk, &x_k), hd, pos_k);
    let mut control_diff = 0f64;
    for h in 0..n_heads {
        control_diff = control_diff.max((score(&q_ll, &k_ll, h) - score(&q_raw, &k_raw, h)).abs());
    }
    println!("max |score diff| permuted {max_diff:e}, unpermuted {control_diff:e}");
    assert!(
        control_diff > 1e-3,
        "the control should differ ({control_diff})"
    );
}

/// llama2.c's `encode` (run.c): BOS, the dummy-prefix " ", one piece per UTF-8 character or
/// its bytes + 3, then repeatedly merge the adjacent pair whose concatenation is the
/// best-scoring piece (leftmost on ties).
fn llama2c_encode(text: &str, vocab: &[(String, f32)]) -> Vec<u32> {
    let lookup: HashMap<&str, usize> = vocab
        .iter()
        .enumerate()
        .map(|(i, (p, _))| (p.as_str(), i))
        .collect();
    let mut tokens: Vec<usize> = vec![1];
    if !text.is_empty() {
        tokens.push(lookup[" "]);
    }
    for c in text.chars() {
        let mut buf = [0u8; 4];
        let s = c.encode_utf8(&mut buf);
        match lookup.get(&*s) {
            Some(&id) => tokens.push(id),
            None => tokens.extend(s.bytes().map(|b| usize::from(b) + 3)),
        }
    }
    loop {
        let mut best: Option<(f32, usize, usize)> = None;
        for i in 0..tokens.len().saturating_sub(1) {
            let joined = format!("{}{}", vocab[tokens[i]].0, vocab[tokens[i + 1]].0);
            if let Some(&id) = lookup.get(joined.as_str())
                && best.is_none_or(|(s, _, _)| vocab[id].1 > s)
            {
                best = Some((vocab[id].1, id, i));
            }
        }
        let Some((_, id, i)) = best else { break };
        tokens[i] = id;
        tokens.remove(i + 1);
    }
    tokens.into_iter().map(|t| t as u32).collect()
}

#[test]
fn tokenizer_matches_llama2c_encode() {
    let Some(data) = data_dir() else { return };
    let tmp = tempfile::tempdir().unwrap();
    convert(
        &data.join("stories260K.bin"),
        &data.join("tok512.bin"),
        tmp.path(),
    )
    .unwrap();
    let tok = tokenizers::Tokenizer::from_file(tmp.path().join("tokenizer.json")).unwrap();
    let vocab = read_tokenizer(&data.join("tok512.bin")).unwrap();
    assert_eq!(vocab.len(), 512);
    assert_eq!(tok.get_vocab_size(true), 512);
    assert_eq!(tok.token_to_id("<s>"), Some(1));
    assert_eq!(tok.token_to_id("</s>"), Some(2));
    assert_eq!(tok.token_to_id("<0x0A>"), Some(3 + 10));
    assert_eq!(tok.token_to_id("\u{2581}t"), Some(259));
    assert_eq!(vocab[259].0, " t");

    let greedy = std::fs::read_to_string(data.join("expected_greedy_t0_n200.txt")).unwrap();
    let first_sentence = &greedy[..greedy.find('.').unwrap() + 1];
    assert_eq!(
        first_sentence,
        "Once upon a time, there was a little girl named Lily."
    );

    let once = tok.encode("Once upon a time", true).unwrap();
    println!(
        "\"Once upon a time\" -> {:?} {:?}",
        once.get_ids(),
        once.get_tokens()
    );
    assert_eq!(once.get_ids()[0], 1);
    assert_eq!(
        tok.decode(once.get_ids(), true).unwrap(),
        "Once upon a time"
    );

    let texts = [
        "Once upon a time",
        first_sentence,
        "Lily's mom said, \"Let's go to the park!\"",
        "  two  spaces, a tab\tand\na newline",
        "caf\u{e9} na\u{ef}ve \u{1F642} smile", // é is a piece; ï and 🙂 need byte fallback
        "\u{1F642}",
        "",
        greedy.as_str(), // the whole 200-token story, newlines included
    ];
    for text in texts {
        let enc = tok.encode(text, true).unwrap();
        let want = llama2c_encode(text, &vocab);
        assert_eq!(enc.get_ids(), want.as_slice(), "encoding of {text:?}");
        assert_eq!(
            tok.decode(enc.get_ids(), true).unwrap(),
            text,
            "round trip of {text:?}"
        );
        println!("{text:?}: {} ids", want.len());
    }
    // The emoji is four byte tokens (F0 9F 99 82 -> ids 243 162 156 133).
    let emoji = tok.encode("\u{1F642}", true).unwrap();
    let space = vocab_id(&vocab, " ");
    assert_eq!(emoji.get_ids(), &[1, space, 243, 162, 156, 133]);
}

fn vocab_id(vocab: &[(String, f32)], piece: &str) -> u32 {
    vocab.iter().position(|(p, _)| p == piece).unwrap() as u32
}

#[test]
fn truncated_inputs_fail_cleanly() {
    let Some(data) = data_dir() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let ckpt_bytes = std::fs::read(data.join("stories260K.bin")).unwrap();
    let tok_bytes = std::fs::read(data.join("tok512.bin")).unwrap();
    let bad_ckpt = tmp.path().join("short.bin");
    std::fs::write(&bad_ckpt, &ckpt_bytes[..100]).unwrap();
    let bad_tok = tmp.path().join("short_tok.bin");
    std::fs::write(&bad_tok, &tok_bytes[..1000]).unwrap();
    // Cut exactly after 300 tokens: every token is whole, but there are too few.
    let vocab = read_tokenizer(&data.join("tok512.bin")).unwrap();
    let boundary = 4 + vocab[..300].iter().map(|(p, _)| 8 + p.len()).sum::<usize>();
    let few_tok = tmp.path().join("few_tok.bin");
    std::fs::write(&few_tok, &tok_bytes[..boundary]).unwrap();

    let good_ckpt = data.join("stories260K.bin");
    let good_tok = data.join("tok512.bin");
    let cases = [
        (&bad_ckpt, &good_tok, &bad_ckpt, "offset"),
        (&good_ckpt, &bad_tok, &bad_tok, "offset"),
        (&good_ckpt, &few_tok, &few_tok, "300 tokens"),
    ];
    for (n, (ckpt, tokp, culprit, phrase)) in cases.into_iter().enumerate() {
        let missing = tmp.path().join(format!("out_missing_{n}"));
        let existing = tmp.path().join(format!("out_existing_{n}"));
        std::fs::create_dir(&existing).unwrap();
        for out in [&missing, &existing] {
            let err = convert(ckpt, tokp, out).unwrap_err();
            let msg = err.to_string();
            println!("{msg}");
            match &err {
                ModelError::Format { file, problem } => {
                    assert_eq!(file, culprit);
                    assert!(problem.contains(phrase), "{problem}");
                }
                other => panic!("expected a Format error, got {other:?}"),
            }
            assert!(msg.contains(&culprit.display().to_string()), "{msg}");
            assert!(files_in(out).is_empty(), "left behind: {:?}", files_in(out));
        }
    }
    // The header-only case names the first missing tensor.
    let err = read_checkpoint(&bad_ckpt).unwrap_err().to_string();
    assert!(
        err.contains("token_embedding_table") && err.contains("ends at 100"),
        "{err}"
    );
    let err = read_checkpoint(&{
        let p = tmp.path().join("tiny.bin");
        std::fs::write(&p, &ckpt_bytes[..10]).unwrap();
        p
    })
    .unwrap_err()
    .to_string();
    assert!(err.contains("28-byte header"), "{err}");
}
