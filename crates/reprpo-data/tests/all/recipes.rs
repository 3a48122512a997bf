//! Tests of dataset recipes: the committed `datasets/*.toml` parse, bad recipes are errors that
//! name the file and key, unknown names list the known ones, mixtures are deterministic per seed
//! and respect `sample`, and hub sources go to the resolver.

// Helpers outside `#[test]` functions may fail loudly too: this is test code.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::cell::RefCell;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use reprpo_data::recipe::{self, HubSource, Recipe, Source};
use reprpo_data::{Converter, DataError, PreferencePair};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn datasets() -> PathBuf {
    root().join("datasets")
}

fn no_hub(h: &HubSource) -> reprpo_data::Result<Vec<PathBuf>> {
    panic!("unexpected hub request for {h}")
}

fn recipe(name: &str) -> Recipe {
    recipe::resolve(&[name.to_string()], &datasets())
        .unwrap()
        .remove(0)
}

#[test]
fn all_committed_recipes_parse() {
    let all = recipe::load_dir(&datasets()).unwrap();
    let expected = [
        "default",
        "default-test",
        "default-ood",
        "default-mc",
        "hh-harmless-test",
        "truthfulqa-mc1",
        "truthfulqa-mc2",
        "sycophancy-liberal",
        "sycophancy-conservative",
        "genies-alpaca-mmlu-train",
        "genies-truthful-qa-test",
        "genies-us-history-textbook-train",
        "genies-us-history-fiction-test",
        "genies-unhelpful-alpaca-train",
        "genies-unhelpful-alpaca-test",
        "genies-illegal-dont-help-test",
        "ethics-justice-test",
        "hh",
        "shp",
        "helpsteer2",
        "truthfulqa-hub",
    ];
    for name in expected {
        assert!(all.contains_key(name), "missing recipe {name}");
    }
    for (name, r) in &all {
        assert_eq!(&r.name, name);
        assert!(
            !r.description.trim().is_empty(),
            "{name} has no description"
        );
        assert!(
            Converter::NAMES.contains(&r.converter_name.as_str()),
            "{name}"
        );
        assert_eq!(r.converter_name.parse::<Converter>().unwrap(), r.converter);
    }
    let d = &all["default"];
    assert_eq!(
        d.source,
        Source::Path(PathBuf::from("crates/reprpo-data/embedded/train.jsonl"))
    );
    assert_eq!(d.converter, Converter::Pairs);
    assert_eq!(d.seed, recipe::DEFAULT_RECIPE_SEED);
    assert_eq!(d.sample, None);
    assert_eq!(all["default-mc"].converter, Converter::Mc);
    // Every default recipe's file exists (they are committed).
    for name in ["default", "default-test", "default-ood", "default-mc"] {
        let path = all[name].local_path(&root()).unwrap();
        assert!(path.is_file(), "{}", path.display());
    }
    let hub = |name: &str| match &all[name].source {
        Source::Hub(h) => h.clone(),
        Source::Path(p) => panic!("{name} is a path recipe: {}", p.display()),
    };
    assert_eq!(
        hub("truthfulqa-hub"),
        HubSource {
            repo: "truthfulqa/truthful_qa".into(),
            config: "multiple_choice".into(),
            split: "validation".into()
        }
    );
    assert_eq!(hub("hh").repo, "Anthropic/hh-rlhf");
    assert_eq!(all["hh"].converter, Converter::HhRlhf);
    assert_eq!(hub("shp").repo, "stanfordnlp/SHP");
    assert_eq!(hub("helpsteer2").repo, "nvidia/HelpSteer2");
    assert_eq!(all["helpsteer2"].converter_name, "helpsteer-score-random");
}

/// Parse `text` as recipe file `bad.toml` and return the (file, key, problem) of the error.
fn config_error(text: &str) -> (PathBuf, String, String) {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bad.toml");
    std::fs::write(&file, text).unwrap();
    match recipe::load_dir(dir.path()) {
        Err(DataError::Config { file, key, problem }) => (file, key, problem),
        other => panic!("expected a Config error for {text:?}, got {other:?}"),
    }
}

