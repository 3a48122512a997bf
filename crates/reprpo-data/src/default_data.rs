//! The built-in default preference data: small, self-generated, learnable by a tiny byte-level
//! model in about a minute, with an in-distribution test split, an out-of-distribution split and
//! multiple-choice items.
//!
//! # The preference
//!
//! A user asks for help with a topic. The **chosen** reply is courteous and helpful and names the
//! topic ("Sure! Break chess into tiny steps. Good luck!"); the **rejected** reply is curt and
//! dismissive and names the topic only half of the time ("Nope! Ask someone else about it. Bye.").
//! Every string is put together from short word lists in this file (no text is fetched or
//! copied), so the preference shows up in many combinations rather than as one memorisable
//! string, and every prompt and completion is printable ASCII, so one byte is one token.
//!
//! # Splits
//!
//! - `train` ([`TRAIN_LEN`] pairs) and `test` ([`TEST_LEN`] pairs): prompts
//!   `"User: {request}\nAssistant:"` built from [`TRAIN_PREFIXES`] x [`TRAIN_REQUESTS`] x
//!   [`TRAIN_TOPICS`]; every prompt occurs once, so the two splits share no prompt.
//! - `ood` ([`OOD_LEN`] pairs): the same preference after a distribution shift in the spirit of
//!   GENIES: other prompt formats (`OOD_FORMATS`), other request templates
//!   (`OOD_REQUESTS`), other topics ([`OOD_TOPICS`]) and other reply sentences; no prompt
//!   template, topic or completion sentence is shared with `train`.
//! - `mc` ([`MC_LEN`] items): held-out in-distribution prompts (shared with neither `train` nor
//!   `test`), each with one courteous reply and two or three dismissive ones in random order.
//!
//! # Determinism
//!
//! [`generate`] draws everything from one `rand::rngs::StdRng::seed_from_u64(seed)`, so a seed
//! fixes the data. The committed files under `crates/reprpo-data/embedded/` are `generate(DEFAULT_SEED)`;
//! a test checks them byte for byte (which also catches a change of `StdRng`'s algorithm in a
//! new `rand` release). [`write_all`] regenerates them.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use rand::rngs::StdRng;
use rand::seq::{IndexedRandom, SliceRandom};
use rand::{Rng, SeedableRng};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::error::{DataError, Result};
use crate::types::{McItem, PreferencePair, SourceMeta};

/// The seed of the committed files.
pub const DEFAULT_SEED: u64 = 42;
/// Number of training pairs.
pub const TRAIN_LEN: usize = 500;
/// Number of in-distribution held-out pairs.
pub const TEST_LEN: usize = 100;
/// Number of out-of-distribution pairs.
pub const OOD_LEN: usize = 100;
/// Number of multiple-choice items.
pub const MC_LEN: usize = 100;
/// Longest prompt, in bytes.
pub const MAX_PROMPT_BYTES: usize = 60;
/// Longest completion (chosen, rejected or MC choice), in bytes, leading space included.
pub const MAX_COMPLETION_BYTES: usize = 60;

/// The file names under `crates/reprpo-data/embedded/`, in the order train, test, ood, mc.
pub const FILE_NAMES: [&str; 4] = ["train.jsonl", "test.jsonl", "ood.jsonl", "mc.jsonl"];
/// The `source.dataset` (and id prefix) of each split, in the order of [`FILE_NAMES`].
pub const DATASET_NAMES: [&str; 4] = ["default-train", "default-test", "default-ood", "default-mc"];

/// The committed `crates/reprpo-data/embedded/train.jsonl`, embedded in the binary.
pub const TRAIN_JSONL: &str = include_str!("../embedded/train.jsonl");
/// The committed `crates/reprpo-data/embedded/test.jsonl`, embedded in the binary.
pub const TEST_JSONL: &str = include_str!("../embedded/test.jsonl");
/// The committed `crates/reprpo-data/embedded/ood.jsonl`, embedded in the binary.
pub const OOD_JSONL: &str = include_str!("../embedded/ood.jsonl");
/// The committed `crates/reprpo-data/embedded/mc.jsonl`, embedded in the binary.
pub const MC_JSONL: &str = include_str!("../embedded/mc.jsonl");

