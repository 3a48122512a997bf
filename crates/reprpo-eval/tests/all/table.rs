//! The table for a known set of per-example scores against values computed by hand (written
//! out in the comments), including TruthfulQA MC2 and the GENIES gain.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use reprpo_eval::score::{dpo_reward, mc_score, pref_score};
use reprpo_eval::suite::{Role, Shift};
use reprpo_eval::table::{Column, Row, Table, mc_cell, pref_cell, shift_rows};

fn close(a: f64, b: f64) {
    assert!((a - b).abs() < 1e-12, "{a} vs {b}");
}

fn ln(x: f64) -> f64 {
    x.ln()
}

#[test]
fn mc1_mc2_and_length_normalised_by_hand() {
    // Choice probabilities 0.5, 0.3, 0.2 (they sum to 1, so the softmax returns them).
    // MC2 with true answers {0, 2}: 0.5 + 0.2 = 0.7; argmax 0 is true.
    let s = mc_score(&[ln(0.5), ln(0.3), ln(0.2)], &[1, 1, 1], &[0, 2]).unwrap();
    close(s.prob_correct, 0.7);
    assert!(s.acc);
    // MC1 with true answer 0 of probabilities 0.1, 0.6, 0.3: 0.1, and argmax 1 is wrong.
    let s = mc_score(&[ln(0.1), ln(0.6), ln(0.3)], &[1, 1, 1], &[0]).unwrap();
    close(s.prob_correct, 0.1);
    assert!(!s.acc);
    // Length normalisation: l = (-4, -3), n = (4, 1): per token -1 vs -3, so choice 0 wins
    // normalised (acc_norm) while choice 1 wins summed; pbar_0 = e^-1 / (e^-1 + e^-3)
    // = 1 / (1 + e^-2) = 0.8807970779778823.
    let s = mc_score(&[-4.0, -3.0], &[4, 1], &[0]).unwrap();
    assert!(!s.acc && s.acc_norm);
    close(s.prob_correct_norm, 1.0 / (1.0 + (-2.0f64).exp()));
    // Ties: the first maximum.
    let s = mc_score(&[-1.0, -1.0], &[1, 1], &[1]).unwrap();
    assert_eq!(s.pred, 0);
    close(s.prob_correct, 0.5);
    // Bad input is an error, not a panic.
    assert!(mc_score(&[-1.0], &[0], &[0]).is_err());
    assert!(mc_score(&[-1.0, -2.0], &[1, 1], &[2]).is_err());
    assert!(mc_score(&[f64::NAN, -2.0], &[1, 1], &[0]).is_err());
}

