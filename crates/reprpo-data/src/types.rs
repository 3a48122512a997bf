//! The two item types everything else produces or consumes: preference pairs and multiple-choice items.

use serde::{Deserialize, Serialize};

/// Where an item came from: the dataset (or file) and the 1-based row in it, plus scores when the
/// converter had them (binarised datasets keep the scores of the two chosen responses).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct SourceMeta {
    /// Dataset name or file path.
    pub dataset: String,
    /// 1-based row in the source file (the first row of the group for grouped sources).
    pub row: usize,
    /// Score of the chosen response, where the source has scores.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chosen_score: Option<f64>,
    /// Score of the rejected response, where the source has scores.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rejected_score: Option<f64>,
}

/// One preference: a prompt, the preferred completion and the dispreferred one.
///
/// `prompt` ends where the model's turn begins (e.g. with `"\n\nAssistant:"`); `chosen` and
/// `rejected` are the completions only, as in TRL's "standard, explicit prompt" format.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PreferencePair {
    /// Stable id: `<dataset>/<row>[/<k>]`.
    pub id: String,
    /// The prompt text.
    pub prompt: String,
    /// The preferred completion.
    pub chosen: String,
    /// The dispreferred completion.
    pub rejected: String,
    /// Provenance.
    #[serde(default)]
    pub source: SourceMeta,
}

/// Whether a multiple-choice item has one correct answer (MC1) or possibly several (MC2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum McKind {
    /// Exactly one correct choice.
    Mc1,
    /// One or more correct choices; scored by the probability mass on the correct set.
    Mc2,
}

/// One multiple-choice question: a prompt, its choices and the indices of the correct ones.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct McItem {
    /// Stable id: `<dataset>/<row>`.
    pub id: String,
    /// The prompt (question) text.
    pub prompt: String,
    /// The candidate completions, in source order.
    pub choices: Vec<String>,
    /// Indices into `choices` of the correct answers, ascending, at least one.
    pub correct: Vec<usize>,
    /// Provenance.
    #[serde(default)]
    pub source: SourceMeta,
}

impl McItem {
    /// MC1 when exactly one choice is correct, MC2 otherwise.
    pub fn kind(&self) -> McKind {
        if self.correct.len() == 1 {
            McKind::Mc1
        } else {
            McKind::Mc2
        }
    }

    /// Whether choice `i` is correct.
    pub fn is_correct(&self, i: usize) -> bool {
        self.correct.contains(&i)
    }

    /// Every (correct, incorrect) combination as a preference pair, ids `<id>/<k>` with k from 0.
    pub fn to_pairs(&self) -> Vec<PreferencePair> {
        let mut out = Vec::new();
        for &c in &self.correct {
            for (i, wrong) in self.choices.iter().enumerate() {
                if self.is_correct(i) {
                    continue;
                }
                out.push(PreferencePair {
                    id: format!("{}/{}", self.id, out.len()),
                    prompt: self.prompt.clone(),
                    chosen: self.choices[c].clone(),
                    rejected: wrong.clone(),
                    source: self.source.clone(),
                });
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mc_to_pairs_pairs_every_correct_with_every_incorrect() {
        let item = McItem {
            id: "x/1".into(),
            prompt: "p".into(),
            choices: vec!["a".into(), "b".into(), "c".into()],
            correct: vec![0, 2],
            source: SourceMeta::default(),
        };
        assert_eq!(item.kind(), McKind::Mc2);
        let pairs = item.to_pairs();
        let got: Vec<(&str, &str, &str)> = pairs
            .iter()
            .map(|p| (p.id.as_str(), p.chosen.as_str(), p.rejected.as_str()))
            .collect();
        assert_eq!(got, vec![("x/1/0", "a", "b"), ("x/1/1", "c", "b")]);
    }
}
