//! `evaluate::window`, lm-evaluation-harness' left truncation of one sequence, on hand-made
//! token lists: `(context + continuation)[-(max_length + 1):]`, the first kept token context only.
#![allow(clippy::unwrap_used)]

use reprpo_data::tokenize::Seq;
use reprpo_eval::evaluate::window;

fn seq(prompt: &[u32], completion: &[u32]) -> Seq {
    Seq {
        prompt: prompt.to_vec(),
        completion: completion.to_vec(),
    }
}

#[test]
fn keeps_the_last_max_length_plus_one_tokens() {
    let s = seq(&[1, 2, 3, 4, 5], &[6, 7]);
    // 7 tokens fit in max_length 6 (6 inputs + the last token as a target only): no cut.
    assert_eq!(window(&s, 6), None);
    assert_eq!(window(&s, 100), None);
    // max_length 4: the last 5 tokens, the prompt's start cut.
    assert_eq!(window(&s, 4), Some(seq(&[3, 4, 5], &[6, 7])));
    // A continuation longer than the window: its first kept token becomes context.
    assert_eq!(window(&s, 1), Some(seq(&[6], &[7])));
    let long = seq(&[1], &[2, 3, 4, 5]);
    assert_eq!(window(&long, 2), Some(seq(&[3], &[4, 5])));
}