#[test]
fn unknown_keys_are_errors_naming_the_file_and_key() {
    let (file, key, problem) =
        config_error("converter = \"pairs\"\ncolour = \"blue\"\n[source]\npath = \"x.jsonl\"\n");
    assert!(file.ends_with("bad.toml"), "{}", file.display());
    assert_eq!(key, "colour");
    assert!(problem.contains("colour"), "{problem}");
    let err = DataError::Config { file, key, problem }.to_string();
    assert!(
        err.contains("bad.toml") && err.contains("`colour`"),
        "{err}"
    );

    let (_, key, _) =
        config_error("converter = \"pairs\"\n[source]\npath = \"x.jsonl\"\nbranch = \"main\"\n");
    assert_eq!(key, "source.branch");
    let (_, key, _) =
        config_error("converter = \"pairs\"\nsource = { hub = \"a/b\", revision = \"main\" }\n");
    assert_eq!(key, "source.revision");
    let (_, key, _) =
        config_error("converter = \"pairs\"\nsource.path = \"x.jsonl\"\nsource.rev = 2\n");
    assert_eq!(key, "source.rev");
    // A top-level key written below `[source]` belongs to the source table: say so.
    let (_, key, _) =
        config_error("converter = \"pairs\"\n[source]\npath = \"x.jsonl\"\nsample = 3\n");
    assert_eq!(key, "source.sample");
    // Malformed TOML is a Config error too, at the line's key.
    let (_, key, problem) = config_error("converter = = \"pairs\"\n");
    assert_eq!(key, "converter", "{problem}");
}

#[test]
fn invalid_recipes_are_errors_naming_the_key() {
    let cases = [
        ("[source]\npath = \"x.jsonl\"\n", "converter"),
        ("converter = \"pairs\"\n", "source"),
        (
            "converter = \"pairs\"\n[source]\npath = \"x.jsonl\"\nhub = \"a/b\"\n",
            "source",
        ),
        (
            "converter = \"pairs\"\n[source]\nsplit = \"train\"\n",
            "source",
        ),
        (
            "converter = \"pairs\"\n[source]\npath = \"x.jsonl\"\nsplit = \"test\"\n",
            "source.split",
        ),
        (
            "converter = \"nonsense\"\n[source]\npath = \"x.jsonl\"\n",
            "converter",
        ),
        (
            "converter = \"pairs\"\nsample = 0\n[source]\npath = \"x.jsonl\"\n",
            "sample",
        ),
        (
            "converter = \"pairs\"\nsample = \"ten\"\n[source]\npath = \"x.jsonl\"\n",
            "sample",
        ),
        (
            "converter = \"pairs\"\nseed = -1\n[source]\npath = \"x.jsonl\"\n",
            "seed",
        ),
    ];
    for (text, want) in cases {
        let (_, key, problem) = config_error(text);
        assert_eq!(key, want, "for {text:?}: {problem}");
        assert!(!problem.is_empty());
    }
    let (_, _, problem) = config_error("converter = \"nonsense\"\n[source]\npath = \"x.jsonl\"\n");
    assert!(
        problem.contains("nonsense") && problem.contains("hh-rlhf"),
        "{problem}"
    );
}

#[test]
fn hub_defaults_are_default_config_and_train_split() {
    let r = Recipe::parse(
        "x",
        Path::new("x.toml"),
        "converter = \"shp\"\nsource = { hub = \"stanfordnlp/SHP\" }\n",
    )
    .unwrap();
    assert_eq!(
        r.source,
        Source::Hub(HubSource {
            repo: "stanfordnlp/SHP".into(),
            config: "default".into(),
            split: "train".into()
        })
    );
    assert_eq!(r.seed, 42);
    assert_eq!(r.local_path(Path::new("/w")), None);
}