/// In-distribution prompt format; `{r}` is the request.
pub(crate) const TRAIN_FORMAT: &str = "User: {r}\nAssistant:";

/// Optional openings of in-distribution requests.
pub const TRAIN_PREFIXES: &[&str] = &["", "Hi! ", "Hello. ", "Quick one: "];

/// In-distribution request templates; `{t}` is the topic.
pub const TRAIN_REQUESTS: &[&str] = &[
    "Can you help me with {t}?",
    "How do I get better at {t}?",
    "Any tips for {t}?",
    "I need advice on {t}.",
    "Where do I start with {t}?",
    "Please explain {t} to me.",
    "What is the best way to learn {t}?",
    "I am stuck on {t}. Help?",
    "Can you teach me {t}?",
    "I want to improve at {t}.",
];

/// In-distribution topics.
pub const TRAIN_TOPICS: &[&str] = &[
    "chess",
    "baking bread",
    "gardening",
    "knitting",
    "swimming",
    "fractions",
    "piano",
    "running",
    "my essay",
    "saving money",
    "camping",
    "painting",
    "French verbs",
    "my resume",
    "yoga",
    "juggling",
    "making soup",
    "my cat",
    "birdwatching",
    "spreadsheets",
    "drawing",
    "public speaking",
    "sleeping well",
    "packing a bag",
    "fixing a tap",
    "growing herbs",
    "algebra",
    "guitar",
    "photography",
    "pottery",
    "typing fast",
    "cycling",
    "my homework",
    "cooking rice",
    "learning Spanish",
    "a job interview",
    "my puppy",
    "reading maps",
    "chemistry class",
    "bird songs",
];

/// Out-of-distribution prompt formats; `{r}` is the request.
pub(crate) const OOD_FORMATS: &[&str] = &["Q: {r}\nA:", "Message: {r}\nReply:"];

/// Out-of-distribution request templates; `{t}` is the topic.
pub(crate) const OOD_REQUESTS: &[&str] = &[
    "My {t} keeps going wrong.",
    "Teach me {t}, please.",
    "What should a beginner know about {t}?",
    "Is {t} hard to pick up?",
    "I want to try {t}. Thoughts?",
    "Got any pointers on {t}?",
    "Tell me how {t} works.",
];

/// Out-of-distribution topics: none contains, or is contained in, a training topic.
pub const OOD_TOPICS: &[&str] = &[
    "kayaking",
    "origami",
    "calculus",
    "beekeeping",
    "sourdough",
    "tennis",
    "sewing",
    "skiing",
    "poetry",
    "my budget",
    "archery",
    "violin",
    "meditation",
    "woodwork",
    "fishing",
    "card tricks",
    "dancing",
    "surfing",
    "geometry",
    "my blog",
    "bonsai",
    "climbing",
    "sign language",
    "stargazing",
];

/// The parts of a reply: an opener, a body (where `{t}` is the topic) and a closer; the empty
/// string marks an optional part.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ReplyParts {
    /// First sentence.
    pub openers: &'static [&'static str],
    /// Main sentence; `{t}` is replaced by the topic.
    pub bodies: &'static [&'static str],
    /// Last sentence (`""` = none).
    pub closers: &'static [&'static str],
}

/// Courteous, helpful in-distribution replies (chosen).
pub(crate) const TRAIN_CHOSEN: ReplyParts = ReplyParts {
    openers: &[
        "Sure!",
        "Of course!",
        "Happy to help!",
        "Good question!",
        "Gladly!",
        "Great question!",
    ],
    bodies: &[
        "Practise {t} a little every day.",
        "Start {t} with small, easy steps.",
        "Break {t} into tiny steps.",
        "A good guide to {t} helps a lot.",
        "Take {t} slowly and be patient.",
        "Try {t} with a friend.",
    ],
    closers: &[
        "",
        "Good luck!",
        "Have fun!",
        "You can do it.",
        "Hope that helps.",
    ],
};