#[test]
fn table_cells_shifts_and_renderings_by_hand() {
    // Dataset "src" (MC, ID): two items; dataset "tgt" (pairs, OOD): two pairs.
    // Base on src: item A probabilities (0.5, 0.3, 0.2), true {0, 2}: P = 0.7, correct;
    //              item B (0.1, 0.6, 0.3), true {0}: P = 0.1, wrong.
    //   acc = 1/2, prob = (0.7 + 0.1) / 2 = 0.4.
    // Adapter on src: A (0.2, 0.3, 0.5), true {0, 2}: P = 0.7, correct (argmax 2);
    //                 B (0.8, 0.1, 0.1), true {0}: P = 0.8, correct.
    //   acc = 1, prob = 0.75. gain ID = 1 / 0.5 = 2.
    let mc = |p: [f64; 3], c: &[usize]| mc_score(&p.map(f64::ln), &[1, 1, 1], c).unwrap();
    let base_src = mc_cell(&[mc([0.5, 0.3, 0.2], &[0, 2]), mc([0.1, 0.6, 0.3], &[0])]);
    let ad_src = mc_cell(&[mc([0.2, 0.3, 0.5], &[0, 2]), mc([0.8, 0.1, 0.1], &[0])]);
    close(base_src.acc, 0.5);
    close(base_src.prob, 0.4);
    close(ad_src.acc, 1.0);
    close(ad_src.prob, 0.75);

    // Base on tgt: pair 1 l_w = -2 (2 tokens), l_l = -6 (3 tokens): delta = -1 + 2 = 1, correct;
    //              pair 2 l_w = -6 (2), l_l = -2 (2): delta = -3 + 1 = -2, wrong. acc = 0.5.
    // Adapter on tgt: pair 1 l_w = -1 (2), l_l = -9 (3): delta = 2.5, correct;
    //                 pair 2 l_w = -3 (2), l_l = -3 (2): delta = 0, NOT correct (prob = 0.5).
    //   acc = 0.5, prob = (sigmoid(2.5) + 0.5) / 2; gain OOD = 0.5 / 0.5 = 1.
    // DPO (beta 0.1): pair 1 r_w = 0.1 (-1 + 2) = 0.1, r_l = 0.1 (-9 + 6) = -0.3, margin 0.4;
    //                 pair 2 r_w = 0.1 (-3 + 6) = 0.3, r_l = 0.1 (-3 + 2) = -0.1, margin 0.4.
    //   reward_acc = 1, margin = 0.4.
    let b1 = pref_score(-2.0, 2, -6.0, 3).unwrap();
    let b2 = pref_score(-6.0, 2, -2.0, 2).unwrap();
    let a1 = pref_score(-1.0, 2, -9.0, 3).unwrap();
    let a2 = pref_score(-3.0, 2, -3.0, 2).unwrap();
    close(b1.delta, 1.0);
    close(b1.prob, 1.0 / (1.0 + (-1.0f64).exp()));
    assert!(!a2.correct);
    let rewards = [dpo_reward(&a1, &b1, 0.1), dpo_reward(&a2, &b2, 0.1)];
    close(rewards[0].margin, 0.4);
    close(rewards[1].margin, 0.4);
    let base_tgt = pref_cell(&[b1.clone(), b2.clone()], None).unwrap();
    let ad_tgt = pref_cell(&[a1, a2], Some(&rewards)).unwrap();
    close(base_tgt.acc, 0.5);
    close(ad_tgt.acc, 0.5);
    close(ad_tgt.prob, (1.0 / (1.0 + (-2.5f64).exp()) + 0.5) / 2.0);
    close(ad_tgt.reward_acc.unwrap(), 1.0);
    close(ad_tgt.margin.unwrap(), 0.4);
    assert!(pref_cell(&[b1, b2], Some(&rewards[..1])).is_err());

    let columns = vec![
        Column {
            name: "src".into(),
            role: Role::Test,
            kind: "mc".into(),
        },
        Column {
            name: "tgt".into(),
            role: Role::Ood,
            kind: "pairs".into(),
        },
    ];
    let rows = vec![
        Row {
            model: "base".into(),
            cells: vec![Some(base_src), Some(base_tgt)],
        },
        Row {
            model: "run-a".into(),
            cells: vec![Some(ad_src), Some(ad_tgt)],
        },
    ];
    // Target-tuned accuracy 0.8: differential elicitation (0.5 - 0.5) / 0.8 = 0.
    // A second shift reversed (tgt -> src) without target_tuned: gain ID = 0.5 / 0.5 = 1,
    // gain OOD = 1 / 0.5 = 2, no elicitation.
    let shifts = vec![
        Shift {
            source: "src".into(),
            target: "tgt".into(),
            target_tuned: Some(0.8),
            category: String::new(),
        },
        Shift {
            source: "tgt".into(),
            target: "src".into(),
            target_tuned: None,
            category: String::new(),
        },
        Shift {
            source: "src".into(),
            target: "missing".into(),
            target_tuned: None,
            category: String::new(),
        },
    ];
    let lines = shift_rows(&columns, &rows, &shifts);
    assert_eq!(
        lines.len(),
        2,
        "the shift naming a missing column is skipped"
    );
    close(lines[0].gain_id, 2.0);
    close(lines[0].gain_ood, 1.0);
    close(lines[0].differential_elicitation.unwrap(), 0.0);
    close(lines[1].gain_id, 1.0);
    close(lines[1].gain_ood, 2.0);
    assert!(lines[1].differential_elicitation.is_none());

    let table = Table {
        suite: "hand".into(),
        columns,
        rows,
        shifts: lines,
        truncation: reprpo_eval::TruncationNote {
            rule: "the rule".into(),
            items: vec![("tgt".into(), 1, 2)],
        },
    };
    let md = table.to_markdown();
    assert!(
        md.contains("truncation: TRUNCATED 1 of 2 items of tgt (the rule)"),
        "{md}"
    );
    assert!(md.contains("| model | src (ID) | tgt (OOD) |"), "{md}");
    assert!(md.contains("| base | 0.500 | 0.500 |"), "{md}");
    assert!(md.contains("| run-a | 1.000 | 0.500 |"), "{md}");
    assert!(md.contains("| base | 0.400 |"), "{md}");
    assert!(
        md.contains(
            "| run-a | src | tgt | 1.000 | 0.500 | 0.500 | 0.500 | 2.000 | 1.000 | 0.000 |"
        ),
        "{md}"
    );
    let csv = table.to_csv();
    let lines: Vec<&str> = csv.lines().collect();
    assert_eq!(
        lines[0],
        "model,dataset,role,kind,n,acc,prob,acc_norm,prob_norm,reward_acc,margin"
    );
    assert_eq!(lines.len(), 5);
    assert!(lines[1].starts_with("base,src,ID,mc,2,0.5,"), "{csv}");
    assert!(lines[4].starts_with("run-a,tgt,OOD,pairs,2,0.5,"), "{csv}");
    assert!(
        lines[4].ends_with(",1,0.4") || lines[4].contains(",1,0.4"),
        "{csv}"
    );
    let back: Table = serde_json::from_str(&table.to_json().unwrap()).unwrap();
    // JSON keeps every field (floats to within serde_json's parsing precision).
    assert_eq!(
        (back.columns.clone(), back.shifts.len()),
        (table.columns.clone(), 2)
    );
    for (rb, rt) in back.rows.iter().zip(&table.rows) {
        for (cb, ct) in rb.cells.iter().zip(&rt.cells) {
            let (cb, ct) = (cb.as_ref().unwrap(), ct.as_ref().unwrap());
            assert!((cb.prob - ct.prob).abs() < 1e-15 && cb.acc == ct.acc);
            assert_eq!(cb.margin.is_some(), ct.margin.is_some());
        }
    }
    let term = table.to_terminal();
    assert!(term.contains("src (ID)") && term.contains("run-a"));
}