#[test]
fn unknown_recipe_name_lists_the_known_ones() {
    let err = recipe::resolve(&["default".into(), "no-such-data".into()], &datasets()).unwrap_err();
    match &err {
        DataError::UnknownRecipe { name, known } => {
            assert_eq!(name, "no-such-data");
            for k in ["default", "default-test", "hh", "shp", "truthfulqa-mc1"] {
                assert!(known.split(", ").any(|n| n == k), "{known}");
            }
        }
        other => panic!("expected UnknownRecipe, got {other:?}"),
    }
    assert!(err.to_string().contains("no-such-data"));
}

#[test]
fn resolve_keeps_the_requested_order() {
    let names: Vec<String> = ["default-test", "default", "hh"].map(String::from).to_vec();
    let got: Vec<String> = recipe::resolve(&names, &datasets())
        .unwrap()
        .into_iter()
        .map(|r| r.name)
        .collect();
    assert_eq!(got, names);
}

fn ids(pairs: &[PreferencePair]) -> Vec<&str> {
    pairs.iter().map(|p| p.id.as_str()).collect()
}

fn with(name: &str, sample: Option<usize>, seed: u64) -> Recipe {
    let mut r = recipe(name);
    r.sample = sample;
    r.seed = seed;
    r
}

#[test]
fn mixture_is_deterministic_per_seed_and_respects_sample() {
    let mix = |seed: u64| {
        let recipes = [
            with("default", Some(50), seed),
            with("default-test", Some(20), seed),
            with("default-mc", Some(10), seed),
        ];
        recipe::load_mixture(&recipes, &root(), &no_hub).unwrap()
    };
    let a = mix(1);
    assert_eq!(a.pairs.len(), 70);
    assert_eq!(a.mc.len(), 10);
    let from = |prefix: &str| a.pairs.iter().filter(|p| p.id.starts_with(prefix)).count();
    assert_eq!(from("default-train/"), 50);
    assert_eq!(from("default-test/"), 20);
    // Same seed: identical; another seed: another order (and another sample).
    assert_eq!(mix(1), a);
    let b = mix(2);
    assert_eq!(b.pairs.len(), 70);
    assert_ne!(ids(&a.pairs), ids(&b.pairs));
    // Recipe order in the concatenation does not survive the final shuffle.
    let first_test = a
        .pairs
        .iter()
        .position(|p| p.id.starts_with("default-test/"))
        .unwrap();
    assert!(first_test < 50, "the mixture was not shuffled");

    // An explicit mixture seed reorders the same selection.
    let recipes = [
        with("default", Some(50), 1),
        with("default-test", Some(20), 1),
    ];
    let s1 = recipe::load_mixture_seeded(&recipes, &root(), &no_hub, 11).unwrap();
    let s2 = recipe::load_mixture_seeded(&recipes, &root(), &no_hub, 12).unwrap();
    assert_ne!(ids(&s1.pairs), ids(&s2.pairs));
    let set = |c: &reprpo_data::Converted| -> BTreeSet<String> {
        c.pairs.iter().map(|p| p.id.clone()).collect()
    };
    assert_eq!(set(&s1), set(&s2));
    assert_eq!(
        recipe::load_mixture(&recipes, &root(), &no_hub).unwrap(),
        recipe::load_mixture_seeded(&recipes, &root(), &no_hub, recipe::mixture_seed(&recipes))
            .unwrap()
    );
}

#[test]
fn a_recipe_without_sample_keeps_every_row() {
    let c = recipe::load_recipe(&recipe("default-test"), &root(), &no_hub).unwrap();
    let expected = reprpo_data::default_data::generate(reprpo_data::default_data::DEFAULT_SEED);
    assert_eq!(c.pairs, expected.test);
    let c = recipe::load_recipe(&recipe("default-mc"), &root(), &no_hub).unwrap();
    assert_eq!(c.mc, expected.mc);
}