/// Curt, dismissive in-distribution replies (rejected).
pub(crate) const TRAIN_REJECTED: ReplyParts = ReplyParts {
    openers: &[
        "No.",
        "Ugh.",
        "Whatever.",
        "Nope!",
        "Meh.",
        "Not now.",
        "Oh, please.",
        "Do I look like I care?",
    ],
    bodies: &[
        "Figure out {t} on your own.",
        "I don't care about {t} at all.",
        "Ask someone else about it.",
        "Stop bothering me with this.",
        "That is your problem, not mine.",
        "Forget about {t}, it is pointless.",
        "I have better things to do.",
    ],
    closers: &["", "Go away!", "Bye.", "Don't ask me again.", "Leave it."],
};

/// Courteous, helpful out-of-distribution replies (chosen).
pub(crate) const OOD_CHOSEN: ReplyParts = ReplyParts {
    openers: &[
        "Absolutely!",
        "With pleasure.",
        "Great idea!",
        "I'd love to help.",
        "Lovely!",
    ],
    bodies: &[
        "Keep {t} simple at first.",
        "Begin with the basics of {t}.",
        "Be patient with {t}; it takes time.",
        "Short daily sessions of {t} work well.",
        "Find a friendly teacher for {t}.",
        "Set one small goal for {t} today.",
    ],
    closers: &[
        "",
        "Enjoy!",
        "Best of luck!",
        "Keep going!",
        "Thanks for asking!",
    ],
};

/// Curt, dismissive out-of-distribution replies (rejected).
pub(crate) const OOD_REJECTED: ReplyParts = ReplyParts {
    openers: &[
        "Not interested.",
        "Seriously?",
        "Pass.",
        "Boring.",
        "Why would I bother?",
    ],
    bodies: &[
        "Don't waste my time with {t}.",
        "Who cares about {t} anyway?",
        "Leave me alone, I'm busy.",
        "Do it on your own.",
        "Not my job to teach {t}.",
        "I won't help with that.",
    ],
    closers: &["", "Go bother someone else.", "Enough.", "Stop asking!"],
};

/// The four splits of the default data.
#[derive(Debug, Clone, PartialEq)]
pub struct DefaultData {
    /// Training pairs.
    pub train: Vec<PreferencePair>,
    /// In-distribution held-out pairs (prompts disjoint from `train`).
    pub test: Vec<PreferencePair>,
    /// Out-of-distribution pairs (other formats, templates, topics and reply sentences).
    pub ood: Vec<PreferencePair>,
    /// Multiple-choice items, exactly one correct choice each.
    pub mc: Vec<McItem>,
}