#[test]
fn hub_recipes_go_to_the_resolver() {
    // The committed hub recipe reaches the resolver with its id, config and split; the
    // resolver's error is passed on.
    let seen = RefCell::new(Vec::new());
    let refuse = |h: &HubSource| -> reprpo_data::Result<Vec<PathBuf>> {
        seen.borrow_mut().push(h.clone());
        Err(DataError::Hub {
            repo: h.repo.clone(),
            message: "offline in tests".into(),
        })
    };
    let err = recipe::load_mixture(&[recipe("truthfulqa-hub")], &root(), &refuse).unwrap_err();
    assert!(matches!(err, DataError::Hub { .. }), "{err:?}");
    assert_eq!(
        seen.borrow().as_slice(),
        [HubSource {
            repo: "truthfulqa/truthful_qa".into(),
            config: "multiple_choice".into(),
            split: "validation".into()
        }]
    );

    // Files from the resolver are read and converted in order; several files get
    // `<name>.<i>` as their dataset so that ids stay unique.
    let dir = tempfile::tempdir().unwrap();
    let shard = |i: usize| {
        let path = dir.path().join(format!("shard-{i}.jsonl"));
        let rows: String = (0..3)
            .map(|k| {
                format!("{{\"prompt\":\"p{i}{k}\",\"chosen\":\" yes\",\"rejected\":\" no\"}}\n")
            })
            .collect();
        std::fs::write(&path, rows).unwrap();
        path
    };
    let files = vec![shard(1), shard(2)];
    let local = |h: &HubSource| -> reprpo_data::Result<Vec<PathBuf>> {
        assert_eq!(h.repo, "someone/prefs");
        assert_eq!(h.config, "v2");
        assert_eq!(h.split, "test");
        Ok(files.clone())
    };
    let r = Recipe::parse(
        "prefs",
        Path::new("prefs.toml"),
        "converter = \"pairs\"\n[source]\nhub = \"someone/prefs\"\nconfig = \"v2\"\nsplit = \"test\"\n",
    )
    .unwrap();
    let c = recipe::load_recipe(&r, &root(), &local).unwrap();
    assert_eq!(
        ids(&c.pairs),
        [
            "prefs.1/1",
            "prefs.1/2",
            "prefs.1/3",
            "prefs.2/1",
            "prefs.2/2",
            "prefs.2/3"
        ]
    );
    assert_eq!(c.pairs[3].prompt, "p20");

    let none = |_: &HubSource| -> reprpo_data::Result<Vec<PathBuf>> { Ok(vec![]) };
    let err = recipe::load_recipe(&r, &root(), &none).unwrap_err();
    assert!(matches!(err, DataError::Hub { .. }), "{err:?}");
}

/// The recipes over `../shared/data` load (a few rows each). Prints a "skipped" line when the
/// data is absent; panics then if `CI=true`.
#[test]
fn shared_data_recipes_load() {
    let all = recipe::load_dir(&datasets()).unwrap();
    let shared: Vec<&Recipe> = all
        .values()
        .filter(|r| matches!(&r.source, Source::Path(p) if p.starts_with("../shared/data")))
        .collect();
    assert!(shared.len() >= 9, "{} shared-data recipes", shared.len());
    for r in shared {
        let path = r.local_path(&root()).unwrap();
        if !path.is_file() {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "{} is missing on CI",
                path.display()
            );
            println!("skipped {}: {} is absent", r.name, path.display());
            continue;
        }
        let mut small = r.clone();
        small.sample = Some(5);
        let c = recipe::load_recipe(&small, &root(), &no_hub)
            .unwrap_or_else(|e| panic!("recipe {}: {e}", r.name));
        assert!(
            !c.pairs.is_empty() || !c.mc.is_empty(),
            "recipe {} gave nothing",
            r.name
        );
        assert!(c.pairs.len() <= 5 && c.mc.len() <= 5);
        println!(
            "{}: {} pairs, {} mc items (sample 5)",
            r.name,
            c.pairs.len(),
            c.mc.len()
        );
    }
}