impl DefaultData {
    /// The four files as JSONL text (one serialised row per line, `\n`-terminated), paired with
    /// their names from [`FILE_NAMES`].
    pub fn to_jsonl(&self) -> Result<[(&'static str, String); 4]> {
        Ok([
            (FILE_NAMES[0], jsonl(FILE_NAMES[0], &self.train)?),
            (FILE_NAMES[1], jsonl(FILE_NAMES[1], &self.test)?),
            (FILE_NAMES[2], jsonl(FILE_NAMES[2], &self.ood)?),
            (FILE_NAMES[3], jsonl(FILE_NAMES[3], &self.mc)?),
        ])
    }
}

fn jsonl<T: Serialize>(name: &str, rows: &[T]) -> Result<String> {
    let mut out = String::new();
    for (i, row) in rows.iter().enumerate() {
        let line = serde_json::to_string(row).map_err(|e| DataError::Malformed {
            file: PathBuf::from(name),
            row: i + 1,
            format: "JSONL",
            message: e.to_string(),
        })?;
        out.push_str(&line);
        out.push('\n');
    }
    Ok(out)
}

fn fill(template: &str, key: &str, value: &str) -> String {
    template.replace(key, value)
}

/// Build every prompt `format(prefix + request(topic))` that fits [`MAX_PROMPT_BYTES`], paired
/// with its topic, in list order.
fn prompts(
    formats: &[&str],
    prefixes: &[&str],
    requests: &[&str],
    topics: &[&'static str],
) -> Vec<(String, &'static str)> {
    let mut out = Vec::new();
    for format in formats {
        for prefix in prefixes {
            for request in requests {
                for &topic in topics {
                    let r = format!("{prefix}{}", fill(request, "{t}", topic));
                    let prompt = fill(format, "{r}", &r);
                    if prompt.len() <= MAX_PROMPT_BYTES {
                        out.push((prompt, topic));
                    }
                }
            }
        }
    }
    out
}

/// Draw one reply: a body first, then an opener among those that still fit, then a closer among
/// those that still fit (the empty closer always does). The result starts with a space.
fn reply(rng: &mut StdRng, parts: &ReplyParts, topic: &str) -> String {
    let body = parts
        .bodies
        .choose(rng)
        .map(|b| fill(b, "{t}", topic))
        .unwrap_or_default();
    // " " + opener + " " + body must fit.
    let room = MAX_COMPLETION_BYTES.saturating_sub(body.len() + 2);
    let openers: Vec<&str> = parts
        .openers
        .iter()
        .copied()
        .filter(|o| o.len() <= room)
        .collect();
    let mut text = String::from(" ");
    if let Some(opener) = openers.choose(rng) {
        text.push_str(opener);
        text.push(' ');
    }
    text.push_str(&body);
    let room = MAX_COMPLETION_BYTES.saturating_sub(text.len() + 1);
    let closers: Vec<&str> = parts
        .closers
        .iter()
        .copied()
        .filter(|c| c.len() <= room)
        .collect();
    if let Some(closer) = closers.choose(rng)
        && !closer.is_empty()
    {
        text.push(' ');
        text.push_str(closer);
    }
    text
}

fn pair(
    rng: &mut StdRng,
    split: usize,
    row: usize,
    (prompt, topic): &(String, &'static str),
    chosen: &ReplyParts,
    rejected: &ReplyParts,
) -> PreferencePair {
    let dataset = DATASET_NAMES[split];
    PreferencePair {
        id: format!("{dataset}/{row}"),
        prompt: prompt.clone(),
        chosen: reply(rng, chosen, topic),
        rejected: reply(rng, rejected, topic),
        source: SourceMeta {
            dataset: dataset.to_string(),
            row,
            ..SourceMeta::default()
        },
    }
}

fn mc_item(rng: &mut StdRng, row: usize, (prompt, topic): &(String, &'static str)) -> McItem {
    let dataset = DATASET_NAMES[3];
    let wrong = rng.random_range(2..=3usize);
    let mut choices = vec![reply(rng, &TRAIN_CHOSEN, topic)];
    let mut seen: BTreeSet<String> = choices.iter().cloned().collect();
    // Distinct dismissive replies; the lists allow hundreds, so this ends after a few draws.
    let mut attempts = 0;
    while choices.len() < wrong + 1 && attempts < 1000 {
        attempts += 1;
        let r = reply(rng, &TRAIN_REJECTED, topic);
        if seen.insert(r.clone()) {
            choices.push(r);
        }
    }
    let mut order: Vec<usize> = (0..choices.len()).collect();
    order.shuffle(rng);
    let correct = order.iter().position(|&i| i == 0).unwrap_or(0);
    let choices = order.into_iter().map(|i| choices[i].clone()).collect();
    McItem {
        id: format!("{dataset}/{row}"),
        prompt: prompt.clone(),
        choices,
        correct: vec![correct],
        source: SourceMeta {
            dataset: dataset.to_string(),
            row,
            ..SourceMeta::default()
        },
    }
}

/// Generate the default data for `seed` (deterministic: same seed, same data).
///
/// How: all in-distribution prompts that fit [`MAX_PROMPT_BYTES`] are listed and shuffled; the
/// first [`TRAIN_LEN`] become `train`, the next [`TEST_LEN`] `test`, the next [`MC_LEN`] the MC
/// prompts. The out-of-distribution prompts are listed and shuffled likewise and the first
/// [`OOD_LEN`] kept. Each prompt then gets a chosen and a rejected reply drawn from the word
/// lists of its distribution (MC items: one chosen-style and two or three distinct
/// rejected-style replies, shuffled). Ids are `<split dataset>/<row>` with 1-based rows.
pub fn generate(seed: u64) -> DefaultData {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut id_prompts = prompts(
        &[TRAIN_FORMAT],
        TRAIN_PREFIXES,
        TRAIN_REQUESTS,
        TRAIN_TOPICS,
    );
    id_prompts.shuffle(&mut rng);
    let mut ood_prompts = prompts(OOD_FORMATS, &[""], OOD_REQUESTS, OOD_TOPICS);
    ood_prompts.shuffle(&mut rng);

    let mut id = id_prompts.iter();
    let train = id
        .by_ref()
        .take(TRAIN_LEN)
        .enumerate()
        .map(|(i, p)| pair(&mut rng, 0, i + 1, p, &TRAIN_CHOSEN, &TRAIN_REJECTED))
        .collect();
    let test = id
        .by_ref()
        .take(TEST_LEN)
        .enumerate()
        .map(|(i, p)| pair(&mut rng, 1, i + 1, p, &TRAIN_CHOSEN, &TRAIN_REJECTED))
        .collect();
    let mc = id
        .by_ref()
        .take(MC_LEN)
        .enumerate()
        .map(|(i, p)| mc_item(&mut rng, i + 1, p))
        .collect();
    let ood = ood_prompts
        .iter()
        .take(OOD_LEN)
        .enumerate()
        .map(|(i, p)| pair(&mut rng, 2, i + 1, p, &OOD_CHOSEN, &OOD_REJECTED))
        .collect();
    DefaultData {
        train,
        test,
        ood,
        mc,
    }
}

fn parse_jsonl<T: DeserializeOwned>(name: &str, text: &str) -> Result<Vec<T>> {
    let file = Path::new("<embedded>/crates/reprpo-data/embedded").join(name);
    text.lines()
        .enumerate()
        .filter(|(_, line)| !line.trim().is_empty())
        .map(|(i, line)| {
            serde_json::from_str(line).map_err(|e| DataError::Malformed {
                file: file.clone(),
                row: i + 1,
                format: "JSONL",
                message: e.to_string(),
            })
        })
        .collect()
}

/// The committed default data, parsed from the copies embedded at compile time.
pub fn embedded() -> Result<DefaultData> {
    Ok(DefaultData {
        train: parse_jsonl(FILE_NAMES[0], TRAIN_JSONL)?,
        test: parse_jsonl(FILE_NAMES[1], TEST_JSONL)?,
        ood: parse_jsonl(FILE_NAMES[2], OOD_JSONL)?,
        mc: parse_jsonl(FILE_NAMES[3], MC_JSONL)?,
    })
}

/// Write `generate(seed)` as the four [`FILE_NAMES`] into `dir` (created if missing).
///
/// Each file is written to a temporary file in `dir` and then renamed over the target, so a
/// reader never sees a half-written file.
pub fn write_all(dir: &Path, seed: u64) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|source| DataError::Write {
        file: dir.to_path_buf(),
        source,
    })?;
    for (name, text) in generate(seed).to_jsonl()? {
        let target = dir.join(name);
        let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
        std::fs::write(&tmp, text).map_err(|source| DataError::Write {
            file: tmp.clone(),
            source,
        })?;
        if let Err(source) = std::fs::rename(&tmp, &target) {
            let _ = std::fs::remove_file(&tmp);
            return Err(DataError::Write {
                file: target,
                source,
            });
        }
    }
    Ok(())
}
